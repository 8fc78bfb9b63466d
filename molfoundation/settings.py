"""Typed ``KEY=VALUE`` settings (the ``--set`` option) for configuration dataclasses.

A value is parsed by the declared type of its field, read from the dataclass annotations, not
by the type of the field's current value: an ``int | None`` field whose default is None gets an
int from ``2`` and None from ``none``. Text can express None (``none`` or ``null``, for fields
that allow None), bool (``true/false``, ``yes/no``, ``1/0``), int, float, str, tuples of those
(comma-separated items: ``tuple[int, ...]`` or fixed ``tuple[int, str]``) and unions of these.

A configuration is flat (fields only) or has sections: fields whose type is itself a
dataclass, such as ``RunConfig.kfac``. A key is a field of the configuration, ``section.field``,
or a bare field name that exactly one section (or the configuration itself) has. Sections go
one level deep: a dataclass field inside a section (``ansatz.slots``) cannot be set from text,
nor can any field of another type (callables, arrays, dictionaries).

Every mistake is a one-line :class:`~molfoundation.errors.InputError`: an unknown key names the
valid keys, an ambiguous key the candidates, a bad value the key and the expected type, and a
dataclass's own ``__post_init__`` validation names the settings it rejected.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from molfoundation.errors import InputError

Settings = Mapping[str, str] | Iterable[str]
"""``{key: text}`` or ``KEY=VALUE`` strings, as given to ``--set``."""

NONE_TEXTS = ("none", "null")
TRUE_TEXTS = ("true", "yes", "1")
FALSE_TEXTS = ("false", "no", "0")

Path = tuple[str, ...]  # (field,) or (section, field)


def parse_assignments(items: Iterable[str]) -> dict[str, str]:
    """``{key: text}`` from ``KEY=VALUE`` strings; a key given twice is an error (which of the
    two values was meant is a guess)."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise InputError(f"--set expects KEY=VALUE, got {item!r}")
        if key in out:
            raise InputError(f"setting {key} is given twice")
        out[key] = text.strip()
    return out


def setting_keys(config_type: type) -> list[str]:
    """The keys that can be set for a configuration class: its own settable fields, then
    ``section.field`` for each section's."""
    own = [name for name, hint in _fields(config_type).items()
           if name not in _sections(config_type) and _parser(hint) is not None]
    nested = [f"{section}.{name}" for section, section_type in _sections(config_type).items()
              for name, hint in _fields(section_type).items() if _parser(hint) is not None]
    return own + nested


def split_settings(settings: Settings, *config_types: type) -> tuple[dict[str, str], ...]:
    """Share the settings of a command that fills several configurations (e.g. a model and a
    training configuration) among them: each key goes, as text, to the one class that has it.
    Unknown and ambiguous keys are errors, with every class's keys as the valid ones."""
    parts: tuple[dict[str, str], ...] = tuple({} for _ in config_types)
    for key, text in _as_mapping(settings).items():
        owners = [(cls, path) for cls in config_types for path in _candidates(cls, key)]
        _check_owners(key, owners, config_types)
        parts[config_types.index(owners[0][0])][key] = text
    return parts


def parse_settings(config_type: type, settings: Settings) -> dict[str, Any]:
    """Typed values for ``config_type``: ``{field: value}`` for its own fields and
    ``{section: {field: value}}`` for its sections."""
    values: dict[str, Any] = {}
    given: dict[Path, str] = {}
    for key, text in _as_mapping(settings).items():
        path = _resolve(config_type, key)
        if path in given:
            raise InputError(f"settings {given[path]} and {key} set the same field {'.'.join(path)}")
        given[path] = key
        hint = _fields(_owner_type(config_type, path))[path[-1]]
        parse, expected = _parser(hint)
        try:
            value = parse(text)
        except ValueError:
            raise InputError(f"invalid value {text!r} for {key}: expected {expected}") from None
        if len(path) == 1:
            values[path[0]] = value
        else:
            values.setdefault(path[0], {})[path[1]] = value
    return values


def apply_settings(config, settings: Settings):
    """``config`` (a dataclass instance, flat or with sections) with ``settings`` applied by
    ``dataclasses.replace``; validation in ``__post_init__`` runs on the new values and its
    ValueError or InputError becomes a one-line InputError naming the settings it rejected."""
    mapping = _as_mapping(settings)
    values = parse_settings(type(config), mapping)
    assignments: dict[str, list[str]] = {}  # field or section -> the KEY=VALUE that change it
    for key, text in mapping.items():
        assignments.setdefault(_resolve(type(config), key)[0], []).append(f"{key}={text}")
    changes = {}
    for name, value in values.items():
        if name in _sections(type(config)):
            value = _replace(getattr(config, name), value, assignments[name])
        changes[name] = value
    return _replace(config, changes, [a for given in assignments.values() for a in given])


def _replace(obj, changes: dict[str, Any], assignments: list[str]):
    if not changes:
        return obj
    try:
        return dataclasses.replace(obj, **changes)
    except ValueError as exc:  # InputError included
        message = " ".join(str(exc).split())
        raise InputError(f"invalid setting {', '.join(assignments)}: {message}") from None


