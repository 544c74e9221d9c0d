"""Black-box TPP search baseline: CMA-ES over the continuous action space of an environment.

Each CMA-ES generation is solved in one batched TPS call. The search maximises the plan's fine
score (the linear score with a smooth PTV hot-spot term, :func:`rtenv.env.fine_score`) and stops
at the first full-score plan (every criterion's goal met) or when the budget of plan evaluations
is spent. It answers "is full score reachable for this case?" and serves as the ``search`` policy
of the benchmarks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cma
import numpy as np

from rtenv.env import EpisodeState, TuningCore, fine_score
from rtenv.evaluation import score_plan
from rtenv.rollout import EpisodeRecord
from rtenv.validation import check_integer


@dataclass
class SearchResult:
    """Outcome of one search.

    Attributes:
        success: A full-score plan was found.
        evaluations: Plans evaluated until success (or the whole budget).
        best_tpp: Best TPP vector found (full score first, then fine score).
        best_score: Its score (the core's scoring mode).
        best_fine_score: Its fine score.
        history: After each generation, the score of the best plan so far (ranked by full
            score, then fine score: it can fall when a plan with a higher fine score scores lower).
    """

    success: bool
    evaluations: int
    best_tpp: np.ndarray
    best_score: float
    best_fine_score: float
    history: list[float] = field(default_factory=list)


def cma_search(core: TuningCore, case_key: tuple[str, int], start_tpp: np.ndarray, budget: int = 400,
               popsize: int = 16, sigma0: float = 0.3, seed: int = 0) -> SearchResult:
    """CMA-ES from ``start_tpp`` on one case.

    Args:
        core: A :class:`~rtenv.env.TuningCore` (its continuous action map is the search space).
        case_key: ``(cohort, index)`` of the case.
        start_tpp: Start TPP vector (the search's mean starts at its action-space image).
        budget: Maximum plan evaluations.
        popsize: Plans per generation (one batched TPS solve).
        sigma0: Initial step size in the [-1, 1] action space.
        seed: Seed (>= 0) of the search: CMA-ES runs with ``seed + 1``, since cma draws a seed from
            the clock for 0.
    """
    check_integer("seed", seed, 0)
    check_integer("budget", budget, 1)
    check_integer("popsize", popsize, 2)
    rng_state = np.random.get_state()  # cma seeds and draws from numpy's global generator
    try:
        return _cma_search(core, case_key, start_tpp, budget, popsize, sigma0, seed)
    finally:
        np.random.set_state(rng_state)


def _cma_search(core: TuningCore, case_key: tuple[str, int], start_tpp: np.ndarray, budget: int, popsize: int,
                sigma0: float, seed: int) -> SearchResult:
    es = cma.CMAEvolutionStrategy(core.tpp_to_action(start_tpp).astype(np.float64), sigma0,
                                  {"popsize": popsize, "seed": seed + 1, "bounds": [-1.0, 1.0], "verbose": -9})
    best: tuple[bool, float, float, np.ndarray] | None = None
    history: list[float] = []
    evaluations = 0
    while evaluations < budget:
        xs = es.ask()[: budget - evaluations]
        eps = [EpisodeState(case_key, core.action_to_tpp(np.asarray(x))) for x in xs]
        core.solve(eps, warm=[False] * len(eps))
        fines = []
        for ep in eps:
            evaluations += 1
            fine = fine_score(ep.result)
            fines.append(fine)
            key = (bool(ep.result.full_score), fine)
            if best is None or key > best[:2]:
                best = (key[0], fine, ep.result.total, ep.tpp)
            if ep.result.full_score:
                history.append(ep.result.total)
                return SearchResult(True, evaluations, ep.tpp, ep.result.total, fine, history)
        history.append(best[2])
        if len(xs) == popsize:
            es.tell(xs, [-f for f in fines])
    assert best is not None
    return SearchResult(False, evaluations, best[3], best[2], best[1], history)


def search_episode(core: TuningCore, case_key: tuple[str, int], start_tpp: np.ndarray, generations: int = 20,
                   popsize: int = 8, seed: int = 0) -> EpisodeRecord:
    """CMA-ES as a tuning episode: one step = one generation of ``popsize`` plans.

    Starts from ``start_tpp`` (a start already at full score takes no step) and ends at the first
    full-score plan or after ``generations``; the record's final plan is the best found (or the
    start, if nothing beat it). ``seed`` (>= 0) seeds the search, as in :func:`cma_search`.
    """
    check_integer("seed", seed, 0)
    check_integer("generations (--max-steps)", generations, 1)  # before its product with popsize is checked
    start = EpisodeState(case_key, np.asarray(start_tpp, dtype=np.float64))
    core.solve([start], warm=[False])
    first = core.info(start)
    final, history, steps = start, [first["score"]], 0
    if not first["full_score"]:
        found = cma_search(core, case_key, start.tpp, budget=generations * popsize, popsize=popsize, seed=seed)
        steps = -(-found.evaluations // popsize)
        history += found.history
        best = EpisodeState(case_key, np.asarray(found.best_tpp))
        core.solve([best], warm=[False])
        if (best.result.full_score, fine_score(best.result)) >= (start.result.full_score, fine_score(start.result)):
            final = best
    last = core.info(final)

    def binary_total(ep: EpisodeState) -> float:
        if core.scoring_mode == "binary":
            return ep.result.total
        return score_plan(core.case(case_key), ep.dose, mode="binary").total

    return EpisodeRecord(
        case=last["case"], initial_score=first["score"], final_score=last["score"],
        initial_binary_score=binary_total(start), final_binary_score=binary_total(final), max_score=last["max_score"],
        steps=steps, full_score=bool(last["full_score"]), final_tpp=last["tpp"], final_dv_metrics=last["dv_metrics"],
        score_trajectory=history,
    )
