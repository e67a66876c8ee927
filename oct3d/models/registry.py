"""A name -> builder registry, so configs, the CLI and the tools can name models by string."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from torch import nn

__all__ = ["register_model", "get_model", "list_models", "model_task"]

Builder = TypeVar("Builder", bound=Callable[..., nn.Module])

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_TASKS: dict[str, str] = {}
TASKS = ("image", "video", "segmentation")


def register_model(task: str) -> Callable[[Builder], Builder]:
    """Decorator: register a builder under its function name for ``task`` (image, video, segmentation)."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")

    def wrap(fn: Builder) -> Builder:
        _MODELS[fn.__name__] = fn
        _TASKS[fn.__name__] = task
        return fn

    return wrap


def list_models(task: str | None = None) -> list[str]:
    """Names of the registered builders, optionally only those for ``task``."""
    return sorted(n for n in _MODELS if task is None or _TASKS[n] == task)


def model_task(name: str) -> str:
    """The task (image, video, segmentation) of a registered builder."""
    get_builder(name)
    return _TASKS[name]


def get_builder(name: str) -> Callable[..., nn.Module]:
    """The builder registered as ``name``; a clear error lists the known names otherwise."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    return _MODELS[name]


def get_model(name: str, **kwargs) -> nn.Module:
    """Build the registered model ``name`` with ``kwargs`` (e.g. ``alpha=0.5, num_classes=400``)."""
    return get_builder(name)(**kwargs)
