"""A name -> builder registry, so configs, the CLI and the tools can name models by string."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from torch import nn

__all__ = ["builder_arguments", "forwards_kwargs", "register_model", "get_model", "list_models", "model_task"]

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


def forwards_kwargs(target: Callable[..., nn.Module], fixed: Sequence[str] = ()) -> Callable[[Builder], Builder]:
    """Decorator for a builder that passes ``**kwargs`` on to ``target`` (a model class).

    The builder's signature becomes its own arguments plus every argument of ``target`` that has a
    default (keyword-only, less ``fixed``: those the builder sets itself), so ``help()``,
    ``inspect.signature`` and :func:`builder_arguments` show and check every argument a caller
    can give, and a checkpoint can record all of them.
    """

    def wrap(fn: Builder) -> Builder:
        own = inspect.signature(fn)
        params = [p for p in own.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        names = {p.name for p in params}
        extra = [
            p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
            for p in inspect.signature(target).parameters.values()
            if p.default is not inspect.Parameter.empty and p.name not in names and p.name not in fixed
            and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        ]
        fn.__signature__ = own.replace(parameters=params + extra)
        return fn

    return wrap


def list_models(task: str | None = None) -> list[str]:
    """Names of the registered builders, optionally only those for ``task`` (``"image"``, ``"video"`` or
    ``"segmentation"``)."""
    if task is not None and task not in set(_TASKS.values()):
        raise ValueError(f"unknown task {task!r}; tasks: {', '.join(sorted(set(_TASKS.values())))}")
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


def builder_arguments(
    name: str, kwargs: Mapping[str, Any] | None = None, omit: Sequence[str] = (),
) -> dict[str, Any]:
    """Every keyword argument of the builder ``name``: ``kwargs`` over the builder's defaults.

    A checkpoint that records this dict rebuilds the same network even when a builder's default
    changes later (``oct_unet3d``'s ``base_width`` went from 16 to 32). Arguments named in
    ``omit`` (those the caller passes itself, such as ``num_classes``) are left out; tuples
    become lists, so the dict stays plain YAML and ``weights_only`` checkpoint data. A builder
    that takes ``**kwargs`` keeps the extra keys as given.

    Raises:
        ValueError: an unknown model, or a key the builder does not take.
    """
    builder = get_builder(name)
    kwargs = dict(kwargs or {})
    parameters = inspect.signature(builder).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    named = [k for k, p in parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = sorted(set(kwargs) - set(named))
    if unknown and not takes_any:
        raise ValueError(f"{name} takes no argument(s) {unknown}; its arguments are {named}")
    resolved = {k: kwargs.get(k, parameters[k].default) for k in named if k not in omit}
    resolved = {k: v for k, v in resolved.items() if v is not inspect.Parameter.empty}
    resolved.update({k: kwargs[k] for k in unknown if k not in omit})
    return {k: list(v) if isinstance(v, tuple) else v for k, v in resolved.items()}
