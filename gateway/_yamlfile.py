"""Configuration files in YAML, parsed once into frozen pydantic models with precise errors.

:func:`load_model` reads a file, refuses duplicate keys (YAML would silently keep the last) and
reports every validation error as ``file:line: field: reason``, with the line of the key it is
about. The site policy and the broker configuration both load through it.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, TypeVar, get_args, get_origin, get_type_hints

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
    data, node, text = read_mapping(path, error)
    try:
        return model.model_validate(data), text
    except ValidationError as err:
        raise error(problems_of(err, model, line_index(node), lambda line, _key: f"{path}:{line}")) from err


def read_mapping(path: Path, error: type[ConfigFileError]) -> tuple[dict[str, Any], yaml.Node | None, str]:
    """The YAML mapping in ``path``: (its data, its node for line numbers, its text), or raise ``error``."""
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
    return data, node, text


Where = Callable[[int, str], str]
"""Where a value came from, given its line in the file and its top-level key: e.g. ``file:line``."""


def problems_of(err: ValidationError, model: type[BaseModel], lines: dict[tuple[str, ...], int], where: Where
                ) -> list[str]:
    """Every error of a validation as ``where: field: reason``, in the order of the file's lines."""
    errors = err.errors()
    # a list too short only because its items failed: the items' errors say what is wrong
    errors = [e for e in errors if e["type"] != "too_short" or not any(
        len(o["loc"]) > len(e["loc"]) and o["loc"][:len(e["loc"])] == e["loc"] for o in errors)]
    described = [_describe(where, lines, e, model) for e in errors]
    # a union's type errors ("should be a list") beside a real error at the same key are noise
    at = {field for _, _, field, kind in described if kind not in _TYPE_ERRORS}
    kept = [(line, text) for line, text, field, kind in described if kind not in _TYPE_ERRORS or field not in at]
    return [text for _, text in sorted(dict.fromkeys(kept), key=lambda d: d[0])]


# What a value of a field with a pattern must look like, in words (pydantic would quote the pattern).
PATTERN_WORDS = {
    "period": "never, or a number of days such as 365d",
    "site": "a name of letters, digits, '.', '_' and '-' (at most 63), starting with a letter or digit",
    "name": "a name of letters, digits, '.', '_' and '-' (at most 63), starting with a letter or digit",
}
IDENTIFIER = "a plain name: letters, digits and _, not starting with a digit"
BOOLEAN_TRAP = ("YAML reads unquoted yes, no, on, off, true and false as booleans: quote the value "
                "(e.g. \"no\") if you mean the word")


_TYPE_ERRORS = frozenset({"tuple_type", "list_type", "dict_type", "model_type", "model_attributes_type",
                          "string_type", "int_type", "int_parsing", "float_type", "float_parsing"})


def _describe(where: Where, lines: dict[tuple[str, ...], int], error: Any, model: type[BaseModel]
              ) -> tuple[int, str, str, str]:
    """One error as ``where: field: reason`` in plain words, its line (to order them), field and kind."""
    loc = tuple(str(part) for part in error["loc"])
    # pydantic adds union-branch and type names to loc; keep the part that names the file's keys
    while loc and loc not in lines:
        loc = loc[:-1]
    kept: list[str] = []
    for part in (str(p) for p in error["loc"]):
        if (*kept, part) in lines or not _is_internal(part):
            kept.append(part)
    field = ".".join(kept) or "(top)"
    line = lines.get(loc, 1)
    reason = _reason(error, kept, model)
    return line, f"{where(line, kept[0] if kept else '')}: {field}: {reason}", field, str(error["type"])


def _reason(error: Any, keys: list[str], model: type[BaseModel]) -> str:  # noqa: PLR0911, PLR0912 (one per kind)
    kind, given, ctx = error["type"], error.get("input"), error.get("ctx") or {}
    name = keys[-1] if keys else ""
    if kind in ("extra_forbidden", "unexpected_keyword_argument"):
        known = sorted(_fields_at(model, keys[:-1]))
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return f"unknown key {name!r}; {hint}known keys here: {', '.join(known)}"
    if isinstance(given, bool) and kind not in ("bool_type", "bool_parsing"):
        if "number" in str(error["msg"]) or kind.startswith(("int", "float")):
            return f"should be a number, not the boolean {str(given).lower()}"
        return f"got {str(given).lower()}, a boolean: {BOOLEAN_TRAP}"
    if kind == "missing":
        return "is required"
    if kind in ("tuple_type", "list_type"):
        return "should be a list, e.g. [a, b]"
    if kind in ("dict_type", "model_type", "model_attributes_type", "mapping_type"):
        return "should be a mapping of keys (key: value lines, or {key: value})"
    if kind == "string_type":
        return "should be text"
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return "should be a whole number"
    if kind in ("float_type", "float_parsing"):
        return "should be a number"
    if kind == "string_pattern_mismatch":
        return f"should be {PATTERN_WORDS.get(name, IDENTIFIER)}; got {given!r}"
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        words = {"greater_than_equal": "at least", "greater_than": "more than", "less_than_equal": "at most",
                 "less_than": "less than"}[kind]
        bound = next(iter(ctx.values()), "?")
        bound = f"{bound:g}" if isinstance(bound, int | float) else bound
        return f"should be {words} {bound}; got {given!r}"
    if kind == "too_short":
        return f"should have at least {ctx.get('min_length', 1)} item(s)"
    if kind == "too_long":
        return f"should have at most {ctx.get('max_length', '?')} item(s)"
    if kind == "literal_error":
        return f"should be {ctx.get('expected', 'one of the allowed values')}; got {given!r}"
    return str(error["msg"]).removeprefix("Value error, ")


def _fields_at(model: type[BaseModel], keys: list[str]) -> set[str]:
    """The keys a mapping at ``keys`` of the file may hold (the fields of the model found there)."""
    current: Any = model
    parts = list(keys)
    while parts:
        names = _field_types(current)
        if names is not None:
            current = names.get(parts.pop(0))
            if current is None:
                return set()
            continue
        inner = _model_in(current)
        if inner is None:
            return set()
        if get_origin(current) in (dict, tuple, list) or str(get_origin(current)).endswith("Mapping'>"):
            parts.pop(0)  # a mapping's key or a list's index
        current = inner
    found = _field_types(current if _field_types(current) is not None else _model_in(current))
    return set(found or ())


def _field_types(cls: Any) -> dict[str, Any] | None:
    """A pydantic model's or a dataclass's fields and their types (None for anything else)."""
    if isinstance(cls, type) and issubclass(cls, BaseModel):
        return {name: field.annotation for name, field in cls.model_fields.items()}
    if isinstance(cls, type) and dataclasses.is_dataclass(cls):
        hints = get_type_hints(cls)
        return {f.name: hints.get(f.name) for f in dataclasses.fields(cls)}
    return None


def _model_in(annotation: Any) -> type | None:
    """The model (pydantic or dataclass) an annotation holds (through Optional, unions, mappings, tuples)."""
    if _field_types(annotation) is not None:
        return annotation if isinstance(annotation, type) else None
    for arg in get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


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
