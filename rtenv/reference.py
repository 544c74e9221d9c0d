"""Reference solvers for the TPS's frozen convex sub-problem (validation and benchmarks).

With the active sets and the covered PTV voxels held fixed (:meth:`rtenv.tps.TPS.freeze`), one
TPS problem becomes a convex QP in relative-dose units::

    minimise_x  sum_s  w_s / 2 * || D_s x - t_s ||^2     subject to  x >= 0,  D_cover x >= 1

(``w_s`` already divided by the active-set size). ``clarabel`` solves it exactly through CVXPY
(optional dependency, in the ``dev`` extra); ``lbfgsb`` solves it with scipy's L-BFGS-B, the
coverage rows handled by a quadratic penalty of weight ``penalty``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy.optimize import minimize

SOLVERS = ("clarabel", "osqp", "lbfgsb")


@dataclass
class ReferenceSolution:
    """A reference solve: fluence, objective (relative-dose units), worst coverage shortfall
    ``max(0, 1 - min(D_cover x))`` and wall time in seconds."""

    solver: str
    fluence: np.ndarray
    objective: float
    coverage_violation: float
    seconds: float


def _objective(x: np.ndarray, terms: list) -> float:
    return float(sum(0.5 * wt * np.sum((Ds @ x - ts) ** 2) for Ds, wt, ts in terms))


def solve_reference(subproblem: dict, solver: str = "clarabel", penalty: float = 1e4,
                    x0: np.ndarray | None = None) -> ReferenceSolution:
    """Solve the frozen sub-problem from :meth:`rtenv.tps.TPS.subproblem`.

    Args:
        subproblem: ``{"terms": [(D_s, w_s, t_s), ...], "D_cover": matrix}``.
        solver: ``"clarabel"`` or ``"osqp"`` (via CVXPY) or ``"lbfgsb"`` (scipy).
        penalty: Coverage penalty weight for ``lbfgsb``.
        x0: Start for ``lbfgsb`` (default: ones).
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown reference solver {solver!r}; valid: {list(SOLVERS)}")
    terms, Dc = subproblem["terms"], subproblem["D_cover"]
    n = Dc.shape[1]
    t0 = time.perf_counter()
    if solver == "lbfgsb":
        A = sp.vstack([np.sqrt(wt) * Ds for Ds, wt, _ in terms] + [np.sqrt(penalty) * Dc]).tocsr()
        At = A.T.tocsr()
        n_cov = Dc.shape[0]
        target = np.concatenate([np.sqrt(wt) * np.full(Ds.shape[0], ts) for Ds, wt, ts in terms]
                                + [np.sqrt(penalty) * np.ones(n_cov)])

        def fun(x: np.ndarray) -> tuple[float, np.ndarray]:
            r = A @ x - target
            r[-n_cov:] = np.minimum(r[-n_cov:], 0.0)  # one-sided: only shortfalls below 1 count
            return 0.5 * float(r @ r), At @ r

        start = np.ones(n) if x0 is None else np.asarray(x0, dtype=np.float64)
        res = minimize(fun, start, jac=True, method="L-BFGS-B", bounds=[(0, None)] * n,
                       options={"maxiter": 5000, "ftol": 1e-12, "gtol": 1e-9})
        x = res.x
    else:
        try:
            import cvxpy as cp
        except ImportError as exc:  # pragma: no cover - cvxpy is in the dev extra
            raise ImportError("the CVXPY reference solvers need `pip install cvxpy clarabel`") from exc
        xv = cp.Variable(n, nonneg=True)
        obj = sum(0.5 * wt * cp.sum_squares(Ds @ xv - ts) for Ds, wt, ts in terms)
        prob = cp.Problem(cp.Minimize(obj), [Dc @ xv >= 1.0])
        prob.solve(solver=cp.CLARABEL if solver == "clarabel" else cp.OSQP)
        if xv.value is None:
            raise RuntimeError(f"{solver} failed on the sub-problem: status {prob.status}")
        x = np.maximum(np.asarray(xv.value), 0.0)
    seconds = time.perf_counter() - t0
    violation = float(max(0.0, 1.0 - (Dc @ x).min())) if Dc.shape[0] else 0.0
    return ReferenceSolution(solver, x, _objective(x, terms), violation, seconds)
