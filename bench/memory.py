"""Memory per document of the replication core, in one process per measurement.

    python -m bench.memory [--json] [--n 20000]

Each mode runs in a fresh child process (so one does not inherit another's heap): it builds
N documents of 5 fields × 40 bytes (about 280 bytes encoded), then a bare
:class:`~meshd.replication.core.Replicator` (no daemon, no store) receives each as a PUSH
from a peer, as a daemon does during writes elsewhere or a join:

Each PUSH is decoded from its wire encoding (built before the measurement starts), so the
document's name and update are new objects, as in a daemon.

- ``pushed``: the documents as they arrive (cold: kept encoded, at the default
  ``hot_documents``);
- ``pushed_then_read``: then every document's content read once (the hot set fills up to
  ``hot_documents`` and evicts the rest);
- ``all_hot``: ``hot_documents`` ≥ N and every document read (every one a live ``Doc``: what
  the previous version held).

``candidates``: µs per document of each way a cold document could be served or changed
(materializing a ``Doc`` from the encoding, with and without its change subscription;
applying an update through a transient ``Doc``; merging it into the encoding with
``merge_updates`` and reading the new state vector; what a peer lacks, and the state vector,
read from the encoding), measured on 2,000 of the documents.

``rss_bytes_per_doc`` is the growth of ``VmRSS`` over the documents' arrival (and reads),
after ``gc.collect()``, divided by N; ``apply_us_per_doc`` the wall time of the arrivals.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from pycrdt import Doc, Map, TransactionEvent, get_state, get_update, merge_updates

from meshd.replication import messages
from meshd.replication.core import ReplicationTuning, Replicator
from meshd.replication.messages import Push
from meshd.state import values

MODES = ("pushed", "pushed_then_read", "all_hot")
FIELD = "x" * 40


def rss() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def documents(n: int) -> list[bytes]:
    out = []
    for _ in range(n):
        doc: Doc[Any] = Doc()
        root = doc.get(values.ROOT, type=Map)
        with doc.transaction():
            for k in range(5):
                root[f"f{k}"] = FIELD
        out.append(bytes(doc.get_update()))
    return out


def child(mode: str, n: int) -> dict[str, Any]:
    updates = documents(n)
    # As a daemon receives them: decoded from the wire, so each update is a new object.
    frames = [
        messages.encode(Push(f"state/d{i:07d}", 0, update, 0, 0))
        for i, update in enumerate(updates)
    ]
    fields = ReplicationTuning.__dataclass_fields__
    extra: dict[str, Any] = {}
    if "hot_documents" in fields and mode == "all_hot":
        extra["hot_documents"] = n
    tuning = ReplicationTuning(anti_entropy_interval=1e9, **extra)
    core = Replicator(node="a", tuning=tuning, rng=random.Random(1), now=0.0)
    gc.collect()
    before = rss()
    started = time.perf_counter()
    for frame in frames:
        core.handle(0.0, "b", messages.decode(frame))
        core.take_outputs()
    del frames
    took = time.perf_counter() - started
    if mode != "pushed":
        for replica in core.store:
            values.read(replica.doc)
    gc.collect()
    grown = rss() - before
    hot = sum(1 for r in core.store if getattr(r, "hot", True))
    return {
        "mode": mode,
        "n": n,
        "encoded_bytes": len(updates[0]),
        "rss_bytes_per_doc": round(grown / n),
        "apply_us_per_doc": round(took / n * 1e6, 1),
        "hot_documents_now": hot,
    }


def candidates(count: int = 2000) -> dict[str, float]:
    encoded = documents(count)
    extra: Doc[Any] = Doc()
    extra.get(values.ROOT, type=Map)["g"] = FIELD
    update = bytes(extra.get_update())

    def materialize(enc: bytes) -> None:
        Doc().apply_update(enc)

    def subscribed(enc: bytes) -> None:
        doc: Doc[Any] = Doc()
        doc.apply_update(enc)
        doc.unobserve(doc.observe(lambda _event: None))

    def transient(enc: bytes) -> None:
        doc: Doc[Any] = Doc()
        doc.apply_update(enc)
        seen: list[bytes] = []

        def capture(event: TransactionEvent) -> None:
            seen.append(event.update)

        subscription = doc.observe(capture)
        doc.apply_update(update)
        doc.unobserve(subscription)
        get_state(doc.get_update())

    def merged(enc: bytes) -> None:
        get_state(merge_updates(enc, update))

    ways = {
        "materialize_doc": materialize,
        "materialize_doc_subscribed": subscribed,
        "apply_via_transient_doc": transient,
        "apply_via_merge_updates": merged,
        "missing_for_peer_from_encoding": lambda enc: get_update(enc, b"\x00"),
        "state_vector_from_encoding": get_state,
    }
    out = {}
    for name, way in ways.items():
        started = time.perf_counter()
        for enc in encoded:
            way(enc)
        out[name] = round((time.perf_counter() - started) / count * 1e6, 1)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.split("\n")[0])
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--n", type=int, default=20_000)
    p.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.n)))
        return 0
    runs = []
    for mode in MODES:
        done = subprocess.run(
            [sys.executable, "-m", "bench.memory", "--n", str(args.n), "--child", mode],
            capture_output=True,
            check=True,
            text=True,
        )
        runs.append(json.loads(done.stdout))
    result = {
        "runs": runs,
        "candidates_us": candidates(),
        "method": {"loadavg_1m": round(os.getloadavg()[0], 2)},
    }
    if args.json:
        print(json.dumps(result))
    else:
        for run in runs:
            print(run)
        print(result["candidates_us"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
