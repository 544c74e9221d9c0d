"""Plan evaluation: cumulative DVHs, dose-volume metrics and scored clinical protocols.

Metrics
-------
All metric functions take ``dose``, a 1-D array with the dose (Gy) of every voxel of one
structure; all voxels have the same volume ``voxel_cc`` (cc). Metrics are voxel-based, no
interpolation: Dx% is the minimum dose of the hottest x % of voxels, Vx is the percentage
of the structure volume receiving at least x Gy.

Protocol files
--------------
Protocols are JSON files laid out like PortPy's clinical-criteria files, so PortPy files
load as they are (also its earlier layout, which names the criterion type in ``name``, and a
sense given as ``constraints.constraint_type``; repeated generated names, where a file gives a
structure's goal and limit as two criteria, are numbered ``#2``, ``#3``)::

    {"disease_site": "Prostate", "pres_per_fraction_gy": 1.8, "num_of_fractions": 44,
     "criteria": [{"type": "dose_volume_V",
                   "parameters": {"structure_name": "Bladder", "dose_gy": 80},
                   "constraints": {"goal_volume_perc": 15, "limit_volume_perc": 20}}]}

The prescription is ``pres_per_fraction_gy * num_of_fractions`` (Gy; at most
:data:`MAX_GY_PER_FRACTION` per fraction, which catches a total dose typed as the per-fraction
one). Criterion types and
their ``parameters`` (besides ``structure_name``):

* ``max_dose``: optional ``method`` (``"max"`` default: the hottest voxel, as PortPy's
  ``max_dose``; ``"hottest_voxels"``; ``"cc"``), ``n_voxels`` (default 3), ``volume_cc``
  (default 0.03); see :func:`max_dose`. The shipped protocols name their method.
* ``mean_dose``: none.
* ``dose_volume_V``: ``dose_gy`` or ``dose_perc`` (percent of the prescription).
* ``dose_volume_D``: ``volume_perc`` or ``volume_cc``.

``constraints`` hold a goal (full credit) and a limit (zero credit). Dose-valued criteria
(max, mean, D) use ``goal_dose_gy``/``limit_dose_gy`` or ``goal_dose_perc``/
``limit_dose_perc`` (percent of the prescription); ``dose_volume_V`` uses
``goal_volume_perc``/``limit_volume_perc`` (percent of the structure volume) or
``goal_volume_cc``/``limit_volume_cc`` (absolute volume, cc). If only one of goal and limit is given, the
other equals it (a step function).

A parameter that does not apply to the criterion (``n_voxels`` without method
``"hottest_voxels"``, a second volume) is refused. Other keys PortPy files carry are ignored, but a
key one or two letters off a known one (``"sence"``, ``"methd"``) is refused rather than silently
dropped, and so is a ``constraints`` key that does not apply to the criterion's type.

Fields added by rtenv (all optional):

* top level: ``name``, ``description``, ``score_mode`` (``"linear"`` default,
  ``"binary"`` or ``"relative"``).
* per criterion: ``name`` (default generated, e.g. ``"Bladder V80Gy"``), ``sense``
  (``"upper"`` default: the value must be <= goal; ``"lower"``: the value must be >= goal,
  e.g. PTV coverage), ``points`` (default 1), ``primary`` (default false; marks the PTV
  goal used by :func:`dola_reward`), ``note``.

Score modes, for value v, goal g, limit l and points p (upper sense; lower mirrors it):

* ``linear``: p * clip((l - v) / (l - g), 0, 1), a step at g when l == g.
* ``binary``: p if the goal is met, else 0.
* ``relative`` (DOLA Eq. 2, floored at 0 here: DOLA's formula goes negative for a value above
  twice its goal): p if v <= g, else p * max(0, 1 - (v - g) / g); lower sense: p if v >= g,
  else p * max(0, v / g).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from rtenv.validation import check_integer, check_real, unique_keys

if TYPE_CHECKING:
    from rtenv.case import PlanningCase

__all__ = [
    "CRITERION_TYPES",
    "MAX_DOSE_METHODS",
    "MAX_GY_PER_FRACTION",
    "SCORE_MODES",
    "Criterion",
    "CriterionResult",
    "Protocol",
    "ProtocolResult",
    "available_protocols",
    "criterion_score",
    "cumulative_dvh",
    "dola_reward",
    "dose_at_volume_cc",
    "dose_at_volume_percent",
    "max_dose",
    "mean_dose",
    "volume_at_dose_percent",
]

CRITERION_TYPES = ("max_dose", "mean_dose", "dose_volume_V", "dose_volume_D")
MAX_DOSE_METHODS = ("max", "hottest_voxels", "cc")
SCORE_MODES = ("linear", "binary", "relative")
SENSES = ("upper", "lower")
MAX_GY_PER_FRACTION = 40.0
"""Largest dose per fraction (Gy) a protocol may prescribe (single-fraction radiosurgery goes to
about 24 Gy); a larger value is almost always a total dose typed as the per-fraction one."""


# --------------------------------------------------------------------------- metrics


def _check_dose(dose: Any, label: str = "dose") -> np.ndarray:
    """Return ``dose`` as a finite, non-empty 1-D float array or raise ValueError."""
    arr = np.asarray(dose, dtype=float)
    if arr.ndim != 1:
        raise ValueError(f"{label} must be a 1-D array of voxel doses, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{label} is empty; need at least one voxel")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{label} contains NaN or inf values")
    return arr


def _ceil(x: float) -> int:
    """Ceiling that ignores floating-point noise (e.g. 1.1/0.1 -> 11, not 12)."""
    return math.ceil(round(x, 9))


def cumulative_dvh(dose: np.ndarray, dose_points: np.ndarray | Sequence[float]) -> np.ndarray:
    """Cumulative DVH: fraction (0..1) of voxels receiving >= each of ``dose_points`` (Gy).

    The result has the shape of ``dose_points``.
    """
    points = np.asarray(dose_points, dtype=float)
    if not np.all(np.isfinite(points)):
        raise ValueError("dose_points contains NaN or inf values")
    return dvh_of_sorted(np.sort(_check_dose(dose)), points)


def dvh_of_sorted(sorted_dose: np.ndarray, dose_points: np.ndarray) -> np.ndarray:
    """:func:`cumulative_dvh` of doses already checked and sorted ascending (Gy), at finite
    ``dose_points`` (Gy): the unchecked core for callers that validated their inputs."""
    below = np.searchsorted(sorted_dose, dose_points, side="left")
    return (sorted_dose.size - below) / sorted_dose.size


def dose_at_volume_percent(dose: np.ndarray, pct: float) -> float:
    """Dx%: minimum dose (Gy) of the hottest ``pct`` % of voxels (``pct`` in [0, 100])."""
    return _dose_at_volume_percent(_check_dose(dose), check_real("volume percent", pct, 0.0, 100.0))


def dose_at_volume_cc(dose: np.ndarray, cc: float, voxel_cc: float) -> float:
    """D_cc: minimum dose (Gy) of the hottest ``cc`` cc, i.e. of ceil(cc / voxel_cc) voxels.

    At least one voxel is used; if ``cc`` exceeds the structure volume, the minimum dose.
    """
    return _dose_at_volume_cc(_check_dose(dose), check_real("volume_cc", cc, 0.0),
                              check_real("voxel_cc", voxel_cc, 0.0, low_inclusive=False))


def volume_at_dose_percent(dose: np.ndarray, dose_gy: float) -> float:
    """Vx: percentage (0..100) of the structure volume receiving >= ``dose_gy`` Gy."""
    return _volume_at_dose_percent(_check_dose(dose), check_real("dose_gy", dose_gy, 0.0))


def max_dose(dose: np.ndarray, method: str = "max", n_voxels: int = 3,
             volume_cc: float = 0.03, voxel_cc: float | None = None) -> float:
    """Maximum dose (Gy) of a structure.

    ``method``: ``"max"`` the hottest voxel; ``"hottest_voxels"`` the mean of the
    ``n_voxels`` hottest voxels (all voxels if fewer); ``"cc"`` the dose to the hottest
    ``volume_cc`` cc (D0.03cc by default, needs ``voxel_cc`` in cc).
    """
    arr = _check_dose(dose)
    if method not in MAX_DOSE_METHODS:
        raise ValueError(f"unknown max_dose method {method!r}; valid methods: {', '.join(MAX_DOSE_METHODS)}")
    if method == "hottest_voxels":
        check_integer("n_voxels", n_voxels, 1)
    if method == "cc":
        if voxel_cc is None:
            raise ValueError("max_dose method 'cc' needs voxel_cc (cc)")
        volume_cc = check_real("volume_cc", volume_cc, 0.0)
        voxel_cc = check_real("voxel_cc", voxel_cc, 0.0, low_inclusive=False)
    return _max_dose(arr, method, n_voxels, volume_cc, voxel_cc)


def mean_dose(dose: np.ndarray) -> float:
    """Mean dose (Gy) over the structure's voxels."""
    return float(_check_dose(dose).mean())


