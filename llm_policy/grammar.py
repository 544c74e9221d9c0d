"""JSON-schema subset -> llama.cpp GBNF grammar that also enforces numeric bounds.

llama.cpp's own JSON-schema grammar fixes keys and types but ignores ``minimum``/``maximum``, so a
small model happily answers ``"t_PTV": 80.5`` for a threshold in [1, 1.2]. :func:`schema_to_gbnf`
compiles the schemas of :mod:`llm_policy.proposal` (objects whose properties are all required,
bounded numbers, bounded strings) into a grammar whose number rules only derive decimals inside the
bounds: a number is written with exactly ``decimals`` fractional digits (``0.050``, ``12.500``)
and the set of such digit strings between the bounds is decomposed into digit-class patterns. A
string (``maxLength`` required) derives at most that many printable ASCII characters other than ``"``
and ``\\`` (no escapes: each character is one byte, so the string costs at most ``maxLength``
tokens, and a token budget that allows for it always sees the answer closed).
Anything outside that subset raises ``ValueError`` so callers can fall back to plain schemas.
"""

from __future__ import annotations

import math
from typing import Any

Pattern = list[str]  # one GBNF element per digit position: a literal '"5"' or a class '[0-9]'


def _digit_ranges(lo: str, hi: str) -> list[Pattern]:
    """Patterns whose union is every digit string of ``len(lo)`` between ``lo`` and ``hi``."""
    if lo == hi:
        return [[f'"{c}"' for c in lo]]
    width = len(lo)
    if lo == "0" * width and hi == "9" * width:
        return [["[0-9]"] * width]
    if width == 1:
        return [[f"[{lo}-{hi}]"]]
    if lo[0] == hi[0]:
        return [[f'"{lo[0]}"', *p] for p in _digit_ranges(lo[1:], hi[1:])]
    out: list[Pattern] = []
    first, last = int(lo[0]), int(hi[0])
    if lo[1:] != "0" * (width - 1):
        out += [[f'"{lo[0]}"', *p] for p in _digit_ranges(lo[1:], "9" * (width - 1))]
        first += 1
    full_last = hi[1:] == "9" * (width - 1)
    mid_hi = last if full_last else last - 1
    if first <= mid_hi:
        head = f'"{first}"' if first == mid_hi else f"[{first}-{mid_hi}]"
        out.append([head] + ["[0-9]"] * (width - 1))
    if not full_last:
        out += [[f'"{hi[0]}"', *p] for p in _digit_ranges("0" * (width - 1), hi[1:])]
    return out


def number_alternatives(low: float, high: float, decimals: int = 3) -> list[str]:
    """GBNF alternatives deriving exactly the decimals with ``decimals`` fractional digits in
    ``[low, high]`` (``low >= 0``)."""
    if not (math.isfinite(low) and math.isfinite(high) and 0 <= low <= high):
        raise ValueError(f"bounds [{low}, {high}] must be finite with 0 <= low <= high")
    scale = 10**decimals
    lo_n, hi_n = math.ceil(low * scale - 1e-9), math.floor(high * scale + 1e-9)
    if lo_n > hi_n:
        raise ValueError(f"no {decimals}-decimal number lies in [{low}, {high}]")
    alts = []
    digits = 1
    while True:  # split by the number of integer digits, so no leading zero is ever derived
        block_lo = 0 if digits == 1 else 10 ** (decimals + digits - 1)
        block_hi = 10 ** (decimals + digits) - 1
        if block_lo > hi_n:
            break
        a, b = max(lo_n, block_lo), min(hi_n, block_hi)
        if a <= b:
            width = decimals + digits
            for p in _digit_ranges(str(a).zfill(width), str(b).zfill(width)):
                alts.append(" ".join(p[:digits] + ['"."'] + p[digits:]) if decimals else " ".join(p))
        digits += 1
    return alts


_PLAIN_CHAR = r"[ !#-\[\]-~]"  # printable ASCII but '"' and '\'


def schema_to_gbnf(schema: dict[str, Any], decimals: int = 3) -> str:
    """A GBNF grammar (rule ``root``) for ``schema``; see the module docstring for the subset."""
    rules: list[str] = []
    counter = [0]

    def rule_for(node: dict[str, Any]) -> str:
        kind = node.get("type")
        if kind == "number":
            if "minimum" not in node or "maximum" not in node:
                raise ValueError("numbers need both 'minimum' and 'maximum'")
            counter[0] += 1
            name = f"num{counter[0]}"
            alts = number_alternatives(float(node["minimum"]), float(node["maximum"]), decimals)
            rules.append(f"{name} ::= " + " | ".join(f"( {a} )" for a in alts))
            return name
        if kind == "string":
            unknown = sorted(set(node) - {"type", "maxLength"})
            if unknown:
                raise ValueError(f"string keywords {unknown} are not supported by the bounded grammar")
            n = node.get("maxLength")
            if not (isinstance(n, int) and not isinstance(n, bool) and n >= 0):
                raise ValueError(f"strings need an integer 'maxLength' >= 0, got {n!r}")
            counter[0] += 1
            name = f"str{counter[0]}"
            rules.append(f'{name} ::= "\\"" {_PLAIN_CHAR}{{0,{n}}} "\\""')
            return name
        if kind == "object":
            props = node.get("properties", {})
            if list(node.get("required", [])) != list(props) or node.get("additionalProperties", True):
                raise ValueError("objects must require every property, in order, and forbid others")
            parts = []
            for i, (key, sub) in enumerate(props.items()):
                sep = "" if i == 0 else '"," ws '
                parts.append(f'{sep}"\\"{key}\\"" ws ":" ws {rule_for(sub)} ws')
            counter[0] += 1
            name = f"obj{counter[0]}"
            rules.append(f'{name} ::= "{{" ws ' + " ".join(parts) + ' "}"')
            return name
        raise ValueError(f"schema type {kind!r} is not supported by the bounded grammar")

    top = rule_for(schema)
    return "\n".join([f"root ::= {top}", 'ws ::= " "?', *rules]) + "\n"
