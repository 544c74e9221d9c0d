"""Reference solvers for the TPS's frozen convex sub-problem (validation and benchmarks).

With the active sets and the covered PTV voxels held fixed (:meth:`rtenv.tps.TPS.freeze`), one
TPS problem becomes a convex QP in relative-dose units::

    minimise_x  sum_s  w_s / 2 * || D_s x - t_s ||^2     subject to  x >= 0,  D_cover x >= 1

(``w_s`` already divided by the active-set size). ``clarabel`` (interior point) and ``osqp``
(ADMM) solve it through CVXPY (optional dependency, in the ``dev`` extra); ``lbfgsb`` solves it
with scipy's L-BFGS-B inside an augmented Lagrangian on the coverage rows.

In these units the objective is tiny (about 1e-3 at the optimum, its Hessian's entries about
1e-6), so against the solvers' absolute tolerances and regularisation it would be solved
loosely: Clarabel at its default settings stopped 1.3 % above the optimum on S1. Every solver
therefore minimises the objective scaled so that its Hessian's largest diagonal entry is 1; the
objective reported is the unscaled one.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from types import ModuleType

import numpy as np
import scipy.sparse as sp
from scipy.optimize import minimize

from rtenv.validation import check_integer, check_real

SOLVERS = ("clarabel", "osqp", "lbfgsb")


@dataclass
class ReferenceSolution:
    """A reference solve: fluence, objective (relative-dose units), worst coverage shortfall
    ``max(0, 1 - min(D_cover x))``, wall time in seconds, the solver's status, and ``converged``:
    the solver's own stopping rule held (CVXPY: status ``optimal``; L-BFGS-B: coverage and
    objective settled and the last inner solve stopped on its tolerance, not its iteration cap).
    Neither is a certificate of optimality: compare objectives (on flat problems L-BFGS-B can
    settle above the optimum)."""

    solver: str
    fluence: np.ndarray
    objective: float
    coverage_violation: float
    seconds: float
    status: str
    converged: bool


def _objective(x: np.ndarray, terms: list) -> float:
    return float(sum(0.5 * wt * np.sum((Ds @ x - ts) ** 2) for Ds, wt, ts in terms))


def objective_scale(terms: list) -> float:
    """The factor that makes the largest diagonal entry of the objective's Hessian
    ``sum_s w_s D_s^T D_s`` equal to 1."""
    diag = sum((wt * np.asarray(Ds.multiply(Ds).sum(0)).ravel() for Ds, wt, _ in terms), np.zeros(1))
    top = float(np.max(diag))
    return 1.0 / top if top > 0 else 1.0  # no objective term reaches any beamlet: nothing to scale


def _augmented_lagrangian(terms: list, Dc: sp.csr_matrix, scale: float, x0: np.ndarray, tol: float,
                          max_outer: int) -> tuple[np.ndarray, str, bool]:
    """L-BFGS-B on ``scale * f(x) + rho/2 ||min(0, D_cover x - 1 - mu/rho)||^2`` over x >= 0,
    updating the multipliers ``mu`` after each solve and raising ``rho`` tenfold whenever the
    worst coverage shortfall falls by less than a factor 4. Stops when the shortfall is <= ``tol``
    and the objective changed by less than ``tol`` (relative; absolute below 1e-12) over the last outer iteration;
    converged if the last inner solve also stopped on its own tolerance."""
    A = sp.vstack([np.sqrt(wt) * Ds for Ds, wt, _ in terms] or [sp.csr_matrix((0, x0.size))]).tocsr()
    At = A.T.tocsr()
    target = np.concatenate([np.sqrt(wt) * np.full(Ds.shape[0], ts) for Ds, wt, ts in terms] or [np.zeros(0)])
    Dct = Dc.T.tocsr()
    n_cov = Dc.shape[0]
    rho = 10.0 / float(np.max(Dc.multiply(Dc).sum(0))) if n_cov else 0.0
    mu = np.zeros(n_cov)
    x, previous, shortfall_before = x0, np.inf, np.inf
    bounds = [(0.0, None)] * x0.size

    def fun(x: np.ndarray, mu: np.ndarray, rho: float) -> tuple[float, np.ndarray]:
        r = A @ x - target
        value, grad = 0.5 * scale * float(r @ r), scale * (At @ r)
        if n_cov:
            g = np.minimum(Dc @ x - 1.0 - mu / rho, 0.0)
            value, grad = value + 0.5 * rho * float(g @ g), grad + rho * (Dct @ g)
        return value, grad

    for k in range(1, max_outer + 1):
        res = minimize(fun, x, args=(mu, rho), jac=True, method="L-BFGS-B", bounds=bounds,
                       options={"maxiter": 5000, "maxfun": 50000, "ftol": 1e-14, "gtol": 1e-10})
        x = res.x
        shortfall = _shortfall(Dc, x)
        f = _objective(x, terms)
        if shortfall <= tol and abs(previous - f) <= tol * max(f, 1e-12):  # (f may be ~0: nothing to penalise)
            if res.success:
                return x, f"converged after {k} outer iterations ({res.message})", True
            return x, f"settled after {k} outer iterations, but not its last inner solve ({res.message})", False
        if n_cov:
            mu = np.maximum(0.0, mu - rho * (Dc @ x - 1.0))
            if shortfall > 0.25 * shortfall_before:
                rho *= 10.0
        previous, shortfall_before = f, shortfall
    return x, f"not converged after {max_outer} outer iterations ({res.message})", False


def _shortfall(Dc: sp.csr_matrix, x: np.ndarray) -> float:
    """Worst coverage shortfall ``max(0, 1 - min D_cover x)``; inf if the dose is not finite."""
    if not Dc.shape[0]:
        return 0.0
    low = float((Dc @ x).min())
    return max(0.0, 1.0 - low) if np.isfinite(low) else math.inf


def import_cvxpy() -> ModuleType:
    """The ``cvxpy`` module, or an ImportError that names the extra installing it."""
    try:
        import cvxpy
    except ImportError as exc:  # pragma: no cover - cvxpy is in the bench and dev extras
        raise ImportError("the CVXPY reference solvers need cvxpy: pip install 'rtenv[bench]'") from exc
    return cvxpy


def solve_reference(subproblem: dict, solver: str = "clarabel", x0: np.ndarray | None = None,
                    tol: float = 1e-6, max_outer: int = 30) -> ReferenceSolution:
    """Solve the frozen sub-problem from :meth:`rtenv.tps.TPS.subproblem`.

    Args:
        subproblem: ``{"terms": [(D_s, w_s, t_s), ...], "D_cover": matrix}``.
        solver: ``"clarabel"`` or ``"osqp"`` (via CVXPY, default settings) or ``"lbfgsb"`` (scipy).
        x0: Start for ``lbfgsb`` (default: ones).
        tol: ``lbfgsb``: coverage shortfall and relative objective change at which the augmented
            Lagrangian stops, in (0, 0.01].
        max_outer: ``lbfgsb``: most outer (multiplier) iterations.

    The wall time covers building and solving the problem, not importing CVXPY.
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown reference solver {solver!r}; valid: {list(SOLVERS)}")
    tol = check_real("tol", tol, 0.0, 0.01, low_inclusive=False)
    max_outer = check_integer("max_outer", max_outer, 1)
    terms = [(sp.csr_matrix(Ds), wt, ts) for Ds, wt, ts in subproblem["terms"]]
    Dc = sp.csr_matrix(subproblem["D_cover"])
    n = Dc.shape[1]
    dark = np.flatnonzero(np.asarray(abs(Dc).sum(1)).ravel() == 0)
    if dark.size:
        raise ValueError(f"covered rows {dark[:5].tolist()} get no dose from any beamlet: coverage D_cover x >= 1 "
                         "is infeasible")
    if x0 is not None:
        x0 = np.asarray(x0, dtype=np.float64)
        if x0.shape != (n,) or not np.all(np.isfinite(x0)) or np.any(x0 < 0):
            raise ValueError(f"x0 must be {n} finite fluences >= 0 (one per beamlet), got shape {x0.shape}"
                             + ("" if x0.shape != (n,) else " with negative or non-finite values"))
    if solver != "lbfgsb":
        cp = import_cvxpy()
    t0 = time.perf_counter()
    scale = objective_scale(terms)
    if solver == "lbfgsb":
        start = np.ones(n) if x0 is None else x0
        x, status, converged = _augmented_lagrangian(terms, Dc, scale, start, tol, max_outer)
    else:
        xv = cp.Variable(n, nonneg=True)
        obj = sum(0.5 * wt * scale * cp.sum_squares(Ds @ xv - ts) for Ds, wt, ts in terms)
        prob = cp.Problem(cp.Minimize(obj), [Dc @ xv >= 1.0] if Dc.shape[0] else [])
        prob.solve(solver=cp.CLARABEL if solver == "clarabel" else cp.OSQP)
        if xv.value is None:
            raise RuntimeError(f"{solver} failed on the sub-problem: status {prob.status}")
        x = np.maximum(np.asarray(xv.value), 0.0)
        status, converged = str(prob.status), prob.status == cp.OPTIMAL
    seconds = time.perf_counter() - t0
    return ReferenceSolution(solver, x, _objective(x, terms), _shortfall(Dc, x), seconds, status, converged)
