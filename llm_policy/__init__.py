"""LLM planning policies (knowledge-guided in-context TPP tuning); see the LLM policy issue."""
