"""Plain values ↔ pycrdt types, and the change operations on a state document.

A state document is a map (the root ``"root"``) whose values are plain scalars, maps, lists,
text and counters. pycrdt pitfalls are made explicit here:

* **Numbers are IEEE doubles** in Yjs. Integers are accepted up to ±2**53 (beyond that they
  cannot round-trip and are refused), and an integral number reads back as ``int``.
* **Concurrent writes to one map key**: one write wins (Yjs orders them by client id), the
  other is lost. For counts use a **counter** (``{"$counter": n}`` or the ``incr`` op): each
  writer adds to its own slot and the value is the sum, so concurrent increments all count.
* **Concurrently created nested types do not merge**: two replicas that each create a map at
  the same key end with one of them, and whatever was written into the other is lost. So a
  counter's slots do not live inside the tree: the tree holds a marker naming a *root-level*
  map, and root types of the same name always merge. ``incr`` on a missing key names it after
  its path (and a generation, bumped when such a counter is deleted), so replicas creating
  the same counter at once write to the same slots. ``{"$counter": n}`` is a reset: it names
  a fresh root map, and increments racing a reset may be lost, as with any overwrite.
* **Text** (``{"$text": "..."}``) merges concurrent character edits; a plain string value is
  replaced as a whole.
"""

from __future__ import annotations

import copy
import json
import math
import uuid
from collections.abc import Callable
from typing import Any, Final

from pycrdt import Array, Doc, Map, Text

from meshd.replication import vectors
from meshd_client.protocol import errors

ROOT: Final = "root"
COUNTER: Final = "$counter"
SLOTS_PREFIX: Final = "$c:"  # root-level maps holding counters' per-writer slots
RETIRED: Final = "$c-retired"  # path-named slot maps of deleted counters (never reused)
TEXT: Final = "$text"
MAX_SAFE_INT: Final = 2**53
MAX_DEPTH: Final = 16
Path = list[str | int]


class CounterInt(int):
    """A counter's value in a dry run (so ``incr`` can tell counters from plain numbers)."""


class TextStr(str):
    """A Text's value in a dry run (so text ops can tell Text from plain strings)."""

    __slots__ = ()


def to_plain(value: Any, *, marked: bool = False) -> Any:
    if isinstance(value, Map):
        if COUNTER in value:
            total = counter_value(value)
            return CounterInt(total) if marked else total
        return {key: to_plain(item, marked=marked) for key, item in value.items()}
    if isinstance(value, Array):
        return [to_plain(item, marked=marked) for item in value]
    if isinstance(value, Text):
        return TextStr(value) if marked else str(value)
    if isinstance(value, float) and value.is_integer() and abs(value) <= MAX_SAFE_INT:
        return int(value)
    if isinstance(value, bytearray):
        return bytes(value)
    return value


def counter_value(counter: Map[Any]) -> int:
    return int(sum(value for _, value in slot_values(_slots(counter)).values()))


def slot_values(slots: Map[Any]) -> dict[str, tuple[float, float]]:
    """Each writer's ``(clock, value)`` in a counter's slot map.

    A writer of the document's current epoch keeps its running total under ``c<client id>``
    (clock: infinite, it is the newest). A compaction carries earlier epochs' writers over as
    ``c<client id>@<clock>``: their total as of the writer's ``clock`` (its position in its own
    history). Replicas that carry the same writer write the same key and value, and the
    highest clock wins, so a carried increment counts once however many replicas carry it."""
    best: dict[str, tuple[float, float]] = {}
    for key, item in slots.items():
        if not isinstance(item, int | float) or not isinstance(key, str):
            continue
        writer, carried, clock_text = key.partition("@")
        clock: float = math.inf
        if carried:
            if not clock_text.isdigit():
                continue  # malformed (from a peer): ignored
            clock = int(clock_text)
        entry = (clock, float(item))
        if writer not in best or entry > best[writer]:
            best[writer] = entry
    return best


def counter_names(value: Any) -> set[str]:
    """The slot maps of the counters in a document value (a pycrdt type)."""
    if isinstance(value, Map):
        if COUNTER in value:
            name = value.get(COUNTER)
            return {name} if isinstance(name, str) and name.startswith(SLOTS_PREFIX) else set()
        return set().union(*(counter_names(item) for item in value.values()))
    if isinstance(value, Array):
        return set().union(*(counter_names(item) for item in value))
    return set()