# the metrics on doses and parameters already checked (a protocol's evaluation checks each
# structure's doses once, and its criteria were checked when it was loaded)
def _dose_at_volume_percent(arr: np.ndarray, pct: float) -> float:
    index = min(max(_ceil(pct * arr.size / 100.0) - 1, 0), arr.size - 1)
    return float(-np.partition(-arr, index)[index])


def _dose_at_volume_cc(arr: np.ndarray, cc: float, voxel_cc: float) -> float:
    index = min(max(_ceil(cc / voxel_cc), 1), arr.size) - 1
    return float(-np.partition(-arr, index)[index])


def _volume_at_dose_percent(arr: np.ndarray, dose_gy: float) -> float:
    return float(np.count_nonzero(arr >= dose_gy) * 100.0 / arr.size)


def _max_dose(arr: np.ndarray, method: str, n_voxels: int, volume_cc: float, voxel_cc: float | None) -> float:
    if method == "max":
        return float(arr.max())
    if method == "hottest_voxels":
        k = min(int(n_voxels), arr.size)
        return float(np.partition(arr, arr.size - k)[arr.size - k:].mean())
    return _dose_at_volume_cc(arr, volume_cc, voxel_cc)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- scoring


_BELOW_ONE = math.nextafter(1.0, 0.0)