def _as_mapping(settings: Settings) -> dict[str, str]:
    if isinstance(settings, Mapping):
        return dict(settings)
    if isinstance(settings, str):  # one assignment, not its characters
        settings = [settings]
    return parse_assignments(settings)


@functools.cache
def _fields(cls: type) -> dict[str, Any]:
    """``{name: resolved annotation}`` of the fields a dataclass takes in ``__init__``. The
    annotations are strings under ``from __future__ import annotations``, so they are
    evaluated in the defining module."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


@functools.cache
def _sections(cls: type) -> dict[str, type]:
    return {name: hint for name, hint in _fields(cls).items()
            if isinstance(hint, type) and dataclasses.is_dataclass(hint)}


def _owner_type(config_type: type, path: Path) -> type:
    return config_type if len(path) == 1 else _sections(config_type)[path[0]]


def _candidates(config_type: type, key: str) -> list[Path]:
    """Every field ``key`` may name in ``config_type``, settable or not."""
    sections = _sections(config_type)
    if "." in key:
        section, name = key.split(".", 1)
        return [(section, name)] if section in sections and name in _fields(sections[section]) else []
    own = [(key,)] if key in _fields(config_type) and key not in sections else []
    return own + [(section, key) for section, cls in sections.items() if key in _fields(cls)]


def _resolve(config_type: type, key: str) -> Path:
    paths = _candidates(config_type, key)
    _check_owners(key, [(config_type, path) for path in paths], (config_type,))
    return paths[0]


def _check_owners(key: str, owners: list[tuple[type, Path]], config_types: Iterable[type]) -> None:
    """Raise unless ``key`` names exactly one field (of one of ``config_types``), and that
    field can be set from text."""
    if not owners:
        if any(key in _sections(cls) for cls in config_types):
            raise InputError(f"{key} is a section of settings; write {key}.FIELD=VALUE")
        valid = [k for cls in config_types for k in setting_keys(cls)]
        near = difflib.get_close_matches(key, valid + [k.rsplit(".", 1)[-1] for k in valid], n=1)
        hint = f" (did you mean {near[0]}?)" if near else ""
        raise InputError(f"unknown setting {key!r}{hint}; valid keys: {', '.join(valid)}")
    if len(owners) > 1:
        if len({path for _, path in owners}) == 1:  # the same field of two configurations
            where = " and ".join(cls.__name__ for cls, _ in owners)
            raise InputError(f"setting {key!r} is ambiguous: {where} both have it")
        raise InputError(f"setting {key!r} is ambiguous; write one of {', '.join('.'.join(p) for _, p in owners)}")
    ((owner, path),) = owners
    hint = _fields(_owner_type(owner, path))[path[-1]]
    if _parser(hint) is None:
        raise InputError(f"{'.'.join(path)} cannot be set from text (its type is {_type_name(hint)})")


def _type_name(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


Parser = tuple[Callable[[str], Any], str]  # (text -> value, raising ValueError; what it expects)


@functools.cache
def _parser(hint) -> Parser | None:
    """How to read a value of type ``hint`` from text, or None where text cannot express it."""
    if hint is type(None):
        return _parse_none, "none"
    if hint is bool:
        return _parse_bool, "bool (true/false)"
    if hint in (int, float, str):  # int() rejects "2.5" and "1e3": no silently truncated counts
        return hint, hint.__name__
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple:
        return _tuple_parser(args)
    if origin in (typing.Union, types.UnionType):
        return _union_parser(args)
    return None


def _parse_none(text: str) -> None:
    if text.lower() not in NONE_TEXTS:
        raise ValueError(text)


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered not in TRUE_TEXTS + FALSE_TEXTS:
        raise ValueError(text)
    return lowered in TRUE_TEXTS


def _tuple_parser(args: tuple) -> Parser | None:
    if len(args) == 2 and args[1] is Ellipsis:
        item = _parser(args[0])
        if item is None:
            return None

        def parse_variable(text: str) -> tuple:
            return tuple(item[0](part.strip()) for part in text.split(",")) if text else ()

        return parse_variable, f"comma-separated {item[1]} values"
    items = [_parser(arg) for arg in args]
    if not items or any(p is None for p in items):
        return None

    def parse_fixed(text: str) -> tuple:
        parts = text.split(",")
        if len(parts) != len(items):
            raise ValueError(text)
        return tuple(p[0](part.strip()) for p, part in zip(items, parts))

    return parse_fixed, f"{len(items)} comma-separated values ({', '.join(p[1] for p in items)})"


# A union tries its members from the most to the least specific text form, so that ``2`` is an
# int for ``int | float`` and ``none`` is None for ``str | None``.
_SPECIFICITY = {type(None): 0, int: 1, float: 2, bool: 3, str: 5}  # tuples: 4


def _union_parser(args: tuple) -> Parser | None:
    ordered = sorted(args, key=lambda a: _SPECIFICITY.get(a, 4))
    members = [_parser(arg) for arg in ordered]
    if any(p is None for p in members):
        return None

    def parse(text: str):
        for member, _ in members:
            try:
                return member(text)
            except ValueError:
                pass
        raise ValueError(text)

    # "int or none" reads better than "none or int"
    expected = [p[1] for a, p in zip(ordered, members) if a is not type(None)]
    return parse, " or ".join(expected + ["none"] * (type(None) in args))
