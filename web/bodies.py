"""The one JSON body reader of every door (API jobs and rules, the webhook receiver): any body, whatever its shape or
size, ends as a value or as a 4xx with the usual error JSON, never a 500.

Order, cheapest first, each step bounding the next:
1. Content-Type must be JSON (`application/json` or `*/*+json`, UTF-8 if a charset is named) → else 415.
2. At most MAX_BYTES are read, also from a chunked body without Content-Length → else 413.
3. Strict UTF-8, no byte order mark → else 400. (json.loads on bytes would guess UTF-16/32 and accept a BOM.)
4. Nesting depth counted by a scanner without recursion, before json.loads → else 400. json's C decoder recurses
   per level, and a body of 30,000 `[` raised RecursionError, which became a 500 (issue 10 §3).
5. json.loads with hooks: duplicate object keys, NaN/Infinity, floats that overflow to inf and integers longer
   than MAX_INT_DIGITS are refused (400). Python's own int-string limit (4,300 digits) is far above what any
   field here means, and a duplicate key would let two parsers (ours, a proxy's) read different requests.
6. Every string, key or value, must be storable: no NUL and no lone surrogate (`"\\ud800"` parses in Python but
   PostgreSQL refuses it, a 500 from the insert of a delivery's reason) → else 400. Walked iteratively.
The callers then check the shape (an object with known fields: 422 naming the field).
"""

from __future__ import annotations

import json
import re

from flask import request
from werkzeug.exceptions import RequestEntityTooLarge

from .errors import BadRequest, PayloadTooLarge, UnsupportedMediaType

MAX_BYTES = 64 * 1024  # the same as security.MAX_BODY: nothing here takes more
MAX_DEPTH = 32  # a Hub webhook payload is 4 deep; our request bodies 1
MAX_INT_DIGITS = 40  # sizes and counts fit in 20 digits; anything longer is not a number this service uses

_JSON_TYPE = re.compile(r"^application/(?:[a-z0-9.+-]+\+)?json$")
_TOKENS = re.compile(r'\\.|["\[\]{}]', re.S)  # an escape pair, a quote or a bracket: all the scanner needs


class BodyError(BadRequest):
    """A body that is not a usable JSON document (a 400 unless a subclass says otherwise)."""


class BodyTooLarge(PayloadTooLarge, BodyError):  # 413, and still a BodyError for callers that record refusals
    pass


class NotJson(UnsupportedMediaType, BodyError):  # 415
    pass


def read_json() -> object:
    """The request's JSON body as a Python value, or a WebError (400/413/415) with one line saying why."""
    _check_content_type()
    data = _read_capped()
    if data.startswith(b"\xef\xbb\xbf"):
        raise BodyError("the request body starts with a byte order mark; send plain UTF-8 JSON")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BodyError(f"the request body is not valid UTF-8 (byte {exc.start})") from None
    if not text.strip():
        raise BodyError("the request body is empty; send a JSON object")
    depth = nesting_depth(text)
    if depth > MAX_DEPTH:
        raise BodyError(f"the JSON body is nested {depth} levels deep; at most {MAX_DEPTH} are accepted")
    try:
        value = json.loads(text, object_pairs_hook=_object, parse_constant=_constant, parse_int=_int,
                           parse_float=_float)
    except _Refused as exc:
        raise BodyError(f"the request body is refused: {exc}") from None
    except (ValueError, RecursionError) as exc:  # RecursionError: belt and braces, the depth check comes first
        where = f" at line {exc.lineno} column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else ""
        raise BodyError(f"the request body is not valid JSON{where}") from None
    _check_strings(value)
    return value


def _check_content_type() -> None:
    mimetype = (request.mimetype or "").lower()
    if not _JSON_TYPE.match(mimetype):
        shown = mimetype[:60] or "none"
        raise NotJson(f"send the body as JSON with Content-Type: application/json (got {shown})", field="Content-Type")
    charset = request.mimetype_params.get("charset")
    if charset is not None and charset.lower().replace("_", "-") not in ("utf-8", "utf8"):
        raise NotJson(f"JSON bodies are UTF-8 (charset {charset[:20]!r} was named)", field="Content-Type")


def _read_capped() -> bytes:
    length = request.content_length
    if length is not None and length > MAX_BYTES:
        raise BodyTooLarge(f"the request body is larger than {MAX_BYTES // 1024} KiB")
    # Read until the end or one byte past the limit, so a chunked body (no Content-Length) that is too long is seen
    # without buffering all of it. Werkzeug's own MAX_CONTENT_LENGTH stream stops at the limit and raises only on
    # the next read (one read of limit+1 bytes returns a silently truncated body), hence the loop.
    chunks, total = [], 0
    try:
        while total <= MAX_BYTES:
            chunk = request.stream.read(MAX_BYTES + 1 - total)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    except RequestEntityTooLarge:
        total = MAX_BYTES + 1
    if total > MAX_BYTES:
        raise BodyTooLarge(f"the request body is larger than {MAX_BYTES // 1024} KiB")
    data = b"".join(chunks)
    return data


def nesting_depth(text: str) -> int:
    """The deepest `[`/`{` nesting outside strings: one linear pass, no recursion, no backtracking (a regex that
    cuts out whole strings is quadratic on `"\\"\\"...` bodies). Escapes are skipped as pairs, so `\\"` never ends
    a string; outside strings a backslash is not JSON anyway."""
    depth = deepest = 0
    in_string = False
    for match in _TOKENS.finditer(text):
        token = match.group()
        if token == '"':
            in_string = not in_string
        elif in_string or token[0] == "\\":
            continue
        elif token in "[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


class _Refused(ValueError):
    pass


def _object(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _Refused(f"duplicate key {key[:60]!r} in an object")
        out[key] = value
    return out


def _constant(name: str):
    raise _Refused(f"{name} is not a JSON number")


def _int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise _Refused(f"an integer of {len(text)} digits")
    return int(text)


def _float(text: str) -> float:
    if len(text) > 100:
        raise _Refused(f"a number of {len(text)} characters")
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise _Refused(f"the number {text[:40]} is too large")
    return value


def _check_strings(value: object) -> None:
    """Every key and string value must be storable text (no NUL, no lone surrogate). Iterative on purpose."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            _storable(item)
        elif isinstance(item, dict):
            for key, child in item.items():
                _storable(key)
                stack.append(child)
        elif isinstance(item, list):
            stack.extend(item)


def _storable(text: str) -> None:
    if "\x00" in text:
        raise BodyError("the request body has a NUL character (\\u0000) in a string")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise BodyError("the request body has a lone surrogate (\\ud800-\\udfff) in a string") from None