def criterion_score(value: float, goal: float, limit: float, points: float = 1.0,
                    sense: str = "upper", mode: str = "linear") -> float:
    """Score of one criterion value (0..points); see the module docstring for the modes.

    ``value``, ``goal`` and ``limit`` share one unit (Gy, % or cc); the limit lies beyond the goal
    (``limit >= goal`` for an upper bound, ``<=`` for a lower one) and ``points > 0``.
    """
    if sense not in SENSES:
        raise ValueError(f"unknown sense {sense!r}; valid senses: {', '.join(SENSES)}")
    if not math.isfinite(value):
        raise ValueError(f"criterion value {value!r} is not finite")
    if not (math.isfinite(goal) and math.isfinite(limit)):
        raise ValueError(f"goal {goal!r} and limit {limit!r} must be finite")
    if not (points > 0 and math.isfinite(points)):
        raise ValueError(f"points = {points!r} must be a finite number > 0")
    if (limit < goal) if sense == "upper" else (limit > goal):
        raise ValueError(f"limit {limit:g} lies on the wrong side of goal {goal:g} for sense {sense!r}")
    if mode not in SCORE_MODES:
        raise ValueError(f"unknown score mode {mode!r}; valid modes: {', '.join(SCORE_MODES)}")
    margin = value - goal if sense == "upper" else goal - value
    if margin <= 0:
        return float(points)
    if mode == "binary":
        return 0.0
    if mode == "linear":  # (l - v) / (l - g) is the same ramp for both senses
        fraction = 0.0 if limit == goal else (limit - value) / (limit - goal)
    else:  # relative: 1 - (v - g) / g (upper) or v / g = 1 - (g - v) / g (lower)
        fraction = 0.0 if goal == 0 else 1.0 - margin / goal
    # a goal missed by a hair keeps the score below full (the ramp's fraction can round to 1.0)
    return float(points * min(max(fraction, 0.0), _BELOW_ONE))


# --------------------------------------------------------------------------- protocols


