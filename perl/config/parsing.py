"""Reading a config: bounded YAML, values parsed into the declared types, dotted overrides, dumping.

Every user mistake (unknown key, wrong type, malformed YAML) raises `ConfigError` in one sentence.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import re
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import yaml

from perl.config.schema import SECTIONS, ConfigError, TrainConfig, _describe, field_type, unwrap_optional
from perl.fileio import atomic_write_text

# note: the largest config file we agree to read; a real one is a few kB, so anything bigger is
# almost surely the wrong file (or a hostile one) and is refused before YAML sees it.
MAX_CONFIG_BYTES = 1_000_000


# note: PyYAML shares the object of an anchor between its aliases, so a 1 kB "billion laughs"
# file loads into a small graph that explodes the moment anything walks it (validation, deepcopy,
# yaml.dump into a store's attributes, an error message). The composer therefore counts every node
# as the reader will see it, aliases expanded, and refuses past a fixed size; and it refuses
# nesting past a fixed depth before Python's recursion limit turns it into a 3000-line traceback.
MAX_YAML_NODES = 100_000
MAX_YAML_DEPTH = 64


class YAMLBoundsError(yaml.YAMLError):
    """A YAML document whose aliases expand beyond `MAX_YAML_NODES` or that nests beyond `MAX_YAML_DEPTH`."""

    def __init__(self, problem: str, mark=None):
        super().__init__(problem)
        self.problem = problem
        self.problem_mark = mark


class _Loader(yaml.SafeLoader):
    """safe_load plus YAML 1.2 floats (PyYAML alone reads `5e-4`, no dot, as a string), bounded
    in expanded size and nesting depth (see `MAX_YAML_NODES`, `MAX_YAML_DEPTH`)."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0
        self._sizes: dict[int, int] = {}

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise YAMLBoundsError(f"nesting deeper than {MAX_YAML_DEPTH} levels", self.peek_event().start_mark)
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        size = self._sizes.get(id(node))
        if size is None:
            size = 1
            if isinstance(node, yaml.SequenceNode):
                size += sum(self._sizes.get(id(child), 1) for child in node.value)
            elif isinstance(node, yaml.MappingNode):
                size += sum(self._sizes.get(id(k), 1) + self._sizes.get(id(v), 1) for k, v in node.value)
            if size > MAX_YAML_NODES:
                raise YAMLBoundsError(
                    f"more than {MAX_YAML_NODES} values once its aliases (*name) are expanded", node.start_mark
                )
            self._sizes[id(node)] = size
        return node


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _yaml_load(text: str) -> Any:
    """YAML text -> Python values with the bounded safe loader (aliases and depth bounded)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 -- a SafeLoader subclass


class _BadValue(Exception):
    """Internal: a value that does not fit its type (turned into a ConfigError with the key)."""


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _parse_scalar(value: Any, tp: Any, from_text: bool) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise _BadValue
    if tp is int:
        if isinstance(value, bool):
            raise _BadValue
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                raise _BadValue from None
        raise _BadValue
    if tp is float:
        if isinstance(value, bool):
            raise _BadValue
        if isinstance(value, (int, float)):
            result = float(value)
        elif isinstance(value, str):
            try:
                result = float(value.strip())
            except ValueError:
                raise _BadValue from None
        else:
            raise _BadValue
        if not math.isfinite(result):
            raise _BadValue
        return result
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool):  # YAML `resume_from_checkpoint: true`
            return "true" if value else "false"
        if isinstance(value, (int, float)) and not from_text:
            return str(value)
        raise _BadValue
    raise _BadValue


def _yaml_value(text: str, kind: type) -> Any:
    """``text`` read as YAML, which must give a ``kind`` (list or dict); else `_BadValue`."""
    try:
        value = _yaml_load(text)
    except yaml.YAMLError:
        raise _BadValue from None
    if not isinstance(value, kind):
        raise _BadValue
    return value


def _parse_value(value: Any, tp: Any, from_text: bool = True) -> Any:
    """Convert ``value`` to the declared type ``tp``.

    Args:
        value: a command-line string (``from_text=True``) or a value read by YAML.
        tp: the field's declared type: int, float, bool, str, list[X], dict, or Optional of those.
        from_text (`bool`, defaults to True): on the command line "none"/"null" mean None for
            Optional fields; in YAML only `null` does, so a string "none" round-trips.

    Raises:
        _BadValue (internal) when the value does not fit; callers turn it into a ConfigError.
    """
    inner, optional = unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise _BadValue
    if optional and isinstance(value, str) and value.strip().lower() in ("none", "null"):
        if from_text or inner is not str:
            return None
    origin = typing.get_origin(inner) or inner
    if origin is list:
        (item_tp,) = typing.get_args(inner) or (str,)
        if isinstance(value, str):
            text = value.strip()
            if text.startswith(("[", "{")):
                value = _yaml_value(text, list)
            else:
                value = [item.strip() for item in text.split(",") if item.strip()]
        if not isinstance(value, list):
            raise _BadValue
        return [_parse_scalar(item, item_tp, from_text) for item in value]
    if origin is dict:
        if isinstance(value, str):
            value = _yaml_value(value, dict)
        if not isinstance(value, dict):
            raise _BadValue
        return {str(k): v for k, v in value.items()}
    return _parse_scalar(value, inner, from_text)


def _coerce(section: str, name: str, value: Any, from_text: bool) -> Any:
    tp = field_type(SECTIONS[section], name)
    try:
        return _parse_value(value, tp, from_text=from_text)
    except _BadValue:
        inner, optional = unwrap_optional(tp)
        expected = _describe(inner) + (" or none" if optional else "")
        raise ConfigError(f"{section}.{name} expects {expected}, got {_short(value)}.") from None


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------
# Keys: finding a field by its dotted name, with a suggestion when it is mistyped.


def _all_keys() -> list[str]:
    return [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def _suggest(word: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def _check_key(section: str, name: Optional[str]) -> None:
    if section not in SECTIONS:
        hint = _suggest(section, list(SECTIONS)) or f"; sections are {', '.join(SECTIONS)}."
        raise ConfigError(f"unknown config section '{section}'{hint}")
    if name is None:
        return
    names = [f.name for f in dataclasses.fields(SECTIONS[section])]
    if name not in names:
        key = f"{section}.{name}"
        hint = _suggest(key, _all_keys()) or _suggest(name, names)
        if not hint:
            hint = f"; valid keys of '{section}' are {', '.join(names)}."
        raise ConfigError(f"unknown config key '{key}'{hint}")


# ---------------------------------------------------------------------------------------------
# Building, loading, overriding, dumping.


def config_from_dict(data: Optional[Mapping[str, Any]], source: str = "config") -> TrainConfig:
    """Build a `TrainConfig` from a nested mapping ``{section: {field: value}}``.

    Missing sections and fields keep their defaults; values are converted to the declared types
    (YAML rules: only `null` is None). Unknown sections or keys raise `ConfigError`.
    """
    cfg = TrainConfig()
    if data is None:
        return cfg
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{source} must be a mapping of sections ({', '.join(SECTIONS)}), not {type(data).__name__}."
        )
    for section, values in data.items():
        section = str(section)
        _check_key(section, None)
        if values is None:
            continue
        if not isinstance(values, Mapping):
            raise ConfigError(
                f"section '{section}' of {source} must be a mapping of field: value, not {type(values).__name__}."
            )
        target = getattr(cfg, section)
        for name, value in values.items():
            name = str(name)
            _check_key(section, name)
            setattr(target, name, _coerce(section, name, value, from_text=False))
    return cfg


def read_yaml_file(path: Path, what: str, hint: str, error: type[ConfigError] = ConfigError) -> Any:
    """Read a user's YAML file safely; every way it can be wrong is one ``error`` sentence.

    Args:
        path (`Path`): the file.
        what (`str`): how messages name it, e.g. "config file".
        hint (`str`): what the user should do instead, e.g. "pass another --config".
        error (`type`): the `ConfigError` subclass to raise.
    """
    if not path.is_file():
        state = "is a directory, not a YAML file" if path.is_dir() else "does not exist"
        raise error(f"{what} {path} {state}; {hint}.")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise error(f"{what} {path} is larger than {MAX_CONFIG_BYTES} bytes; {hint}.")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"cannot read {what} {path} as UTF-8 text ({type(e).__name__}).") from None
    try:
        return _yaml_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or "invalid syntax"
        raise error(f"malformed YAML in {what} {path}{where}: {problem}; fix the file or {hint}.") from None


def load_config(path: str | os.PathLike) -> TrainConfig:
    """Read a YAML config file into a `TrainConfig` (structure and types checked, not ranges).

    Args:
        path: a YAML file with any subset of the sections, e.g. ``peft: {type: dora, r: 16}``.

    Raises:
        ConfigError: the file is missing, unreadable, malformed YAML, or has an unknown key.
    """
    p = Path(path)
    data = read_yaml_file(p, "config file", "pass another --config")
    return config_from_dict(data, source=f"config file {p}")


def apply_overrides(cfg: TrainConfig, overrides: Mapping[str, Any]) -> TrainConfig:
    """Return a copy of ``cfg`` with dotted overrides applied.

    Usage:
        >>> apply_overrides(TrainConfig(), {"peft.r": "16", "peft.target_modules": "q_proj,v_proj"})

    Args:
        cfg (`TrainConfig`): the config to start from (not modified).
        overrides (`Mapping[str, Any]`): ``"section.field" -> value``. Strings are parsed by the
            field's declared type: int, float, bool (true/false/1/0/yes/no), str, list (comma
            separated or a YAML list), dict (YAML), and "none"/"null" -> None for Optional fields.
            Other values (from Python) are converted the same way as YAML values.

    Raises:
        ConfigError: unknown key (with the closest one suggested) or a value of the wrong type.
    """
    out = copy.deepcopy(cfg)
    for key, value in overrides.items():
        parts = str(key).split(".")
        if len(parts) != 2:
            hint = _suggest(str(key), _all_keys()) or "."
            raise ConfigError(f"config key '{key}' must look like section.field (e.g. peft.r){hint}")
        section, name = parts
        _check_key(section, name)
        setattr(getattr(out, section), name, _coerce(section, name, value, from_text=isinstance(value, str)))
    return out


def config_to_dict(cfg: TrainConfig) -> dict[str, dict[str, Any]]:
    """The config as plain nested dicts and lists (YAML- and JSON-serialisable)."""
    return dataclasses.asdict(cfg)


def to_yaml(cfg: TrainConfig) -> str:
    """The config as YAML text that `load_config` reads back into an equal config."""
    header = "# perl TrainConfig; `perlwb train --config <this file>` reproduces the run.\n"
    return header + yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False)


def save_config(cfg: TrainConfig, path: str | os.PathLike) -> Path:
    """Write ``cfg`` as YAML to ``path`` (parent folders created); returns the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(p, to_yaml(cfg))  # note: a reader never sees half a config
    return p
