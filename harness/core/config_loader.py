"""A general config loader: YAML in, a frozen pydantic model out, every problem one line.

Owns what any typed config needs and no harness key: the strict, frozen model base
(:class:`ConfigModel`), the phrases errors quote (:class:`Expect`, :func:`check`,
:func:`list_of`), safe YAML reading, dotted ``key=value`` overrides and the translation
of pydantic's ``ValidationError`` into one :class:`~harness.errors.InputError` naming the
dotted key and what was expected. The harness's schema lives in harness/core/config.py.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Callable, Optional

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from harness.errors import InputError

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self needs Python 3.11


@dataclass(frozen=True)
class Expect:
    """``Annotated`` marker: what an error says was expected when the field's constraints fail
    (pydantic reports one bound at a time, "less than 1"; the user is told the whole range)."""

    phrase: str


def check(complaint: Callable[[Any], Optional[str]]) -> AfterValidator:
    """A validator for a rule with no pydantic constraint: ``complaint(value)`` returns
    what was expected, or None when the value is fine."""
    def validate(value):
        if expected := complaint(value):
            raise PydanticCustomError("expected", "expected {expected}", {"expected": expected})
        return value

    return AfterValidator(validate)


def list_of(item_type: type, *validators: Any) -> Any:
    """A YAML list held as a tuple (so the model stays hashable); a set or a string is refused."""
    as_tuple = BeforeValidator(lambda value: tuple(value) if isinstance(value, list) else value)
    return Annotated[(tuple[item_type, ...], as_tuple, *validators)]


class ConfigModel(BaseModel):
    """A section of a config: strict types, no unknown keys, frozen, finite numbers. Strict: YAML
    already typed every value, so "64" for an integer is the user's mistake, not something to coerce."""

    # python-re: a pattern keeps Python's re meaning, not the Rust engine's.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False,
                              regex_engine="python-re")

    @model_validator(mode="before")
    @classmethod
    def _null_section_is_defaults(cls, raw: Any) -> Any:
        # `optim:` with nothing under it reads as null in YAML: the section's defaults.
        return {} if raw is None else raw

    @classmethod
    def from_dict(cls, raw: Any) -> Self:
        """Validate a plain dict (parsed YAML, or ``to_dict()`` sent to a Ray worker)."""
        if raw is None:  # null is a section's defaults, never a whole config's
            raise InputError(f"config: expected a mapping, got {_describe(raw)}")
        try:
            return cls.model_validate(raw)
        except ValidationError as err:
            raise InputError(_one_line(cls, raw, err)) from None

    def to_dict(self) -> dict:
        """Plain, JSON-serialisable data: ``from_dict(to_dict())`` equals the model."""
        return self.model_dump(mode="json")

    def replace(self, **dotted: Any) -> Self:
        """A copy with dotted keys replaced, validated again: ``replace(**{"optim.lr": 0.1})``."""
        raw = self.to_dict()
        for key, value in dotted.items():
            set_dotted(type(self), raw, key, value)
        return type(self).from_dict(raw)


_TYPE_PHRASES = {"int_type": "an integer", "float_type": "a number", "bool_type": "true or false",
                 "string_type": "a string", "model_type": "a mapping"}
_CONSTRAINT_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal",
                      "string_too_short", "string_too_long", "string_pattern_mismatch"}


def _one_line(root: type[BaseModel], raw: Any, err: ValidationError) -> str:
    """``key: expected ..., got ...`` for the error a reader of ``raw`` meets first."""
    error = min(err.errors(), key=lambda e: _file_order(e, raw))
    loc, kind, value = error["loc"], error["type"], error["input"]
    key = _dotted(loc) or "config"
    if kind == "value_error" and isinstance(error["ctx"]["error"], InputError):
        return str(error["ctx"]["error"])  # a cross-field check's own line, key included
    if kind == "extra_forbidden":
        names = _model_in(_type_at(root, loc[:-1])[0]).model_fields
        return f"{key}: unknown key; expected one of {', '.join(sorted(names))}"
    if kind == "finite_number":
        return f"{key}: expected a finite number, got {value!r}"
    if kind == "tuple_type":
        item = typing.get_args(_type_at(root, loc)[0])[0]
        return f"{key}: expected a list of {item.__name__}, got {_describe(value)}"
    if kind == "literal_error" and not isinstance(value, str):  # every choice is a string: a type mistake
        return f"{key}: expected a string, got {_describe(value)}"
    if kind in _TYPE_PHRASES:
        return f"{key}: expected {_TYPE_PHRASES[kind]}, got {_describe(value)}"
    expected = _expected(root, loc, kind, error.get("ctx") or {})
    if expected is None:  # still one line
        return f"{key}: {error['msg']}"
    return f"{key}: expected {expected}, got {_short_repr(value)}"


def _expected(root: type[BaseModel], loc: tuple, kind: str, ctx: dict) -> Optional[str]:
    if kind == "expected":
        return ctx["expected"]
    field_type, metadata = _type_at(root, loc)
    if kind == "literal_error":
        return "one of " + ", ".join(repr(choice) for choice in typing.get_args(field_type))
    if kind in _CONSTRAINT_ERRORS:
        return next((m.phrase for m in metadata if isinstance(m, Expect)), None)
    return None  # a pydantic error this schema does not plan for