@dataclass(frozen=True)
class Criterion:
    """One validated protocol criterion.

    ``goal`` and ``limit`` are in ``unit`` ("Gy" for max, mean and D criteria, "%" of the
    structure volume or "cc" for V criteria), except when ``rx_relative`` is true: then they are
    percent of the prescription and converted to Gy at evaluation. ``parameters`` holds
    the metric parameters (``dose_gy``/``dose_perc``, ``volume_perc``/``volume_cc``,
    ``method``/``n_voxels``/``volume_cc``).
    """

    name: str
    type: str
    structure: str
    sense: str
    points: float
    primary: bool
    parameters: Mapping[str, Any]
    goal: float
    limit: float
    unit: str
    rx_relative: bool = False
    note: str = ""

    def thresholds(self, prescription_gy: float) -> tuple[float, float]:
        """(goal, limit) in the criterion's unit (Gy, % or cc) for a prescription in Gy."""
        if self.rx_relative:
            return self.goal * prescription_gy / 100.0, self.limit * prescription_gy / 100.0
        return self.goal, self.limit

    def measure(self, dose: np.ndarray, voxel_cc: float, prescription_gy: float) -> float:
        """The criterion's metric (Gy, % or cc) for one structure's voxel doses (Gy)."""
        return self._measure(_check_dose(dose), check_real("voxel_cc", voxel_cc, 0.0, low_inclusive=False),
                             check_real("prescription_gy", prescription_gy, 0.0, low_inclusive=False))

    def _measure(self, arr: np.ndarray, voxel_cc: float, prescription_gy: float) -> float:
        p = self.parameters
        if self.type == "max_dose":
            return _max_dose(arr, p["method"], p.get("n_voxels", 3), p.get("volume_cc", 0.03), voxel_cc)
        if self.type == "mean_dose":
            return float(arr.mean())
        if self.type == "dose_volume_V":
            threshold = p["dose_gy"] if "dose_gy" in p else p["dose_perc"] * prescription_gy / 100.0
            if self.unit == "cc":  # rounded as _ceil rounds: 3 x 0.1 cc is 0.3 cc, not a hair above it
                return round(float(np.count_nonzero(arr >= threshold) * voxel_cc), 9)
            return _volume_at_dose_percent(arr, threshold)
        if "volume_perc" in p:
            return _dose_at_volume_percent(arr, p["volume_perc"])
        return _dose_at_volume_cc(arr, p["volume_cc"], voxel_cc)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], index: int = 0) -> Criterion:
        """Parse and validate one PortPy-style criterion dict (``index`` is for messages)."""
        where = f"criteria[{index}]" + (f" ({raw['name']!r})" if isinstance(raw, Mapping) and "name" in raw else "")
        if not isinstance(raw, Mapping):
            raise ValueError(f"{where}: expected an object, got {type(raw).__name__}")

        def fail(msg: str) -> ValueError:
            return ValueError(f"{where}: {msg}")

        def num(value: Any, key: str, high: float = math.inf, low_inclusive: bool = True) -> float:
            try:
                return check_real(key, value, 0.0, high, low_inclusive)
            except ValueError as exc:
                raise fail(str(exc)) from None

        if "type" not in raw and raw.get("name") in CRITERION_TYPES:
            # PortPy's earlier layout names the criterion type in "name" ({"name": "max_dose", ...})
            raw = {k: v for k, v in raw.items() if k != "name"} | {"type": raw["name"]}
        for key in ("type", "parameters"):
            if key not in raw:
                raise fail(f"missing required field {key!r}")
        _refuse_near_misses(raw, _CRITERION_FIELDS, "field", fail)
        ctype = raw["type"]
        if ctype not in CRITERION_TYPES:
            raise fail(f"unsupported criterion type {ctype!r}; supported types: {', '.join(CRITERION_TYPES)}")
        raw_params = raw["parameters"]
        structure = raw_params.get("structure_name") if isinstance(raw_params, Mapping) else None
        if not isinstance(structure, str) or not structure:
            raise fail("missing required field 'parameters.structure_name'")
        _refuse_near_misses(raw_params, _PARAMETERS, "parameter", fail)

        params: dict[str, Any] = {}
        if ctype == "max_dose":
            method = raw_params.get("method", "max")
            if method not in MAX_DOSE_METHODS:
                raise fail(f"unknown max_dose method {method!r}; valid methods: {', '.join(MAX_DOSE_METHODS)}")
            params["method"] = method
            if method == "hottest_voxels":
                try:
                    params["n_voxels"] = check_integer("n_voxels", raw_params.get("n_voxels", 3), 1)
                except ValueError as exc:
                    raise fail(str(exc)) from None
            elif method == "cc":
                params["volume_cc"] = num(raw_params.get("volume_cc", 0.03), "volume_cc")
        elif ctype != "mean_dose":
            choices = ("dose_gy", "dose_perc") if ctype == "dose_volume_V" else ("volume_perc", "volume_cc")
            given = [k for k in choices if k in raw_params]
            if len(given) != 1:
                raise fail(f"{ctype} needs exactly one of parameters {' / '.join(choices)}")
            key = given[0]
            params[key] = num(raw_params[key], key, 100.0 if key == "volume_perc" else math.inf)
        stray = [k for k in raw_params if k in _PARAMETERS and k != "structure_name" and k not in params]
        if stray:  # e.g. n_voxels without method "hottest_voxels": it would silently measure the hottest voxel
            what = f"method {params['method']!r}" if ctype == "max_dose" else "criterion"
            raise fail(f"parameters {stray} do not apply to this {ctype} {what}; it uses "
                       f"{sorted(params) or 'none besides structure_name'}")

        constraints = raw.get("constraints", {})
        if not isinstance(constraints, Mapping):
            raise fail("'constraints' must be an object")
        # PortPy may state the sense inside the constraints ("constraint_type": "upper")
        constraint_type = constraints.get("constraint_type")
        constraints = {k: v for k, v in constraints.items() if k != "constraint_type"}
        flavours = ("volume_perc", "volume_cc") if ctype == "dose_volume_V" else ("dose_gy", "dose_perc")
        foreign = [k for k in constraints if k not in {f"{e}_{f}" for e in ("goal", "limit") for f in flavours}]
        if foreign:
            keys = ", ".join(f"{e}_{f}" for f in flavours for e in ("goal", "limit"))
            raise fail(f"constraints {foreign} do not apply to a {ctype} criterion; valid: {keys}")
        used = [f for f in flavours if f"goal_{f}" in constraints or f"limit_{f}" in constraints]
        if len(used) != 1:
            keys = " / ".join(f"goal_{f}, limit_{f}" for f in flavours)
            reason = "mix units" if used else "have no goal or limit"
            raise fail(f"constraints {reason}; a {ctype} criterion uses {keys}")
        flavour = used[0]
        unit = {"volume_perc": "%", "volume_cc": "cc"}.get(flavour, "Gy")
        high = 100.0 if flavour == "volume_perc" else math.inf
        # either may be missing (it then equals the other); check each under the key it was given as
        given = {e: num(constraints[f"{e}_{flavour}"], f"{e}_{flavour}", high)
                 for e in ("goal", "limit") if f"{e}_{flavour}" in constraints}
        goal, limit = given.get("goal", given.get("limit")), given.get("limit", given.get("goal"))

        sense = raw.get("sense", constraint_type or "upper")
        for key, value in (("sense", sense), ("constraints.constraint_type", constraint_type or sense)):
            if value not in SENSES:
                raise fail(f"unknown {key} {value!r}; valid senses: {', '.join(SENSES)}")
        if constraint_type is not None and constraint_type != sense:
            raise fail(f"sense {sense!r} contradicts constraints.constraint_type {constraint_type!r}")
        if (limit < goal) if sense == "upper" else (limit > goal):
            relation, need = ("<", ">=") if sense == "upper" else (">", "<=")
            raise fail(f"limit_{flavour} ({limit:g}) {relation} goal_{flavour} ({goal:g}); "
                       f"sense {sense!r} needs limit {need} goal")
        points = num(raw.get("points", 1), "points", low_inclusive=False)
        primary = raw.get("primary", False)
        if not isinstance(primary, bool):
            raise fail(f"primary = {primary!r} is invalid; expected true or false")
        name = raw.get("name") or _default_name(ctype, structure, params, unit)
        return cls(name=str(name), type=ctype, structure=structure, sense=sense, points=points,
                   primary=primary, parameters=params, goal=goal, limit=limit, unit=unit,
                   rx_relative=flavour == "dose_perc", note=str(raw.get("note", "")))

    def to_dict(self) -> dict[str, Any]:
        """PortPy-style dict (with rtenv's fields) that :meth:`from_dict` reads back."""
        flavour = {"%": "volume_perc", "cc": "volume_cc"}.get(self.unit, "dose_perc" if self.rx_relative else "dose_gy")
        out: dict[str, Any] = {
            "name": self.name,
            "type": self.type,
            "parameters": {"structure_name": self.structure, **self.parameters},
            "constraints": {f"goal_{flavour}": self.goal, f"limit_{flavour}": self.limit},
            "sense": self.sense,
            "points": self.points,
            "primary": self.primary,
        }
        if self.note:
            out["note"] = self.note
        return out


