"""String names for quantisers: ``register`` a class, ``create`` one by name and role.

A method name (``"lsq"``) may have one class per role: weights and activations often need
different rules (signed vs unsigned, per-channel vs per-sample scales).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from .base import Quantizer, Role

ROLES: tuple[Role, ...] = ("weight", "activation")
_REGISTRY: dict[str, dict[str, type[Quantizer]]] = {}


def register(
    name: str, roles: tuple[Role, ...] = ROLES
) -> Callable[[type[Quantizer]], type[Quantizer]]:
    """Class decorator: make ``cls`` the quantiser for method ``name`` in each of ``roles``."""

    def deco(cls: type[Quantizer]) -> type[Quantizer]:
        slots = _REGISTRY.setdefault(name, {})
        for role in roles:
            if role not in ROLES:
                raise ValueError(f"unknown role {role!r}; expected one of {ROLES}")
            if role in slots and slots[role] is not cls:
                raise ValueError(f"method {name!r} already has a {role} quantiser: {slots[role]}")
            slots[role] = cls
        cls.method = name
        if len(roles) == 1:
            cls.role = roles[0]
        return cls

    return deco


def methods() -> list[str]:
    """Registered method names, sorted."""
    return sorted(_REGISTRY)


def roles_of(name: str) -> tuple[str, ...]:
    """The roles (``weight``, ``activation``) that method ``name`` can quantise."""
    return tuple(r for r in ROLES if r in _lookup(name))


def get(name: str, role: Role) -> type[Quantizer]:
    """The quantiser class registered for ``name`` and ``role``."""
    slots = _lookup(name)
    if role not in slots:
        can = ", ".join(slots) or "nothing"
        raise ValueError(f"method {name!r} cannot quantise {role}s (it quantises: {can})")
    return slots[role]


def create(name: str, role: Role, **kwargs: Any) -> Quantizer:
    """Instantiate the ``role`` quantiser of method ``name`` with keyword options.

    Classes that serve both roles take a ``role`` argument, passed here. An option the class does
    not take is an error that names it and lists the valid ones.
    """
    cls = get(name, role)
    params = inspect.signature(cls.__init__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    valid = [
        p for p in params if p != "self" and params[p].kind is not inspect.Parameter.VAR_KEYWORD
    ]
    if "role" in valid:
        kwargs = {"role": role, **kwargs}
    unknown = [k for k in kwargs if k not in valid]
    if unknown and not takes_any:
        raise ValueError(
            f"{name} ({role}) has no option {', '.join(map(repr, unknown))}; "
            f"valid options: {', '.join(valid) or 'none'}"
        )
    return cls(**kwargs)


def _lookup(name: str) -> dict[str, type[Quantizer]]:
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown quantisation method {name!r}; registered: {', '.join(methods())}"
        )
    return _REGISTRY[name]
