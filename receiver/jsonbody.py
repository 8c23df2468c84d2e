"""JSON that comes from outside (request bodies), parsed with a bound on how deeply it nests.

Python's json module recurses once per level of nesting: a body of 100,000 `[` makes json.loads raise
RecursionError, and one just shallow enough to parse can still make a later step that walks the value
(json.dumps of an opaque field, a validation message) raise it. No body the receiver takes nests
deeper than a few levels, so anything past MAX_DEPTH is refused before it is parsed.
"""
from __future__ import annotations

import json
import math
import re

MAX_DEPTH = 32
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)    # a JSON string, escapes included
_BRACKET = re.compile(r"[\[\]{}]")


class TooDeep(ValueError):
    """The text nests arrays and objects deeper than allowed."""


def too_deep(text: str, max_depth: int = MAX_DEPTH) -> bool:
    """Whether the JSON text nests arrays/objects more than max_depth levels (brackets inside strings
    do not count). Exact for valid JSON; for anything else json.loads has the last word."""
    if text.count("[") + text.count("{") <= max_depth:
        return False            # too few brackets to nest that deep: a callback's body, at no cost
    depth = 0
    for bracket in _BRACKET.finditer(_STRING.sub("", text)):
        depth += 1 if bracket.group() in "[{" else -1
        if depth > max_depth:
            return True
    return False


def loads(text: str, max_depth: int = MAX_DEPTH, **options):
    """json.loads(text, **options), or ValueError: TooDeep past max_depth levels, another ValueError for
    text that is not JSON (NaN and Infinity included: Python reads them, JSON has no such numbers)."""
    if too_deep(text, max_depth):
        raise TooDeep(f"nested more than {max_depth} levels deep")
    try:
        if not options:
            return _DECODER.decode(text)        # json.loads with options makes a decoder each call
        options.setdefault("parse_constant", _not_a_json_number)
        return json.loads(text, **options)
    except RecursionError:          # not expected after the check above; a 500 it must never be
        raise TooDeep(f"nested more than {max_depth} levels deep") from None


def _not_a_json_number(name: str):
    raise ValueError(f"{name} is not a JSON number")


_DECODER = json.JSONDecoder(parse_constant=_not_a_json_number)


def number(text: str) -> int | float:
    """A JSON number written with a fraction or an exponent, read as JSON (and JSON Schema) reads it:
    60.0 is the whole number 60. For json.loads(parse_float=...); a number past a float's range
    (1e400) is refused, not read as infinity."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of range")
    return int(value) if value.is_integer() else value