_PROTOCOL_FIELDS = ("name", "protocol_name", "description", "disease_site", "pres_per_fraction_gy",
                    "num_of_fractions", "score_mode", "criteria")
_CRITERION_FIELDS = ("type", "name", "parameters", "constraints", "sense", "points", "primary", "note")
_PARAMETERS = ("structure_name", "method", "n_voxels", "volume_cc", "dose_gy", "dose_perc", "volume_perc")


def _refuse_near_misses(given: Mapping[str, Any], known: Sequence[str], what: str,
                        fail: Callable[[str], ValueError]) -> None:
    """Unknown keys are ignored (PortPy files carry fields of their own, e.g. ``structure_def``),
    except a likely misspelling of a known one (``"sence"``: one letter inserted, deleted, changed
    or swapped, two in a name longer than 5), which would silently drop the setting."""
    for key in given:
        if key not in known:
            dist = {k: _edits(str(key).lower(), k) for k in known}
            close = [k for k in known if dist[k] <= (1 if len(k) <= 5 else 2)]
            if close:
                best = min(close, key=dist.__getitem__)
                raise fail(f"unknown {what} {key!r}; did you mean {best!r}? (valid: {', '.join(known)})")


def _edits(a: str, b: str) -> int:
    """Edit distance with adjacent swaps (optimal string alignment) between ``a`` and ``b``."""
    prev2: list[int] = []
    prev = list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        row = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            row[j] = min(prev[j] + 1, row[j - 1] + 1, prev[j - 1] + (a[i - 1] != b[j - 1]))
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                row[j] = min(row[j], prev2[j - 2] + 1)
        prev2, prev = prev, row
    return prev[-1]


