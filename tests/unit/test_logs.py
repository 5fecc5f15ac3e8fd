"""Structured logging: formatters, configuration and the rate limiter."""

from __future__ import annotations

import calendar
import io
import json
import logging
import sys
from collections.abc import Iterator

import pytest

from meshd.logs import (
    JsonFormatter,
    LogfmtFormatter,
    RateLimitedLog,
    configure_logging,
    kv,
)

TS = "2026-11-21T10:00:00.123Z"


@pytest.fixture(autouse=True)
def restore_meshd_logger() -> Iterator[None]:
    """configure_logging changes process-wide logging state; undo it after each test."""
    logger = logging.getLogger("meshd")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    logger.handlers[:] = saved[0]
    logger.setLevel(saved[1])
    logger.propagate = saved[2]


def record(
    msg: str = "member dead",
    *args: object,
    name: str = "meshd.membership",
    level: int = logging.INFO,
    fields: object = None,
) -> logging.LogRecord:
    rec = logging.LogRecord(name, level, __file__, 1, msg, args or None, None)
    rec.created = calendar.timegm((2026, 11, 21, 10, 0, 0)) + 0.123
    rec.msecs = 123.0
    if fields is not None:
        rec.fields = fields
    return rec


# -- logfmt ------------------------------------------------------------------------------------


def test_logfmt_line() -> None:
    rec = record(fields={"node": "b", "incarnation": 3})
    assert LogfmtFormatter().format(rec) == (
        f'ts={TS} level=info logger=meshd.membership msg="member dead" node=b incarnation=3'
    )


@pytest.mark.parametrize(
    ("value", "rendered"),
    [
        ("plain", "plain"),
        ("10.0.0.1:7946", "10.0.0.1:7946"),
        ("two words", '"two words"'),
        ('say "hi"', '"say \\"hi\\""'),
        ("a=b", '"a=b"'),
        ("", '""'),
        ("line\nbreak", '"line\\nbreak"'),
        ("tab\there", '"tab\\there"'),
        ("nul\x00", '"nul\\u0000"'),
        ("bell\x07", '"bell\\u0007"'),
        ("back\\slash", '"back\\\\slash"'),
        ("ünïcødé", "ünïcødé"),
        ("sep\u2028", '"sep\\u2028"'),
        (None, "null"),
        (True, "true"),
        (False, "false"),
        (1.5, "1.5"),
        (-7, "-7"),
    ],
)
def test_logfmt_value_quoting(value: object, rendered: str) -> None:
    line = LogfmtFormatter().format(record("m", fields={"v": value}))
    assert line.endswith(f" v={rendered}")


def test_logfmt_message_args_and_unquoted_single_word() -> None:
    line = LogfmtFormatter().format(record("joined %s", "mesh"))
    assert 'msg="joined mesh"' in line
    assert " msg=started" in LogfmtFormatter().format(record("started"))


def test_logfmt_keys_sanitized_and_reserved_names_kept_apart() -> None:
    fields = {"bad key=x": 1, "msg": "shadow", "level": "x", "": 2}
    line = LogfmtFormatter().format(record("m", fields=fields))
    assert line.endswith(" bad_key_x=1 field.msg=shadow field.level=x _=2")
    assert " msg=m " in line


def test_logfmt_exception_field() -> None:
    try:
        raise ValueError("bad packet")
    except ValueError:
        rec = record("decode failed", fields={"peer": "b"})
        rec.exc_info = sys.exc_info()
    line = LogfmtFormatter().format(rec)
    assert "\n" not in line
    assert ' peer=b exc="Traceback (most recent call last):\\n' in line
    assert 'ValueError: bad packet"' in line


def test_logfmt_unprintable_object_does_not_lose_the_line() -> None:
    class Broken:
        def __str__(self) -> str:
            raise RuntimeError("no")

    line = LogfmtFormatter().format(record("m", fields={"obj": Broken()}))
    assert line.endswith(' obj="<unprintable Broken>"')


def test_fields_that_are_not_a_mapping_are_kept() -> None:
    line = LogfmtFormatter().format(record("m", fields=[1, 2]))
    assert line.endswith(' field.fields="[1, 2]"')


# -- JSON --------------------------------------------------------------------------------------


def test_json_line() -> None:
    rec = record(fields={"node": "b", "incarnation": 3, "ok": True, "nothing": None})
    line = JsonFormatter().format(rec)
    assert "\n" not in line
    assert json.loads(line) == {
        "ts": TS,
        "level": "info",
        "logger": "meshd.membership",
        "msg": "member dead",
        "node": "b",
        "incarnation": 3,
        "ok": True,
        "nothing": None,
    }


def test_json_non_serializable_and_non_finite_values() -> None:
    fields = {"addr": ("10.0.0.1", 7946), "obj": object(), "ratio": float("nan")}
    obj = json.loads(JsonFormatter().format(record("m", fields=fields)))
    assert obj["addr"] == "('10.0.0.1', 7946)"
    assert obj["obj"].startswith("<object object")
    assert obj["ratio"] == "nan"


def test_json_exception_field() -> None:
    try:
        raise KeyError("k")
    except KeyError:
        rec = record("failed", level=logging.ERROR)
        rec.exc_info = sys.exc_info()
    obj = json.loads(JsonFormatter().format(rec))
    assert obj["level"] == "error"
    assert obj["exc"].endswith("KeyError: 'k'")


# -- configure_logging -------------------------------------------------------------------------


