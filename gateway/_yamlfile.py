"""Configuration files in YAML, parsed once into frozen pydantic models with precise errors.

:func:`load_model` reads a file, refuses duplicate keys (YAML would silently keep the last) and
reports every validation error as ``file:line: field: reason``, with the line of the key it is
about. The site policy and the broker configuration both load through it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


class ConfigFileError(ValueError):
    """A configuration file failed to load; ``problems`` holds one ``file:line: field: reason`` each."""

    noun: ClassVar[str] = "configuration"

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def load_model(path: Path, model: type[M], error: type[ConfigFileError]) -> tuple[M, str]:
    """Parse and validate ``path`` as ``model``: (the model, the file's text), or raise ``error``."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise error([f"{path}:0: (file): cannot read: {err.strerror}"]) from err
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 0
        raise error([f"{path}:{line}: (yaml): {getattr(err, 'problem', err)}"]) from err
    if not isinstance(data, dict):
        raise error([f"{path}:1: (file): a {error.noun} must be a mapping of keys"])
    duplicates = _duplicate_keys(node)
    if duplicates:
        raise error([f"{path}:{line}: {field}: key appears more than once" for field, line in duplicates])
    try:
        return model.model_validate(data), text
    except ValidationError as err:
        lines = line_index(node)
        raise error([_describe(path, lines, e) for e in err.errors()]) from err


def _describe(path: Path, lines: dict[tuple[str, ...], int], error: Any) -> str:
    loc = tuple(str(part) for part in error["loc"])
    # pydantic adds union-branch and type names to loc; keep the part that names the file's keys
    while loc and loc not in lines:
        loc = loc[:-1]
    kept: list[str] = []
    for part in (str(p) for p in error["loc"]):
        if (*kept, part) in lines or not _is_internal(part):
            kept.append(part)
    field = ".".join(kept) or "(top)"
    reason = str(error["msg"]).removeprefix("Value error, ")
    return f"{path}:{lines.get(loc, 1)}: {field}: {reason}"


def _is_internal(part: str) -> bool:
    """Pydantic's union-branch tags in an error location (not keys of the file)."""
    return (part in {"int", "float", "str", "bool", "KeyRange", "Tls"} or "[" in part
            or part.startswith("function-"))


def line_index(node: yaml.Node | None) -> dict[tuple[str, ...], int]:
    """Map each key path of the YAML document to the 1-based line it starts on."""
    index: dict[tuple[str, ...], int] = {}

    def walk(n: yaml.Node, path: tuple[str, ...]) -> None:
        index.setdefault(path, n.start_mark.line + 1)
        if isinstance(n, yaml.MappingNode):
            for key, value in n.value:
                child = (*path, str(key.value))
                index[child] = key.start_mark.line + 1
                walk(value, child)
        elif isinstance(n, yaml.SequenceNode):
            for i, item in enumerate(n.value):
                walk(item, (*path, str(i)))

    if node is not None:
        walk(node, ())
    return index


def _duplicate_keys(node: yaml.Node | None, path: str = "") -> list[tuple[str, int]]:
    """Keys given twice in one mapping (YAML would silently keep the last one)."""
    found: list[tuple[str, int]] = []
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key, value in node.value:
            name = f"{path}.{key.value}" if path else str(key.value)
            if str(key.value) in seen:
                found.append((name, key.start_mark.line + 1))
            seen.add(str(key.value))
            found += _duplicate_keys(value, name)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            found += _duplicate_keys(item, f"{path}.{i}")
    return found