def _default_name(ctype: str, structure: str, params: Mapping[str, Any], unit: str = "%") -> str:
    """Readable criterion name such as "Bladder V80Gy", "Esophagus V18Gy[cc]" or "PTV D95%"."""
    if ctype == "mean_dose":
        return f"{structure} Dmean"
    if ctype == "max_dose":
        label = {"max": "Dmax", "hottest_voxels": f"Dmax({params.get('n_voxels')} vox)",
                 "cc": f"D{params.get('volume_cc', 0):g}cc"}[params["method"]]
        return f"{structure} {label}"
    if ctype == "dose_volume_V":
        label = f"V{params['dose_gy']:g}Gy" if "dose_gy" in params else f"V{params['dose_perc']:g}%Rx"
        return f"{structure} {label}" + ("[cc]" if unit == "cc" else "")
    label = f"D{params['volume_perc']:g}%" if "volume_perc" in params else f"D{params['volume_cc']:g}cc"
    return f"{structure} {label}"


@dataclass(frozen=True)
class CriterionResult:
    """Evaluation of one criterion. ``value``, ``goal``, ``limit`` and ``margin`` are in
    ``unit`` (Gy, % of the structure volume, or cc); ``margin`` > 0 means the goal is missed by
    that much (upper: value - goal; lower: goal - value)."""

    name: str
    structure: str
    type: str
    value: float
    unit: str
    goal: float
    limit: float
    score: float
    points: float
    met: bool
    margin: float
    sense: str = "upper"
    primary: bool = False


