"""Build a validated :class:`Config` from defaults, a profile, a TOML file, the environment and
command-line overrides.

Every setting has one canonical dotted name (``node.bind``, ``membership.probe_interval``). It is
the setting's path in TOML, it gives the environment variable its name (``MESHD_NODE_BIND``), it
is what ``--set`` takes, and it is the key of every :class:`ConfigError`. One table of parsers,
keyed by those names, serves every layer, so a value means the same thing wherever it is written
and an operator can fix an error without knowing which layer's parser produced it.

A string is always read the way the environment is read (``"2s"``, ``"a:1,b:2"``, ``"yes"``),
whichever layer it came from; values that are already typed (TOML numbers, booleans, arrays and
tables, or Python objects passed as overrides) are checked as they are.
"""

from __future__ import annotations

import argparse
import base64
import difflib
import ipaddress
import math
import os
import re
import socket
import tomllib
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import fields, replace
from types import MappingProxyType
from typing import Any, Final, NamedTuple, TypeVar

from meshd.config.model import (
    Address,
    ApiConfig,
    Config,
    ConfigError,
    DnsSeed,
    LogConfig,
    MembershipTuning,
    MetricsConfig,
    NodeConfig,
    PlacementTuning,
    ReplicationLimits,
    SecurityConfig,
    Seed,
    StorageTuning,
    TracingConfig,
    TransportTuning,
)
from meshd.config.profiles import PROFILES, profile_tuning

__all__ = [
    "CONFIG_ENV",
    "DEFAULT_PORT",
    "ENV_PREFIX",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "SETTING_NAMES",
    "add_run_arguments",
    "build_config",
    "env_name",
    "overrides_from_args",
]

DEFAULT_PORT: Final = 7946
ENV_PREFIX: Final = "MESHD_"
CONFIG_ENV: Final = "MESHD_CONFIG"
LOG_LEVELS: Final = ("debug", "info", "warning", "error")
LOG_FORMATS: Final = ("logfmt", "json")
MAX_TAGS: Final = 32
MAX_TAG_BYTES: Final = 512
MAX_LABEL_CHARS: Final = 64
KEY_SIZES: Final = (16, 24, 32)
# sun_path is 108 bytes on Linux, one of which is the terminating NUL.
MAX_SOCKET_PATH_BYTES: Final = 107

_T = TypeVar("_T")
_Parser = Callable[[object], object]


class _Invalid(ValueError):
    """A value a parser rejects. The caller adds the setting's name and where the value came from,
    so parsers stay small and know nothing about layers."""


class _Raw(NamedTuple):
    """A value as one layer wrote it, with where it came from for error messages."""

    value: object
    origin: str


# --- scalar parsers: each takes what a layer wrote and returns the model's type -------------------


def _describe(value: object) -> str:
    """Render a rejected value roughly as the user wrote it, for "expected X, got Y"."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, list | tuple):
        return "a list"
    return repr(value)


def _expected(what: str, value: object) -> _Invalid:
    return _Invalid(f"expected {what}, got {_describe(value)}")


def _parse_str(value: object) -> str:
    if not isinstance(value, str):
        raise _expected("a string", value)
    return value


def _parse_path(value: object) -> str:
    """A filesystem path; an empty one would silently mean the current directory."""
    path = _parse_str(value)
    if not path.strip():
        raise _Invalid("must not be empty")
    return path


def _parse_socket_path(value: object) -> str:
    """Checked here because bind() would otherwise fail only at startup, with a vaguer error."""
    path = _parse_path(value)
    size = len(os.fsencode(path))
    if size > MAX_SOCKET_PATH_BYTES:
        raise _Invalid(
            f"path is {size} bytes long; Unix socket paths are limited to {MAX_SOCKET_PATH_BYTES}"
        )
    return path


_TRUE_WORDS: Final = frozenset({"true", "1", "yes"})
_FALSE_WORDS: Final = frozenset({"false", "0", "no"})


def _parse_bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _TRUE_WORDS:
            return True
        if word in _FALSE_WORDS:
            return False
    raise _expected("true or false (or yes/no, 1/0)", value)


_INT_RE: Final = re.compile(r"[+-]?[0-9]+")


def _parse_int(value: object) -> int:
    # bool is an int subclass; `true` where a count is expected is a mistake, not 1.
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and _INT_RE.fullmatch(value.strip()):
        return int(value.strip())
    raise _expected("an integer", value)


def _parse_ratio(value: object) -> float:
    """A fraction 0..1 (a number, or a string holding one)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            raise _expected("a number between 0 and 1", value) from None
    else:
        raise _expected("a number between 0 and 1", value)
    if not 0.0 <= number <= 1.0:
        raise _Invalid(f"{number} is not between 0 and 1")
    return number