def _slots(marker: Map[Any]) -> Map[Any]:
    """The root-level map holding a counter's slots."""
    name = marker.get(COUNTER)
    if not isinstance(name, str) or not name.startswith(SLOTS_PREFIX):
        name = SLOTS_PREFIX + "invalid"  # a malformed marker from a peer reads as zero
    slots: Map[Any] = marker.doc.get(name, type=Map)
    return slots


def _new_counter(doc: Doc[Any], name: str, by: int) -> Map[Any]:
    """A marker for the counter whose slots are the root map ``name``; adds ``by``."""
    slots: Map[Any] = doc.get(name, type=Map)
    slot = f"c{doc.client_id}"
    slots[slot] = slots.get(slot, 0) + by
    return Map({COUNTER: name})


def _path_counter_name(doc: Doc[Any], path: Path) -> str:
    """The slot map an ``incr`` on a missing key creates: the same on every replica with the
    same view, so concurrent creations share their slots; a deleted counter's name is
    retired, so one created later at the same path starts from zero."""
    retired: Map[Any] = doc.get(RETIRED, type=Map)
    base = SLOTS_PREFIX + json.dumps(path, separators=(",", ":"))
    generation = 0
    while f"{base}#{generation}" in retired:
        generation += 1
    return f"{base}#{generation}"


def retire(doc: Doc[Any], value: Any, keep: frozenset[str] = frozenset()) -> None:
    """``value`` is being overwritten or deleted: clear the slots of every counter in it
    (their tombstones can then be collected) and retire path-named ones — except the
    counters named in ``keep`` (still referenced by what replaces it)."""
    if isinstance(value, Map):
        if COUNTER in value:
            name = value.get(COUNTER)
            if isinstance(name, str) and name.startswith(SLOTS_PREFIX) and name not in keep:
                slots: Map[Any] = doc.get(name, type=Map)
                slots.clear()
                if "#" in name:
                    retired: Map[Any] = doc.get(RETIRED, type=Map)
                    retired[name] = True
            return
        for item in value.values():
            retire(doc, item, keep)
    elif isinstance(value, Array):
        for item in value:
            retire(doc, item, keep)


def _scalar(value: Any) -> Any:
    if value is None or isinstance(value, bool | str | bytes):
        return value
    if isinstance(value, int):
        if abs(value) > MAX_SAFE_INT:
            raise errors.Invalid(
                "integers beyond ±2**53 cannot be stored exactly (Yjs numbers "
                "are doubles); store them as strings"
            )
        return value
    if isinstance(value, float):
        return value
    raise errors.Invalid(f"unsupported value type {type(value).__name__}")


def check_plain(value: Any, depth: int = 0) -> None:
    """Validate a value a caller wants to store (before anything is written)."""
    if depth > MAX_DEPTH:
        raise errors.Invalid(f"values nest at most {MAX_DEPTH} deep")
    if isinstance(value, dict):
        if set(value) == {TEXT}:
            if not isinstance(value[TEXT], str):
                raise errors.Invalid("$text needs a string")
            return
        if set(value) == {COUNTER}:
            if type(value[COUNTER]) is not int:
                raise errors.Invalid("$counter needs an integer")
            _scalar(value[COUNTER])
            return
        for key, item in value.items():
            if not isinstance(key, str) or key.startswith("$"):
                raise errors.Invalid("map keys must be strings not starting with '$'")
            check_plain(item, depth + 1)
        return
    if isinstance(value, list):
        for item in value:
            check_plain(item, depth + 1)
        return
    _scalar(value)


Names = Callable[[], str]
"""Where a new counter's slot map gets its name when the path cannot name it."""


def fresh_name() -> str:
    return f"{SLOTS_PREFIX}{uuid.uuid4().hex}"


def to_crdt(value: Any, doc: Doc[Any], names: Names = fresh_name) -> Any:
    """A checked plain value as a pycrdt prelim value (counters' slots go to ``doc``; call
    inside the transaction that inserts the value)."""
    if isinstance(value, dict):
        if set(value) == {TEXT}:
            return Text(value[TEXT])
        if set(value) == {COUNTER}:
            return _new_counter(doc, names(), value[COUNTER])
        return Map({key: to_crdt(item, doc, names) for key, item in value.items()})
    if isinstance(value, list):
        return Array([to_crdt(item, doc, names) for item in value])
    return value