@dataclass(frozen=True)
class ProtocolResult:
    """Scores of all criteria of a protocol for one plan."""

    protocol: str
    mode: str
    prescription_gy: float
    criteria: list[CriterionResult]

    @property
    def total(self) -> float:
        """Sum of the criterion scores (points)."""
        return float(sum(c.score for c in self.criteria))

    @property
    def max_score(self) -> float:
        """Highest reachable total (points)."""
        return float(sum(c.points for c in self.criteria))

    @property
    def violated(self) -> list[CriterionResult]:
        """Criteria whose goal is not met."""
        return [c for c in self.criteria if not c.met]

    @property
    def full_score(self) -> bool:
        """True if every goal is met."""
        return all(c.met for c in self.criteria)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary."""
        return {"protocol": self.protocol, "mode": self.mode, "prescription_gy": self.prescription_gy,
                "total": self.total, "max_score": self.max_score, "full_score": self.full_score,
                "criteria": [asdict(c) for c in self.criteria]}

    def table(self) -> str:
        """Fixed-width text table: criterion | value | goal | limit | score | met."""
        rows = [(c.name, f"{c.value:.2f} {c.unit}", f"{c.goal:.2f} {c.unit}", f"{c.limit:.2f} {c.unit}",
                 f"{c.score:.2f}/{c.points:g}", "yes" if c.met else "NO") for c in self.criteria]
        rows.append(("total", "", "", "", f"{self.total:.2f}/{self.max_score:g}", ""))
        header = ("criterion", "value", "goal", "limit", "score", "met")
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

        def line(cells: Sequence[str]) -> str:
            padded = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
            return "  ".join(padded).rstrip()

        return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def _protocol_dir() -> Any:
    return resources.files("rtenv") / "data" / "protocols"


def available_protocols() -> list[str]:
    """Names of the protocols shipped with rtenv (loadable with :meth:`Protocol.load`)."""
    return sorted(p.name[:-5] for p in _protocol_dir().iterdir() if p.name.endswith(".json"))


@dataclass(frozen=True)
class Protocol:
    """A clinical protocol: prescription (Gy), fractions and scored criteria."""

    name: str
    disease_site: str
    prescription_gy: float
    fractions: int
    criteria: tuple[Criterion, ...]
    score_mode: str = "linear"
    description: str = ""

    @property
    def max_score(self) -> float:
        """Sum of the criteria's points."""
        return float(sum(c.points for c in self.criteria))

    @property
    def structures(self) -> list[str]:
        """Structure names used by the criteria, in order of first use."""
        return list(dict.fromkeys(c.structure for c in self.criteria))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Protocol:
        """Parse and validate a PortPy-style protocol dict (unknown keys are ignored, except likely
        misspellings of known ones)."""
        if not isinstance(data, Mapping):
            raise ValueError(f"protocol must be an object, got {type(data).__name__}")
        def fail(msg: str) -> ValueError:
            return ValueError(f"protocol: {msg}")

        _refuse_near_misses(data, _PROTOCOL_FIELDS, "field", fail)
        for key in ("pres_per_fraction_gy", "num_of_fractions", "criteria"):
            if key not in data:
                raise ValueError(f"protocol is missing required field {key!r}")
        try:
            per_fraction = check_real("pres_per_fraction_gy", data["pres_per_fraction_gy"], 0.0,
                                      MAX_GY_PER_FRACTION, low_inclusive=False)
        except ValueError as exc:
            raise ValueError(f"{exc} (the dose per fraction; the prescription is pres_per_fraction_gy x "
                             "num_of_fractions)") from None
        fractions = check_integer("num_of_fractions", data["num_of_fractions"], 1)
        mode = data.get("score_mode", "linear")
        if mode not in SCORE_MODES:
            raise ValueError(f"unknown score_mode {mode!r}; valid modes: {', '.join(SCORE_MODES)}")
        raw_criteria = data["criteria"]
        if not isinstance(raw_criteria, Sequence) or isinstance(raw_criteria, str) or not raw_criteria:
            raise ValueError("protocol field 'criteria' must be a non-empty list")
        criteria = [Criterion.from_dict(c, i) for i, c in enumerate(raw_criteria)]
        # generated names (no "name", or PortPy's earlier {"name": type}) can repeat where a file
        # gives a structure's goal and limit as two criteria: number each repeat with the first
        # "#k" that no criterion uses (a given name is kept as it is)
        generated = [raw.get("name") in (None, "", *CRITERION_TYPES) for raw in raw_criteria]
        taken = {c.name for c, gen in zip(criteria, generated, strict=True) if not gen}
        for i, (c, gen) in enumerate(zip(criteria, generated, strict=True)):
            if gen:
                name, k = c.name, 2
                while name in taken:
                    name, k = f"{c.name} #{k}", k + 1
                taken.add(name)
                criteria[i] = replace(c, name=name)
        names = [c.name for c in criteria]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:  # results are reported by criterion name
            raise ValueError(f"criterion names {twice} appear more than once; give each criterion its own 'name'")
        return cls(name=str(data.get("name") or data.get("protocol_name") or "custom"),
                   disease_site=str(data.get("disease_site", "")),
                   prescription_gy=round(per_fraction * fractions, 9), fractions=fractions,
                   criteria=tuple(criteria), score_mode=mode, description=str(data.get("description", "")))

    def to_dict(self) -> dict[str, Any]:
        """PortPy-style dict (with rtenv's fields) that :meth:`from_dict` reads back."""
        return {"name": self.name, "description": self.description, "disease_site": self.disease_site,
                "pres_per_fraction_gy": self.prescription_gy / self.fractions,  # unrounded: Rx reads back as it is
                "num_of_fractions": self.fractions, "score_mode": self.score_mode,
                "criteria": [c.to_dict() for c in self.criteria]}

    @classmethod
    def load(cls, name_or_path: str | Path) -> Protocol:
        """Load a shipped protocol by name (e.g. ``"prostate9"``) or a JSON file by path."""
        path = Path(name_or_path)
        if is_protocol_path(name_or_path):
            _check_protocol_file(path)
            text, stem = path.read_text(encoding="utf-8"), path.stem
        else:
            resource = _protocol_dir() / f"{name_or_path}.json"
            if not resource.is_file():
                raise ValueError(f"unknown protocol {name_or_path!r}; shipped protocols: "
                                 f"{', '.join(available_protocols())} (or pass a path to a .json file)")
            text, stem = resource.read_text(encoding="utf-8"), str(name_or_path)
        try:  # a repeated key would drop a setting silently (json keeps the last one)
            data = json.loads(text, object_pairs_hook=unique_keys)
        except ValueError as exc:  # invalid JSON or a repeated key
            raise ValueError(f"protocol {name_or_path}: not valid JSON ({exc})") from None
        if isinstance(data, dict) and "name" not in data and "protocol_name" not in data:
            data["name"] = stem
        return cls.from_dict(data)

    def evaluate(self, doses: Mapping[str, np.ndarray], voxel_cc: float | Mapping[str, float],
                 mode: str | None = None, prescription_gy: float | None = None) -> ProtocolResult:
        """Score a plan.

        ``doses`` maps structure names to 1-D voxel dose arrays (Gy); ``voxel_cc`` is the
        voxel volume (cc), one for all or one per structure. ``mode`` overrides the
        protocol's score mode, ``prescription_gy`` its prescription (Gy) for all
        ``*_perc`` dose values.
        """
        mode = self.score_mode if mode is None else mode
        if mode not in SCORE_MODES:
            raise ValueError(f"unknown score mode {mode!r}; valid modes: {', '.join(SCORE_MODES)}")
        rx = self.prescription_gy if prescription_gy is None else check_real(
            "prescription_gy", prescription_gy, 0.0, low_inclusive=False)
        missing = [s for s in self.structures if s not in doses]
        if missing:
            raise ValueError(f"protocol {self.name!r} needs structure(s) {', '.join(map(repr, missing))} "
                             f"missing from doses; available: {', '.join(map(repr, doses)) or 'none'}")
        arrays, voxels = {}, {}
        for s in self.structures:
            arrays[s] = _check_dose(doses[s], f"dose for structure {s!r}")
            if isinstance(voxel_cc, Mapping):
                if s not in voxel_cc:
                    raise ValueError(f"voxel_cc has no entry for structure {s!r}")
                voxels[s] = check_real(f"voxel_cc[{s!r}]", voxel_cc[s], 0.0, low_inclusive=False)
            else:
                voxels[s] = check_real("voxel_cc", voxel_cc, 0.0, low_inclusive=False)

        results = []
        for c in self.criteria:
            value = c._measure(arrays[c.structure], voxels[c.structure], rx)
            goal, limit = c.thresholds(rx)
            margin = value - goal if c.sense == "upper" else goal - value
            results.append(CriterionResult(
                name=c.name, structure=c.structure, type=c.type, value=value, unit=c.unit, goal=goal,
                limit=limit, score=criterion_score(value, goal, limit, c.points, c.sense, mode),
                points=c.points, met=bool(margin <= 0), margin=margin, sense=c.sense, primary=c.primary))
        return ProtocolResult(protocol=self.name, mode=mode, prescription_gy=rx, criteria=results)


