"""rtenv: radiotherapy treatment-planning-parameter (TPP) tuning toolkit.

Stages, each knowing only those before it: planning cases (:mod:`rtenv.case`,
:mod:`rtenv.phantom`, :mod:`rtenv.dose_engine`, :mod:`rtenv.scenarios`) -> plan evaluation
(:mod:`rtenv.evaluation`) -> the TPS (:mod:`rtenv.tpp`, :mod:`rtenv.tps`, reference solvers in
:mod:`rtenv.reference`) -> environments (:mod:`rtenv.env`, :mod:`rtenv.sb3`; ids registered on
import by :mod:`rtenv.registration`) -> search and rollouts (:mod:`rtenv.search`,
:mod:`rtenv.rollout`). Figures: :mod:`rtenv.plots`; the CLI (:mod:`rtenv.cli`) is a thin layer
over all of it, including the ``drl`` and ``knowledge_extraction`` packages.
"""

import os
import sys

from rtenv.case import Beam, CaseFormatError, PlanningCase, Structure
from rtenv.evaluation import Protocol, ProtocolResult, score_plan
from rtenv.registration import ENV_IDS, register_envs
from rtenv.scenarios import COHORTS, SCENARIOS, Scenario, get_scenario, load_case
from rtenv.tpp import TPP

register_envs()


def _one_thread_after_fork() -> None:
    """torch's OpenMP thread pool does not survive a fork: in a forked child, a parallel product
    (the TPS's sparse products among them) waits forever for the parent's threads once the parent
    has run one, e.g. in gymnasium's ``AsyncVectorEnv`` with the fork start method after the
    parent solved a plan. Forked children therefore compute on one thread, as torch's own
    DataLoader workers do (plans are bitwise the same on any thread count)."""
    torch = sys.modules.get("torch")
    if torch is not None:  # a child that imports torch itself starts a fresh pool
        torch.set_num_threads(1)


os.register_at_fork(after_in_child=_one_thread_after_fork)

# the TPS and the environments import torch (about a second): loaded on first use
_LAZY = {"TPS": "rtenv.tps", "ADMMSettings": "rtenv.tps", "PlanResult": "rtenv.tps",
         "TPPTuningEnv": "rtenv.env", "TPPTuningVectorEnv": "rtenv.env"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rtenv' has no attribute {name!r}")


__version__ = "0.1.0"
__all__ = [
    "Beam", "CaseFormatError", "PlanningCase", "Structure", "Protocol", "ProtocolResult", "score_plan",
    "COHORTS", "SCENARIOS", "Scenario", "get_scenario", "load_case", "ENV_IDS", "TPP", *_LAZY,
]