def _file_order(error: dict, raw: Any) -> list:
    """Sort key for the error to report: within a section, an unknown key first
    (alphabetically), then values in the order the file gives them."""
    order, node = [], raw
    for depth, part in enumerate(error["loc"]):
        if depth == len(error["loc"]) - 1 and error["type"] == "extra_forbidden":
            order.append((0, part))
        elif isinstance(node, dict):
            order.append((1, list(node).index(part) if part in node else len(node)))
        else:
            order.append((1, part if isinstance(part, int) else 0))
        node = node.get(part) if isinstance(node, dict) else None
    return order


def _dotted(loc: tuple) -> str:
    """``("sweep", "seeds", 0)`` -> ``sweep.seeds[0]``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else part
    return out


def _unwrap(tp: Any) -> tuple[Any, list]:
    """``Optional[Annotated[X, m]]`` -> ``(X, [m])``."""
    if typing.get_origin(tp) is typing.Union:
        (tp,) = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is Annotated:
        return typing.get_args(tp)[0], list(tp.__metadata__)
    return tp, []


def _type_at(root: type[BaseModel], loc: tuple) -> tuple[Any, list]:
    """The type at ``loc`` in the schema and the metadata (constraints, :class:`Expect`) on it."""
    tp, metadata = root, []
    for part in loc:
        if isinstance(part, int):  # an item of list_of(...)
            tp, metadata = _unwrap(typing.get_args(tp)[0])
        else:
            info = _model_in(tp).model_fields[part]
            tp, inner = _unwrap(info.annotation)
            metadata = [*info.metadata, *inner]
    return tp, metadata


def _model_in(tp: Any) -> Optional[type[BaseModel]]:
    """The model class inside ``tp`` (``Optional[X]`` -> X), else None."""
    tp = _unwrap(tp)[0]
    return tp if isinstance(tp, type) and issubclass(tp, BaseModel) else None


def _short_repr(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(value) if hasattr(value, '__len__') else '?'} long)"


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}" if not isinstance(value, dict) else "a mapping"


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice (PyYAML would keep the last without a
    word) or a key that is not a string."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            self.flatten_mapping(node)
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                where = f"line {key_node.start_mark.line + 1}"
                if not isinstance(key, str):
                    raise InputError(f"key {key!r} at {where}: expected a string key (a config name)")
                if key in seen:
                    raise InputError(f"key {key!r} at {where}: given twice in one mapping; expected each key once")
                seen.add(key)
        return super().construct_mapping(node, deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _StrictLoader.construct_mapping)


def _parse_yaml(text: str, where: str) -> Any:
    """YAML -> plain data; every problem (syntax, duplicate or non-string key,
    nesting past Python's recursion limit) as an InputError naming ``where``."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except InputError as err:
        raise InputError(f"{where}: {err}") from None
    except RecursionError:
        raise InputError(f"{where}: nested too deeply; expected at most a few levels of sections") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or "invalid YAML"
        raise InputError(f"{where}: YAML syntax error{at}: {problem}") from None


def read_yaml_file(path: str | Path) -> dict:
    """The mapping at the top of a YAML config file; anything else is an InputError naming the file."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: config file not found; expected a YAML file") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a folder; expected a YAML file") from None
    except OSError as err:
        raise InputError(f"{path}: cannot read config ({err.strerror})") from None
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not a text file (byte {err.start} is not UTF-8); expected a YAML file") from None
    if "\0" in text:
        raise InputError(f"{path}: not a text file (it holds NUL bytes); expected a YAML file")
    raw = _parse_yaml(text, str(path))
    if raw is None:
        # An empty file is a mistake (a wrong path, a truncated copy), not a request for defaults.
        raise InputError(f"{path}: config file is empty; expected a mapping of config sections (see configs/)")
    if not isinstance(raw, dict):
        raise InputError(f"{path}: expected a mapping of config sections at the top level, "
                         f"got {type(raw).__name__}")
    return raw


def parse_override(item: str) -> tuple[str, Any]:
    """``optim.lr=0.05`` -> ("optim.lr", 0.05); values are parsed as YAML scalars/lists."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise InputError(f"--set {item!r}: expected key=value, e.g. optim.lr=0.05")
    try:
        return key, _parse_yaml(text, key) if text.strip() else ""
    except InputError:
        raise InputError(f"--set {key}: cannot parse value {text!r} as YAML") from None


def set_dotted(root: type[BaseModel], raw: dict, key: str, value: Any) -> None:
    """Set ``raw[a][b] = value`` for ``key`` ``a.b``; a key the schema ``root`` lacks is refused by name."""
    node, schema = raw, root
    parts = key.split(".")
    for depth, part in enumerate(parts):
        fields = schema.model_fields if schema is not None else {}
        if part not in fields:
            where = ".".join(parts[: depth + 1])
            raise InputError(f"--set {key}: unknown key {where!r}; expected one of " + ", ".join(sorted(fields))
                             if fields else f"--set {key}: {where!r} has no sub-keys")
        if typing.get_origin(fields[part].annotation) is dict and depth < len(parts) - 1:
            # A free mapping (a factory's kwargs): the rest of the key names its entries.
            for inner in parts[depth:-1]:
                if not isinstance(node.get(inner), dict):
                    node[inner] = {}
                node = node[inner]
            node[parts[-1]] = value
            return
        schema = _model_in(fields[part].annotation)
        if depth == len(parts) - 1:
            node[part] = value
        elif not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]

