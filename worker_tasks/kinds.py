"""Whether JSON read from Redis is of the kind a record declares.

Anyone who can write to Redis can rewrite a record with valid JSON of another kind
(``"attempts": "abc"``, ``"copy": 5``). Readers keep only the fields that are of the kind their
dataclass (or table) declares, and read the others as no field, as ``tracking.decode`` reads a
field that is not JSON. The checks are built once per type hint: a reader of 100,000 records
pays about a tenth of a microsecond a field.

Kinds understood: ``int``, ``float`` (an int too: JSON writes 2.0 as 2), ``str``, ``bool``,
``None``, ``Any``, a ``StrEnum`` (one of its values), ``list[...]``, ``dict[str, ...]``, and
unions of them; any other class by ``isinstance`` (JSON never makes one).
"""

from __future__ import annotations

import functools
import types
import typing
from collections.abc import Callable, Mapping
from enum import StrEnum
from typing import Any

Check = Callable[[Any], bool]


def fits(value: Any, hint: Any) -> bool:
    """Whether ``value`` (read from JSON) is of the kind ``hint`` names."""
    return check_for(hint)(value)


def of_kind(cls: type, values: Mapping[str, Any]) -> dict[str, Any]:
    """The ``values`` that are of the kind dataclass ``cls`` declares for them; others, and
    names it does not declare, left out."""
    checks = checks_of(cls)
    return {name: value for name, value in values.items()
            if name in checks and checks[name](value)}


@functools.cache
def checks_of(cls: type) -> dict[str, Check]:
    """Each field of dataclass ``cls`` and the check of its kind."""
    return {name: check_for(hint) for name, hint in typing.get_type_hints(cls).items()}


@functools.cache
def check_for(hint: Any) -> Check:
    """The check of one kind (see the module's docstring), built once."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        plain = frozenset(arg for arg in args if arg in SCALARS)
        others = [check_for(arg) for arg in args if arg not in SCALARS]
        allowed = frozenset().union(*(SCALARS[arg] for arg in plain))
        return lambda value: type(value) in allowed or any(check(value) for check in others)
    if hint in SCALARS:
        allowed = SCALARS[hint]
        return lambda value: type(value) in allowed
    if hint is Any:
        return lambda value: True
    if origin is list:
        item = check_for(args[0])
        return lambda value: type(value) is list and all(map(item, value))
    if origin is dict:
        item = check_for(args[1])
        return lambda value: type(value) is dict and all(map(item, value.values()))
    if isinstance(hint, type) and issubclass(hint, StrEnum):
        names = frozenset(member.value for member in hint)
        return lambda value: isinstance(value, str) and value in names
    if isinstance(hint, type):  # no JSON kind (a record's list of other records): by class
        return lambda value: isinstance(value, hint)
    raise TypeError(f"no check for the kind {hint!r}")


# The Python types JSON reads as each scalar kind (``bool`` is no ``int`` here).
SCALARS: dict[Any, frozenset[type]] = {
    int: frozenset({int}), float: frozenset({int, float}), str: frozenset({str}),
    bool: frozenset({bool}), type(None): frozenset({type(None)}),
}
