"""Checked access to an API op's arguments.

Every op reads its arguments through these, so a wrong type or range is refused before the
value is used, with an ``invalid`` error that names the field (``detail.field``) — never a
``TypeError`` deep inside that the client would see as ``internal``.
"""

from __future__ import annotations

from typing import Any, Final

from meshd_client.protocol import errors

MAX_TEXT: Final = 1024


def _invalid(key: str, what: str) -> errors.Invalid:
    return errors.Invalid(f"{key} must be {what}", detail={"field": key})


def text(args: dict[str, Any], key: str, *, max_len: int = MAX_TEXT) -> str:
    """A required, non-empty string."""
    value = args.get(key)
    if not isinstance(value, str) or not 0 < len(value) <= max_len:
        raise _invalid(key, f"a string of 1..{max_len} characters")
    return value


def opt_text(
    args: dict[str, Any], key: str, default: str | None = None, *, max_len: int = MAX_TEXT
) -> str | None:
    """An optional string (absent or null: ``default``); empty strings allowed."""
    value = args.get(key)
    if value is None:
        return default
    if not isinstance(value, str) or len(value) > max_len:
        raise _invalid(key, f"a string of at most {max_len} characters")
    return value


def integer(args: dict[str, Any], key: str, default: int, lo: int, hi: int) -> int:
    value = args.get(key, default)
    if type(value) is not int or not lo <= value <= hi:
        raise _invalid(key, f"an integer in {lo}..{hi}")
    return value


def seconds(args: dict[str, Any], key: str, default: float, hi: float) -> float:
    """A positive duration in seconds, at most ``hi``."""
    value = args.get(key, default)
    if not isinstance(value, int | float) or isinstance(value, bool) or not 0 < value <= hi:
        raise _invalid(key, f"a number of seconds in (0, {hi}]")
    return float(value)


def flag(args: dict[str, Any], key: str, default: bool) -> bool:
    value = args.get(key, default)
    if type(value) is not bool:
        raise _invalid(key, "true or false")
    return value


def text_list(
    args: dict[str, Any], key: str, *, max_items: int, max_len: int = MAX_TEXT
) -> tuple[str, ...]:
    """A list of non-empty strings (absent or null: empty). A bare string is refused: it
    would otherwise be taken as a list of its characters."""
    value = args.get(key)
    if value is None:
        return ()
    if not isinstance(value, list | tuple) or len(value) > max_items:
        raise _invalid(key, f"a list of at most {max_items} strings")
    for item in value:
        if not isinstance(item, str) or not 0 < len(item) <= max_len:
            raise _invalid(key, f"a list of strings of 1..{max_len} characters")
    return tuple(value)


def mapping(args: dict[str, Any], key: str) -> dict[str, Any] | None:
    """An optional map (absent or null: None)."""
    value = args.get(key)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _invalid(key, "a map")
    return value


def listing(args: dict[str, Any], key: str) -> list[Any] | None:
    """An optional list (absent or null: None)."""
    value = args.get(key)
    if value is None:
        return None
    if not isinstance(value, list):
        raise _invalid(key, "a list")
    return value
