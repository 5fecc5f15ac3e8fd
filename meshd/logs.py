"""Structured logging for the daemon: logfmt or JSON lines, one event per line.

Log lines are read by machines (journald, Loki, jq) as often as by people, so every record is
a flat set of key/value pairs with the same leading keys (``ts level logger msg``) and the event's
own fields after them. Call sites attach fields with ``extra=kv(...)``, which keeps them on the
standard :mod:`logging` API, so nothing else in the tree needs a logging dependency.

Only the ``meshd`` logger hierarchy is configured; handlers that the embedding process put on
the root logger are left alone. :class:`RateLimitedLog` exists because the daemon logs input it
rejects from the network, and a peer (or an attacker) must not be able to flood the log that way.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, TextIO

from meshd_client.protocol import tracecontext

LOGGER_NAME: Final = "meshd"
LogFormat = Literal["logfmt", "json"]

_LEVELS: Final[Mapping[str, int]] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
_RESERVED: Final = frozenset({"ts", "level", "logger", "msg", "exc", "stack"})


def kv(**fields: object) -> dict[str, object]:
    """``extra=`` for a log call carrying structured fields: ``log.info("x", extra=kv(n=1))``."""
    return {"fields": fields}


def message_fields(fields: Mapping[str, Any]) -> dict[str, object]:
    """``msg_id`` and ``trace_id`` of a message (API request args, a delivery event), for
    every log line about it: ``-`` where it has none (or a malformed one)."""
    msg_id = fields.get("id")
    parent = fields.get("traceparent")
    trace_id = "-"
    if parent is not None:
        try:
            trace_id = tracecontext.parse_traceparent(parent)[3:35]
        except tracecontext.Malformed:
            pass
    valid_id = isinstance(msg_id, str) and 0 < len(msg_id) <= 128
    return {"msg_id": msg_id if valid_id else "-", "trace_id": trace_id}


def configure_logging(level: str, fmt: LogFormat, stream: TextIO | None = None) -> None:
    """Routes the ``meshd`` logger hierarchy to ``stream`` (stderr by default) in ``fmt``.

    Idempotent: a second call replaces the handler a previous call installed, which is how a
    SIGHUP reload changes level or format. Records do not propagate to the root logger, so
    another library's ``basicConfig`` cannot duplicate them in a different format.
    Raises ValueError for an unknown level or format, so a bad config fails loudly at load time.
    """
    try:
        numeric = _LEVELS[level.lower()]
    except KeyError:
        expected = ", ".join(sorted(_LEVELS))
        raise ValueError(f"unknown log level {level!r}; expected one of {expected}") from None
    formatter: logging.Formatter
    if fmt == "logfmt":
        formatter = LogfmtFormatter()
    elif fmt == "json":
        formatter = JsonFormatter()
    else:
        raise ValueError(f"unknown log format {fmt!r}; expected 'logfmt' or 'json'")
    handler = _MeshdHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(formatter)
    logger = logging.getLogger(LOGGER_NAME)
    for old in [h for h in logger.handlers if isinstance(h, _MeshdHandler)]:
        logger.removeHandler(old)
        old.close()
    logger.addHandler(handler)
    logger.setLevel(numeric)
    logger.propagate = False


class _MeshdHandler(logging.StreamHandler[TextIO]):
    """Marks the handler :func:`configure_logging` owns, so a reload replaces only that one."""


def _record_fields(record: logging.LogRecord, formatter: logging.Formatter) -> dict[str, object]:
    """Every key/value of one event, in output order: fixed keys, call-site fields, exception.

    A call-site field whose name collides with a fixed key is kept under ``field.<name>``
    rather than silently overwriting it.
    """
    out: dict[str, object] = {
        "ts": _timestamp(record),
        "level": record.levelname.lower(),
        "logger": record.name,
        "msg": record.getMessage(),
    }
    extra = getattr(record, "fields", None)
    if isinstance(extra, Mapping):
        for key, value in extra.items():
            name = str(key)
            out[f"field.{name}" if name in _RESERVED or name in out else name] = value
    elif extra is not None:
        out["field.fields"] = extra
    if record.exc_info and not record.exc_text:
        record.exc_text = formatter.formatException(record.exc_info)
    if record.exc_text:
        out["exc"] = record.exc_text
    if record.stack_info:
        out["stack"] = formatter.formatStack(record.stack_info)
    return out


def _timestamp(record: logging.LogRecord) -> str:
    """RFC 3339 UTC with milliseconds, e.g. ``2026-11-21T10:00:00.123Z``."""
    base = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{base}.{int(record.msecs):03d}Z"


class LogfmtFormatter(logging.Formatter):
    """``ts=... level=info logger=meshd.x msg="member dead" node=b incarnation=3``."""

    def format(self, record: logging.LogRecord) -> str:
        parts = (
            f"{_logfmt_key(k)}={_logfmt_value(v)}" for k, v in _record_fields(record, self).items()
        )
        return " ".join(parts)


class JsonFormatter(logging.Formatter):
    """One JSON object per line with the same keys as the logfmt output."""

    def format(self, record: logging.LogRecord) -> str:
        fields = _record_fields(record, self)
        try:
            return json.dumps(fields, ensure_ascii=False, allow_nan=False, default=_safe_str)
        except (ValueError, TypeError):
            # NaN/Infinity are not JSON, and exotic keys are not strings: degrade to text.
            return json.dumps({k: _plain(v) for k, v in fields.items()}, ensure_ascii=False)


def _plain(value: object) -> object:
    return value if isinstance(value, str | int | bool) or value is None else _safe_str(value)


def _safe_str(value: object) -> str:
    """str() that cannot raise: a broken ``__str__`` must not lose the log line."""
    try:
        return str(value)
    except Exception:
        return f"<unprintable {type(value).__name__}>"


def _logfmt_key(key: str) -> str:
    """Keys cannot be quoted in logfmt, so characters that would break parsing become '_'."""
    cleaned = "".join(c if c.isprintable() and c not in ' ="' else "_" for c in key)
    return cleaned or "_"


def _logfmt_value(value: object) -> str:
    if value is None:
        text = "null"
    elif isinstance(value, bool):
        text = "true" if value else "false"
    else:
        text = _safe_str(value)
    if text and all(c.isprintable() and c not in ' ="\\' for c in text):
        return text
    return '"' + "".join(_escape_char(c) for c in text) + '"'


def _escape_char(c: str) -> str:
    if c in '"\\':
        return "\\" + c
    if c == "\n":
        return "\\n"
    if c == "\r":
        return "\\r"
    if c == "\t":
        return "\\t"
    if c == " " or c.isprintable():
        return c
    code = ord(c)
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


@dataclass(slots=True)
class _Window:
    start: float
    count: int = 0
    suppressed: int = 0


class RateLimitedLog:
    """Logs at most ``burst`` messages per key per ``interval`` seconds.

    For input rejected from the network: a misbehaving peer would otherwise turn each bad packet
    into a log line. The first message after a suppressed stretch carries ``suppressed=<n>`` so
    the log still says how much was dropped. Keys are typically (reason, peer). The table of keys
    is bounded by ``max_keys`` (spoofed sources can mint keys freely); when it is full the
    longest-idle window is forgotten. ``suppressed_total`` is a plain counter for metrics.
    """

    def __init__(
        self,
        logger: logging.Logger,
        *,
        burst: int = 5,
        interval: float = 60.0,
        max_keys: int = 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if burst < 1 or interval <= 0 or max_keys < 1:
            raise ValueError("burst and max_keys must be >= 1 and interval > 0")
        self.logger = logger
        self.burst = burst
        self.interval = interval
        self.max_keys = max_keys
        self._clock = clock
        self._windows: dict[Hashable, _Window] = {}
        self.suppressed_total = 0

    def log(self, level: int, key: Hashable, msg: str, /, **fields: object) -> bool:
        """Logs ``msg`` with ``fields`` unless ``key`` is over its budget; True if logged."""
        return self._log(level, key, msg, fields)

    def debug(self, key: Hashable, msg: str, /, **fields: object) -> bool:
        return self._log(logging.DEBUG, key, msg, fields)

    def info(self, key: Hashable, msg: str, /, **fields: object) -> bool:
        return self._log(logging.INFO, key, msg, fields)

    def warning(self, key: Hashable, msg: str, /, **fields: object) -> bool:
        return self._log(logging.WARNING, key, msg, fields)

    def error(self, key: Hashable, msg: str, /, **fields: object) -> bool:
        return self._log(logging.ERROR, key, msg, fields)

    def _log(self, level: int, key: Hashable, msg: str, fields: dict[str, object]) -> bool:
        if not self.logger.isEnabledFor(level):
            return False
        now = self._clock()
        window = self._windows.pop(key, None)
        if window is None:
            window = _Window(now)
            if len(self._windows) >= self.max_keys:
                # Every use re-inserts its key, so the first in the dict is the longest idle.
                del self._windows[next(iter(self._windows))]
        elif now - window.start >= self.interval:
            window.start = now
            window.count = 0
        self._windows[key] = window
        if window.count >= self.burst:
            window.suppressed += 1
            self.suppressed_total += 1
            return False
        window.count += 1
        if window.suppressed:
            fields = {**fields, "suppressed": window.suppressed}
            window.suppressed = 0
        # stacklevel 3: the record names the caller of log()/warning()/..., not this module.
        self.logger.log(level, msg, extra=kv(**fields), stacklevel=3)
        return True
