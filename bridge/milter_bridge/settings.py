"""Config's settings from flags, MILTER_BRIDGE_* variables and a TOML file.

Every setting is declared once, as a field of ``Config`` (config.py): its name,
type, default, parser, check and help. ``SETTINGS`` lists them, each with its
flag, environment variable and TOML key.

Where a value comes from, strongest first: a command-line flag, the
environment, the TOML file (``--config FILE`` or ``MILTER_BRIDGE_CONFIG``),
the default. A setting given nowhere is not passed to ``Config``, which then
uses the field's default: the program and ``Config(listen=..., upstream=...)``
have the same defaults. An error names the setting as the user wrote it
(``--deadline``, ``MILTER_BRIDGE_DEADLINE`` or ``config file /etc/…: deadline``)
and says why. docs/configuration.md is the reference table of these settings
(a test keeps them in step).
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from milter_bridge.config import Config, ConfigError
from milter_bridge.options import Setting, declared

SETTINGS = declared(Config)
BY_NAME = {s.name: s for s in SETTINGS}


@dataclass(frozen=True)
class Loaded:
    """The settings given, parsed, and where each setting came from."""

    values: Mapping[str, object]  # by Config field; only the settings given somewhere
    sources: Mapping[str, str]  # by setting name: flag, env, config file FILE or default

    def label(self, name: str) -> str:
        """The setting as the user gave it: its flag, its variable or its key in the file."""
        source = self.sources[name]
        setting = BY_NAME[name]
        if source == "env":
            return setting.env
        if source.startswith("config file"):
            return f"{source}: {name}"
        return setting.flag

    def config(self) -> Config:
        """Raises ConfigError naming the setting as the user gave it."""
        # Each value came from its field's own parser, whose type mypy checks
        # against the field where Config declares it.
        fields: dict[str, Any] = dict(self.values)
        try:
            return Config(**fields)
        except ConfigError as exc:
            message = str(exc)
            for setting in SETTINGS:
                renamed = _relabel(message, setting.flag, self.label(setting.name))
                if renamed is not None:
                    raise ConfigError(renamed) from None
            raise


def _relabel(message: str, flag: str, label: str) -> str | None:
    """``--flag: why`` or ``--flag detail: why`` with ``label`` for the flag."""
    if message.startswith((flag + ":", flag + " ")):
        return label + message[len(flag) :]
    return None


def _parse(setting: Setting, raw: object, label: str) -> object:
    try:
        return setting.parse(raw)
    except (TypeError, ValueError) as exc:  # ConfigError too
        message = str(exc)
        renamed = _relabel(message, setting.flag, label)
        raise ConfigError(renamed or f"{label}: {message}") from None


def _read_file(path: Path) -> dict[str, object]:
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        msg = f"config file {path}: cannot be read: {exc.strerror}"
        raise ConfigError(msg) from None
    except tomllib.TOMLDecodeError as exc:
        msg = f"config file {path}: not valid TOML: {exc}"
        raise ConfigError(msg) from None
    unknown = sorted(set(data) - set(BY_NAME))
    if unknown:
        msg = f"config file {path}: unknown setting {unknown[0]!r} (settings: {', '.join(BY_NAME)})"
        raise ConfigError(msg)
    return data


def load(
    flags: Mapping[str, object], environ: Mapping[str, str], config_file: Path | None
) -> Loaded:
    """``flags``: the text given on the command line, by setting name (None or absent: not
    given; a list for a repeatable setting)."""
    values: dict[str, object] = {}
    sources: dict[str, str] = {}
    file_values = _read_file(config_file) if config_file is not None else {}
    for setting in SETTINGS:
        if flags.get(setting.name) not in (None, []):
            source, label, raw = "flag", setting.flag, flags[setting.name]
        elif setting.env in environ:
            source, label, raw = "env", setting.env, environ[setting.env]
        elif setting.name in file_values:
            source = f"config file {config_file}"
            label, raw = f"{source}: {setting.name}", file_values[setting.name]
        elif setting.required:  # the parser says what is missing
            source, label, raw = "default", setting.flag, ""
        else:
            sources[setting.name] = "default"  # Config's own default
            continue
        sources[setting.name] = source
        values[setting.field] = _parse(setting, raw, label)
    return Loaded(values, sources)
