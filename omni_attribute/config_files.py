"""The config files of the commands (omni-attribute-train, omni-attribute-annotate run and finetune): a YAML (or
JSON) mapping, ``section.key=value`` overrides parsed as YAML, and the nested dataclasses built from it with
every unknown key named. Each command passes its own error class (a ``ConfigError``), so its messages and
exceptions stay its own; which paths are relative to the file, and how they are resolved, is the command's."""

from __future__ import annotations

import json
from dataclasses import asdict, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml


def read_config_file(path: str | Path | None, error: type[Exception]) -> tuple[dict, Path]:
    """The mapping in a YAML/JSON file (empty without a file) and the folder relative paths start from."""
    if path is None:
        return {}, Path.cwd()
    path = Path(path)
    if not path.is_file():
        raise error(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise error(f"{path.name} is not valid YAML: {exc}") from exc
    return data, path.parent


def apply_overrides(data: dict, overrides: list[str], error: type[Exception], example: str | None = None) -> dict:
    """``section.key=value`` strings set into ``data`` (the value parsed as YAML); ``example`` goes into the
    message about a malformed one."""
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key.strip():
            raise error(f"override {override!r}: write section.key=value" + (f", e.g. {example}" if example else ""))
        target = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise error(f"override {override!r}: {part!r} is a value, not a section")
        target[parts[-1]] = yaml.safe_load(raw)
    return data


def build_dataclass(cls, data: Any, where: str, error: type[Exception]):
    """``cls`` (a dataclass, its sections dataclasses too) from a mapping; ``where`` names it in messages."""
    if not isinstance(data, dict):
        raise error(f"{where}: expected a mapping, got {type(data).__name__}")
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise error(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(known)}")
    defaults = cls()
    values = {}
    for name, value in data.items():
        default = getattr(defaults, name)
        values[name] = build_dataclass(type(default), value, f"{where}.{name}", error) if is_dataclass(default) else value
    return cls(**values)


def dump_config(config) -> str:
    return json.dumps(asdict(config), indent=2, default=str)


def config_keys(config) -> list[str]:
    """``section.key = default`` lines of a config dataclass (for --help)."""
    lines = []

    def walk(obj, prefix: str) -> None:
        for f in fields(obj):
            value = getattr(obj, f.name)
            if is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
            else:
                lines.append(f"  {prefix}{f.name} = {value!r}")
    walk(config, "")
    return lines