# ---------------------------------------------------------------------- operations

OPS: Final = ("set", "delete", "incr", "insert", "append", "text_insert", "text_delete")


def _parse_path(raw: Any) -> Path:
    if not isinstance(raw, list) or len(raw) > MAX_DEPTH:
        raise errors.Invalid("path must be a list of keys and indexes")
    for part in raw:
        if not isinstance(part, str | int) or isinstance(part, bool):
            raise errors.Invalid("path elements are map keys (strings) or list indexes")
    return list(raw)


def parse_ops(raw: Any) -> list[dict[str, Any]]:
    """Check the shape of every operation up front."""
    if not isinstance(raw, list) or not 0 < len(raw) <= 1000:
        raise errors.Invalid("ops must be a list of 1..1000 operations")
    ops = []
    for op in raw:
        if not isinstance(op, dict) or op.get("op") not in OPS:
            raise errors.Invalid(f"each op needs 'op' in {', '.join(OPS)}")
        path = _parse_path(op.get("path", []))
        kind = op["op"]
        if kind in ("set", "delete", "incr") and not path:
            raise errors.Invalid(f"{kind} needs a non-empty path")
        if kind == "set":
            check_plain(op.get("value"))
        elif kind == "incr":
            by = op.get("by", 1)
            if type(by) is not int:
                raise errors.Invalid("incr 'by' must be an integer")
            _scalar(by)
        elif kind in ("insert", "append"):
            values = op.get("values")
            if not isinstance(values, list):
                raise errors.Invalid(f"{kind} needs 'values' (a list)")
            check_plain(values)
            if kind == "insert" and type(op.get("index")) is not int:
                raise errors.Invalid("insert needs an integer 'index'")
        elif kind == "text_insert":
            if type(op.get("index")) is not int or not isinstance(op.get("text"), str):
                raise errors.Invalid("text_insert needs 'index' (int) and 'text' (string)")
        elif kind == "text_delete" and (
            type(op.get("index")) is not int or type(op.get("length")) is not int
        ):
            raise errors.Invalid("text_delete needs 'index' and 'length' (ints)")
        ops.append({**op, "path": path})
    return ops


class _Plain:
    """Path navigation on plain values, for the dry run."""

    @staticmethod
    def parent(root: dict[str, Any], path: Path) -> tuple[Any, str | int]:
        node: Any = root
        for part in path[:-1]:
            node = _Plain.step(node, part)
        return node, path[-1]

    @staticmethod
    def step(node: Any, part: str | int) -> Any:
        if isinstance(node, dict) and isinstance(part, str):
            if part not in node:
                raise errors.NotFound(f"no key {part!r}")
            return node[part]
        if isinstance(node, list) and isinstance(part, int):
            if not -len(node) <= part < len(node):
                raise errors.NotFound(f"index {part} out of range")
            return node[part]
        raise errors.Invalid(f"cannot step into {type(node).__name__} with {part!r}")

    @staticmethod
    def target(root: dict[str, Any], path: Path) -> Any:
        node: Any = root
        for part in path:
            node = _Plain.step(node, part)
        return node


