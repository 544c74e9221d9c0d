"""LLM policy without a model: answer schema and validation (fuzzed), and the prompt's components."""

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from knowledge_extraction.knowledge import build_knowledge
from llm_policy.backends import Completion
from llm_policy.policy import LLMPolicy
from llm_policy.prompt import Attempt, PlanState, PromptOptions, build_messages, knowledge_guidance, select_memory
from llm_policy.proposal import (
    REASONING_MAX_CHARS,
    ProposalError,
    extract_json,
    parse_proposal,
    proposal_bounds,
    proposal_schema,
    scoped_names,
)
from rtenv.env import DVH_POINTS
from rtenv.rollout import EpisodeRecord
from rtenv.tpp import TPP, tpp_names

S1 = ("PTV", "Bladder", "Rectum")
S3 = ("PTV", "Liver", "Heart")


def s1_knowledge(n=4):
    rng = np.random.default_rng(0)
    records = []
    for i in range(n):
        tpp = dict(zip(tpp_names(S1), [1.05, 0.6, 0.5, 2.0, 1.5, 3.0, 0.1, 0.6, 0.5], strict=True))
        tpp = {k: float(v * (1 + 0.05 * rng.standard_normal())) if not k.startswith("t_PTV") else v
               for k, v in tpp.items()}
        records.append(EpisodeRecord(case=f"S1-knowledge-{i}", initial_score=6, final_score=9,
                                     initial_binary_score=6, final_binary_score=9, max_score=9, steps=3,
                                     full_score=True, final_tpp=tpp, final_dv_metrics={}))
    return build_knowledge(records, {"policy": "acer:test", "scenario": "S1", "cohort": "knowledge"})


def s1_state(structures=S1):
    names = tpp_names(structures)
    criteria = {"PTV hot spot": {"value": 86.0, "unit": "Gy", "goal": 84.74, "limit": 87.12, "met": False},
                "Rectum V75Gy": {"value": 12.0, "unit": "%", "goal": 15.0, "limit": 20.0, "met": True}}
    info = {"tpp": TPP.default(structures).to_dict(), "score": 7.5, "max_score": 9.0, "criteria": criteria}
    obs = np.linspace(1, 0, DVH_POINTS * len(structures)).astype(np.float32)
    assert list(info["tpp"]) == names
    return PlanState.from_step(obs, info, structures, 79.2)


# ---------------------------------------------------------------------------------- proposals
def test_bounds_are_the_realisable_tpp_ranges():
    b = proposal_bounds(S1)
    assert b["t_PTV"] == (1.0, 1.2) and b["lambda_bladder"] == pytest.approx((0.01, 1000.0))
    assert b["V_PTV"] == (0.001, 0.3) and b["t_rectum"] == (0.01, 1.0) and b["V_rectum"] == (0.01, 1.0)
    assert scoped_names(S1, "weights_only") == ["lambda_PTV", "lambda_bladder", "lambda_rectum"]
    with pytest.raises(ValueError, match="action_scope 'some'"):
        scoped_names(S1, "some")


def test_schema_shapes():
    s = proposal_schema(S1)
    assert s["required"] == tpp_names(S1) and s["additionalProperties"] is False
    assert s["properties"]["t_PTV"] == {"type": "number", "minimum": 1.0, "maximum": 1.2}
    cot = proposal_schema(S1, "weights_only", chain_of_thought=True)
    assert cot["required"] == ["reasoning", "tpp"] and list(cot["properties"]["tpp"]["properties"]) == [
        "lambda_PTV", "lambda_bladder", "lambda_rectum"]


def good_answer():
    return {"t_PTV": 1.05, "t_bladder": 0.6, "t_rectum": 0.5, "lambda_PTV": 2, "lambda_bladder": 1.5,
            "lambda_rectum": 3.0, "V_PTV": 0.1, "V_bladder": 0.6, "V_rectum": 0.5}


