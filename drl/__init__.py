"""Deep reinforcement learning planners (ACER) and their explanations; see the DRL issue."""
