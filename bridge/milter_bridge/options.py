"""How a setting is declared: one field of Config says everything about it.

    max_headers: int = option(
        default=DEFAULT_MAX_HEADERS, parse=whole, check=positive, metavar="COUNT", help="..."
    )

gives the field's type and default, the parser of what a user writes (a flag's
or variable's text, or a TOML value), the metavar and help of ``--max-headers``,
and the check of a value however it was made (``Config(...)`` directly or from
the command line). The flag, the MILTER_BRIDGE_* variable and the TOML key
derive from the name; ``declared(Config)`` lists them all. mypy checks that the
parser, the check and the default fit the field's type.

Parsers raise ValueError with the reason only (``'lots' is not a whole
number``); whoever parses prefixes the setting as the user gave it.
"""

from __future__ import annotations

import dataclasses
import grp
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, dataclass_transform, overload

ENV_PREFIX = "MILTER_BRIDGE_"
_T = TypeVar("_T")
_METADATA_KEY = "milter_bridge.setting"


def _as_is(value: object) -> object:
    return value


def _fine(_: object) -> str | None:
    return None


@dataclass(frozen=True)
class Setting:
    """One setting: what ``option`` declares, with the field's name and default added."""

    parse: Callable[[object], Any]
    metavar: str
    help: str
    # The problem with a value, or None; not asked for None (a setting left off).
    check: Callable[[Any], str | None] = _fine
    # A value as a user would write it (for check-config, --help and the reference).
    show: Callable[[Any], object] = _as_is
    repeatable: bool = False  # [STAGE=]VALUE items: the flag repeats
    name: str = ""  # the TOML key; "" until declared(): the field's name
    field: str = ""
    default: object = None  # None for a required setting
    required: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def shown_default(self) -> str | None:
        """The default as a user would write it; None when there is none."""
        return None if self.default is None else str(self.show(self.default))


_Check = Callable[[_T], str | None]


@overload
def option(
    *,
    default: _T,
    parse: Callable[[object], _T],
    metavar: str,
    help: str,
    check: _Check[_T] = ...,
    show: Callable[[_T], object] = ...,
    name: str = "",
    repeatable: bool = False,
) -> _T: ...
@overload
def option(
    *,
    default_factory: Callable[[], _T],
    parse: Callable[[object], _T],
    metavar: str,
    help: str,
    check: _Check[_T] = ...,
    show: Callable[[_T], object] = ...,
    name: str = "",
    repeatable: bool = False,
) -> _T: ...
@overload
def option(
    *,
    parse: Callable[[object], _T],
    metavar: str,
    help: str,
    check: _Check[_T] = ...,
    show: Callable[[_T], object] = ...,
) -> _T: ...
def option(**kwargs: Any) -> Any:
    """A Config field that is a setting; without ``default`` or ``default_factory``, required."""
    field_args = {k: kwargs.pop(k) for k in ("default", "default_factory") if k in kwargs}
    return dataclasses.field(**field_args, metadata={_METADATA_KEY: Setting(**kwargs)})


@dataclass_transform(frozen_default=True, field_specifiers=(dataclasses.field, option))
def settings_class(cls: type[_T]) -> type[_T]:
    """A frozen dataclass (with slots) whose fields may be declared with ``option``."""
    return dataclasses.dataclass(frozen=True, slots=True)(cls)


_DECLARED: dict[type, tuple[Setting, ...]] = {}


def declared(cls: type) -> tuple[Setting, ...]:
    """The settings of a ``settings_class``, in field order."""
    if cls not in _DECLARED:
        _DECLARED[cls] = _declared(cls)
    return _DECLARED[cls]


def _declared(cls: type) -> tuple[Setting, ...]:
    out = []
    for f in dataclasses.fields(cls):
        setting = f.metadata.get(_METADATA_KEY)
        if not isinstance(setting, Setting):
            continue
        if f.default is not dataclasses.MISSING:
            default: object = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        out.append(
            dataclasses.replace(
                setting,
                name=setting.name or f.name,
                field=f.name,
                default=default,
                required=f.default is f.default_factory is dataclasses.MISSING,
            )
        )
    return tuple(out)


def check_all(instance: object) -> tuple[Setting, str] | None:
    """The first setting of ``instance`` whose check fails, and why."""
    for setting in declared(type(instance)):
        value = getattr(instance, setting.field)
        problem = None if value is None else setting.check(value)
        if problem is not None:
            return setting, problem
    return None


# Parsers: a flag's or variable's text, or a TOML value -> the field's value.


def whole(raw: object) -> int:
    if isinstance(raw, int) and not isinstance(raw, bool):
        return raw
    if isinstance(raw, str):
        try:
            return int(raw)
        except ValueError:
            pass
    msg = f"{raw!r} is not a whole number"
    raise ValueError(msg)