def test_parse_accepts_prose_and_fences_around_json():
    text = "Sure! Here is my proposal:\n```json\n" + json.dumps(good_answer()) + "\n```\nGood luck {not json}"
    values, reasoning = parse_proposal(text, S1)
    assert values["lambda_PTV"] == 2.0 and isinstance(values["lambda_PTV"], float) and reasoning == ""
    cot = json.dumps({"reasoning": "rectum is too hot", "tpp": {"lambda_PTV": 1, "lambda_bladder": 2,
                                                                "lambda_rectum": 5}})
    values, reasoning = parse_proposal(cot, S1, "weights_only", chain_of_thought=True)
    assert reasoning == "rectum is too hot" and values == {"lambda_PTV": 1.0, "lambda_bladder": 2.0,
                                                           "lambda_rectum": 5.0}


@pytest.mark.parametrize("mutate, message", [
    (lambda a: a.pop("V_rectum"), "missing keys \\['V_rectum'\\]"),
    (lambda a: a.update(extra=1.0), "unexpected keys \\['extra'\\]"),
    (lambda a: a.update(t_PTV="1.05"), "t_PTV must be a number in \\[1, 1.2\\], got '1.05'"),
    (lambda a: a.update(lambda_PTV=True), "lambda_PTV must be a number"),
    (lambda a: a.update(lambda_PTV=None), "lambda_PTV must be a number"),
    (lambda a: a.update(lambda_PTV=5000.0), "lambda_PTV = 5000 is outside \\[0.01, 1000\\]"),
    (lambda a: a.update(t_PTV=80.5), "t_PTV = 80.5 is outside \\[1, 1.2\\]"),
])
def test_parse_rejects_bad_values_naming_them(mutate, message):
    a = good_answer()
    mutate(a)
    with pytest.raises(ProposalError, match=message):
        parse_proposal(json.dumps(a), S1)


def test_parse_rejects_non_finite_and_huge_numbers():
    for literal in ("NaN", "Infinity", "-Infinity", "1e400"):
        text = json.dumps(good_answer()).replace("2,", literal + ",", 1)
        with pytest.raises(ProposalError):
            parse_proposal(text, S1)
    with pytest.raises(ProposalError, match="no JSON object"):
        parse_proposal("I would raise the rectum weight.", S1)
    with pytest.raises(ProposalError, match="empty"):
        parse_proposal("   ", S1)
    with pytest.raises(ProposalError, match="every|missing"):
        parse_proposal("[1, 2, 3] and {}", S1)
    # a repeated key is refused wherever the bad value stands (json keeps the last one silently)
    good = json.dumps(good_answer())
    for text in ('{"t_PTV": 99, ' + good[1:], good[:-1] + ', "t_PTV": 99}', good[:-1] + ', "t_PTV": 1.05}'):
        with pytest.raises(ProposalError, match="repeated key 't_PTV'"):
            parse_proposal(text, S1)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=400))
def test_fuzz_arbitrary_text_only_ever_raises_proposal_error(text):
    try:
        values, _ = parse_proposal(text, S1)
    except ProposalError as exc:
        assert exc.problems and str(exc)
    else:  # hypothesis found a valid answer: it must really be one
        b = proposal_bounds(S1)
        assert set(values) == set(b) and all(b[k][0] <= v <= b[k][1] for k, v in values.items())


json_values = st.one_of(st.none(), st.booleans(), st.integers(-10**30, 10**30),
                        st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
                        st.lists(st.integers(), max_size=2))


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from([*tpp_names(S1), "x", "tpp", "reasoning"]), json_values),
       st.text(max_size=20), st.text(max_size=20))
def test_fuzz_json_objects_in_prose(obj, before, after):
    text = before.replace("{", "(") + json.dumps(obj) + after
    bounds = proposal_bounds(S1)
    should_pass = set(obj) == set(bounds) and all(
        not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
        and bounds[k][0] <= v <= bounds[k][1] for k, v in obj.items())
    if should_pass:
        values, _ = parse_proposal(text, S1)
        assert values == {k: float(v) for k, v in obj.items()}
    else:
        with pytest.raises(ProposalError):
            parse_proposal(text, S1)


def test_extract_json_skips_broken_objects():
    assert extract_json('{"a": 1,, } then {"b": 2}') == {"b": 2}


