"""Deep reinforcement learning planners: ACER (:mod:`drl.acer`, SB3-compatible) and its estimators
(:mod:`drl.acer_math`)."""
