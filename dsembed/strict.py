"""Strict conversion of plain YAML data into frozen dataclasses (recipes, study files).

Unknown keys, wrong types, bad enum values and missing required keys (fields without a default)
raise `RecipeError` naming the file and the dotted key, with a did-you-mean where one fits. Used by
dsembed.config (recipes) and dsembed.study.config (study files).
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal, Union, get_args, get_origin

import yaml

from dsembed.errors import RecipeError

# PyYAML (YAML 1.1) reads `1e-5` without a dot as a string; float fields accept that spelling.
_SCIENTIFIC = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")



def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in get_args(tp))}]"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str, where: str) -> Any:
    """Check `value` against the annotation `tp` and return it (ints widen to floats)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value in get_args(tp) and type(value) in {type(a) for a in get_args(tp)}:
            return value
        choices = [a for a in get_args(tp) if isinstance(a, str)]
        hint = difflib.get_close_matches(str(value), choices, n=1)
        did = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise RecipeError(f"{where}: {key} = {value!r} is not one of {_type_name(tp)}{did}")
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key, where)
            except RecipeError as err:
                errors.append(err)
        raise RecipeError(f"{where}: {key} = {value!r} should be {_type_name(tp)}")
    if origin is list:
        if not isinstance(value, list):
            raise RecipeError(f"{where}: {key} = {value!r} should be a list ({_type_name(tp)})")
        (item_tp,) = get_args(tp)
        return [_convert(v, item_tp, f"{key}[{i}]", where) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: {key} should be a mapping ({_type_name(tp)})")
        _, val_tp = get_args(tp)
        return {str(k): _convert(v, val_tp, f"{key}.{k}", where) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # PyYAML (YAML 1.1) reads `1e-5` without a dot as a string; accept that spelling of a number.
        if isinstance(value, str) and _SCIENTIFIC.match(value.strip()):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key, where)
    raise RecipeError(f"{where}: {key} = {value!r} should be {_type_name(tp)}")


def _unknown_key(where: str, key: str, name: str, known: list[str]) -> RecipeError:
    hint = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    did = f" (did you mean {hint[0]!r}?)" if hint else f" (known keys: {', '.join(known)})"
    return RecipeError(f"{where}: unknown key {key}{did}")


def from_dict(cls: type, data: Any, prefix: str, where: str,
              special: dict[str, Callable[[Any, str], Any]] | None = None) -> Any:
    """Build dataclass `cls` from `data`; `special` maps a field name to its own builder (tagged unions).

    Raises:
        RecipeError: an unknown key, a wrong type or enum value, or a field without a default left out.
    """
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: {prefix or 'the recipe'} should be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls) if not f.name.startswith("_") and f.name != "source"]
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in known:
            raise _unknown_key(where, key, str(name), known)
        if special and name in special:
            kwargs[name] = special[name](value, where)
        else:
            kwargs[name] = _convert(value, hints[name], key, where)
    missing = [f.name for f in dataclasses.fields(cls) if f.init and f.name in known and f.name not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:  # cls(**kwargs) would raise a TypeError naming the class, not the file and the key
        keys = [f"{prefix}.{name}" if prefix else name for name in missing]
        first = missing[0]
        under = f" under {prefix}" if prefix else ""
        raise RecipeError(f"{where}: missing required key{'s' if len(keys) > 1 else ''} {', '.join(keys)} "
                          f"(add {first}: <{_type_name(hints[first])}>{under}{' and the others' if len(keys) > 1 else ''})")
    return cls(**kwargs)


def set_dotted(data: dict[str, Any], dotted: str, value: Any, where: str) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise RecipeError(f"{where}: override {dotted}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`key.sub=value` with the value parsed as a YAML scalar (or flow list / mapping)."""
    if "=" not in text or text.startswith("="):
        raise RecipeError(f"command line: override {text!r} should look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def read_yaml_mapping(path: Path, what: str = "recipe") -> dict[str, Any]:
    """Parse a YAML file that must hold a mapping; errors name the file (and line) and the fix."""
    where = str(path)
    if not path.is_file():
        raise RecipeError(f"{where}: {what} file not found (check the path)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or "invalid YAML"
        raise RecipeError(f"{where}{line}: {problem} (fix the YAML syntax)") from None
    except UnicodeDecodeError:
        raise RecipeError(f"{where}: not UTF-8 text (save the {what} as UTF-8)") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: a {what} is a mapping of keys, not {type(data).__name__}")
    return data