def test_parse_edge_cases_never_escape_as_other_errors():
    huge = json.dumps(good_answer()).replace("2,", "1" + "0" * 400 + ",", 1)  # an int beyond float range
    with pytest.raises(ProposalError, match="401-digit integer"):
        parse_proposal(huge, S1)
    # a format shown before the answer: the first object that validates counts
    values, _ = parse_proposal("Format: {} . Answer: " + json.dumps(good_answer()), S1)
    assert values == {k: float(v) for k, v in good_answer().items()}
    # chain of thought: the reasoning is required, a string, and bounded like the schema says
    for reasoning, match in ((None, "must be a string"), (7, "must be a string"),
                             ("x" * (REASONING_MAX_CHARS + 1), f"at most {REASONING_MAX_CHARS}")):
        answer = {"tpp": good_answer()} if reasoning is None else {"reasoning": reasoning, "tpp": good_answer()}
        with pytest.raises(ProposalError, match=match):
            parse_proposal(json.dumps(answer), S1, chain_of_thought=True)


# --------------------------------------------------------------------------------------- prompt
def test_guided_prompt_holds_the_three_components_and_no_identifiers():
    kb = s1_knowledge()
    msgs = build_messages(s1_state(), PromptOptions(guidance=True), knowledge=kb)
    assert [m["role"] for m in msgs] == ["system", "user"]
    text = msgs[1]["content"]
    for part in ("## Optimisation problem", "D95(PTV) >= Rx", "Rx = 79.2 Gy", "## Active configuration",
                 "lambda_rectum | objective weight", "## Dosimetric state",
                 "Score 7.50 of 9", "PTV: 79.2 Gy: 100.0%", "Rectum V75Gy | 12.00 %",
                 "violated: PTV hot spot", "## Knowledge guidance", "Condition your proposal",
                 "keys are exactly t_PTV, t_bladder"):
        assert part in text, part
    assert "S1-knowledge" not in text and "acer:test" not in text
    # parameter-wise: each parameter's values appear sorted, so no patient's vector can be read back
    line = next(ln for ln in text.splitlines() if ln.startswith("lambda_bladder:"))
    values = [float(v) for v in line.split("values: ")[1].split(", ")]
    assert values == sorted(values) and len(values) == 4
    assert text.count("## Knowledge guidance") == 1 and "## Memory" not in text
    assert text.index("## Knowledge guidance") < text.index("## Active configuration")  # fixed parts first
    unguided = build_messages(s1_state(), PromptOptions(guidance=False))[1]["content"]
    guide = text[text.index("## Knowledge guidance"):text.index("## Active configuration")]
    assert "Knowledge" not in unguided and unguided == text.replace(guide, "")
    with pytest.raises(ValueError, match="needs a knowledge base"):
        build_messages(s1_state(), PromptOptions(guidance=True))
    # the checkpoint rows: value, goal and limit in the criterion's unit, and whether it is met
    assert "PTV hot spot | 86.00 Gy | 84.74 Gy | 87.12 Gy | NO" in text
    assert "Rectum V75Gy | 12.00 % | 15.00 % | 20.00 % | yes" in text


class ScriptedBackend:
    """Answers from a list and keeps the chats it was sent: the real model, constrained to the
    schema, cannot be made to give the invalid answer whose repair this drives."""

    def __init__(self, answers: list[str]) -> None:
        self.answers, self.chats = list(answers), []

    def complete(self, messages, schema, temperature, seed, max_tokens):
        self.chats.append(list(messages))
        return Completion(self.answers.pop(0), None, 1, 1, 0.0, "text")


def test_an_invalid_answer_goes_back_with_its_error_and_the_repair_is_used():
    good = {"t_PTV": 1.05, "t_bladder": 0.6, "t_rectum": 0.5, "lambda_PTV": 2.0, "lambda_bladder": 1.5,
            "lambda_rectum": 3.0, "V_PTV": 0.1, "V_bladder": 0.6, "V_rectum": 0.5}
    backend = ScriptedBackend([json.dumps({**good, "V_PTV": 0.9}), json.dumps(good)])
    policy = LLMPolicy(backend, S1, 79.2, options=PromptOptions(guidance=False))
    state = s1_state()
    info = {"tpp": state.tpp, "score": state.score, "max_score": state.max_score, "criteria": state.criteria}
    proposal, log = policy.propose(state.dvh, info)
    assert proposal == good and not log.valid_first and not log.fallback
    repair = backend.chats[1]
    assert repair[:-2] == backend.chats[0] and repair[-2]["content"] == json.dumps({**good, "V_PTV": 0.9})
    assert "V_PTV = 0.9 is outside" in repair[-1]["content"]  # the validation error went back to the model


