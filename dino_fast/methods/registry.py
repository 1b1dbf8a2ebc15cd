"""The method registry: ``method.name`` -> :class:`~dino_fast.methods.base.Method` subclass.

Built-in methods are imported on first use (their module path is listed here), so that
importing the registry stays cheap; a method of another package registers itself with
:func:`register_method` when its module is imported.
"""
from __future__ import annotations

import importlib
from typing import Callable, TypeVar

from dino_fast.config import ConfigError, TrainConfig
from dino_fast.methods.base import Method

__all__ = ["METHODS", "register_method", "method_names", "get_method", "build_method"]

M = TypeVar("M", bound=type)
METHODS: dict[str, type[Method]] = {}
# built-in methods: name -> module that registers it (imported by get_method on first use)
_BUILTIN = {"dino": "dino_fast.methods.dino", "dinov2": "dino_fast.methods.dinov2", "mugs": "dino_fast.methods.mugs"}


def register_method(name: str) -> Callable[[M], M]:
    """Class decorator: register a :class:`Method` subclass as ``method.name = name``.

    Raises:
        ValueError: ``name`` is empty or taken by another class; TypeError: not a Method subclass.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"method name must be a non-empty str, got {name!r}")

    def deco(cls: M) -> M:
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise TypeError(f"register_method({name!r}) expects a Method subclass, got {cls!r}")
        other = METHODS.get(name)
        if other is not None and other is not cls:
            raise ValueError(f"method {name!r} is already registered ({other.__module__}.{other.__qualname__})")
        cls.name = name
        METHODS[name] = cls
        return cls

    return deco


def method_names() -> list[str]:
    """Every known method name (built-in and registered), sorted."""
    return sorted(set(METHODS) | set(_BUILTIN))


def get_method(name: str) -> type[Method]:
    """The class registered as ``name`` (importing a built-in method's module on first use).

    Raises:
        ConfigError: no such method (the message lists the known names).
    """
    if name not in METHODS and name in _BUILTIN:
        importlib.import_module(_BUILTIN[name])
    cls = METHODS.get(name)
    if cls is None:
        raise ConfigError(f"method.name must be one of {method_names()}, got {name!r}")
    return cls


def build_method(cfg: TrainConfig) -> Method:
    """``get_method(cfg.method.name)(cfg)``."""
    return get_method(cfg.method.name)(cfg)