def test_configure_logging_logfmt_end_to_end() -> None:
    out = io.StringIO()
    configure_logging("info", "logfmt", out)
    log = logging.getLogger("meshd.membership")
    log.debug("hidden")
    log.info("member dead", extra=kv(node="b", incarnation=3))
    line = out.getvalue()
    assert line.count("\n") == 1
    assert line.startswith("ts=")
    assert line.rstrip("\n").endswith(
        'level=info logger=meshd.membership msg="member dead" node=b incarnation=3'
    )


def test_configure_logging_is_idempotent_and_reconfigures() -> None:
    first, second = io.StringIO(), io.StringIO()
    configure_logging("info", "logfmt", first)
    configure_logging("DEBUG", "json", second)
    meshd = logging.getLogger("meshd")
    assert len(meshd.handlers) == 1
    logging.getLogger("meshd.x").debug("now visible", extra=kv(a=1))
    assert first.getvalue() == ""
    obj = json.loads(second.getvalue())
    assert obj["level"] == "debug"
    assert (obj["logger"], obj["msg"], obj["a"]) == ("meshd.x", "now visible", 1)


def test_configure_logging_leaves_other_handlers_alone() -> None:
    root = logging.getLogger()
    foreign = logging.StreamHandler(io.StringIO())
    meshd = logging.getLogger("meshd")
    own = logging.NullHandler()
    root.addHandler(foreign)
    meshd.addHandler(own)
    try:
        configure_logging("info", "json", io.StringIO())
        configure_logging("info", "logfmt", io.StringIO())
        assert foreign in root.handlers
        assert own in meshd.handlers
        assert len(meshd.handlers) == 2
        logging.getLogger("meshd.y").info("not duplicated")
        assert isinstance(foreign.stream, io.StringIO)
        assert foreign.stream.getvalue() == ""
    finally:
        root.removeHandler(foreign)


def test_configure_logging_defaults_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("warning", "logfmt")
    logging.getLogger("meshd").warning("to stderr")
    assert 'msg="to stderr"' in capsys.readouterr().err


@pytest.mark.parametrize(("level", "fmt"), [("verbose", "logfmt"), ("info", "xml")])
def test_configure_logging_rejects_bad_values(level: str, fmt: str) -> None:
    with pytest.raises(ValueError, match="unknown log"):
        configure_logging(level, fmt, io.StringIO())  # type: ignore[arg-type]


def test_kv() -> None:
    assert kv(node="a", n=1) == {"fields": {"node": "a", "n": 1}}


# -- RateLimitedLog ----------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    out = io.StringIO()
    configure_logging("debug", "json", out)
    yield logging.getLogger("meshd.transport"), out


def lines(out: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_rate_limit_per_key_and_suppressed_count(
    captured: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, out = captured
    clock = FakeClock()
    limited = RateLimitedLog(logger, burst=2, interval=10.0, clock=clock)

    results = [limited.warning("peer-a", "bad packet", peer="a") for _ in range(5)]
    assert results == [True, True, False, False, False]
    assert limited.warning("peer-b", "bad packet", peer="b")  # other keys are independent
    clock.now += 9.9
    assert not limited.warning("peer-a", "bad packet", peer="a")
    clock.now += 0.1
    assert limited.warning("peer-a", "bad packet", peer="a")
    assert limited.warning("peer-a", "bad packet", peer="a")
    assert not limited.warning("peer-a", "bad packet", peer="a")
    assert limited.suppressed_total == 5

    logged = lines(out)
    assert [(x["peer"], x.get("suppressed")) for x in logged] == [
        ("a", None),
        ("a", None),
        ("b", None),
        ("a", 4),
        ("a", None),
    ]
    assert all(x["level"] == "warning" and x["msg"] == "bad packet" for x in logged)


def test_rate_limit_levels_and_disabled_levels_do_not_spend_budget(
    captured: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, out = captured
    logger.setLevel(logging.INFO)
    try:
        limited = RateLimitedLog(logger, burst=1, interval=10.0, clock=FakeClock())
        assert not limited.debug("k", "dropped by level")
        assert limited.suppressed_total == 0
        assert limited.info("k", "first")
        assert not limited.error("k", "over budget")
        assert [x["level"] for x in lines(out)] == ["info"]
    finally:
        logger.setLevel(logging.NOTSET)


def test_rate_limit_key_table_is_bounded(captured: tuple[logging.Logger, io.StringIO]) -> None:
    logger, _ = captured
    limited = RateLimitedLog(logger, burst=1, interval=60.0, max_keys=3, clock=FakeClock())
    for key in ("a", "b", "c"):
        assert limited.info(key, "x")
    assert not limited.info("a", "x")  # "a" is now the most recently used
    assert limited.info("d", "x")  # evicts "b", the longest idle
    assert limited.info("b", "x")  # forgotten, so allowed again (evicts "c")
    assert not limited.info("a", "x")
    assert not limited.info("d", "x")


def test_rate_limit_records_the_caller(captured: tuple[logging.Logger, io.StringIO]) -> None:
    logger, _ = captured
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    handler = Keep()
    logger.addHandler(handler)
    try:
        RateLimitedLog(logger).warning("k", "m")
        RateLimitedLog(logger).log(logging.INFO, "k", "m", key="field named key")
    finally:
        logger.removeHandler(handler)
    assert [r.funcName for r in seen] == ["test_rate_limit_records_the_caller"] * 2
    assert seen[1].fields == {"key": "field named key"}  # type: ignore[attr-defined]


@pytest.mark.parametrize("kwargs", [{"burst": 0}, {"interval": 0.0}, {"max_keys": 0}])
def test_rate_limit_rejects_bad_parameters(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=">= 1"):
        RateLimitedLog(logging.getLogger("meshd"), **kwargs)  # type: ignore[arg-type]
