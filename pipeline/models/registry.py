"""The model registry: architectures by name, built with options checked against each factory's signature.

Factories register themselves with `@register_model("name")` (timm style), so adding an architecture never
touches a dispatch chain. Every factory has the signature
`(num_classes: int, in_channels: int = 3, image_size: int = 32, <model-specific keyword options>)`; the pipeline
passes `in_channels` and `image_size` from the dataset and the rest from `model.options` in params.yaml. Because
those options are hand-written, `create_model` turns every mistake (unknown name, unknown option, wrong type or
value) into a `ConfigError` naming the setting and what it accepts.
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any, Callable, Iterable, TypeVar

from torch import nn

from pipeline.errors import ConfigError

__all__ = ["available_models", "check_choice", "check_positive", "create_model", "register_model"]

ModelFactory = Callable[..., nn.Module]
FactoryT = TypeVar("FactoryT", bound=ModelFactory)

_REGISTRY: dict[str, ModelFactory] = {}
_DATASET_OPTIONS = ("in_channels", "image_size")


def register_model(name: str) -> Callable[[FactoryT], FactoryT]:
    """Register a factory under `name`; a name taken twice is a programming error, so it fails loudly."""

    def decorator(factory: FactoryT) -> FactoryT:
        if name in _REGISTRY:
            raise ValueError(f"Model name '{name}' is registered twice ({_REGISTRY[name].__module__} and "
                             f"{factory.__module__}).")
        _REGISTRY[name] = factory
        return factory

    return decorator


def available_models() -> list[str]:
    """All registered model names, sorted, for error messages and listings."""
    return sorted(_REGISTRY)


def create_model(name: str, num_classes: int, **options: Any) -> nn.Module:
    """Build the model registered as `name`, after checking every option against the factory's signature."""
    factory = _lookup(name)
    accepted = _accepted_options(factory)
    check_positive("num_classes", num_classes)
    for option, value in options.items():
        if option not in accepted:
            raise ConfigError(_unknown_option_message(name, option, accepted))
        _check_option_type(name, option, value, accepted[option].default)
    for option in _DATASET_OPTIONS:
        if option in options:
            check_positive(option, options[option])
    return factory(num_classes, **options)


def check_choice(option: str, value: Any, allowed: Iterable[str]) -> None:
    """Reject a string option outside its fixed set of values, naming the allowed ones."""
    allowed = list(allowed)
    if value not in allowed:
        raise ConfigError(f"Model option '{option}' has the value {value!r}, which is not allowed. Allowed values: "
                          f"{', '.join(repr(choice) for choice in allowed)}. Fix model.options.{option} in "
                          f"params.yaml.")


def check_positive(option: str, value: int) -> None:
    """Reject a size or count that is not a positive integer, since no layer can be built from it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"Model option '{option}' must be a positive integer; it is {value!r}. Fix it in "
                          f"params.yaml (model.options.{option}, or data.* for sizes taken from the dataset).")


def _lookup(name: str) -> ModelFactory:
    """The factory registered as `name`, or a ConfigError listing the names there are."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    close = difflib.get_close_matches(str(name), _REGISTRY, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise ConfigError(f"Unknown model '{name}'.{hint} Available models: {', '.join(available_models())}. "
                      f"Set model.name in params.yaml to one of them.")


def _accepted_options(factory: ModelFactory) -> dict[str, inspect.Parameter]:
    """The keyword options a factory takes: everything in its signature but the class count."""
    parameters = inspect.signature(factory).parameters
    return {option: parameter for option, parameter in parameters.items() if option != "num_classes"}


def _unknown_option_message(name: str, option: str, accepted: dict[str, inspect.Parameter]) -> str:
    """Explain an option the factory does not take, with the closest accepted one and the full list."""
    close = difflib.get_close_matches(option, accepted, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    listing = ", ".join(f"{option_name} (default {parameter.default!r})"
                        for option_name, parameter in accepted.items())
    return (f"Model '{name}' has no option '{option}'.{hint} Accepted options: {listing}. "
            f"Fix model.options in params.yaml.")


def _check_option_type(name: str, option: str, value: Any, default: Any) -> None:
    """Reject a value whose type differs from the option's default (YAML makes `"3"` and `3` easy to mix up)."""
    if default is inspect.Parameter.empty or default is None:
        return
    expected = type(default)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return
    if isinstance(value, bool) != (expected is bool) or not isinstance(value, expected):
        raise ConfigError(f"Model '{name}' option '{option}' must be of type {expected.__name__}; it is {value!r} "
                          f"({type(value).__name__}). Fix model.options.{option} in params.yaml.")
