"""LLM planning policies: knowledge-guided in-context TPP tuning (the M2M seed, with DOLA's extras).

* :mod:`llm_policy.prompt`: the prompt (optimisation problem, knowledge guidance, active
  configuration, dosimetric state, memory, task);
* :mod:`llm_policy.proposal`: the answer's JSON schema and its client-side validation;
* :mod:`llm_policy.grammar`: a llama.cpp grammar that enforces the schema's numeric bounds;
* :mod:`llm_policy.backends`: ``llama_cpp``, ``transformers`` and ``openai`` backends behind one
  ``complete`` interface;
* :mod:`llm_policy.policy`: :class:`~llm_policy.policy.LLMPolicy` and the planning loop.
"""
