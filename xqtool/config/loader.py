"""The generic YAML → dataclass engine shared by the tokenizer and VAR schemas.

YAML is read with YAML 1.2 booleans (:class:`ConfigLoader`); a sectioned dataclass (fields that are
dataclasses) accepts nested sections and flat keys alike (each leaf name lives in exactly one section).
Overrides are ``key=value`` strings (``quant.codebook_size=8192`` or the flat ``codebook_size=8192``),
values parsed as YAML scalars/lists. Unknown keys raise :class:`~xqtool.errors.ConfigError` with a
did-you-mean suggestion; wrong types name the key and the expected type; values outside a field's
``choices`` metadata are refused. Numeric ranges are checked by :func:`check_config_ranges` against a
schema's rule table. No schema lives here.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple, Type, TypeVar, Union

import yaml

from xqtool.errors import ConfigError
from xqtool.validate import Range, check_number

T = TypeVar("T")


def choices(*values: str) -> Dict[str, Any]:
    """Field metadata restricting a string field to `values` (matched case-insensitively when loading)."""
    return {"choices": values}


class ConfigLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` whose booleans are only ``true``/``false`` (any case), as in YAML 1.2.

    YAML 1.1 also reads ``yes/no/on/off/y/n`` as booleans, which turns ``mixed_precision: no`` into
    ``False``. With this loader those words stay strings; boolean fields still accept them
    (:func:`_coerce` maps ``yes/on/y/1`` to True and ``no/off/n/0`` to False).
    """


ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)

_TRUE_WORDS = ("true", "yes", "on", "y", "1")
_FALSE_WORDS = ("false", "no", "off", "n", "0")


def yaml_load(text: str) -> Any:
    """Parse YAML text safely with :class:`ConfigLoader` (no object construction, YAML 1.2 booleans)."""
    return yaml.load(text, Loader=ConfigLoader)  # noqa: S506 - ConfigLoader is a SafeLoader subclass


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Union or origin is getattr(types, "UnionType", None):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return "optional " + " or ".join(_type_name(a) for a in args)
    if origin in (tuple, list, Tuple, List):
        args = typing.get_args(tp)
        inner = _type_name(args[0]) if args else "value"
        return f"list of {inner}"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML value to the annotated type `tp`, or raise a ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if origin is Union or origin is getattr(types, "UnionType", None):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() in ("none", "null", "~") and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"'{key}' must be {_type_name(tp)}, got {value!r}")
    if origin in (tuple, list, Tuple, List):
        (inner, *_rest) = typing.get_args(tp) or (Any,)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if isinstance(value, str):
            parts = [p for p in value.replace("_", ",").replace(" ", ",").split(",") if p]
            value = parts
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"'{key}' must be a {_type_name(tp)}, got {value!r}")
        items = [_coerce(v, inner, key) for v in value]
        return tuple(items) if origin in (tuple, Tuple) else items
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE_WORDS + _FALSE_WORDS:
            return value.strip().lower() in _TRUE_WORDS
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"'{key}' must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"'{key}' must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"'{key}' must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"'{key}' must be a number, got {value!r}")
        number: Optional[float] = None
        if isinstance(value, (int, float)):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "3e-5" as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"'{key}' must be a number, got {value!r}")
        if not math.isfinite(number):
            raise ConfigError(f"'{key}' must be a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        if isinstance(value, bool):  # a mapping parsed elsewhere with YAML 1.1 booleans (no/off/yes/on)
            raise ConfigError(f"'{key}' must be a string, got {value!r}: quote it, e.g. '{key.split('.')[-1]}: \"no\"'")
        raise ConfigError(f"'{key}' must be a string, got {value!r}")
    return value


def _suggest(name: str, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _hints(cls: type) -> Dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_section(tp: Any) -> bool:
    return dataclasses.is_dataclass(tp) and isinstance(tp, type)


def _build(cls: Type[T], data: Mapping[str, Any], where: str) -> T:
    if not isinstance(data, Mapping):
        raise ConfigError(f"section '{where or cls.__name__}' must be a mapping, got {type(data).__name__}")
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs: Dict[str, Any] = {}
    for key, value in data.items():
        full = f"{where}.{key}" if where else str(key)
        if key not in fields:
            scope = f"section '{where}'" if where else "the config"
            options = list(fields) + (list(flat_index(cls)) if not where else [])
            raise ConfigError(f"unknown key '{full}' in {scope}{_suggest(str(key), options)}")
        tp = hints[key]
        if _is_section(tp):
            kwargs[key] = _build(tp, value or {}, full)
        else:
            value = _coerce(value, tp, full)
            allowed = fields[key].metadata.get("choices")
            if allowed and value not in allowed and isinstance(value, str):
                same = [c for c in allowed if str(c).lower() == value.lower()]  # 'No', 'BF16'
                value = same[0] if same else value
            if allowed and value not in allowed:
                raise ConfigError(
                    f"'{full}' must be one of {', '.join(map(str, allowed))}; got {value!r}{_suggest(str(value), allowed)}"
                )
            kwargs[key] = value
    return cls(**kwargs)


def config_to_dict(cfg: Any) -> Dict[str, Any]:
    """Nested plain dict (tuples as lists) of a config dataclass, ready for YAML/JSON."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        return v

    return plain(cfg)


def flat_index(cls: type) -> Dict[str, str]:
    """Map each leaf field name of a sectioned config to its section name (flat official keys → section)."""
    index: Dict[str, str] = {}
    for name, tp in _hints(cls).items():
        if _is_section(tp):
            for leaf in _hints(tp):
                index[leaf] = name
    return index


def _set_dotted(tree: Dict[str, Any], dotted: str, value: Any, cls: type) -> None:
    parts = dotted.split(".")
    if len(parts) == 1:
        index = flat_index(cls)
        if parts[0] in index:
            parts = [index[parts[0]], parts[0]]
    node = tree
    for part in parts[:-1]:
        nxt = node.get(part)
        if not isinstance(nxt, dict):
            nxt = {}
            node[part] = nxt
        node = nxt
    node[parts[-1]] = value


def parse_overrides(overrides: Optional[Iterable[str]]) -> List[Tuple[str, Any]]:
    """Parse ``key=value`` strings; values are YAML scalars or lists (``v_patch_nums=[1,2,4]``)."""
    result: List[Tuple[str, Any]] = []
    for item in overrides or ():
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key=value (e.g. quant.codebook_size=8192)")
        key, raw = item.split("=", 1)
        key = key.strip().lstrip("-")
        if not key:
            raise ConfigError(f"override '{item}' has an empty key")
        try:
            value = yaml_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        result.append((key, value))
    return result


def read_yaml(path: Union[str, Path]) -> Dict[str, Any]:
    """Read a YAML mapping with :func:`yaml_load` (safe; ConfigError if missing, unreadable or not a mapping)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path} is a folder: give a YAML config file")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path} is not valid YAML{where}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a text file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must contain a YAML mapping at the top level, got {type(data).__name__}")
    return data


