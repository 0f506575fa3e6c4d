"""From YAML text and command-line overrides to typed, validated sections, and back to YAML.

YAML files may use ``${oc.env:VAR,default}`` interpolation (resolved with OmegaConf). Overrides
are ``section.field=value`` strings whose values are parsed as YAML scalars/lists. Values are
coerced to the fields' annotated types; an unknown field is refused with the closest known name.
:func:`load_config` remembers where each field was set (YAML or command line) for the fields that
follow from the ERA5 channel list (:func:`~megatron_dchag.config.resolve.follow_channel_list`).

Out: :func:`dump_config` writes the whole config (``config.yaml``); :func:`summarize_config` is
the console form, where long lists (a cube's 3,681 wavelengths) are shortened to their first and
last few values and their count.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import typing
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import yaml

from megatron_dchag.config.checks import ConfigError, suggest
from megatron_dchag.config.resolve import follow_channel_list
from megatron_dchag.config.sections import ExperimentConfig, validate_config

#: Precedence of the places a field is set (higher wins): YAML file (or a saved config), then the
#: command line's overrides and flags. Fields left at their dataclass default have level 0.
YAML_LEVEL, COMMAND_LINE_LEVEL = 1, 2


# ----------------------------------------------------------------------------------------------
# Typed construction from plain dicts
# ----------------------------------------------------------------------------------------------


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Coerce ``value`` to the annotated type ``tp`` or raise ConfigError naming ``where``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        return _coerce(value, non_none[0], where)
    if tp is Any:
        return value
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}={value!r} must be a list")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin in (tuple, Tuple):
        if isinstance(value, int) and not isinstance(value, bool) and len(args) == 2 and args[1] is not Ellipsis:
            value = [value, value]
        if not isinstance(value, (list, tuple)) or (args[-1] is not Ellipsis and len(value) != len(args)):
            raise ConfigError(f"{where}={value!r} must be a list of {len(args)} values")
        item_types = args if args[-1] is not Ellipsis else [args[0]] * len(value)
        return tuple(_coerce(v, t, f"{where}[{i}]") for i, (v, t) in enumerate(zip(value, item_types)))
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}={value!r} must be true or false")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{where}={value!r} must be an integer")
        try:
            f = float(value)
        except ValueError:
            raise ConfigError(f"{where}={value!r} must be an integer") from None
        if not f.is_integer():
            raise ConfigError(f"{where}={value!r} must be an integer")
        return int(f)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}={value!r} must be a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}={value!r} must be a number") from None
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}={value!r} must be a string")
        return str(value)
    return value


def build_dataclass(cls: type, values: Optional[Mapping[str, Any]], where: str = "") -> Any:
    """Build ``cls`` from a mapping, rejecting unknown keys with a suggestion of the closest name."""
    if values is None:
        values = {}
    if not isinstance(values, Mapping):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        full = f"{where}.{key}" if where else str(key)
        if key not in names:
            raise ConfigError(f"unknown config field '{full}'{suggest(str(key), names)}")
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


def config_to_dict(cfg: Any) -> Dict[str, Any]:
    """Plain nested dict (lists for tuples) suitable for YAML/JSON."""

    def convert(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: convert(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [convert(x) for x in v]
        return v

    return convert(cfg)


def dump_config(cfg: ExperimentConfig) -> str:
    """The whole config as YAML (what ``config.yaml`` holds)."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None, width=120)


def summarize_config(cfg: ExperimentConfig, max_items: int = 16, shown: int = 4) -> str:
    """:func:`dump_config` for the console: a list longer than ``max_items`` is shown as its first
    and last ``shown`` values and its length, on one line (``[400.0, 400.1, ..., 900.0] (3681 values)``)."""
    tree = config_to_dict(cfg)
    summaries: Dict[str, str] = {}
    for section in tree.values():
        if not isinstance(section, dict):
            continue
        for key, value in section.items():
            if isinstance(value, list) and len(value) > max_items:
                token = f"__summary_{len(summaries)}__"
                head = ", ".join(_flow(v) for v in value[:shown])
                tail = ", ".join(_flow(v) for v in value[-shown:])
                summaries[token] = f"[{head}, ..., {tail}] ({len(value)} values)"
                section[key] = token
    text = yaml.safe_dump(tree, sort_keys=False, default_flow_style=None, width=120)
    for token, summary in summaries.items():
        text = text.replace(token, summary)
    return text


def _flow(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def parse_override(text: str) -> Tuple[List[str], Any]:
    """``'model.hidden_size=256'`` -> (['model', 'hidden_size'], 256)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.field=value")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-")
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}' has an empty field name")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _set_path(tree: Dict[str, Any], path: List[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set '{'.'.join(path)}': '{part}' is not a section")
        node = child
    node[path[-1]] = value


def _resolve_interpolations(tree: Dict[str, Any], source: str) -> Dict[str, Any]:
    """Resolve ``${oc.env:...}`` and other OmegaConf interpolations, if any are present."""
    text = yaml.safe_dump(tree)
    if "${" not in text:
        return tree
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        return OmegaConf.to_container(OmegaConf.create(tree), resolve=True)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{source}: cannot resolve interpolation: {exc}".splitlines()[0]) from None


def load_yaml(path: str) -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        with open(path, "r", encoding="utf-8") as fh:
            tree = yaml.safe_load(fh)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file '{path}' cannot be read: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file '{path}' is not valid YAML: {str(exc).splitlines()[0]}") from None
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of sections, got {type(tree).__name__}")
    return tree


def load_config(
    path: Optional[str] = None,
    overrides: Sequence[str] = (),
    validate: bool = True,
    world_size: Optional[int] = None,
    workload_sections: Optional[Sequence[str]] = None,
    base: Optional[Mapping[str, Any]] = None,
) -> ExperimentConfig:
    """Load a YAML config (or ``base``, a config tree such as a run's saved config, in its place),
    apply dotted overrides, build the dataclasses, derive the fields that follow from
    ``data.channels`` where they were set at a lower precedence
    (:func:`~megatron_dchag.config.resolve.follow_channel_list`), and validate them
    (``workload_sections``: see :meth:`ExperimentConfig.validate`).

    Otherwise the result is the config as written (defaults that follow from other fields still
    ``None``); :func:`~megatron_dchag.config.resolve.resolve_config` fills those in for a run.
    """
    if path and base is not None:
        raise ConfigError("load_config: give a config file or a base config, not both")
    tree: Dict[str, Any] = load_yaml(path) if path else copy.deepcopy(dict(base or {}))
    levels = {f"{section}.{key}": YAML_LEVEL for section, fields in tree.items() if isinstance(fields, dict)
              for key in fields}
    for text in overrides:
        key_path, value = parse_override(text)
        _set_path(tree, key_path, value)
        if len(key_path) >= 2:
            levels[".".join(key_path[:2])] = COMMAND_LINE_LEVEL
        elif isinstance(value, dict):
            levels.update({f"{key_path[0]}.{key}": COMMAND_LINE_LEVEL for key in value})
    tree = _resolve_interpolations(tree, path or "overrides")
    cfg = follow_channel_list(build_dataclass(ExperimentConfig, tree), levels)
    if validate:
        validate_config(cfg, world_size=world_size, workload_sections=workload_sections)
    return cfg