def whole_or_auto(auto: Callable[[], int]) -> Callable[[object], int]:
    """A whole number, or the word ``auto`` for what ``auto()`` says."""

    def parse(raw: object) -> int:
        if raw == "auto":
            return auto()
        try:
            return whole(raw)
        except ValueError:
            msg = f"{raw!r} is neither a whole number nor auto"
            raise ValueError(msg) from None

    return parse


def number(raw: object) -> float:
    if isinstance(raw, int | float) and not isinstance(raw, bool):
        return float(raw)
    if isinstance(raw, str):
        try:
            return float(raw)
        except ValueError:
            pass
    msg = f"{raw!r} is not a number"
    raise ValueError(msg)


def text(raw: object) -> str:
    if isinstance(raw, str | int) and not isinstance(raw, bool):
        return str(raw)
    msg = f"{raw!r} is not text"
    raise ValueError(msg)


def one_of(*choices: str) -> Callable[[object], str]:
    def parse(raw: object) -> str:
        value = text(raw)
        if value not in choices:
            msg = f"{value!r} is not one of {', '.join(choices)}"
            raise ValueError(msg)
        return value

    return parse


def on_off(raw: object) -> bool:
    if isinstance(raw, bool):  # TOML true/false
        return raw
    return one_of("on", "off")(raw) == "on"


def show_on_off(value: bool) -> str:  # noqa: FBT001 - the value shown
    return "on" if value else "off"


def octal(raw: object) -> int:
    try:
        return int(text(raw), 8)
    except ValueError:
        msg = f"{raw!r} is not an octal mode like 660"
        raise ValueError(msg) from None


def show_octal(mode: int | None) -> str | None:
    return None if mode is None else f"{mode:o}"


def items(raw: object) -> list[str]:
    """``[STAGE=]VALUE`` items: repeated flags, ``a,b`` text, a TOML list or table."""
    if isinstance(raw, str):
        return [item.strip() for item in raw.split(",") if item.strip()]
    if isinstance(raw, list):
        return [str(item) for item in raw]
    if isinstance(raw, dict):  # {default = 8, end_of_message = 120}
        first = [str(raw["default"])] if "default" in raw else []
        return first + [f"{key}={value}" for key, value in raw.items() if key != "default"]
    msg = f"{raw!r} is not a list"
    raise ValueError(msg)


# Checks: a value of the field -> what is wrong with it, or None.


def positive(value: float) -> str | None:
    return None if 0 < value < math.inf else f"{value} must be greater than 0 and finite"


MAX_POLICY_STREAMS = 64


def stream_count(value: float) -> str | None:
    if 0 <= value <= MAX_POLICY_STREAMS:
        return None
    return f"{value} is not between 0 and {MAX_POLICY_STREAMS}"


MAX_WORKERS = 64


def worker_count(value: float) -> str | None:
    return None if 1 <= value <= MAX_WORKERS else f"{value} is not between 1 and {MAX_WORKERS}"


def seconds_or_zero(value: float) -> str | None:
    return None if 0 <= value < math.inf else f"{value} is not a number of seconds"


def permission_mode(mode: int | None) -> str | None:
    return None if mode is None or 0 <= mode <= 0o777 else f"{mode:o} is not a permission mode"


def existing_group(name: str | None) -> str | None:
    try:
        grp.getgrnam(name or "")
    except KeyError:
        return f"no group named {name!r}"
    return None


def host_port(value: str) -> tuple[str, int]:
    """(host, port) of HOST:PORT or [ADDR]:PORT; port -1 when it is not a number."""
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port) if port.isdigit() else -1


def host_and_port(value: str | None) -> str | None:
    host, port = host_port(value or "")
    return None if host and 0 <= port <= 65535 else f"{value!r} is not HOST:PORT"


def member(choices: tuple[str, ...]) -> Callable[[str], str | None]:
    def check(value: str) -> str | None:
        return None if value in choices else f"{value!r} is not one of {', '.join(choices)}"

    return check


def readable(path: str) -> tuple[str, str | None]:
    """The file's text, or why it cannot be read."""
    try:
        return Path(path).read_text(errors="replace"), None
    except OSError as exc:
        return "", f"cannot read {path}: {exc.strerror or exc}"


PEM_CERTIFICATE = re.compile(r"-----BEGIN CERTIFICATE")
PEM_KEY = re.compile(r"-----BEGIN (?:RSA |EC )?PRIVATE KEY")  # PKCS#8, PKCS#1 or SEC 1


def pem_file(kind: str, marker: re.Pattern[str]) -> Callable[[str | None], str | None]:
    """Checked at start, so that a wrong file stops the bridge instead of failing every call."""

    def check(path: str | None) -> str | None:
        content, problem = readable(path or "")
        if problem is None and not marker.search(content):
            return f"{path} holds no PEM {kind}"
        return problem

    return check


def nonempty_file(path: str | None) -> str | None:
    content, problem = readable(path or "")
    return problem or (None if content.strip() else f"{path} is empty")