def _parse_id(value: object) -> int:
    """A uid or gid: what the kernel reports for a peer is an unsigned 32-bit number."""
    number = _parse_int(value)
    if not 0 <= number < 2**32:
        raise _Invalid(f"{number} is not a valid uid/gid")
    return number


_NUMBER: Final = r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
_SECONDS_RE: Final = re.compile(_NUMBER)
_DURATION_PART_RE: Final = re.compile(rf"\s*({_NUMBER})\s*(ms|s|m|h|d)")
_DURATION_UNITS: Final = MappingProxyType(
    {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
)
_DURATION_HINT: Final = "a duration (seconds, or a number with a unit: 500ms, 2s, 1m, 1h)"


def _duration_from_text(text: str) -> float:
    """Parse "1.5", "500ms", "2m" or Go-style sums like "1m30s" into seconds.

    The grammar is spelled out rather than handed to float(), which would also take "inf",
    "1e3" and "1_000" and so accept typos silently.
    """
    body = text.strip()
    sign = 1.0
    if body[:1] in ("+", "-"):
        sign = -1.0 if body[0] == "-" else 1.0
        body = body[1:]
    if _SECONDS_RE.fullmatch(body):
        return sign * float(body)
    total, pos = 0.0, 0
    while pos < len(body):
        part = _DURATION_PART_RE.match(body, pos)
        if part is None:
            raise _expected(_DURATION_HINT, text)
        total += float(part[1]) * _DURATION_UNITS[part[2]]
        pos = part.end()
    if pos == 0:
        raise _expected(_DURATION_HINT, text)
    return sign * total


def _parse_duration(value: object) -> float:
    """Seconds as a float. Signs are accepted so that MembershipTuning.validate(), which knows
    each field's lower bound, reports "must be > 0" under the right name."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        seconds = _duration_from_text(value)
    else:
        raise _expected(_DURATION_HINT, value)
    if not math.isfinite(seconds):
        raise _Invalid(f"expected a finite duration, got {_describe(value)}")
    return seconds


_OCTAL_RE: Final = re.compile(r"(?:0o)?[0-7]+")


def _parse_mode(value: object) -> int:
    """A permission mode. Strings are always octal, as with chmod, so "0660" and "660" agree;
    TOML integers are taken as written (0o660 in TOML is octal, 660 is decimal)."""
    if isinstance(value, int) and not isinstance(value, bool):
        mode = value
    elif isinstance(value, str) and _OCTAL_RE.fullmatch(value.strip().lower()):
        mode = int(value.strip().lower().removeprefix("0o"), 8)
    else:
        raise _expected('a file mode (an octal string like "0660")', value)
    if not 0 <= mode <= 0o777:
        raise _Invalid(f'{mode:#o} is outside 0..0o777 (write it in octal: "0660" or 0o660)')
    return mode


_NAME_RE: Final = re.compile(r"[A-Za-z0-9._-]{1,128}")


def _parse_name(value: object) -> str:
    """Node names go on the wire and into log lines and file names, hence the narrow alphabet."""
    name = _parse_str(value)
    if not _NAME_RE.fullmatch(name):
        raise _Invalid(
            f"{name!r} is not a valid node name (1 to 128 characters of A-Z a-z 0-9 . _ -)"
        )
    return name


def _parse_label(value: object) -> str:
    label = _parse_str(value)
    if len(label) > MAX_LABEL_CHARS:
        raise _Invalid(f"is {len(label)} characters long; at most {MAX_LABEL_CHARS} are allowed")
    return label


def _parse_key(value: object) -> str:
    """A base64 AES key. Messages never echo the value: it is a secret."""
    text = _parse_str(value).strip()
    try:
        raw = base64.b64decode(text, validate=True)
    except ValueError:  # binascii.Error, or non-ASCII input
        raise _Invalid("is not valid base64 (the key is not shown)") from None
    if len(raw) not in KEY_SIZES:
        raise _Invalid(f"decodes to {len(raw)} bytes; AES keys must be 16, 24 or 32 bytes")
    return text


def _choice(options: Iterable[str]) -> Callable[[object], str]:
    """A case-insensitive pick from a fixed set, normalised to lower case."""
    allowed = tuple(options)

    def parse_choice(value: object) -> str:
        word = _parse_str(value).strip().lower()
        if word not in allowed:
            raise _Invalid(f"{word!r} is not one of: {', '.join(allowed)}")
        return word

    return parse_choice


def _optional(parse: Callable[[object], _T]) -> Callable[[object], _T | None]:
    """Let an empty string mean "not set", so `MESHD_NODE_ADVERTISE=` can undo a file's value."""

    def parse_optional(value: object) -> _T | None:
        return None if value == "" else parse(value)

    return parse_optional


def _list_of(parse_item: Callable[[object], _T]) -> Callable[[object], tuple[_T, ...]]:
    """A list: an array, or a comma-separated string (blank items skipped, so "" is empty)."""

    def parse_list(value: object) -> tuple[_T, ...]:
        if isinstance(value, str):
            items: list[object] = [part.strip() for part in value.split(",") if part.strip()]
        elif isinstance(value, list | tuple):
            items = list(value)
        else:
            raise _expected("a list", value)
        return tuple(_parse_item(parse_item, index, item) for index, item in enumerate(items, 1))

    return parse_list


def _parse_item(parse: Callable[[object], _T], index: int, item: object) -> _T:
    try:
        return parse(item)
    except _Invalid as err:
        raise _Invalid(f"item {index}: {err}") from None


# --- tags -----------------------------------------------------------------------------------------


def _split_tag(item: object) -> tuple[str, str]:
    text = _parse_str(item)
    key, sep, value = text.partition("=")
    if not sep:
        raise _Invalid(f"{text!r} is not of the form name=value")
    return key.strip(), value.strip()


def _tag_pairs(value: object) -> list[tuple[str, str]]:
    """Tags as a TOML table, as "k=v,k2=v2" (environment) or as ["k=v", ...] (repeated --tag)."""
    if isinstance(value, Mapping):
        pairs: list[tuple[str, str]] = []
        for key, item in value.items():
            if not isinstance(item, str):
                raise _Invalid(f"tag {key!r}: expected a string, got {_describe(item)}")
            pairs.append((str(key), item))
        return pairs
    if isinstance(value, str):
        return [_split_tag(part) for part in value.split(",") if part.strip()]
    if isinstance(value, list | tuple):
        return [_split_tag(part) for part in value]
    raise _expected("a table of strings or name=value pairs", value)


def _parse_tags(value: object) -> dict[str, str]:
    """Tags travel in every alive message, so their count and size are bounded."""
    tags: dict[str, str] = {}
    for key, item in _tag_pairs(value):
        if not key:
            raise _Invalid("tag names must not be empty")
        if key in tags:
            raise _Invalid(f"tag {key!r} is given twice")
        tags[key] = item
    if len(tags) > MAX_TAGS:
        raise _Invalid(f"{len(tags)} tags given; at most {MAX_TAGS} are allowed")
    size = sum(len(key.encode()) + len(item.encode()) for key, item in tags.items())
    if size > MAX_TAG_BYTES:
        raise _Invalid(
            f"tag names and values take {size} bytes (UTF-8); at most {MAX_TAG_BYTES} are allowed"
        )
    return tags


# --- addresses ------------------------------------------------------------------------------------


def _split_host_port(text: str) -> tuple[str, str | None, bool]:
    """Split "host:port" or "[v6]:port" into (host, port text or None, bracketed).

    Bare IPv6 ("::1:7946") is refused rather than guessed at: the last group could be a port.
    """
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            raise _Invalid("missing ']' after the IPv6 address")
        if not rest:
            return host, None, True
        if not rest.startswith(":"):
            raise _Invalid("expected ':port' after ']'")
        return host, rest[1:], True
    if text.count(":") > 1:
        raise _Invalid("IPv6 addresses must be in brackets, e.g. [::1]:7946")
    host, sep, port = text.partition(":")
    return host, (port if sep else None), False


_PORT_RE: Final = re.compile(r"[0-9]+")


def _parse_port(text: str | None, *, default: int | None, allow_zero: bool) -> int:
    if text is None:
        if default is None:
            raise _Invalid("missing port (expected host:port)")
        return default
    if not _PORT_RE.fullmatch(text):
        raise _Invalid(f"port {text!r} is not a number")
    port = int(text)
    low = 0 if allow_zero else 1
    if not low <= port <= 65535:
        raise _Invalid(f"port {port} is outside {low}..65535")
    return port


_LABEL_RE: Final = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def _is_hostname(host: str) -> bool:
    """RFC 1123 names. An all-numeric last label is refused so that a mistyped IPv4 address
    ("10.0.0.256") is reported instead of being looked up as a name."""
    name = host.removesuffix(".")
    labels = name.split(".")
    return (
        len(name) <= 253
        and all(_LABEL_RE.fullmatch(label) for label in labels)
        and not labels[-1].isdigit()
    )


def _parse_host(host: str, *, bracketed: bool, ip_only: bool) -> str:
    """Return the host normalised (IP literals in their canonical form, IPv6 without brackets)."""
    if not host:
        raise _Invalid("missing host")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if ip is not None:
        if bracketed and ip.version != 6:
            raise _Invalid("brackets are only for IPv6 addresses")
        return str(ip)
    if bracketed:
        raise _Invalid(f"{host!r} is not an IPv6 address")
    if ip_only:
        raise _Invalid(f"{host!r} is not an IP address (names are not resolved for this setting)")
    if not _is_hostname(host):
        raise _Invalid(f"{host!r} is neither an IP address nor a valid hostname")
    return host


# DNS names as seeds may hold SRV labels (``_gossip._udp.meshd.default.svc``).
_DNS_LABEL_RE: Final = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")


def _parse_seed(value: object) -> Seed:
    """A seed: "host[:port]" (resolved once, see _address_parser) or "dns:NAME[:PORT]"."""
    text = _parse_str(value).strip()
    if not text.startswith("dns:"):
        return _address_parser(ip_only=False, allow_zero_port=False, default_port=DEFAULT_PORT)(
            text
        )
    rest = text.removeprefix("dns:")
    name, sep, port_text = rest.partition(":")
    try:
        port = _parse_port(port_text if sep else None, default=DEFAULT_PORT, allow_zero=False)
    except _Invalid as err:
        raise _Invalid(f"invalid seed {text!r}: {err}") from None
    bare = name.removesuffix(".")
    if not (
        0 < len(bare) <= 253
        and all(_DNS_LABEL_RE.fullmatch(label) for label in bare.split("."))
        and not bare.split(".")[-1].isdigit()
    ):
        raise _Invalid(f"invalid seed {text!r}: {name!r} is not a DNS name")
    return DnsSeed(name, port)


def _address_parser(
    *, ip_only: bool, allow_zero_port: bool, default_port: int | None
) -> Callable[[object], Address]:
    """Addresses are "host:port" (or "[v6]:port"). Bind and advertise addresses must be IP
    literals because the daemon must not depend on DNS to know who it is; seeds may be names."""

    def parse_address(value: object) -> Address:
        text = _parse_str(value).strip()
        try:
            host, port_text, bracketed = _split_host_port(text)
            port = _parse_port(port_text, default=default_port, allow_zero=allow_zero_port)
            return _parse_host(host, bracketed=bracketed, ip_only=ip_only), port
        except _Invalid as err:
            raise _Invalid(f"invalid address {text!r}: {err}") from None

    return parse_address


# --- the table of settings ------------------------------------------------------------------------


def _tuning_parsers(section: str, tuning: type) -> dict[str, _Parser]:
    """Derived from a tuning dataclass's fields so a new knob is configurable at once.

    Every float in a tuning class is a duration in seconds.
    """
    by_type: dict[object, _Parser] = {float: _parse_duration, int: _parse_int, bool: _parse_bool}
    hints = typing.get_type_hints(tuning)
    parsers: dict[str, _Parser] = {}
    for spec in fields(tuning):
        parse = by_type.get(hints[spec.name])
        if parse is None:
            raise TypeError(f"no parser for {section}.{spec.name} of type {hints[spec.name]}")
        parsers[f"{section}.{spec.name}"] = parse
    return parsers


def _settings() -> Mapping[str, _Parser]:
    return MappingProxyType(
        {
            "profile": _choice(PROFILES),
            "node.name": _parse_name,
            "node.bind": _address_parser(ip_only=True, allow_zero_port=True, default_port=None),
            "node.advertise": _optional(
                _address_parser(ip_only=True, allow_zero_port=False, default_port=None)
            ),
            "node.seeds": _list_of(_parse_seed),
            "node.dns_resolver": _optional(
                _address_parser(ip_only=True, allow_zero_port=False, default_port=53)
            ),
            "node.tags": _parse_tags,
            "node.data_dir": _parse_path,
            "node.rejoin": _parse_bool,
            **_tuning_parsers("membership", MembershipTuning),
            **_tuning_parsers("placement", PlacementTuning),
            **_tuning_parsers("storage", StorageTuning),
            **_tuning_parsers("replication", ReplicationLimits),
            **_tuning_parsers("transport", TransportTuning),
            "security.keys": _list_of(_parse_key),
            "security.keyring_file": _optional(_parse_path),
            "security.label": _parse_label,
            "security.insecure": _parse_bool,
            "api.socket": _parse_socket_path,
            "api.mode": _parse_mode,
            "api.allow_uids": _list_of(_parse_id),
            "api.allow_gids": _list_of(_parse_id),
            "api.max_sessions": _parse_int,
            "api.max_streams": _parse_int,
            "api.max_streams_total": _parse_int,
            "api.partial_frame_timeout": _parse_duration,
            "api.max_buffered": _parse_int,
            "metrics.enabled": _parse_bool,
            "metrics.bind": _address_parser(ip_only=False, allow_zero_port=True, default_port=None),
            "tracing.endpoint": _parse_str,
            "tracing.service_name": _parse_str,
            "tracing.sample_ratio": _parse_ratio,
            "tracing.max_queue": _parse_int,
            "tracing.export_timeout": _parse_duration,
            "log.level": _choice(LOG_LEVELS),
            "log.format": _choice(LOG_FORMATS),
        }
    )


_SETTINGS: Final = _settings()
_SECTIONS: Final = frozenset(name.partition(".")[0] for name in _SETTINGS if "." in name)

#: Every setting's canonical dotted name, in a stable order (for docs, completion and tests).
SETTING_NAMES: Final[tuple[str, ...]] = tuple(_SETTINGS)


def env_name(setting: str) -> str:
    """The environment variable for a dotted setting: node.data_dir -> MESHD_NODE_DATA_DIR."""
    return ENV_PREFIX + setting.replace(".", "_").upper()


def _unknown(name: str, candidates: Iterable[str], where: str) -> ConfigError:
    """An unknown-setting error, with the nearest known name: most are typos."""
    close = difflib.get_close_matches(name, list(candidates), n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    return ConfigError(name, f"unknown setting ({where}){hint}")


# --- layers: each turns one source into {dotted name: raw value} ----------------------------------


def _read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as file:
            return tomllib.load(file)
    except OSError as err:
        raise ConfigError("config", f"cannot read {path}: {err.strerror or err}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError("config", f"{path} is not valid TOML: {err}") from None


def _flatten_toml(document: Mapping[str, object], origin: str) -> dict[str, _Raw]:
    """Map the document's tables onto dotted names, refusing anything unknown: a misspelt key
    that was silently ignored would leave the default in force without anyone noticing."""
    candidates = (*_SETTINGS, *_SECTIONS)
    layer: dict[str, _Raw] = {}
    for name, value in document.items():
        if name in _SETTINGS:
            layer[name] = _Raw(value, origin)
        elif name in _SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(
                    name, f"expected a table [{name}], got {_describe(value)} ({origin})"
                )
            for key, item in value.items():
                dotted = f"{name}.{key}"
                if dotted not in _SETTINGS:
                    raise _unknown(dotted, candidates, origin)
                layer[dotted] = _Raw(item, origin)
        else:
            raise _unknown(name, candidates, origin)
    return layer


def _file_layer(path: str | None) -> dict[str, _Raw]:
    if path is None:
        return {}
    return _flatten_toml(_read_toml(path), f"in {path}")


def _env_layer(env: Mapping[str, str]) -> dict[str, _Raw]:
    """MESHD_<SECTION>_<KEY> variables. A variable in a known section that names no setting is
    an error (it is almost certainly a typo); other MESHD_* variables, such as MESHD_SOCKET for
    the client and MESHD_CONFIG, belong to someone else and are left alone."""
    by_env = {env_name(name): name for name in _SETTINGS}
    sections = {section.upper() for section in _SECTIONS}
    layer: dict[str, _Raw] = {}
    for var in sorted(env):
        if not var.startswith(ENV_PREFIX):
            continue
        setting = by_env.get(var)
        if setting is not None:
            layer[setting] = _Raw(env[var], f"from {var}")
            continue
        section, sep, _ = var.removeprefix(ENV_PREFIX).partition("_")
        if sep and section in sections:
            raise _unknown(var, by_env, "environment variable")
    return layer


def _override_layer(overrides: Mapping[str, object]) -> dict[str, _Raw]:
    """None means "not given", so callers can pass optional values straight through."""
    layer: dict[str, _Raw] = {}
    for name, value in overrides.items():
        if name not in _SETTINGS:
            raise _unknown(name, _SETTINGS, "command-line override")
        if value is not None:
            layer[name] = _Raw(value, "from the command line")
    return layer


# --- from raw values to the model -----------------------------------------------------------------


def _parse_settings(merged: Mapping[str, _Raw]) -> dict[str, Any]:
    """Parse every given setting, in table order so the first error reported is stable."""
    values: dict[str, Any] = {}
    for name, parse in _SETTINGS.items():
        raw = merged.get(name)
        if raw is None:
            continue
        try:
            values[name] = parse(raw.value)
        except _Invalid as err:
            raise ConfigError(name, f"{err} ({raw.origin})") from None
    return values


def _section(values: Mapping[str, Any], section: str) -> dict[str, Any]:
    prefix = f"{section}."
    return {name.removeprefix(prefix): v for name, v in values.items() if name.startswith(prefix)}


def _default_profile() -> str:
    return next(str(spec.default) for spec in fields(Config) if spec.name == "profile")


def _default_node_name() -> str:
    """The host name, as memberlist does; checked because hosts can be named anything."""
    host = socket.gethostname()
    try:
        return _parse_name(host)
    except _Invalid:
        raise ConfigError(
            "node.name", f"not set, and this host's name {host!r} is not a valid node name"
        ) from None


def _check_security(security: SecurityConfig) -> None:
    """Refuse to run unencrypted by accident: that has to be asked for, and only on its own."""
    has_keys = bool(security.keys) or security.keyring_file is not None
    if security.insecure and has_keys:
        raise ConfigError(
            "security.insecure",
            "cannot be combined with security.keys or security.keyring_file; choose one",
        )
    if not security.insecure and not has_keys:
        raise ConfigError(
            "security.keys",
            "no encryption key: set security.keys or security.keyring_file, "
            "or pass --insecure for an unencrypted cluster",
        )


LOCAL_DATA_DIR: Final = ".meshd"  # the local profile's data directories: ./.meshd/<name>


def _assemble(values: Mapping[str, Any], source: str | None) -> Config:
    profile: str = values.get("profile", _default_profile())
    membership = replace(profile_tuning(profile), **_section(values, "membership"))
    membership.validate()
    placement = PlacementTuning(**_section(values, "placement"))
    placement.validate()
    storage = StorageTuning(**_section(values, "storage"))
    storage.validate()
    transport = TransportTuning(**_section(values, "transport"))
    transport.validate()
    replication = ReplicationLimits(**_section(values, "replication"))
    replication.validate()
    node = _section(values, "node")
    if "name" not in node:
        node["name"] = _default_node_name()
    if "data_dir" not in node and profile == "local":
        # Several daemons on one machine: each keeps its store under the run directory.
        node["data_dir"] = os.path.abspath(os.path.join(LOCAL_DATA_DIR, node["name"]))
    security = SecurityConfig(**_section(values, "security"))
    _check_security(security)
    api = ApiConfig(**_section(values, "api"))
    api.validate()
    tracing = TracingConfig(**_section(values, "tracing"))
    tracing.validate()
    return Config(
        node=NodeConfig(**node),
        profile=profile,
        membership=membership,
        placement=placement,
        storage=storage,
        replication=replication,
        transport=transport,
        security=security,
        api=api,
        metrics=MetricsConfig(**_section(values, "metrics")),
        tracing=tracing,
        log=LogConfig(**_section(values, "log")),
        source=source,
    )


def build_config(
    file: str | None, env: Mapping[str, str], overrides: Mapping[str, object]
) -> Config:
    """Build the daemon's configuration from every layer and validate it as a whole.

    Precedence, lowest first: dataclass defaults < the profile's membership tuning < the TOML
    ``file`` < ``MESHD_*`` variables in ``env`` < ``overrides`` (dotted name -> value, from
    command-line flags). The profile is whichever ``profile`` value wins, from any layer; its
    tuning is the base that ``membership.*`` settings from every layer are applied on top of.

    When ``file`` is None the path in ``env["MESHD_CONFIG"]`` is used, if set and non-empty; the
    path used is recorded in ``Config.source`` so a SIGHUP reload reads the same file.

    Lists and tags given in a layer replace the lower layer's value whole; they are not merged.
    In ``overrides``, None means "not given". Strings anywhere are parsed as in the environment:
    comma-separated lists, ``k=v,k2=v2`` tags, ``true/false/yes/no/1/0`` booleans, durations
    such as ``500ms`` or ``2m``, octal modes such as ``0660``.

    Raises ConfigError whose ``key`` is the dotted setting name (or the variable name for an
    unknown ``MESHD_*`` variable, or ``config`` when the file cannot be read).
    """
    path = file if file is not None else (env.get(CONFIG_ENV) or None)
    layers = (_file_layer(path), _env_layer(env), _override_layer(overrides))
    merged = {name: raw for layer in layers for name, raw in layer.items()}
    config = _assemble(_parse_settings(merged), source=path)
    return replace(config, overridden=_overridden(layers))


def _overridden(layers: Iterable[Mapping[str, _Raw]]) -> tuple[str, ...]:
    """Settings given in more than one layer, each as "name: <winner> (over <losers>)"
    in table order: a value silently ignored because a flag sets the same key is the
    kind of surprise an operator should find in the start-up log."""
    given: dict[str, list[str]] = {}
    for layer in layers:
        for name, raw in layer.items():
            given.setdefault(name, []).append(raw.origin)
    return tuple(
        f"{name}: {origins[-1]} (over {', '.join(origins[:-1])})"
        for name in _SETTINGS
        if len(origins := given.get(name, [])) > 1
    )


# --- command line ---------------------------------------------------------------------------------

# (argparse dest, setting) for the dedicated `meshd run` flags.
_FLAG_SETTINGS: Final = (
    ("profile", "profile"),
    ("name", "node.name"),
    ("bind", "node.bind"),
    ("advertise", "node.advertise"),
    ("seeds", "node.seeds"),
    ("tags", "node.tags"),
    ("data_dir", "node.data_dir"),
    ("rejoin", "node.rejoin"),
    ("keys", "security.keys"),
    ("keyring_file", "security.keyring_file"),
    ("label", "security.label"),
    ("insecure", "security.insecure"),
    ("socket", "api.socket"),
    ("metrics_bind", "metrics.bind"),
    ("log_level", "log.level"),
    ("log_format", "log.format"),
)


def _key_value(text: str) -> tuple[str, str]:
    """argparse type for --set, so a malformed pair is a usage error at once."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), value


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `meshd run` flags. Every default is None so that overrides_from_args() can tell
    a flag the user gave from one they did not, and lower layers are not clobbered.

    ``--config`` is stored as ``ns.config``: pass it as build_config()'s ``file``.
    """
    parser.add_argument(
        "--config", metavar="PATH", help=f"TOML configuration file (default: ${CONFIG_ENV})"
    )
    parser.add_argument("--profile", choices=tuple(PROFILES), help="membership tuning profile")
    node = parser.add_argument_group("node")
    node.add_argument("--name", help="node name (default: the host name)")
    node.add_argument("--bind", metavar="IP:PORT", help="gossip bind address (port 0: any)")
    node.add_argument("--advertise", metavar="IP:PORT", help="address other members use")
    node.add_argument(
        "--seed",
        dest="seeds",
        action="append",
        metavar="HOST[:PORT]|dns:NAME[:PORT]",
        help=f"member to join, or a DNS name (SRV, else A/AAAA) looked up before every join "
        f"attempt (repeatable; default port {DEFAULT_PORT})",
    )
    node.add_argument(
        "--tag", dest="tags", action="append", metavar="K=V", help="node tag (repeatable)"
    )
    node.add_argument("--data-dir", metavar="PATH", help="state directory")
    node.add_argument(
        "--rejoin",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="rejoin the peers remembered in the data directory (default: yes)",
    )
    security = parser.add_argument_group("security")
    security.add_argument(
        "--key",
        dest="keys",
        action="append",
        metavar="B64",
        help="encryption key, base64 (repeatable, first is primary; visible in ps: "
        "prefer --keyring-file)",
    )
    security.add_argument("--keyring-file", metavar="PATH", help="file holding the keyring")
    security.add_argument("--label", help="cluster label, kept apart from other clusters")
    security.add_argument(
        "--insecure",
        action="store_true",
        default=None,
        help="run without encryption (only with no keys configured)",
    )
    service = parser.add_argument_group("api, metrics and logging")
    service.add_argument("--socket", metavar="PATH", help="Unix socket of the local API")
    service.add_argument(
        "--metrics-bind", metavar="HOST:PORT", help="serve metrics here (enables metrics)"
    )
    service.add_argument("--log-level", choices=LOG_LEVELS)
    service.add_argument("--log-format", choices=LOG_FORMATS)
    parser.add_argument(
        "--set",
        dest="settings",
        action="append",
        type=_key_value,
        metavar="KEY=VALUE",
        help="any setting by dotted name, e.g. membership.probe_interval=2s (repeatable; "
        "the dedicated flags above win over --set)",
    )


def overrides_from_args(ns: argparse.Namespace) -> dict[str, object]:
    """The overrides for build_config(): only the flags the user gave.

    --set pairs come first (later ones winning) and the dedicated flags after them, so that
    ``--name x`` beats ``--set node.name=y`` whatever their order on the line.
    """
    overrides: dict[str, object] = dict(getattr(ns, "settings", None) or ())
    for dest, setting in _FLAG_SETTINGS:
        value = getattr(ns, dest, None)
        if value is not None:
            overrides[setting] = value
    if getattr(ns, "metrics_bind", None) is not None:
        overrides["metrics.enabled"] = True
    return overrides