def _nest(data: Mapping[str, Any], cls: type, ignored: Iterable[str] = ()) -> Dict[str, Any]:
    """Accept section-nested and flat (official) keys alike; return a section-nested dict."""
    sections = {name for name, tp in _hints(cls).items() if _is_section(tp)}
    if not sections:
        return dict(data)
    index = flat_index(cls)
    ignored = set(ignored)
    nested: Dict[str, Any] = {}
    for key, value in data.items():
        if key in sections:
            if value is None:
                continue
            if not isinstance(value, Mapping):
                raise ConfigError(f"section '{key}' must be a mapping, got {type(value).__name__}")
            nested.setdefault(key, {}).update(value)
        elif key in index:
            nested.setdefault(index[key], {})[key] = value
        elif key in ignored:
            continue
        else:
            raise ConfigError(f"unknown key '{key}'{_suggest(str(key), list(index) + sorted(sections))}")
    return nested


def load_yaml_dataclass(
    source: Union[str, Path, Mapping[str, Any], None],
    cls: Type[T],
    overrides: Optional[Iterable[str]] = None,
    ignored_keys: Iterable[str] = (),
) -> T:
    """Build dataclass `cls` from a YAML file or dict, applying dotted ``key=value`` overrides.

    Sectioned dataclasses (fields that are dataclasses) accept both nested and flat keys; top-level
    `ignored_keys` are dropped. No bounds are checked here (each schema validates its own).

    Raises:
        ConfigError: missing/invalid YAML file, unknown key (with a did-you-mean), wrong type, value outside
            a field's ``choices``.
    """
    data: Dict[str, Any] = {}
    if source is not None:
        data = read_yaml(source) if isinstance(source, (str, Path)) else dict(source)
    tree = _nest(data, cls, ignored_keys)
    for key, value in parse_overrides(overrides):
        _set_dotted(tree, key, value, cls)
    return _build(cls, tree, "")


def save_config_yaml(cfg: Any) -> str:
    """YAML text of a config dataclass or a plain nested dict (sections in field order)."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def check_config_ranges(cfg: Any, rules: Mapping[str, Range]) -> None:
    """ConfigError naming the first config value (``section.key``) outside its rule (None values pass)."""
    for dotted, rule in rules.items():
        node = cfg
        for part in dotted.split("."):
            node = getattr(node, part, None)
        check_number(f"'{dotted}'", node, rule)
