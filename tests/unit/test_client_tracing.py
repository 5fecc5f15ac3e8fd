"""The client's propagation rules, and that tracing costs no import where it is off.

Each case runs in a fresh interpreter: which OpenTelemetry modules are loaded, and whether a
global tracer provider is set, is per process."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Makes "opentelemetry" unimportable, as where the extra is not installed.
_BLOCK = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name == "opentelemetry" or name.startswith("opentelemetry."):
            raise ModuleNotFoundError(name)
        return None
sys.meta_path.insert(0, _Block())
import importlib.util
_find = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a: (
    None if name.split(".")[0] == "opentelemetry" else _find(name, *a)
)
"""


def python(code: str, *, blocked: bool = False) -> subprocess.CompletedProcess[str]:
    """``code`` in a fresh interpreter (with OpenTelemetry unimportable if ``blocked``)."""
    return subprocess.run(
        [sys.executable, "-c", (_BLOCK if blocked else "") + textwrap.dedent(code)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def run(code: str, *, blocked: bool = False) -> str:
    done = python(code, blocked=blocked)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_without_opentelemetry_nothing_is_added_unless_given_explicitly() -> None:
    out = run(
        """
        from meshd_client import tracing
        from meshd_client.protocol.tracecontext import Malformed
        assert not tracing.AVAILABLE
        args = {}
        with tracing.outgoing("request", args, to="x"):
            pass
        assert args == {}, args
        tp = "00-" + "a" * 32 + "-" + "b" * 16 + "-01"
        with tracing.outgoing("request", args, traceparent=tp):
            pass
        assert args == {"traceparent": tp}, args
        try:
            with tracing.outgoing("request", {}, traceparent="bogus"):
                raise AssertionError("a malformed explicit traceparent must raise first")
        except Malformed:
            print("refused")
        """,
        blocked=True,
    )
    assert out.strip() == "refused"


def test_the_daemon_and_the_client_import_no_opentelemetry_until_a_traced_call() -> None:
    out = run(
        """
        import sys
        import meshd.cli.daemon, meshd.node.node, meshd.cli.meshctl, meshd_client
        print(sorted(m for m in sys.modules if m.startswith("opentelemetry")))
        """
    )
    assert out.strip() == "[]"


def test_with_the_api_only_a_call_outside_a_trace_gets_a_fresh_context() -> None:
    out = run(
        """
        from meshd_client import tracing
        from meshd_client.protocol import tracecontext
        a, b = {}, {}
        with tracing.outgoing("send", a):
            pass
        with tracing.outgoing("send", b):
            pass
        ca = tracecontext.from_fields(a)
        cb = tracecontext.from_fields(b)
        assert ca is not None and cb is not None and ca.trace_id != cb.trace_id
        print("ok")
        """
    )
    assert out.strip() == "ok"


def test_with_the_sdk_the_call_is_a_child_of_the_callers_span() -> None:
    out = run(
        """
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        trace.set_tracer_provider(TracerProvider())
        from meshd_client import tracing
        from meshd_client.protocol import tracecontext
        from meshd_client.types import Message
        args = {}
        with trace.get_tracer("app").start_as_current_span("outer") as outer:
            outer_ctx = outer.get_span_context()
            with tracing.outgoing("request", args, to="x"):
                inner = trace.get_current_span().get_span_context()
        ctx = tracecontext.from_fields(args)
        assert ctx.trace_id == format(outer_ctx.trace_id, "032x")
        assert ctx.span_id == format(inner.span_id, "016x") != format(outer_ctx.span_id, "016x")
        # The handler runs in the context the message carried.
        msg = Message(id="m", body=None, traceparent=ctx.traceparent)
        with tracing.handling("agent", msg) as span:
            current = trace.get_current_span().get_span_context()
            assert span is not None and current.trace_id == outer_ctx.trace_id
            assert span.parent.span_id == inner.span_id
        with tracing.handling("agent", Message(id="n", body=None)) as none:
            assert none is None
        print("ok")
        """
    )
    assert out.strip() == "ok"


def test_a_daemon_with_an_endpoint_but_without_opentelemetry_says_what_to_install(
    tmp_path: Path,
) -> None:
    code = f"""
        from meshd.cli.daemon import main
        sys.exit(main([
            "run", "--insecure", "--name", "t1", "--bind", "127.0.0.1:0", "--profile", "local",
            "--socket", "{tmp_path}/t1.sock", "--data-dir", "{tmp_path}/data",
            "--set", "tracing.endpoint=http://127.0.0.1:4318/v1/traces",
        ]))
        """
    done = python(code, blocked=True)
    assert done.returncode == 2, done.stderr
    assert "tracing.endpoint" in done.stderr and "meshd[tracing]" in done.stderr
    assert "Traceback" not in done.stderr