def test_knowledge_pooled_by_role_for_another_site():
    guide = knowledge_guidance(s1_knowledge(), S3)
    assert guide["t_PTV"]["source"] == ["t_PTV"]
    assert guide["lambda_liver"]["source"] == ["lambda_bladder", "lambda_rectum"]
    assert len(guide["lambda_heart"]["values"]) == 8 and guide["lambda_heart"]["values"] == sorted(
        guide["lambda_heart"]["values"])
    text = build_messages(s1_state(S3), PromptOptions(), knowledge=s1_knowledge())[1]["content"]
    assert "lambda_liver (pooled from lambda_bladder, lambda_rectum)" in text


def test_memory_picks_best_prior_attempts_and_options_validate():
    history = [Attempt(0, {"lambda_PTV": 1.0}, 5.0, ["a"]), Attempt(1, {"lambda_PTV": 2.0}, 7.0, []),
               Attempt(2, {"lambda_PTV": 3.0}, 6.0, ["b"]), Attempt(3, {"lambda_PTV": 4.0}, 7.0, [])]
    assert [a.step for a in select_memory(history, 2)] == [1, 3]
    assert select_memory(history, 0) == []
    text = build_messages(s1_state(), PromptOptions(guidance=False, memory_k=2, chain_of_thought=True,
                                                    action_scope="weights_only"), history=history)[1]["content"]
    assert "step 1: lambda_PTV=2 -> score 7.00" in text and "step 0:" not in text
    assert '"reasoning"' in text and "Only the weights" in text
    with pytest.raises(ValueError, match="memory_k"):
        PromptOptions(memory_k=-1)
    with pytest.raises(ValueError, match="action_scope"):
        PromptOptions(action_scope="thresholds")


# -------------------------------------------------------------------------------------- grammar
def _expand(alternative: str) -> set[str]:
    import itertools

    choices = [[tok[1]] if tok.startswith('"') else [str(d) for d in range(int(tok[1]), int(tok[3]) + 1)]
               for tok in alternative.split(" ")]
    return {"".join(c) for c in itertools.product(*choices)}


@pytest.mark.parametrize("low, high", [(1.0, 1.2), (0.01, 1.0), (0.001, 0.3), (0.01, 1000.0), (0.0, 0.0),
                                       (0.0125, 0.0875), (3.0, 47.5)])
def test_grammar_numbers_are_exactly_the_bounded_decimals(low, high):
    from llm_policy.grammar import number_alternatives

    derived: set[str] = set()
    for alt in number_alternatives(low, high, decimals=3):
        strings = _expand(alt)
        assert not strings & derived  # alternatives are disjoint
        derived |= strings
    expected = {f"{n / 1000:.3f}" for n in range(math.ceil(low * 1000 - 1e-9), math.floor(high * 1000 + 1e-9) + 1)}
    assert derived == expected  # every 3-decimal number in range, no leading zeros, nothing else


def test_grammar_compiles_our_schemas_and_refuses_others():
    from llm_policy.grammar import schema_to_gbnf

    g = schema_to_gbnf(proposal_schema(S1, "weights_only", chain_of_thought=True))
    assert g.startswith("root ::= obj") and '"\\"lambda_rectum\\""' in g and '[ !#-\\[\\]-~]{0,1200} "\\""' in g
    with pytest.raises(ValueError, match="minimum"):
        schema_to_gbnf({"type": "number"})
    with pytest.raises(ValueError, match="require every property"):
        schema_to_gbnf({"type": "object", "properties": {"a": {"type": "string"}}, "required": []})
    with pytest.raises(ValueError, match="not supported"):
        schema_to_gbnf({"type": "array"})
    with pytest.raises(ValueError, match="no 3-decimal number"):
        schema_to_gbnf({"type": "number", "minimum": 0.0001, "maximum": 0.0002})
    with pytest.raises(ValueError, match="strings need an integer 'maxLength' >= 0, got None"):
        schema_to_gbnf({"type": "string"})
    with pytest.raises(ValueError, match=r"string keywords \['pattern'\] are not supported"):
        schema_to_gbnf({"type": "string", "maxLength": 9, "pattern": "a+"})
