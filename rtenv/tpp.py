"""Treatment planning parameters (TPPs): the upper-level decision of every planning agent.

Each planned structure ``s`` has three TPPs (SPEC section 1):

* ``lambda_s``: objective weight (relative to ``lambda_PTV`` in the TPS objective);
* ``t_s``: dose threshold as a fraction of the prescription: voxels above ``t_s * Rx`` are
  penalised (for the target: the hot-spot threshold);
* ``V_s``: volume fraction: only the hottest ``V_s`` of the structure may be penalised.

Names join the kind and the structure key: the target keeps its name (``t_PTV``, ``lambda_PTV``,
``V_PTV``), OARs are lower-cased (``t_bladder``, ``lambda_rectum``, ``V_femoralhead_l``).

The flat vector order is fixed and documented: all thresholds, then all weights, then all volume
fractions, each in the case's structure order (target first)::

    [t_PTV, t_bladder, t_rectum, lambda_PTV, lambda_bladder, lambda_rectum, V_PTV, V_bladder, V_rectum]

Valid ranges (:data:`RANGES`): ``t_PTV`` in [1, 1.2], ``t_OAR`` in (0, 1], ``lambda`` in
[1e-6, 10000], ``V_PTV`` in (0, 0.3], ``V_OAR`` in (0, 1]. The weights' floor keeps their ratios
(at most 1e10) inside the TPS's float32 arithmetic; SPEC only asks for positive weights.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rtenv.validation import is_real, unique_keys

KINDS = ("t", "lambda", "V")

# (kind, is_target) -> (low, high, low_inclusive)
RANGES: dict[tuple[str, bool], tuple[float, float, bool]] = {
    ("t", True): (1.0, 1.2, True),
    ("t", False): (0.0, 1.0, False),
    ("lambda", True): (1e-6, 1e4, True),
    ("lambda", False): (1e-6, 1e4, True),
    ("V", True): (0.0, 0.3, False),
    ("V", False): (0.0, 1.0, False),
}

_MEANING = {"t": "a dose threshold as a fraction of the prescription", "lambda": "a relative weight",
            "V": "a volume fraction of the structure"}

# SPEC section 1 default start and random-start distributions (uniform low, high)
DEFAULTS = {("t", True): 1.0, ("t", False): 1.0, ("lambda", True): 1.0, ("lambda", False): 1.0,
            ("V", True): 0.1, ("V", False): 1.0}
RANDOM_START = {("t", True): (1.0, 1.2), ("t", False): (0.0, 1.0), ("lambda", True): (0.0, 30.0),
                ("lambda", False): (0.0, 30.0), ("V", True): (0.0, 0.3), ("V", False): (0.0, 1.0)}
_TINY = 1e-3  # random-start draws from 0 start at this fraction of their top (inside open lower bounds)


def structure_key(name: str, is_target: bool) -> str:
    """The key a structure contributes to TPP names (``PTV`` or a lower-cased OAR name)."""
    return name if is_target else name.lower()


def tpp_names(structures: Sequence[str]) -> list[str]:
    """TPP names in vector order for ``structures`` (the first is the target); raises
    ``ValueError`` where two structures give the same key (e.g. ``Bladder`` and ``bladder``)."""
    keys = [structure_key(s, i == 0) for i, s in enumerate(structures)]
    if len(set(keys)) != len(keys):
        clash = sorted({k for k in keys if keys.count(k) > 1})
        raise ValueError(f"structures {list(structures)} give the same TPP names for {clash}; "
                         "OAR names must differ after lower-casing")
    return [f"{kind}_{k}" for kind in KINDS for k in keys]


def tpp_kinds(structures: Sequence[str]) -> list[tuple[str, bool]]:
    """``(kind, is_target)`` of each TPP in vector order, e.g. ``("lambda", False)``."""
    return [(kind, i == 0) for kind in KINDS for i in range(len(structures))]


def tpp_range(kind: str, is_target: bool) -> tuple[float, float, bool]:
    """``(low, high, low_inclusive)`` of a TPP kind (``high`` is always inclusive)."""
    return RANGES[(kind, is_target)]


@dataclass(frozen=True, eq=False)
class TPP:
    """A validated TPP vector for an ordered list of structures (target first). Two TPPs are
    equal when their structures and values are; TPPs hash, so they can key dicts and sets.

    Attributes:
        structures: Structure names, target first.
        values: Flat float64 vector in :func:`tpp_names` order.
    """

    structures: tuple[str, ...]
    values: np.ndarray

    def __post_init__(self) -> None:
        if isinstance(self.structures, str):
            raise ValueError(f"structures must be a sequence of names, got the string {self.structures!r}")
        if len(self.structures) < 1:
            raise ValueError("a TPP needs at least the target structure")
        v = _real_array(self.values)
        if v.shape != (3 * len(self.structures),):
            raise ValueError(
                f"TPP vector has shape {v.shape}; {len(self.structures)} structures need shape "
                f"({3 * len(self.structures)},) ({', '.join(self.names)})"
            )
        v = check_tpp_vector(v, self.structures)  # a float64 copy
        v.setflags(write=False)
        object.__setattr__(self, "values", v)
        object.__setattr__(self, "structures", tuple(self.structures))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TPP):
            return NotImplemented
        return self.structures == other.structures and np.array_equal(self.values, other.values)

    def __hash__(self) -> int:
        return hash((self.structures, self.values.tobytes()))

    # ---------------------------------------------------------------- access
    @property
    def names(self) -> list[str]:
        return tpp_names(self.structures)

    def __getitem__(self, name: str) -> float:
        try:
            return float(self.values[self.names.index(name)])
        except ValueError:
            raise KeyError(f"no TPP {name!r}; valid names: {self.names}") from None

    def kind(self, kind: str) -> np.ndarray:
        """The ``"t"``, ``"lambda"`` or ``"V"`` values, one per structure."""
        n = len(self.structures)
        i = KINDS.index(kind)
        return self.values[i * n:(i + 1) * n]

    def replace(self, **changes: float) -> TPP:
        """A copy with some TPPs changed by name, e.g. ``tpp.replace(lambda_PTV=2.0)``."""
        v = self.values.copy()
        for name, value in changes.items():
            if name not in self.names:
                raise KeyError(f"no TPP {name!r}; valid names: {self.names}")
            v[self.names.index(name)] = _number(name, value)
        return TPP(self.structures, v)

    # --------------------------------------------------------- constructors
    @classmethod
    def default(cls, structures: Sequence[str]) -> TPP:
        """SPEC default start: all t = 1, all lambda = 1, V_PTV = 0.1, V_OAR = 1."""
        return cls(tuple(structures), _per_kind(structures, lambda k, tgt: DEFAULTS[(k, tgt)]))

    @classmethod
    def random(cls, structures: Sequence[str], rng: np.random.Generator) -> TPP:
        """SPEC random start: t_PTV ~ U(1, 1.2), t_OAR ~ U(0, 1), lambda ~ U(0, 30),
        V_PTV ~ U(0, 0.3), V_OAR ~ U(0, 1) (each draw from 0 starts at 1e-3 of its top instead)."""
        def draw(kind: str, tgt: bool) -> float:
            lo, hi = RANDOM_START[(kind, tgt)]
            return float(rng.uniform(max(lo, _TINY * hi), hi))
        return cls(tuple(structures), _per_kind(structures, draw))

    @classmethod
    def from_dict(cls, structures: Sequence[str], data: Mapping[str, float]) -> TPP:
        """From ``{name: value}``; every TPP of ``structures`` is required, no others allowed."""
        names = tpp_names(structures)
        missing = [n for n in names if n not in data]
        extra = [k for k in data if k not in names]
        if missing or extra:
            raise ValueError(f"TPP dict must have exactly {names}; missing {missing}, unexpected {extra}")
        return cls(tuple(structures), np.array([_number(n, data[n]) for n in names]))

    def to_dict(self) -> dict[str, float]:
        return {n: float(v) for n, v in zip(self.names, self.values, strict=True)}

    def to_json(self) -> str:
        """``{"structures": [...], "tpp": {name: value}}`` as a JSON string (read by :meth:`from_json`)."""
        return json.dumps({"structures": list(self.structures), "tpp": self.to_dict()}, indent=2)

    @classmethod
    def from_json(cls, text: str, structures: Sequence[str] | None = None) -> TPP:
        """From a JSON string: ``{"structures": [...], "tpp": {name: value}}`` (what
        :meth:`to_json` writes) or a bare ``{name: value}`` (then ``structures`` must be given)."""
        data = json.loads(text, object_pairs_hook=unique_keys)
        if not isinstance(data, dict):
            raise ValueError(f"TPP JSON must be an object, got {type(data).__name__}")
        if "structures" in data and "tpp" not in data:
            raise ValueError("the TPP JSON has 'structures' but no 'tpp' object of values")
        if "tpp" in data:
            file_structures = data.get("structures")
            if file_structures is not None and not (
                    isinstance(file_structures, list) and all(isinstance(n, str) for n in file_structures)):
                raise ValueError(f"'structures' in the TPP JSON must be a list of names, got {file_structures!r}")
            if structures is not None and file_structures is not None and list(file_structures) != list(structures):
                raise ValueError(f"TPPs are for structures {file_structures}, the case has {list(structures)}")
            structures = file_structures or structures
            data = data["tpp"]
            if not isinstance(data, dict):
                raise ValueError(f"'tpp' in the TPP JSON must be an object, got {type(data).__name__}")
        if structures is None:
            raise ValueError("a bare TPP JSON object (no 'tpp' key) needs the case's structures passed in")
        return cls.from_dict(structures, data)

    @classmethod
    def load(cls, path: str | Path, structures: Sequence[str] | None = None) -> TPP:
        """Read a JSON file in either form :meth:`from_json` accepts."""
        try:
            return cls.from_json(Path(path).read_text(), structures)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None


def _number(name: str, value: object) -> float:
    """``value`` as a float, or ``ValueError`` naming the TPP if it is not a real number; a
    narrower float (``np.float32(0.3)``) is read as the decimal it prints as (0.3)."""
    if not is_real(value):
        raise ValueError(f"TPP {name} = {value!r} is not a number")
    if isinstance(value, np.floating) and value.dtype.itemsize < 8:
        return float(str(value))
    try:
        return float(value)
    except OverflowError:  # an integer beyond float range
        raise ValueError(f"TPP {name} is a {len(str(abs(value)))}-digit integer, too large for a float") from None


def _real_array(values: object) -> np.ndarray:
    """``values`` as an array of real numbers; bools (also inside a list, where numpy would make
    them 1.0 and 0.0), strings, complex and objects raise."""
    raw = np.asarray(values)
    if raw.dtype.kind not in "iuf":
        raise ValueError(f"TPP values must be real numbers, got dtype {raw.dtype}")
    if not isinstance(values, np.ndarray) and raw.size:
        bools = [x for x in np.asarray(values, dtype=object).ravel() if isinstance(x, (bool, np.bool_))]
        if bools:
            raise ValueError(f"TPP values must be real numbers, got the bool {bools[0]!r}")
    return raw


def _per_kind(structures: Sequence[str], value) -> np.ndarray:
    return np.array([value(kind, target) for kind, target in tpp_kinds(structures)], dtype=np.float64)


def check_tpp_vector(values: np.ndarray, structures: Sequence[str]) -> np.ndarray:
    """The checked TPP values as float64: raise ``ValueError`` naming the first TPP that is NaN,
    infinite or out of range.

    ``values`` may be one vector ``(3 n,)`` or a batch ``(B, 3 n)``. Floats narrower than float64
    are read as the decimals they print as (a float32 ``0.6`` is 0.6, not 0.6000000238, which would
    admit one voxel more to a volume of 1515 voxels), are compared with the ranges in their own
    precision too (a float32 ``0.3`` is V_PTV's upper bound), and the values are returned clipped to
    the ranges (a no-op for float64 values in range).
    """
    raw = _real_array(values)
    if raw.ndim not in (1, 2):
        raise ValueError(f"TPP values must be one vector or a batch of vectors (1-D or 2-D), got shape {raw.shape}")
    narrow = raw.dtype.kind == "f" and raw.dtype.itemsize < 8
    v = np.atleast_2d(raw.astype(str).astype(np.float64) if narrow else raw.astype(np.float64))
    names = tpp_names(structures)
    if v.shape[1] != len(names):
        raise ValueError(f"TPP vectors have {v.shape[1]} values; expected {len(names)} ({', '.join(names)})")
    own = raw.dtype if raw.dtype.kind == "f" else np.dtype(np.float64)
    for j, (name, key) in enumerate(zip(names, tpp_kinds(structures), strict=True)):
        lo, hi, lo_inc = RANGES[key]
        lo_own, hi_own = float(own.type(lo)), float(own.type(hi))
        col = v[:, j]
        bad = ~np.isfinite(col) | (col > hi_own) | ((col < lo_own) if lo_inc else (col <= lo_own))
        if bad.any():
            b = int(np.argmax(bad))
            where = f" (plan {b})" if v.shape[0] > 1 else ""
            interval = f"{'[' if lo_inc else '('}{lo:g}, {hi:g}]"
            raise ValueError(f"TPP {name} = {float(col[b])!r}{where} is outside its valid range {interval} "
                             f"({_MEANING[key[0]]})")
        np.clip(col, lo, hi, out=col)
    return v if raw.ndim == 2 else v[0]

