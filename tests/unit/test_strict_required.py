"""Every config read through dsembed.strict reports a left-out required key as one line naming the
file and the dotted key (never a TypeError from the dataclass constructor).

The test walks every dataclass reachable from each strict root (Recipe, StudyConfig), builds the
smallest valid file for the root, and removes each field without a default in turn, at its place
in the file. A new strict config is found by `test_every_strict_loader_is_covered`.
"""
from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import pytest
import yaml

from dsembed.config import Recipe, load_recipe
from dsembed.errors import RecipeError
from dsembed.strict import from_dict
from dsembed.study.config import StudyConfig, load_study

REPO = Path(__file__).resolve().parents[2]
# root dataclass -> the modules that build it through dsembed.strict
ROOTS = {Recipe: "dsembed.config", StudyConfig: "dsembed.study.config"}


def _required(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init and f.name != "source"
            and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]


def _dataclasses_in(tp: Any) -> list[type]:
    if dataclasses.is_dataclass(tp):
        return [tp]
    return [d for arg in get_args(tp) for d in _dataclasses_in(arg)]


def _paths(root: type) -> list[tuple[tuple[str, ...], type]]:
    """(path of field names from the root, dataclass) for every dataclass reachable from root."""
    out, todo = [], [((), root)]
    while todo:
        path, cls = todo.pop()
        out.append((path, cls))
        for name, tp in typing.get_type_hints(cls).items():
            if name != "source":
                todo += [((*path, name), d) for d in _dataclasses_in(tp)]
    return out


def _minimal(tp: Any) -> Any:
    """A small valid value of annotation tp (a mapping with only required keys for a dataclass)."""
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _minimal_mapping(tp)
    if origin is Literal:
        return get_args(tp)[0]
    if origin in (Union, types.UnionType):
        return _minimal(next(a for a in get_args(tp) if a is not type(None)))
    if origin is list:
        return [_minimal(get_args(tp)[0])]
    if origin is dict:
        return {"a": _minimal(get_args(tp)[1])}
    return {bool: True, int: 1, float: 1.0, str: "r.yaml"}.get(tp, "x")


def _minimal_mapping(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    data = {name: _minimal(hints[name]) for name in _required(cls)}
    kind = next((f for f in dataclasses.fields(cls) if f.name == "type" and get_origin(hints["type"]) is Literal), None)
    if kind is not None:  # a member of a tagged union names itself
        data["type"] = kind.default
    return data


def _root_data(root: type, path: tuple[str, ...], cls: type) -> tuple[dict[str, Any], dict[str, Any]]:
    """The smallest valid data for root with `cls` placed at `path`; returns (data, cls's mapping)."""
    data = _minimal_mapping(root)
    node = data
    for name in path:
        node = node.setdefault(name, {})
    node.update(_minimal_mapping(cls))
    return data, node


def _cases() -> list[tuple[type, tuple[str, ...], type, str]]:
    return [(root, path, cls, name) for root in ROOTS for path, cls in _paths(root) for name in _required(cls)]


def _load(root: type, tmp_path: Path, data: dict[str, Any]) -> Path:
    (tmp_path / "r.yaml").write_text("model:\n  random_init: {model_type: llama, num_hidden_layers: 4}\n  tokenizer: bytes\n"
                                     "data:\n  train: ['synthetic:8']\n")
    path = tmp_path / ("study.yaml" if root is StudyConfig else "recipe.yaml")
    path.write_text(yaml.safe_dump(data))
    if root is StudyConfig:
        load_study(path, tasks_dir=str(tmp_path))
    else:
        load_recipe(path)
    return path


def test_the_walk_reaches_every_section():
    reached = {cls for root in ROOTS for _, cls in _paths(root)}
    assert {StudyConfig, Recipe, *typing.get_args(typing.get_type_hints(Recipe)["pooling"])} <= reached
    assert len(_cases()) >= 3  # StudyConfig: name, output_dir, variants (recipes have defaults everywhere today)


@pytest.mark.parametrize("root", list(ROOTS), ids=[r.__name__ for r in ROOTS])
def test_the_minimal_files_load(root, tmp_path):
    _load(root, tmp_path, _minimal_mapping(root))


@pytest.mark.parametrize("root, path, cls, name", _cases(),
                         ids=[f"{r.__name__}:{'.'.join((*p, n))}" for r, p, _, n in _cases()])
def test_each_required_key_left_out_is_named_with_the_file(root, path, cls, name, tmp_path):
    data, node = _root_data(root, path, cls)
    del node[name]
    key = ".".join((*path, name))
    with pytest.raises(RecipeError) as info:
        _load(root, tmp_path, data)
    message = str(info.value)
    suffix = "study.yaml" if root is StudyConfig else "recipe.yaml"
    assert message.startswith(str(tmp_path / suffix)) and f"missing required key {key} " in message, message
    assert "\n" not in message


@dataclass(frozen=True)
class Inner:
    size: int
    label: str
    note: str = ""


@dataclass(frozen=True)
class Outer:
    inner: Inner
    tags: list[str] = field(default_factory=list)


def test_nested_required_keys_are_named_by_their_dotted_path():
    with pytest.raises(RecipeError, match=r"^f\.yaml: missing required keys inner\.size, inner\.label \(add size: <int> under inner"):
        from_dict(Outer, {"inner": {"note": "n"}}, "", "f.yaml")
    with pytest.raises(RecipeError, match=r"^f\.yaml: missing required key inner \(add inner: <Inner>\)"):
        from_dict(Outer, {}, "", "f.yaml")


def test_every_strict_loader_is_covered():
    """Every module that builds dataclasses through dsembed.strict.from_dict has its root in ROOTS."""
    users = set()
    for path in sorted((REPO / "dsembed").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        if any(isinstance(n, ast.ImportFrom) and n.module == "dsembed.strict" and any(a.name == "from_dict" for a in n.names)
               for n in ast.walk(tree)):
            users.add(".".join(path.relative_to(REPO).with_suffix("").parts))
    assert users == set(ROOTS.values()), f"strict loaders {sorted(users)}: add their root dataclass to ROOTS"


def test_study_cli_missing_key_is_one_line_exit_2(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("name: x\nvariants: {a: r.yaml}\ntasks_dir: t\n")
    result = subprocess.run([sys.executable, "-m", "dsembed.cli.study", str(path)], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0
    assert result.stderr.startswith(f"error: {path}: missing required key output_dir "), result.stderr
