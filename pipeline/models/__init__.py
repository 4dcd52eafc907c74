"""The architectures the pipeline can build, by name (`create_model`), and how to add one (`register_model`).

Importing the package imports every architecture module once, for the side effect of its `@register_model`
decorators; the modules themselves import only `pipeline.models.registry`, so imports point one way.
"""

from pipeline.models import cifar_resnet, cifar_vgg, mlp, torchvision_models  # noqa: F401
from pipeline.models.registry import available_models, check_choice, check_positive, create_model, register_model

__all__ = ["available_models", "check_choice", "check_positive", "create_model", "register_model"]
