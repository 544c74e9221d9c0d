"""Gymnasium ids of the rtenv environments (registered on ``import rtenv``)."""

from __future__ import annotations

import gymnasium as gym

ENV_IDS = {
    "rtenv/Prostate7Beam-v0": "S1",
    "rtenv/Prostate180Beam-v0": "S2",
    "rtenv/Liver7Beam-v0": "S3",
    "rtenv/TG119-v0": "TG119",  # single case; needs pyradplan (the TG-119 data; docs/cases.md)
}


def register_envs() -> None:
    """Register every id (single env and ``vector_entry_point``); safe to call more than once."""
    for env_id, scenario in ENV_IDS.items():
        if env_id in gym.registry:
            continue
        start = "random" if scenario == "S3" else "default"  # the seed's S3 starts from random TPPs
        kwargs = {"scenario": scenario, "start": start}
        gym.register(
            id=env_id,
            entry_point="rtenv.env:TPPTuningEnv",
            vector_entry_point="rtenv.env:TPPTuningVectorEnv",
            kwargs=kwargs,
            disable_env_checker=False,
        )