def dola_reward(result: ProtocolResult) -> float:
    """DOLA's reward (Eq. 1): R = 50 I_PTV + sum_j I_j - 50 (1 - I_PTV).

    I_PTV is 1 if the primary criterion's goal is met (exactly one criterion must be
    marked ``primary``), I_j the same indicator for each other criterion.
    """
    primary = [c for c in result.criteria if c.primary]
    if len(primary) != 1:
        raise ValueError(f"dola_reward needs exactly one primary criterion in protocol {result.protocol!r}, "
                         f"found {len(primary)}; mark the PTV goal with \"primary\": true")
    i_ptv = 1.0 if primary[0].met else 0.0
    others = sum(1.0 for c in result.criteria if not c.primary and c.met)
    return 50.0 * i_ptv + others - 50.0 * (1.0 - i_ptv)


def is_protocol_path(name_or_path: str | Path) -> bool:
    """Whether :meth:`Protocol.load` reads ``name_or_path`` as a file path (a :class:`Path`, a name
    ending in ``.json``, one with a folder, or an existing file) rather than a shipped name."""
    path = Path(name_or_path)
    return isinstance(name_or_path, Path) or path.suffix == ".json" or len(path.parts) > 1 or path.is_file()


def _check_protocol_file(path: Path) -> None:
    if not path.is_file():
        where = "" if path.is_absolute() else f" (relative to the working directory {Path.cwd()})"
        raise FileNotFoundError(f"protocol file {str(path)!r} not found{where}; shipped protocols: "
                                f"{', '.join(available_protocols())}")


def _load_protocol(name_or_path: str) -> Protocol:
    """:meth:`Protocol.load`, cached; a file's entry is keyed on its modification time and size,
    so an edited protocol file is read again (one ``stat`` per call)."""
    path = Path(name_or_path)
    stamp = None
    if is_protocol_path(name_or_path):
        _check_protocol_file(path)
        st = path.stat()
        stamp = (st.st_mtime_ns, st.st_size)
    return _load_protocol_cached(name_or_path, stamp)


@lru_cache(maxsize=32)
def _load_protocol_cached(name_or_path: str, stamp: tuple[int, int] | None) -> Protocol:
    return Protocol.load(name_or_path)


def score_plan(case: PlanningCase, dose: np.ndarray, mode: str | None = None,
               protocol: Protocol | str | None = None) -> ProtocolResult:
    """Score a plan of a :class:`~rtenv.case.PlanningCase`.

    ``dose`` is the dose (Gy) over the case's dose rows; ``protocol`` defaults to the case's own
    (loaded once and cached); ``*_perc`` doses are relative to the case's prescription.
    """
    if protocol is None:
        try:
            protocol = _load_protocol(case.protocol)
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"case {case.name!r} is scored by {exc}") from None
    elif isinstance(protocol, str):
        protocol = _load_protocol(protocol)
    return protocol.evaluate(case.structure_doses(dose), {s.name: s.voxel_cc for s in case.structures},
                             mode=mode, prescription_gy=case.prescription_gy)