def dry_run(marked_root: dict[str, Any], ops: list[dict[str, Any]]) -> None:
    """Raise the error the first failing op would raise; changes only a copy.

    ``marked_root`` is ``to_plain(root, marked=True)``: counters and texts are marked so the
    dry run applies the same type rules as the real document."""
    root = copy.deepcopy(marked_root)
    for op in ops:
        kind, path = op["op"], op["path"]
        if kind == "set":
            parent, key = _Plain.parent(root, path)
            _assign(parent, key, _mark(op["value"]))
        elif kind == "delete":
            parent, key = _Plain.parent(root, path)
            _Plain.step(parent, key)
            del parent[key]
        elif kind == "incr":
            parent, key = _Plain.parent(root, path)
            if isinstance(key, str) and key.startswith("$"):
                raise errors.Invalid("map keys may not start with '$'")
            if isinstance(parent, dict) and isinstance(key, str) and key not in parent:
                parent[key] = CounterInt(0)
            current = _Plain.step(parent, key)
            if not isinstance(current, CounterInt):
                raise errors.Invalid("incr needs a counter (or a missing map key)")
            parent[key] = CounterInt(current + op.get("by", 1))
        elif kind in ("insert", "append"):
            target = _Plain.target(root, path) if path else root
            if not isinstance(target, list):
                raise errors.Invalid(f"{kind} needs a list at the path")
            index = len(target) if kind == "append" else op["index"]
            if not 0 <= index <= len(target):
                raise errors.NotFound(f"index {index} out of range")
            target[index:index] = [_mark(v) for v in op["values"]]
        else:
            parent, key = _Plain.parent(root, path) if path else (None, "")
            target = _Plain.target(root, path)
            if not isinstance(target, TextStr) or parent is None:
                raise errors.Invalid(f"{kind} needs a text value ({{'$text': ...}}) at the path")
            index = op["index"]
            if kind == "text_insert":
                if not 0 <= index <= len(target):
                    raise errors.NotFound("text index out of range")
                parent[key] = TextStr(target[:index] + op["text"] + target[index:])
            else:
                length = op["length"]
                if length < 0 or not 0 <= index <= index + length <= len(target):
                    raise errors.NotFound("text range out of range")
                parent[key] = TextStr(target[:index] + target[index + length :])


