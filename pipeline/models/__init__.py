"""The architectures the pipeline can build (`create_model`: registry names, `torchvision/<name>`, `timm/<name>` or
a factory's dotted path, see `sources`), and how to register one (`register_model`).

Importing the package imports every architecture module once, for the side effect of its `@register_model`
decorators; the modules themselves import only `pipeline.models.registry`, so imports point one way.
"""

from pipeline.models import cifar_resnet, cifar_vgg, mlp, torchvision_models  # noqa: F401
from pipeline.models.registry import available_models, check_choice, check_positive, register_model
from pipeline.models.sources import check_model_name, create_model, model_spec

__all__ = ["available_models", "check_choice", "check_model_name", "check_positive", "create_model", "model_spec",
           "register_model"]
