"""What an LLM must answer, and the client-side check of what it did answer.

The model is asked for one JSON object holding the next TPP vector: every TPP of the scenario
(``action_scope="all"``) or only the weights ``lambda_*`` (``"weights_only"``, as in DOLA), each
a number inside the range the environment can realise (:func:`proposal_bounds`). With chain of
thought the object is ``{"reasoning": "...", "tpp": {...}}`` so the model writes its reasoning
before the numbers.

The same JSON schema drives constrained decoding where a backend supports it; the answer is
always validated here too, because constrained decoders differ in what they enforce (llama.cpp's
grammar ignores numeric bounds). :func:`parse_proposal` never trusts the text: it extracts the
first JSON object from prose, rejects NaN and infinities, strings, booleans, missing and extra
keys and out-of-range values, and reports every problem in one :class:`ProposalError`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from typing import Any

from rtenv.env import CONTINUOUS_BOUNDS
from rtenv.tpp import RANGES, tpp_kinds, tpp_names
from rtenv.validation import unique_keys

ACTION_SCOPES = ("all", "weights_only")
REASONING_MAX_CHARS = 1200


class ProposalError(ValueError):
    """An LLM answer that is not a valid TPP proposal; ``problems`` lists every reason."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


def proposal_bounds(structures: Sequence[str]) -> dict[str, tuple[float, float]]:
    """``name -> (low, high)`` (inclusive) for every TPP: the TPP ranges of :mod:`rtenv.tpp`
    intersected with the continuous action map of the environments (weights 0.01-1000)."""
    out = {}
    for name, key in zip(tpp_names(structures), tpp_kinds(structures), strict=True):
        lo, hi, _ = RANGES[key]
        a, b = CONTINUOUS_BOUNDS[key]
        if key[0] == "lambda":
            a, b = 10.0**a, 10.0**b
        out[name] = (max(lo, a), min(hi, b))
    return out


def scoped_names(structures: Sequence[str], action_scope: str) -> list[str]:
    """The TPP names the model proposes under ``action_scope`` (``all`` or ``weights_only``)."""
    if action_scope not in ACTION_SCOPES:
        raise ValueError(f"action_scope {action_scope!r} is invalid; valid: {list(ACTION_SCOPES)}")
    names = tpp_names(structures)
    return names if action_scope == "all" else [n for n in names if n.startswith("lambda_")]


def proposal_schema(structures: Sequence[str], action_scope: str = "all",
                    chain_of_thought: bool = False) -> dict[str, Any]:
    """JSON schema of the answer (numbers bounded by :func:`proposal_bounds`)."""
    bounds = proposal_bounds(structures)
    names = scoped_names(structures, action_scope)
    tpp = {
        "type": "object",
        "properties": {n: {"type": "number", "minimum": bounds[n][0], "maximum": bounds[n][1]} for n in names},
        "required": names,
        "additionalProperties": False,
    }
    if not chain_of_thought:
        return tpp
    return {
        "type": "object",
        "properties": {"reasoning": {"type": "string", "maxLength": REASONING_MAX_CHARS}, "tpp": tpp},
        "required": ["reasoning", "tpp"],
        "additionalProperties": False,
    }


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number JSON allows")


def extract_json(text: str) -> Any:
    """The first JSON object in ``text`` (which may wrap it in prose or code fences).

    Raises:
        ProposalError: no JSON object could be decoded (NaN/Infinity literals count as invalid).
    """
    return next(_json_objects(text))


def _json_objects(text: str) -> Iterator[dict]:
    """The JSON objects in ``text``, in order and decoded as they are asked for (objects nested in
    an earlier one included); raises :class:`ProposalError` where there is none."""
    if not isinstance(text, str) or not text.strip():
        raise ProposalError(["the answer is empty"])
    decoder = json.JSONDecoder(parse_constant=_reject_constant, object_pairs_hook=unique_keys)
    start = text.find("{")
    last_error = "no '{' found"
    found = False
    while start != -1:
        try:
            obj, _ = decoder.raw_decode(text, start)
            if isinstance(obj, dict):
                found = True
                yield obj
        except ValueError as exc:  # JSONDecodeError or a rejected constant
            last_error = str(exc)
        except RecursionError:  # nested deeper than the decoder goes: not a proposal either
            last_error = "JSON nested too deep"
        start = text.find("{", start + 1)
    if not found:
        raise ProposalError([f"the answer holds no JSON object ({last_error}); answer with one JSON object only"])


def validate_proposal(obj: Any, structures: Sequence[str], action_scope: str = "all",
                      chain_of_thought: bool = False) -> tuple[dict[str, float], str]:
    """Check a decoded answer; returns ``(tpp values by name, reasoning)``.

    Raises:
        ProposalError: listing every missing, extra, non-numeric, non-finite or out-of-range key.
    """
    reasoning = ""
    if chain_of_thought:
        if not isinstance(obj, dict) or not isinstance(obj.get("tpp"), dict):
            raise ProposalError(['the answer must be {"reasoning": "...", "tpp": {...}} with an object "tpp"'])
        reasoning = obj.get("reasoning")
        problems = [f"unexpected top-level key {k!r}" for k in sorted(set(obj) - {"reasoning", "tpp"})]
        if not isinstance(reasoning, str):
            problems.append(f'"reasoning" must be a string, got {reasoning!r}')
            reasoning = ""
        elif len(reasoning) > REASONING_MAX_CHARS:
            problems.append(f'"reasoning" has {len(reasoning)} characters; at most {REASONING_MAX_CHARS}')
        obj = obj["tpp"]
    else:
        problems = []
    if not isinstance(obj, dict):
        raise ProposalError([f"the answer must be a JSON object, got {type(obj).__name__}"])
    bounds = proposal_bounds(structures)
    names = scoped_names(structures, action_scope)
    missing = [n for n in names if n not in obj]
    if missing:
        problems.append(f"missing keys {missing}")
    extra = sorted(set(obj) - set(names))
    if extra:
        problems.append(f"unexpected keys {extra}; allowed: {names}")
    values: dict[str, float] = {}
    for n in names:
        if n not in obj:
            continue
        v = obj[n]
        lo, hi = bounds[n]
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            problems.append(f"{n} must be a number in [{lo:g}, {hi:g}], got {v!r}")
            continue
        try:
            v = float(v)
        except OverflowError:  # an integer written out beyond float range
            problems.append(f"{n} (a {len(str(abs(v)))}-digit integer) is outside [{lo:g}, {hi:g}]")
            continue
        if not math.isfinite(v):
            problems.append(f"{n} must be finite, got {v!r}")
        elif not lo <= v <= hi:
            problems.append(f"{n} = {v:g} is outside [{lo:g}, {hi:g}]")
        else:
            values[n] = v
    if problems:
        raise ProposalError(problems)
    return values, reasoning


def parse_proposal(text: str, structures: Sequence[str], action_scope: str = "all",
                   chain_of_thought: bool = False) -> tuple[dict[str, float], str]:
    """:func:`validate_proposal` of the first JSON object in ``text`` that passes it (an answer may
    show a format before the real one); where none passes, the first object's problems."""
    first: ProposalError | None = None
    for obj in _json_objects(text):
        try:
            return validate_proposal(obj, structures, action_scope, chain_of_thought)
        except ProposalError as exc:
            first = first or exc
    raise first  # type: ignore[misc]  # _json_objects returned at least one object