def _mark(value: Any) -> Any:
    """A plain value as the document will hold it (with counter/text markers)."""
    if isinstance(value, dict):
        if set(value) == {TEXT}:
            return TextStr(value[TEXT])
        if set(value) == {COUNTER}:
            return CounterInt(value[COUNTER])
        return {k: _mark(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_mark(v) for v in value]
    return value


def _assign(parent: Any, key: str | int, value: Any) -> None:
    if isinstance(parent, dict) and isinstance(key, str):
        if key.startswith("$"):
            raise errors.Invalid("map keys may not start with '$'")
        parent[key] = value
    elif isinstance(parent, list) and isinstance(key, int):
        if not -len(parent) <= key < len(parent):
            raise errors.NotFound(f"index {key} out of range")
        parent[key] = value
    else:
        raise errors.Invalid(f"cannot set {key!r} in {type(parent).__name__}")


def apply_ops(doc: Doc[Any], ops: list[dict[str, Any]], names: Names = fresh_name) -> None:
    """Apply already dry-run ops inside the caller's transaction (new counters that their
    path cannot name are named by ``names``)."""
    root: Map[Any] = doc.get(ROOT, type=Map)
    for op in ops:
        kind, path = op["op"], op["path"]
        if kind in ("set", "delete", "incr"):
            parent = _resolve(root, path[:-1])
            key = path[-1]
            if kind == "set":
                if _holds(parent, key):
                    retire(doc, parent[key])
                parent[key] = to_crdt(op["value"], doc, names)
            elif kind == "delete":
                retire(doc, parent[key])
                del parent[key]
            else:
                _increment(doc, parent, path, op.get("by", 1), names)
            continue
        target = _resolve(root, path)
        if kind == "append":
            for value in op["values"]:
                target.append(to_crdt(value, doc, names))
        elif kind == "insert":
            for offset, value in enumerate(op["values"]):
                target.insert(op["index"] + offset, to_crdt(value, doc, names))
        elif kind == "text_insert":
            target.insert(_text_offset(target, op["index"]), op["text"])
        else:
            start = _text_offset(target, op["index"])
            end = _text_offset(target, op["index"] + op["length"])
            del target[start:end]


def _text_offset(text: Text, index: int) -> int:
    """pycrdt (Yrs) addresses text by UTF-8 byte offset; callers (and the dry run) count
    characters."""
    return len(str(text)[:index].encode())


def _resolve(root: Map[Any], path: Path) -> Any:
    node: Any = root
    for part in path:
        node = node[part]
    return node


def _holds(parent: Any, key: str | int) -> bool:
    if isinstance(parent, Map):
        return isinstance(key, str) and key in parent
    return isinstance(key, int) and -len(parent) <= key < len(parent)


def _increment(doc: Doc[Any], parent: Any, path: Path, by: int, names: Names) -> None:
    key = path[-1]
    if isinstance(parent, Map) and isinstance(key, str) and key not in parent:
        # Named after its path only when every step is a map key: list indexes shift.
        if all(isinstance(part, str) for part in path):
            name = _path_counter_name(doc, path)
        else:
            name = names()
        parent[key] = _new_counter(doc, name, by)
        return
    slots = _slots(parent[key])
    slot = f"c{doc.client_id}"
    slots[slot] = slots.get(slot, 0) + by


def _fresh_counters(value: Any) -> int:
    """How many new counters a plain value creates."""
    if isinstance(value, dict):
        if set(value) == {COUNTER}:
            return 1
        return sum(_fresh_counters(item) for item in value.values())
    if isinstance(value, list):
        return sum(_fresh_counters(item) for item in value)
    return 0


def undo_plan(doc: Doc[Any], ops: list[dict[str, Any]]) -> tuple[list[str], Names]:
    """For a batch that may have to be taken back: every root type applying ``ops`` can
    change (an undo manager only sees types it was given beforehand), and the names for the
    counters it creates, drawn now so they can be among them."""
    drawn = [fresh_name() for _ in range(sum(_fresh_counters(op.get("value")) for op in ops))]
    drawn += [fresh_name() for op in ops if op["op"] == "incr"]
    roots = {ROOT, ONCE, RETIRED, *drawn}
    root: Map[Any] = doc.get(ROOT, type=Map)
    for op in ops:
        path = op["path"]
        top = path[0] if path else None
        if isinstance(top, str) and top in root:
            roots |= counter_names(root[top])  # counters it may increment or retire
        if op["op"] == "incr" and all(isinstance(part, str) for part in path):
            # Path-named: the generation moves on if the batch retires the path's counter.
            base = _path_counter_name(doc, path)
            stem, _, generation = base.rpartition("#")
            roots |= {f"{stem}#{g}" for g in range(int(generation), int(generation) + len(ops))}
    supply = iter(drawn)
    return sorted(roots), lambda: next(supply)


ONCE: Final = "once"
MAX_ONCE: Final = 10_000
# Between an idempotency key and the writer that recorded it (see record_once); keys are
# printable, so it never occurs in one.
WRITER_SEP: Final = "\x1f"


def applied_once(doc: Doc[Any], key: str) -> bool:
    """Was an update with this idempotency key applied already (on any replica)?"""
    once: Map[Any] = doc.get(ONCE, type=Map)
    if key in once:
        return True
    return any(f"{key}{WRITER_SEP}{client}" in once for client in vectors.decode(doc.get_state()))


def record_once(doc: Doc[Any], key: str, wall_ms: int, *, per_writer: bool = False) -> None:
    """Remember ``key`` in the same transaction as the update it guards; forget the oldest
    keys beyond ``MAX_ONCE`` (pruned in batches to keep writes cheap).

    ``per_writer``: record it under this writer's own entry, for a write that may be
    withdrawn. Two writers recording one key under the same entry would conflict, and the
    loser of a map conflict is deleted: withdrawing the winner would then leave the key
    recorded nowhere, though the other write stays."""
    once: Map[Any] = doc.get(ONCE, type=Map)
    once[f"{key}{WRITER_SEP}{doc.client_id}" if per_writer else key] = wall_ms
    if len(once) > MAX_ONCE * 1.2:
        by_age = sorted(once.items(), key=lambda kv: kv[1])
        for old, _ in by_age[: len(once) - MAX_ONCE]:
            del once[old]


def once_key(entry: str) -> str:
    """The idempotency key an entry of the ``once`` map records."""
    return entry.partition(WRITER_SEP)[0]


def read(doc: Doc[Any], path: Path | None = None) -> Any:
    root: Map[Any] = doc.get(ROOT, type=Map)
    node: Any = root
    for part in path or []:
        # Only map keys and list indexes lead somewhere (pycrdt answers None for a string
        # index into an Array, and would step into counters' slots and text characters).
        if isinstance(node, Map) and COUNTER not in node and isinstance(part, str):
            found = part in node
        elif isinstance(node, Array) and type(part) is int:
            found = -len(node) <= part < len(node)
        else:
            found = False
        if not found:
            raise errors.NotFound(f"no value at {path!r}")
        node = node[part]
    return to_plain(node)
