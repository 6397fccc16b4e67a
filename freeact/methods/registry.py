"""Methods by name: ``@register_method("name")`` on a :class:`~freeact.methods.base.Method` subclass,
``get_method(name, settings)`` to build one."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .base import Method

_METHODS: dict[str, type["Method"]] = {}


def register_method(name: str):
    def deco(cls):
        cls.name = name
        _METHODS[name] = cls
        return cls

    return deco


def method_names() -> list[str]:
    return sorted(_METHODS)


def get_method(name: str, cfg: dict) -> "Method":
    if name not in _METHODS:
        raise KeyError(f"unknown method {name!r}; known: {method_names()}")
    return _METHODS[name](cfg)
