"""rtenv: radiotherapy treatment-planning-parameter (TPP) tuning toolkit.

Stages, each knowing only those before it: planning cases (:mod:`rtenv.case`,
:mod:`rtenv.phantom`, :mod:`rtenv.dose_engine`, :mod:`rtenv.scenarios`) -> plan evaluation
(:mod:`rtenv.evaluation`) -> figures (:mod:`rtenv.plots`) and the CLI (:mod:`rtenv.cli`).
"""

from rtenv.case import Beam, CaseFormatError, PlanningCase, Structure
from rtenv.evaluation import Protocol, ProtocolResult, score_plan
from rtenv.registration import ENV_IDS, register_envs
from rtenv.scenarios import COHORTS, SCENARIOS, Scenario, get_scenario, load_case

register_envs()

__version__ = "0.1.0"
__all__ = [
    "Beam", "CaseFormatError", "PlanningCase", "Structure", "Protocol", "ProtocolResult", "score_plan",
    "COHORTS", "SCENARIOS", "Scenario", "get_scenario", "load_case", "ENV_IDS",
]
