"""A request body's JSON, parsed only when its shape is bounded: never deep, never vast.

Two shapes cost the edge far more than their size says, and both are refused before a byte is
parsed:
- **Too deep** (over `MAX_DEPTH` levels): orjson reads 1,024 levels and writes 255, so a body
  nested between the two used to pass the checks and fail when the edge wrote it upstream, and
  a deeper one is only recursion for whoever reads it next. 400 `invalid_request`.
- **Too many items** (over `MAX_ITEMS` keys, values and containers): a 17 MB body of a million
  small keys took 0.4 s to parse and 0.8 s more to build the upstream body from, all of it on
  the event loop, during which the edge answered nobody. 413 `payload_too_large`.

Why a scan and not only a thread: orjson holds the GIL for a whole parse (it builds Python
objects as it goes), so `asyncio.to_thread(orjson.loads, raw)` stalls the loop exactly as long
as parsing on it does (measured: a million keys, 0.33 s either way). What bounds the stall is
bounding what gets parsed, and so everything after the parse. The scan runs at the speed of
`bytes` methods (a few ms for 20 MB): strings are cut out (after their escaped quotes and
backslashes), then the structure left is counted and its nesting measured by removing the
innermost `[]` pairs once per level. For valid JSON both figures are exact; invalid JSON gets
whatever figure, and orjson's error if it passes. A body over `THREAD_BYTES` is scanned and
parsed in a worker thread all the same: the scan's steps hand the GIL back to the loop between
them, and so does the thread's share of a large parse.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from edge.errors import InvalidRequest, PayloadTooLarge

# Levels of nesting, the top-level object being one. A chat body needs about 6 (body, messages,
# a message, content parts, a part, an image_url), a JSON schema in `format` or `tools` a dozen
# or two; 64 is plenty and well under what orjson writes (255).
MAX_DEPTH = 64
# Keys, values and containers. At about 0.1-0.9 µs each to parse (containers the dearest), 65,536
# bound the event loop's stall to tens of milliseconds; a token-id prompt within the default
# `max_prompt_words` (50,000) fits, and real chat bodies hold a few hundred.
MAX_ITEMS = 65_536
# Bodies over this are scanned and parsed in a worker thread; below, the thread hop costs more
# than it saves.
THREAD_BYTES = 256 * 1024

# What the scan keeps of a body: the bytes JSON's structure is made of, and the backslash with
# every byte an escape may put after it (those letters as one), so escapes still pair up.
_KEPT = b'",:[]{}\\/bfnrtu'
_NOT_KEPT = bytes(b for b in range(256) if b not in _KEPT)
_FOLD_ESCAPES = bytes.maketrans(b"/bfnrtu", b"nnnnnnn")
# What the nesting measure keeps of the structure: brackets, all of one kind.
_SAME_BRACKETS = bytes.maketrans(b"{}", b"[]")
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


async def load(raw: bytes) -> Any:
    """`parse(raw)`, in a worker thread when `raw` is over `THREAD_BYTES`."""
    if len(raw) > THREAD_BYTES:
        return await asyncio.to_thread(parse, raw)
    return parse(raw)


def parse(raw: bytes) -> Any:
    """The JSON value `raw` holds, once its shape is within the bounds.

    Error handling: `InvalidRequest` (400) for a body that is not JSON or is nested over
    `MAX_DEPTH` levels, `PayloadTooLarge` (413) for one of over `MAX_ITEMS` items.
    """
    check_shape(raw)
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"the request body is not valid JSON (UTF-8): {exc}") from None


def check_shape(raw: bytes) -> None:
    """Refuse `raw` if it holds over `MAX_ITEMS` items or nests over `MAX_DEPTH` levels.

    Error handling: as `parse`.
    """
    items, depth = measure(raw, MAX_ITEMS, MAX_DEPTH)
    if items > MAX_ITEMS:
        raise PayloadTooLarge(
            f"the request body holds more than {MAX_ITEMS} JSON keys and values; "
            "no request the edge serves needs that many"
        )
    if depth > MAX_DEPTH:
        raise InvalidRequest(
            f"the request body is nested more than {MAX_DEPTH} levels deep; "
            "no request the edge serves needs that many"
        )


def measure(raw: bytes, max_items: int, max_depth: int) -> tuple[int, int]:
    """How many items the JSON text `raw` holds (one per container, plus one per `,` and `:`
    between its keys and values) and how deep it nests, without parsing it.

    Both are exact for valid JSON up to their maximum; past it the count stops: the figure is
    then only over the maximum, and over `max_items` items the depth is not measured (0).
    """
    kept = raw.translate(_FOLD_ESCAPES, _NOT_KEPT)  # one pass; usually a fraction is left
    # Escapes, left to right as a JSON reader takes them (`\\` before `\"`): every quote left
    # then opens or closes a string.
    for escape in (b"\\\\", b'\\"'):
        if escape in kept:  # a search is cheaper than a replace that finds nothing
            kept = kept.replace(escape, b"")
    # Each string but a lone top-level one follows a bracket, `,` or `:`: an item each.
    strings = kept.count(b'"') // 2
    if strings > max_items + 1:  # before split() makes an object of each string
        return strings - 1, 0
    structure = b"".join(kept.split(b'"')[::2])  # the strings' contents left out
    items = sum(structure.count(c) for c in (b",", b":", b"[", b"{"))
    if items > max_items:  # the passes below take a time proportional to the containers
        return items, 0
    brackets = structure.translate(_SAME_BRACKETS, _NOT_BRACKETS)
    depth = 0
    while brackets and depth <= max_depth:
        inner = brackets.replace(b"[]", b"")  # every innermost container: one level
        if len(inner) == len(brackets):  # unbalanced: not JSON, orjson says what is wrong
            break
        brackets, depth = inner, depth + 1
    return items, depth
