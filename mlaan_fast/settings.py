"""Typed settings defined once: a dataclass field carries its default, help text and check.

``setting(default, help, check)`` declares a field of a settings dataclass (the model's
``LocalOptions``, the trainer's ``TrainConfig``). From those declarations come, with no second
list to keep in step: the validation of values from Python, YAML and the command line (one
message naming the setting), the argparse flags (``add_flags``) and the help text.

A check is a function ``(name, value) -> value`` that returns the value in its canonical type
or raises TypeError/ValueError naming the setting. The ones here cover what the settings need.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import numbers
from collections.abc import Callable, Iterable
from typing import Any

Check = Callable[[str, Any], Any]

TRUE_WORDS = ("true", "yes", "on", "1")
FALSE_WORDS = ("false", "no", "off", "0")


def setting(default: Any, help: str, check: Check, *, flag: str | None = None, aliases: tuple[str, ...] = (),
            group: str | None = None, metavar: str | None = None, resume: bool = False) -> Any:
    """A dataclass field with its help text and check; ``flag=""`` keeps it off the command line.

    ``resume``: a resumed run must have the same value (it changes the training path)."""
    meta = {"help": help, "check": check, "flag": flag, "aliases": aliases, "group": group,
            "metavar": metavar, "resume": resume}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def fields(cls) -> list[dataclasses.Field]:
    """The declared settings of a dataclass (fields made with :func:`setting`)."""
    return [f for f in dataclasses.fields(cls) if "check" in f.metadata]


def check_value(cls, name: str, value: Any, label: str | None = None) -> Any:
    """``value`` of setting ``name`` of ``cls``, checked and in its canonical type (errors say ``label``)."""
    return {f.name: f for f in fields(cls)}[name].metadata["check"](label or name, value)


def flag_name(name: str) -> str:
    """The command-line flag of setting ``name``."""
    return "--" + name.replace("_", "-")


def check_all(obj) -> dict:
    """Every declared setting of ``obj`` checked: {name: canonical value} (raises on the first bad one)."""
    return {f.name: f.metadata["check"](f.name, getattr(obj, f.name)) for f in fields(type(obj))}


def unknown_keys(cls, keys: Iterable[str], where: str) -> None:
    """ValueError naming the keys that are not settings of ``cls`` (and the known ones)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(keys) - known)
    if unknown:
        raise ValueError(f"{where}: unknown setting(s) {', '.join(unknown)}; "
                         f"known: {', '.join(sorted(known))}")


# ----------------------------------------------------------------------------- checks
def _kind(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def boolean(name: str, value: Any) -> bool:
    """True/False, or the usual spellings (yes/no, on/off, 1/0, true/false) as strings."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in TRUE_WORDS + FALSE_WORDS:
        return value.strip().lower() in TRUE_WORDS
    if isinstance(value, numbers.Integral) and value in (0, 1):
        return bool(value)
    raise TypeError(f"{name}: expected true or false, got {_kind(value)}")


def number(lo: float = -math.inf, hi: float = math.inf, *, lo_open: bool = False, hi_open: bool = False,
           optional: bool = False) -> Check:
    """A finite real number in [lo, hi] (either end open on request); None too if ``optional``."""
    if hi == math.inf:
        bounds = f"{'>' if lo_open else '>='} {lo:g}"
    elif lo == -math.inf:
        bounds = f"{'<' if hi_open else '<='} {hi:g}"
    else:
        bounds = f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"

    def check(name: str, value: Any) -> float | None:
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name}: expected a number, got {_kind(value)}")
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"{name}: must be a finite number, got {value}")
        if value < lo or value > hi or (lo_open and value == lo) or (hi_open and value == hi):
            raise ValueError(f"{name}: must be {bounds}, got {value:g}")
        return value
    return check


def integer(lo: int | None = None, hi: int | None = None, *, optional: bool = False) -> Check:
    """A whole number (not a bool, not a float) in [lo, hi]; None too if ``optional``."""
    def check(name: str, value: Any) -> int | None:
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name}: expected a whole number, got {_kind(value)}")
        value = int(value)
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            bounds = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
            raise ValueError(f"{name}: must be {bounds}, got {value}")
        return value
    return check


def choice(*values: str) -> Check:
    """One of the strings ``values``."""
    def check(name: str, value: Any) -> str:
        if not isinstance(value, str) or value not in values:
            raise ValueError(f"{name}: unknown {value!r}; choose one of {', '.join(values)}")
        return value
    check.wants_text = True
    check.choices = values
    return check


def text(*, optional: bool = False) -> Check:
    """Any non-empty string (a path, a device name); None too if ``optional``."""
    def check(name: str, value: Any) -> str | None:
        if value is None and optional:
            return None
        if not isinstance(value, str) or not value:
            raise TypeError(f"{name}: expected a non-empty string, got {_kind(value)}")
        return value
    check.wants_text = True
    return check


def numbers_of(length: int, item: Check) -> Check:
    """A list or tuple of ``length`` values, each passing ``item``; returned as a tuple."""
    def check(name: str, value: Any) -> tuple:
        if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
            raise TypeError(f"{name}: expected {length} numbers, got {_kind(value)}")
        values = tuple(value)
        if len(values) != length:
            raise ValueError(f"{name}: expected {length} numbers, got {len(values)}")
        return tuple(item(f"{name}[{i}]", v) for i, v in enumerate(values))
    return check


def mapping(name: str, value: Any) -> dict:
    """A dict (for nested groups of settings)."""
    if not isinstance(value, dict):
        raise TypeError(f"{name}: expected a mapping of settings, got {_kind(value)}")
    return dict(value)


# ----------------------------------------------------------------------------- command line
def _parse_scalar(raw: str):
    """'3' -> 3, '0.5' -> 0.5, 'nan' -> nan, anything else stays a string (the check judges it)."""
    for parse in (int, float):
        try:
            return parse(raw)
        except ValueError:
            pass
    return raw


def add_flags(parser: argparse.ArgumentParser, cls, *, dest_prefix: str = "",
              default: Any = argparse.SUPPRESS, groups: dict[str | None, Any] | None = None) -> None:
    """One flag per declared setting of ``cls`` (``--name-with-dashes``; ``--[no-]name`` for booleans).

    Values are parsed as numbers where they look like numbers and checked later, with the other
    sources, by :func:`check_value` (so every bad value gets the same one-line message); ``dest`` is
    ``dest_prefix + name``; flags not given stay absent (``default`` SUPPRESS)."""
    groups = {} if groups is None else groups
    for f in fields(cls):
        meta = f.metadata
        if meta["flag"] == "":
            continue
        group = meta["group"]
        if group not in groups:
            groups[group] = parser.add_argument_group(group) if group else parser
        names = [meta["flag"] or flag_name(f.name), *meta["aliases"]]
        kw = dict(dest=dest_prefix + f.name, default=default, help=meta["help"])
        check = meta["check"]
        if check is boolean:
            groups[group].add_argument(*names, action=argparse.BooleanOptionalAction, **kw)
            continue
        if isinstance(f.default, tuple):
            kw.update(nargs=len(f.default), type=_parse_scalar)
        else:
            kw.update(type=str if getattr(check, "wants_text", False) else _parse_scalar)
        choices = getattr(check, "choices", None)
        kw["metavar"] = meta["metavar"] or ("{" + ",".join(choices) + "}" if choices else f.name.upper())
        groups[group].add_argument(*names, **kw)
