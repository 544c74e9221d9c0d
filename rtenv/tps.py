"""The in-house TPS: dose-volume-constrained fluence optimisation by ADMM, batched, in torch.

For one case and a TPP vector (``t_s``, ``lambda_s``, ``V_s`` per structure; see
:mod:`rtenv.tpp`) the TPS solves, in dose units relative to the prescription (``d = D x / Rx``)::

    minimise_x  sum_s  w_s / (2 |A_s|) * || d_{A_s} - t_s ||^2
    subject to  x >= 0,   D95(d_PTV) >= 1

(D95 here and below: the coverage dose of :attr:`ADMMSettings.coverage`, 0.95 by default) with
``w_s = lambda_s / lambda_PTV`` (the solver itself scales all weights by one constant so the
largest is 1, which leaves the minimiser unchanged and keeps float32 arithmetic well conditioned
for extreme weight ratios) and ``A_s`` the active set of structure ``s``: of its hottest
``V_s`` fraction of voxels, those with ``d > t_s`` (for the PTV this is the hot-spot term). The
active sets are recomputed from the current dose at every outer iteration, which makes the
problem non-convex (SPEC section 1). OAR voxels inside the PTV belong to the PTV for the
optimisation (PTV wins overlaps); scoring uses the full masks. An optional one-sided PTV
under-dose term ``w_u / (2 |U|) ||d_U - 1||^2`` over the PTV voxels below the prescription ``U``
can be switched on.

ADMM splits off both constraints: an auxiliary PTV dose ``y`` (coverage) with scaled dual ``g``,
and a non-negative copy ``z`` of the fluence with scaled dual ``h``::

    x <- argmin f(x) + rho_y/2 || d_PTV(x) - y + g ||^2 + rho_z/2 || x - z + h ||^2
    z <- max(x + h, 0);                     h <- h + x - z
    y <- d_PTV + g with its hottest coverage fraction of voxels raised to >= 1
    g <- g + d_PTV - y

``rho_y = beta / |PTV|`` (beta acts on the mean squared consensus residual) and ``rho_z`` gives
the split the same strength per beamlet. The x-update takes ``cg_steps`` Jacobi-preconditioned
conjugate-gradient steps on its normal equations, warm-started from the current ``x``; the
diagonal preconditioner is rebuilt every ``precond_every`` outer iterations (default: every one).
An outer iteration costs ``2 cg_steps`` sparse products (one for the residual, two per CG step but
the last, which needs only ``D p``) plus one per preconditioner rebuild. (SPEC's
reference code instead clips ``x`` to >= 0 after plain CG; measured here, that fixed point is not
the optimum of the convex sub-problem and drifts away from it as the CG steps grow, while the
split converges to it.) Iteration stops when ``||z - z_old|| / ||z_old|| < tol`` or after
``max_iter`` outer iterations; the plan is ``z``, rescaled so that PTV D95 equals the
prescription (the float32 Gy dose's D95 lies a few rounding steps above it, never below). A batch of B
TPP vectors shares every sparse product (one SpMM of the ``(voxels, beamlets)`` matrix with a
``(beamlets, B)`` block); plans that converge leave the
working set while the rest continue. Every per-plan operation is independent of the batch (on
CPU, bitwise), so a batched solve returns the same plans as B single solves.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import torch

from rtenv.case import PlanningCase, rounded_up_ratio
from rtenv.tpp import TPP, check_tpp_vector, tpp_names
from rtenv.validation import check_integer, check_real

COVERAGE_HEADROOM = 8 * 2.0**-23
"""Relative margin (8 float32 rounding steps, about 1e-6) above the prescription at which the TPS
puts the coverage dose of its float32 Gy dose: dosing the fluence again with another summation
order moved D95 by up to 3 steps here."""


@dataclass(frozen=True)
class ADMMSettings:
    """Solver settings (defaults: SPEC section 1).

    Attributes:
        max_iter: Maximum outer ADMM iterations.
        cg_steps: Conjugate-gradient steps per x-update.
        tol: Relative change of the non-negative fluence iterate between outer iterations,
            ``||z - z_old|| / ||z_old||``, that counts as converged.
        beta: ADMM penalty on the mean squared PTV consensus residual.
        precond_every: Rebuild the CG's Jacobi preconditioner (the diagonal of the x-update's
            normal matrix, which follows the active sets) every this many outer iterations; each
            rebuild costs one sparse product. 1 (default) rebuilds it every iteration; 10 makes
            a solve 8-15 % faster, with plans that differ from the default's about as much as
            4 more iterations move them (docs/tps_and_envs.md).
        coverage: Fraction of the PTV that must receive the prescription (0.95: D95 >= Rx).
        ptv_underdose: Add the one-sided PTV under-dose term.
        underdose_weight: Its weight relative to ``lambda_PTV``: in the reported objective
            (relative dose ``d = D x / Rx``, weights ``lambda_s / lambda_PTV``) the term is
            ``underdose_weight * sum((d_U - 1)^2) / (2 |U|)`` over the PTV voxels U below Rx,
            on the same scale as the PTV hot-spot term. Not part of the frozen sub-problem
            (:meth:`TPS.subproblem`), whose set U would move with the dose.
    """

    max_iter: int = 40
    cg_steps: int = 3
    tol: float = 5e-3
    beta: float = 2.0
    precond_every: int = 1
    coverage: float = 0.95
    ptv_underdose: bool = False
    underdose_weight: float = 1.0

    def __post_init__(self) -> None:
        for name, hi in (("max_iter", 100_000), ("cg_steps", 1000), ("precond_every", None)):
            object.__setattr__(self, name, check_integer(name, getattr(self, name), 1, hi))  # numpy ints -> int
        for name, value, lo, hi in (("tol", self.tol, 0.0, 1.0), ("beta", self.beta, 0.0, 1e6),
                                    ("coverage", self.coverage, 0.0, 1.0),
                                    ("underdose_weight", self.underdose_weight, 0.0, 1e6)):
            check_real(name, value, lo, hi, low_inclusive=False)
        if not isinstance(self.ptv_underdose, bool | np.bool_):
            raise ValueError(f"ptv_underdose = {self.ptv_underdose!r} must be True or False")


@dataclass(frozen=True)
class FrozenSets:
    """Active sets held fixed (the convex sub-problem at a solution): one boolean mask per
    structure over that structure's optimisation voxels, and the PTV voxels that the coverage
    constraint raises (``d >= 1`` is imposed on exactly these)."""

    active: dict[str, np.ndarray]
    coverage_rows: np.ndarray


@dataclass
class PlanResult:
    """Optimised plans of one batch (leading dimension B).

    Attributes:
        tpps: The TPP vectors solved, ``(B, n_tpp)``.
        fluence: Beamlet weights ``(B, n_beamlets)`` (the case's fluence units), D95 = Rx.
        warm_start: The ADMM iterates before the D95 rescale, ``(B, n_beamlets)``: the ``x0``
            with which a next solve (e.g. the next tuning step) continues.
        dose: Dose over the case's dose rows ``(B, n_rows)`` in Gy.
        objective: Objective at the returned plan (relative-dose units), ``(B,)``.
        active_voxels: Active-set size per structure, ``name -> (B,)``.
        iterations: Outer iterations used, ``(B,)``.
        converged: Whether the tolerance was reached within ``max_iter``, ``(B,)``.
        seconds: Wall time of the whole batch solve.
        device: Torch device used.
    """

    tpps: np.ndarray
    fluence: np.ndarray
    warm_start: np.ndarray
    dose: np.ndarray
    objective: np.ndarray
    active_voxels: dict[str, np.ndarray]
    iterations: np.ndarray
    converged: np.ndarray
    seconds: float
    device: str
    names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.fluence.shape[0])


def _csr_tensor(m: sp.csr_matrix, device: torch.device) -> torch.Tensor:
    """A torch CSR tensor with int32 indices (int64 indices cost a conversion in every product)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(
            torch.from_numpy(m.indptr.astype(np.int32)), torch.from_numpy(m.indices.astype(np.int32)),
            torch.from_numpy(m.data.astype(np.float32)), size=m.shape, device=device, check_invariants=False,
        )


def spmm(A: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """``A @ X`` for a sparse CSR ``A`` and a dense ``X``. On CPU ``A @ X`` first allocates a
    zero-filled output and copies through it; ``addmm`` with ``beta = 0`` into an empty tensor
    makes the same product without that (about 10 % of a product at 16 columns here)."""
    if X.device.type != "cpu":
        return A @ X
    out = torch.empty((A.shape[0], X.shape[1]), dtype=X.dtype)
    return torch.addmm(out, A, X, beta=0.0, out=out)


# torch's CPU sum splits a reduction with a single output across threads from 32 768 elements
# (its grain size), which changes the summation order; below this length one row is summed serially
_SERIAL_SUM = 16384


def coldot(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Column dot products of two ``(n, B)`` blocks, ``(B,)``, each summed in the same order
    whatever B is (``(u * v).sum(0)`` is not), so a plan solved in a batch takes exactly the path
    it takes alone: the products are laid out plan-major and each plan's row is summed alone (one
    thread per row). A single long column is summed as two identical rows for the same reason."""
    n, B = u.shape
    if B == 1 and n < _SERIAL_SUM:
        return (u * v).view(1, -1).sum(1)
    prod = torch.empty((max(B, 2), n), dtype=u.dtype, device=u.device)
    if B == 1:
        torch.mul(u.t().expand(2, n), v.t().expand(2, n), out=prod)
    else:
        torch.mul(u.t(), v.t(), out=prod)
    return prod.sum(1)[:B]


def kth_largest(x: torch.Tensor, k: int | torch.Tensor, columns: torch.Tensor | None = None) -> torch.Tensor:
    """The ``k``-th largest value of each column ``x[:, b]`` (``1 <= k <= len(x)``; one ``k`` for
    all columns or one per column), ``(B,)``. With a boolean ``columns`` mask only those columns
    are computed; the others get ``-inf``.

    On CPU this works in numpy (a partition for one ``k``, a sort otherwise), more than 10 times
    faster than ``torch.sort`` on column blocks here.
    """
    n, B = x.shape
    if x.device.type == "cpu":
        xn = x.detach().numpy()
        kn = k if isinstance(k, int) else k.numpy()
        if columns is not None:
            idx = np.flatnonzero(columns.numpy())
            out = np.full(B, -np.inf, dtype=xn.dtype)
            out[idx] = _kth_largest_np(xn[:, idx], kn if isinstance(kn, int) else kn[idx])
            return torch.from_numpy(out)
        return torch.from_numpy(_kth_largest_np(xn, kn))
    cols = torch.arange(B, device=x.device)
    top = torch.sort(x, dim=0).values[n - k, cols]
    return top if columns is None else torch.where(columns, top, -torch.inf)


def _kth_largest_np(x: np.ndarray, k: int | np.ndarray) -> np.ndarray:
    n = x.shape[0]
    if isinstance(k, int):
        return np.partition(x, n - k, axis=0)[n - k]
    return np.sort(x, axis=0)[n - k, np.arange(x.shape[1])]


def _mask(values: np.ndarray, name: str) -> np.ndarray:
    """A boolean mask as a contiguous bool array; other dtypes (NaN-holding floats included) raise."""
    m = np.asarray(values)
    if m.dtype != np.bool_:
        raise ValueError(f"{name} must be a boolean mask, got dtype {m.dtype}")
    return np.ascontiguousarray(m)


def _check_fluence(x: np.ndarray, name: str) -> None:
    if not np.all(np.isfinite(x)) or x.min() < 0:
        raise ValueError(f"{name} must be finite and >= 0")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``None`` (cpu) as a ``torch.device``; raises
    ``ValueError`` if CUDA is asked for but absent. Each device comes back under one name, for
    caches and run settings: ``"cpu:0"`` as ``cpu``, ``"cuda"`` with the current GPU's index
    (``cuda:0`` unless the process chose another).

    The check counts GPUs through NVML where it can, without initialising CUDA, so an env built
    in a process that then forks its workers (gymnasium's ``AsyncVectorEnv``) leaves them able
    to use CUDA."""
    try:
        dev = torch.device("cpu" if device is None else device)
    except RuntimeError:
        raise ValueError(f"device {device!r} is not a device; valid: 'cpu', 'cuda', 'cuda:N'") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {str(dev)!r} is not supported; valid: 'cpu', 'cuda', 'cuda:N'")
    if dev.type == "cpu":
        return torch.device("cpu")
    count = torch.cuda.device_count()  # 0 on a CPU-only build of torch
    if count == 0:
        raise ValueError(f"device {str(dev)!r} requested but CUDA is not available; use device='cpu'")
    if dev.index is not None and dev.index >= count:
        raise ValueError(f"device {str(dev)!r} does not exist; valid: cuda:0 .. cuda:{count - 1}")
    if dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_initialized() else 0)
    return dev


class TPS:
    """The ADMM TPS bound to one case and device; reuse it across many solves.

    Args:
        case: The planning case.
        device: ``"cpu"`` (default) or ``"cuda"``.
        settings: Solver settings.
    """

    def __init__(self, case: PlanningCase, device: str | torch.device | None = "cpu",
                 settings: ADMMSettings | None = None) -> None:
        self.case = case
        self.device = resolve_device(device)
        self._settings = settings or ADMMSettings()
        self.structures = tuple(case.structure_names)
        self.names = tpp_names(self.structures)
        target = case.target
        if self.structures[0] != target.name:
            raise ValueError(f"case {case.name!r}: the target must be the first structure, got {self.structures}")
        # optimisation rows: each structure's voxels as one contiguous block of the matrix (PTV wins
        # overlaps; a voxel in two OARs appears in both blocks, each carrying its own term), so
        # that every per-structure operation works on a slice rather than a gather or scatter
        in_target = np.zeros(case.n_rows, dtype=bool)
        in_target[target.rows] = True
        block_rows, self._blocks = [], []
        start = 0
        for s in case.structures:
            rows = s.rows if s.role == "target" else s.rows[~in_target[s.rows]]
            if rows.size == 0:
                raise ValueError(f"case {case.name!r}: structure {s.name!r} lies entirely inside the target")
            block_rows.append(rows)
            self._blocks.append(slice(start, start + rows.size))
            start += rows.size
        self.n_opt = start
        self.n_beamlets = case.n_beamlets
        rx = case.prescription_gy
        D = (case.dose_influence[np.concatenate(block_rows)] / rx).astype(np.float32).tocsr()
        self._D = _csr_tensor(D, self.device)
        self._Dt = _csr_tensor(D.T.tocsr(), self.device)
        self._D_full = _csr_tensor(case.dose_influence.astype(np.float32).tocsr(), self.device)
        self._target_rows = torch.as_tensor(target.rows, device=self.device)
        n_ptv = block_rows[0].size
        self._cover_k = max(math.ceil(self.settings.coverage * n_ptv), 1)
        self._cold_start: np.ndarray | None = None
        self._Dt_sq = _csr_tensor(D.multiply(D).T.tocsr(), self.device)  # Jacobi preconditioner
        # ADMM penalties: beta on the mean squared PTV consensus residual; the x = z split gets the
        # same strength per beamlet (beta/|PTV| times the mean PTV column norm of D)
        self._rho_y = self.settings.beta / n_ptv
        D_ptv = D[self._blocks[0]]
        self._rho_z = float(self._rho_y * np.asarray(D_ptv.multiply(D_ptv).sum(0)).ravel().mean())

    def __deepcopy__(self, memo: dict) -> TPS:
        """A copy that shares the sparse matrices, which no solve changes (torch cannot deep-copy
        sparse CSR tensors), and copies the rest; it lets ``copy.deepcopy`` copy an environment."""
        new = object.__new__(type(self))
        memo[id(self)] = new
        for name, value in self.__dict__.items():
            shared = isinstance(value, torch.Tensor) and value.layout == torch.sparse_csr
            new.__dict__[name] = value if shared else copy.deepcopy(value, memo)
        return new

    @property
    def settings(self) -> ADMMSettings:
        """The solver settings, fixed at construction (the coverage count and the ADMM penalties
        derive from them): for other settings make another :class:`TPS`."""
        return self._settings

    def block_size(self, s: int) -> int:
        """Number of optimisation voxels of structure ``s`` (for an OAR: those outside the target)."""
        sl = self._blocks[s]
        return sl.stop - sl.start

    @property
    def cold_start(self) -> np.ndarray:
        """The default start: uniform fluence scaled so that PTV D95 = Rx, ``(n_beamlets,)`` (a
        copy: the TPS keeps its own)."""
        if self._cold_start is None:
            ones = torch.ones(self.n_beamlets, 1, device=self.device)
            d_ptv = spmm(self._D, ones)[self._blocks[0]]
            self._cold_start = (ones / self._coverage_dose(d_ptv).clamp(min=1e-12))[:, 0].cpu().numpy()
        return self._cold_start.copy()

    # ------------------------------------------------------------------ helpers
    def _tpp_batch(self, tpps: TPP | Sequence[TPP] | np.ndarray) -> np.ndarray:
        if isinstance(tpps, TPP):
            tpps = [tpps]
        if isinstance(tpps, np.ndarray):
            v = np.atleast_2d(check_tpp_vector(tpps, self.structures))
        else:
            for t in tpps:
                if not isinstance(t, TPP):
                    raise TypeError(f"expected TPP objects or an array, got {type(t).__name__}")
                if t.structures != self.structures:
                    raise ValueError(f"TPP is for structures {t.structures}; the case has {self.structures}")
            v = np.stack([t.values for t in tpps]) if len(tpps) else np.zeros((0, len(self.names)))
        if v.ndim != 2 or v.shape[0] == 0:
            raise ValueError(f"need a non-empty batch of TPP vectors, got shape {v.shape}")
        check_tpp_vector(v, self.structures)
        return v

    def _tpp_tensors(self, batch: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Thresholds and weights (float32) and volume fractions (float64, for exact ranks
        ``ceil(V n)``) of a TPP batch, each ``(S, B)``."""
        n = len(self.structures)
        tv = torch.as_tensor(batch[:, :2 * n].T, dtype=torch.float32, device=self.device)
        return tv[:n], tv[n:], torch.as_tensor(batch[:, 2 * n:].T, dtype=torch.float64, device=self.device)

    def _coverage_dose(self, d_ptv: torch.Tensor) -> torch.Tensor:
        """D_coverage of each plan (the k-th hottest PTV dose), ``(B,)``."""
        return kth_largest(d_ptv, self._cover_k)

    def _volume_ranks(self, v: torch.Tensor) -> list[torch.Tensor | None]:
        """Per structure, the rank ``ceil(V n)`` of the coolest voxel that may be penalised, one per
        plan (from float64 ``v``, rounding noise below 1e-9 voxel ignored as in the scoring, so
        that V n = 15 gives 15); ``None`` where every plan has V = 1 (all voxels admitted, no sort
        needed)."""
        ranks: list[torch.Tensor | None] = []
        for s in range(len(self._blocks)):
            n = self.block_size(s)
            k = torch.ceil(torch.round(v[s] * n, decimals=9)).clamp(1, n).long()
            ranks.append(None if bool((k == n).all()) else k)
        return ranks

    def _active_weights(self, d: torch.Tensor, t: torch.Tensor, w: torch.Tensor, ranks: list[torch.Tensor | None],
                        frozen: list[torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Per-row quadratic weights ``a`` and ``a * target`` sums ``c`` of the objective terms, and
        the active sets as 0/1 float masks per structure (float arithmetic is several times faster
        than boolean tensors on CPU; sums of 0/1 floats are exact counts)."""
        a = torch.empty_like(d)
        c = torch.empty_like(d)
        masks = []
        for s, rows in enumerate(self._blocks):
            ds = d[rows]
            if frozen is not None:
                mask = frozen[s]
                count = mask.sum(0)
            else:
                mask = (ds - t[s]).sign_().clamp_(min=0.0)  # 1 where d > t_s
                count = mask.sum(0)
                if ranks[s] is not None:
                    # only plans with more voxels above t_s than the volume admits need the sort
                    over = count > ranks[s]
                    if bool(over.any()):
                        top = kth_largest(ds, ranks[s], columns=over)
                        mask.mul_((ds - top).sign_().add_(1.0).clamp_(max=1.0))  # and d >= the V_s cut
                        count = mask.sum(0)
            masks.append(mask)
            torch.mul(mask, w[s] / count.clamp(min=1), out=a[rows])
            torch.mul(a[rows], t[s], out=c[rows])
        if self.settings.ptv_underdose:
            wu = self._underdose_weights(d, w)
            a[self._blocks[0]] += wu
            c[self._blocks[0]] += wu
        return a, c, masks

    def _underdose_weights(self, d: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Per-row weights of the PTV under-dose term over the PTV block: ``underdose_weight * w_PTV
        / |U|`` on the voxels U below Rx, 0 elsewhere."""
        under = d[self._blocks[0]] < 1.0
        return under * (self.settings.underdose_weight * w[0] / under.sum(0).clamp(min=1))

    def _objective(self, d: torch.Tensor, t: torch.Tensor, w: torch.Tensor, masks: list[torch.Tensor]) -> torch.Tensor:
        total = torch.zeros(d.shape[1], dtype=d.dtype, device=d.device)
        for s, rows in enumerate(self._blocks):
            r = (d[rows] - t[s]) * masks[s]
            total += w[s] * coldot(r, r) / (2 * masks[s].sum(0).clamp(min=1))
        if self.settings.ptv_underdose:
            short = d[self._blocks[0]] - 1.0
            total += coldot(self._underdose_weights(d, w) * short, short) / 2
        return total

    # -------------------------------------------------------------------- solve
    def optimize(self, tpps: TPP | Sequence[TPP] | np.ndarray, x0: np.ndarray | None = None,
                 frozen: FrozenSets | None = None) -> PlanResult:
        """Optimise the fluence for each TPP vector of a batch.

        Args:
            tpps: One :class:`TPP`, a sequence of them, or an array ``(B, n_tpp)`` in
                :func:`rtenv.tpp.tpp_names` order.
            x0: Optional warm start ``(n_beamlets,)`` or ``(B, n_beamlets)``, used as given:
                pass the previous solve's ``warm_start`` (its ADMM iterate before the D95
                rescale; restarting from rescaled plans would multiply beamlets that no active
                term constrains by every step's rescale factor). Default: uniform fluence scaled
                to D95 = Rx.
            frozen: Hold the active sets and the covered voxels fixed (the convex sub-problem).

        Returns:
            A :class:`PlanResult`; check ``converged``: hitting ``max_iter`` is reported there.
        """
        t0 = time.perf_counter()
        cfg = self.settings
        batch = self._tpp_batch(tpps)
        B = batch.shape[0]
        dev = self.device
        t, lam, vol = self._tpp_tensors(batch)
        # the ADMM works with weights scaled by the largest lambda (all <= 1): a constant factor on
        # the objective leaves its constrained minimiser unchanged but keeps float32 CG well
        # conditioned against the fixed ADMM penalties when lambda_PTV is tiny; the reported
        # objective uses SPEC's lambda_s / lambda_PTV
        w = lam / lam.max(0).values
        w_spec = lam / lam[0]
        frozen_masks, cover_rows = self._frozen(frozen, B)

        if x0 is None:
            X = torch.as_tensor(self.cold_start, device=dev)[:, None].repeat(1, B)
        else:
            x0 = np.ascontiguousarray(x0, dtype=np.float32)  # (torch refuses negative strides)
            if x0.shape == (self.n_beamlets,):
                x0 = np.broadcast_to(x0, (B, self.n_beamlets))
            if x0.shape != (B, self.n_beamlets):
                raise ValueError(f"x0 has shape {x0.shape}; expected ({self.n_beamlets},) or ({B}, {self.n_beamlets})")
            _check_fluence(x0, "x0")
            X = torch.tensor(x0.T, device=dev)
        D, Dt, ptv = self._D, self._Dt, self._blocks[0]
        d = spmm(D, X)
        Z, H = X.clone(), torch.zeros_like(X)  # non-negative copy of x and its scaled dual
        y = self._project(d[ptv], cover_rows)
        g = torch.zeros_like(y)
        rho_y, rho_z = self._rho_y, self._rho_z
        # the working set holds the plans still running; a plan that converges leaves it (its
        # fluence goes to `out`), so later iterations cost only what the remaining plans need
        t_all, vol_all, frozen_all = t, vol, frozen_masks
        cols = torch.arange(B, device=dev)
        out = torch.empty_like(Z)
        iterations = torch.full((B,), cfg.max_iter, dtype=torch.long, device=dev)
        converged = torch.zeros(B, dtype=torch.bool, device=dev)
        ranks = self._volume_ranks(vol)
        for it in range(1, cfg.max_iter + 1):
            a, c, _ = self._active_weights(d, t, w, ranks, frozen_masks)
            a[ptv] += rho_y
            c[ptv].add_(y - g, alpha=rho_y)
            # x-update: Jacobi-preconditioned CG on (D^T diag(a) D + rho_z I) x = D^T c + rho_z (z - h),
            # from the current x; the dose d = D x is carried along without extra products. The
            # diagonal costs a product of its own and follows the active weights, which change
            # little between outer iterations; any positive diagonal keeps CG correct, and a stale
            # one only preconditions less well
            if (it - 1) % cfg.precond_every == 0:
                precond = spmm(self._Dt_sq, a).add_(rho_z)
            r = spmm(Dt, c.addcmul_(a, d, value=-1.0)).add_(Z - H - X, alpha=rho_z)
            p = r / precond
            rs = coldot(r, p)
            for k in range(cfg.cg_steps):
                q = spmm(D, p)
                last = k == cfg.cg_steps - 1
                if last:
                    # the last step needs only the curvature p^T (D^T diag(a) D + rho_z I) p =
                    # q^T diag(a) q + rho_z p^T p, not the next residual: one product fewer
                    alpha = rs / (coldot(q, a * q) + rho_z * coldot(p, p)).clamp(min=1e-30)
                else:
                    Ap = spmm(Dt, a * q).add_(p, alpha=rho_z)
                    alpha = rs / coldot(p, Ap).clamp(min=1e-30)
                X.addcmul_(p, alpha)
                d.addcmul_(q, alpha)
                if last:
                    break
                r.addcmul_(Ap, alpha, value=-1.0)
                s_ = r / precond
                rs_new = coldot(r, s_)
                p = s_.addcmul_(p, rs_new / rs.clamp(min=1e-30))
                rs = rs_new
            Zn = torch.add(X, H).clamp_(min=0.0)
            H.add_(X).sub_(Zn)
            y = self._project(d[ptv] + g, cover_rows)
            g.add_(d[ptv]).sub_(y)
            step = Zn - Z
            done = coldot(step, step).sqrt() < cfg.tol * coldot(Z, Z).sqrt().clamp(min=1e-30)
            Z = Zn
            if bool(done.any()):
                finished = cols[done]
                out[:, finished] = Z[:, done]
                iterations[finished] = it
                converged[finished] = True
                keep = ~done
                if not bool(keep.any()):
                    break
                cols = cols[keep]
                X, d, Z, H, y, g, precond = (v[:, keep] for v in (X, d, Z, H, y, g, precond))
                t, w, vol = t[:, keep], w[:, keep], vol[:, keep]
                ranks = self._volume_ranks(vol)
                if frozen_masks is not None:
                    frozen_masks = [m[:, keep] for m in frozen_masks]
                    cover_rows = cover_rows[:, keep]
        else:
            out[:, cols] = Z

        X = out  # the plan is the non-negative fluence
        raw = X.T.cpu().numpy()
        d = spmm(D, X)
        coverage = self._coverage_dose(d[ptv])
        scale = 1.0 / coverage
        X, d = X * scale, d * scale
        unusable = ~(coverage > 0) | ~torch.isfinite(X).all(0)  # no dose to the covered PTV, or overflow
        if bool(unusable.any()):
            raise RuntimeError(
                f"plans {torch.nonzero(unusable).flatten().tolist()} of the batch cannot be rescaled to D95 = Rx: "
                "their ADMM iterate gives no finite coverage dose (e.g. a warm start x0 far larger than the "
                "plan's fluence diverged; start cold)")
        dose = spmm(self._D_full, X)
        nudge = self._coverage_nudge(dose[self._target_rows])
        X, d, dose = X * nudge, d * nudge, (dose * nudge).T
        _, _, masks = self._active_weights(d, t_all, w_spec, self._volume_ranks(vol_all), frozen_all)
        objective = self._objective(d, t_all, w_spec, masks)
        return PlanResult(
            tpps=batch,
            fluence=X.T.cpu().numpy(),
            warm_start=raw,
            dose=dose.cpu().numpy(),
            objective=objective.cpu().numpy().astype(np.float64),
            active_voxels={s: m.sum(0).cpu().numpy().astype(np.int64)
                           for s, m in zip(self.structures, masks, strict=True)},
            iterations=iterations.cpu().numpy(),
            converged=converged.cpu().numpy(),
            seconds=time.perf_counter() - t0,
            device=str(dev),
            names=list(self.names),
        )

    def _coverage_nudge(self, dose_ptv: torch.Tensor) -> torch.Tensor:
        """Per plan, the factor (1 or a few float32 steps above it) that lifts the coverage dose of
        the rescaled plans' float32 Gy dose ``dose_ptv`` (target rows, ``(n_ptv, B)``) to at least
        the prescription plus :data:`COVERAGE_HEADROOM`. The rescale sets it in relative dose; the
        Gy dose comes from another matrix and often lands a rounding step below Rx, which fails a
        ``D95 >= Rx`` goal; the headroom keeps the goal met when the fluence is dosed again with
        another summation order (:meth:`PlanningCase.dose`)."""
        target = self.case.prescription_gy * (1.0 + COVERAGE_HEADROOM)
        dx = kth_largest(dose_ptv, self._cover_k).cpu().numpy()  # > 0: the rescale checked it
        factor = np.maximum(rounded_up_ratio(dx, target), np.float32(1.0))  # plans already above stay as they are
        return torch.as_tensor(factor, device=dose_ptv.device)

    def _project(self, v: torch.Tensor, cover_rows: torch.Tensor | None) -> torch.Tensor:
        """Coverage projection: raise the covered voxels of ``v`` (relative dose) to >= 1."""
        if cover_rows is None:
            cover_rows = v >= self._coverage_dose(v)
        return torch.where(cover_rows, v.clamp(min=1.0), v)

    def _frozen(self, frozen: FrozenSets | None, B: int) -> tuple[list[torch.Tensor] | None, torch.Tensor | None]:
        if frozen is None:
            return None, None
        active, cov = self._check_frozen(frozen)
        masks = [torch.as_tensor(m, dtype=torch.float32, device=self.device)[:, None].expand(-1, B) for m in active]
        return masks, torch.as_tensor(cov, device=self.device)[:, None].expand(-1, B)

    def _check_frozen(self, frozen: FrozenSets) -> tuple[list[np.ndarray], np.ndarray]:
        """The frozen masks as bool arrays in structure order, after checking names and shapes."""
        names = set(frozen.active)
        if names != set(self.structures):
            raise ValueError(f"frozen active sets are for {sorted(names)}; the case's structures are "
                             f"{list(self.structures)} (missing {sorted(set(self.structures) - names)}, "
                             f"unexpected {sorted(names - set(self.structures))})")
        active = []
        for i, s in enumerate(self.structures):
            m = _mask(frozen.active[s], f"frozen active set of {s!r}")
            if m.shape != (self.block_size(i),):
                raise ValueError(f"frozen active set of {s!r} has shape {m.shape}; expected ({self.block_size(i)},)")
            active.append(m)
        cov = _mask(frozen.coverage_rows, "frozen coverage_rows")
        if cov.shape != (self.block_size(0),):
            raise ValueError(f"frozen coverage_rows has shape {cov.shape}; expected ({self.block_size(0)},)")
        return active, cov

    # ------------------------------------------------------- sub-problem access
    def _one_tpp(self, tpp: TPP, method: str) -> np.ndarray:
        """The ``(1, n_tpp)`` batch of a method defined for one plan."""
        batch = self._tpp_batch(tpp)
        if batch.shape[0] != 1:
            raise ValueError(f"{method} takes one TPP, got {batch.shape[0]}")
        return batch

    def freeze(self, tpp: TPP, fluence: np.ndarray) -> FrozenSets:
        """The active sets and covered PTV voxels of ``tpp`` at ``fluence`` (one plan)."""
        batch = self._one_tpp(tpp, "freeze")
        fluence = np.asarray(fluence, dtype=np.float32)
        if fluence.shape != (self.n_beamlets,):
            raise ValueError(f"fluence has shape {fluence.shape}; expected ({self.n_beamlets},)")
        _check_fluence(fluence, "fluence")
        t, lam, vol = self._tpp_tensors(batch)
        X = torch.as_tensor(fluence[:, None], device=self.device)
        d = spmm(self._D, X)
        _, _, masks = self._active_weights(d, t, lam / lam[0], self._volume_ranks(vol), None)
        d_ptv = d[self._blocks[0]]
        cover = d_ptv >= self._coverage_dose(d_ptv)
        return FrozenSets({s: m[:, 0].cpu().numpy() > 0 for s, m in zip(self.structures, masks, strict=True)},
                          cover[:, 0].cpu().numpy())

    def subproblem(self, tpp: TPP, frozen: FrozenSets) -> dict:
        """The frozen convex sub-problem as scipy matrices (relative-dose units):
        ``terms`` = list of ``(D_s[active], weight / |active|, t_s)`` and ``D_cover`` (rows that
        must reach 1). Its objective is ``sum weight/2 * ||D_s x - t_s||^2``, ``x >= 0``. Defined
        without the PTV under-dose term: a TPS with ``ptv_underdose`` raises."""
        if self.settings.ptv_underdose:
            raise ValueError("the frozen sub-problem has no PTV under-dose term; use a TPS with ptv_underdose=False")
        n = len(self.structures)
        v = self._one_tpp(tpp, "subproblem")[0]
        t, lam = v[:n], v[n:2 * n]
        active, cov = self._check_frozen(frozen)
        D = _scipy_csr(self._D)
        terms = []
        for s, (m, rows) in enumerate(zip(active, self._blocks, strict=True)):
            idx = np.arange(rows.start, rows.stop)[m]
            if idx.size:
                terms.append((D[idx], float(lam[s] / lam[0]) / idx.size, float(t[s])))
        ptv = self._blocks[0]
        cover = np.arange(ptv.start, ptv.stop)[cov]
        return {"terms": terms, "D_cover": D[cover]}

    def objective_of(self, fluence: np.ndarray, subproblem: dict) -> float:
        """Objective of the frozen sub-problem at a fluence (relative-dose units)."""
        x = np.asarray(fluence, dtype=np.float64)
        return float(sum(0.5 * wt * np.sum((Ds @ x - ts) ** 2) for Ds, wt, ts in subproblem["terms"]))


def _scipy_csr(t: torch.Tensor) -> sp.csr_matrix:
    return sp.csr_matrix((t.values().cpu().numpy(), t.col_indices().cpu().numpy(), t.crow_indices().cpu().numpy()),
                         shape=tuple(t.shape))
