"""Run configs: dataclasses, loadable from YAML, overridable with ``--set a.b=1``.

Every stage (pretraining, SFT, DPO, ...) describes its run with a tree of
dataclasses. This file turns a YAML file plus dotted overrides into that tree,
checking every key and type on the way, so a typo fails at start-up with a
message that names it instead of silently training the wrong thing::

    cfg = load_config(PretrainConfig, "configs/pretrain.yaml", ["optim.lr=3e-4"])
    print(config_to_yaml(cfg))        # the resolved config, as saved with the run

Fields typed ``dict`` are free-form (their keys are checked by whoever consumes
them, e.g. :class:`minigpt.model.GPTConfig` for the ``model`` section).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """``X | None`` -> (X, True); anything else -> (tp, False)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (converting int -> float)."""
    tp, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise TypeError(f"config key {key!r} must not be null")
    if _is_dataclass_type(tp):
        return _build(tp, value, key)
    origin = typing.get_origin(tp) or tp
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise TypeError(f"config key {key!r} must be true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"config key {key!r} must be an int, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"config key {key!r} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise TypeError(f"config key {key!r} must be a string, got {value!r}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise TypeError(f"config key {key!r} must be a mapping, got {value!r}")
        return dict(value)
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise TypeError(f"config key {key!r} must be a list, got {value!r}")
        args = typing.get_args(tp)
        items = [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)] if args else value
        return list(items) if origin is list else tuple(items)
    return value


def _build(cls: type[T], data: Any, prefix: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys by full name."""
    where = prefix or cls.__name__
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise TypeError(f"config section {where!r} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for name in data:
        if name not in fields:
            full = f"{prefix}.{name}" if prefix else str(name)
            raise ValueError(
                f"unknown config key {full!r}; valid keys here: {', '.join(sorted(fields))}"
            )
    kwargs = {}
    for name, value in data.items():
        full = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(value, hints[name], full)
    return cls(**kwargs)


def merge_into_defaults(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """Nested dicts of ``cls()``'s defaults with ``data`` laid over them.

    Sections that are dataclasses merge key by key, so a YAML file that sets only
    ``train: {batch_size: 8}`` keeps every other ``train`` default of ``cls``.
    Free-form ``dict`` fields (like ``model``) are replaced as a whole, so
    ``model: {preset: tiny}`` means exactly the tiny preset.
    """
    return _merge(config_to_dict(cls()), data, cls)


def _merge(base: dict[str, Any], data: Any, cls: type) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise TypeError(f"config section of {cls.__name__} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    for key, value in data.items():
        tp = _unwrap_optional(hints[key])[0] if key in hints else None
        if _is_dataclass_type(tp) and isinstance(value, dict):
            default = base.get(key)
            base[key] = _merge(default if isinstance(default, dict) else {}, value, tp)
        else:
            base[key] = value  # unknown keys pass through and fail in _build, named
    return base


def config_from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build the dataclass tree ``cls``: its defaults, with ``data`` merged over them.

    Raises:
        ValueError: an unknown key (named in full, e.g. ``'optim.lrr'``).
        TypeError: a value of the wrong type (also named).
    """
    return _build(cls, merge_into_defaults(cls, data))


def config_to_dict(config: Any) -> dict[str, Any]:
    """The nested-dict form of a config dataclass (what YAML and JSON hold)."""
    return dataclasses.asdict(config)


def config_to_yaml(config: Any) -> str:
    """The config as YAML text, keys in field order (printed at start, saved with the run)."""
    return yaml.safe_dump(config_to_dict(config), sort_keys=False, default_flow_style=False)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optim.lr=3e-4"`` -> (["optim", "lr"], 0.0003). The value is parsed as YAML,
    so ``true``, ``12``, ``[1, 2]`` and ``null`` get their natural types."""
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    path = key.strip().split(".")
    if not all(path):
        raise ValueError(f"override {text!r} has an empty key part")
    value = yaml.safe_load(raw) if raw.strip() else ""
    # YAML 1.1 reads "3e-4" as a string; a number is what anyone means there.
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = float(value) if any(c in value for c in ".eE") else value
    return path, value


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict:
    """Apply dotted ``key.sub=value`` overrides to nested dicts, in place; returns ``data``."""
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ValueError(f"override {text!r}: {part!r} is a value, not a section")
            node = child
        node[path[-1]] = value
    return data


def add_override_argument(
    parser: argparse.ArgumentParser, example: str = "optim.lr=3e-4", what: str = "a config value"
) -> None:
    """Add the repeatable ``--set KEY=VALUE`` option every config-driven command shares.

    The values land in ``args.overrides`` (a list) and go to :func:`load_config`,
    which applies them after the YAML file, so the command line always wins.
    """
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override {what}, e.g. --set {example} (repeatable)",
    )


def load_config(
    cls: type[T],
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> T:
    """Defaults of ``cls`` <- YAML file at ``path`` (optional) <- dotted overrides.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError / TypeError: unknown key or wrong type, naming the key.
    """
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        loaded = yaml.safe_load(path.read_text())
        if loaded is not None and not isinstance(loaded, dict):
            raise ValueError(f"config file {path} must hold a mapping at the top level")
        data = loaded or {}
    # defaults <- file, then the dotted overrides on top (they merge into dict fields too)
    data = apply_overrides(merge_into_defaults(cls, data), overrides)
    return _build(cls, data)
