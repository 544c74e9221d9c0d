"""Knowledge bases (parameter-wise export, validation) and the Spearman / distribution analyses."""

import dataclasses
import json
import math

import numpy as np
import pytest

from knowledge_extraction.analysis import (
    metric_panels,
    plot_metric_distributions,
    plot_spearman,
    plot_tpp_distributions,
    spearman_table,
    tpp_panels,
)
from knowledge_extraction.knowledge import (
    KnowledgeFormatError,
    build_knowledge,
    knowledge_table,
    load_knowledge,
    save_knowledge,
)
from rtenv.rollout import EpisodeRecord


def record(i, full=True):
    tpp = {"t_PTV": 1.0 + 0.01 * i, "lambda_PTV": 2.0 ** i, "V_PTV": 0.1}
    return EpisodeRecord(case=f"c{i}", initial_score=5, final_score=9 if full else 7, initial_binary_score=5,
                         final_binary_score=9 if full else 7, max_score=9, steps=3, full_score=full, final_tpp=tpp,
                         final_dv_metrics={"PTV hot spot": 84.0 - i, "Rectum V75Gy": 10.0 + (i % 2)})


def test_build_keeps_full_score_plans_parameter_wise():
    recs = [record(3), record(1), record(2), record(9, full=False)]
    kb = build_knowledge(recs, {"policy": "acer:x", "scenario": "S1", "cohort": "knowledge"})
    assert kb["source"]["episodes"] == 4 and kb["source"]["successful"] == 3
    lam = kb["parameters"]["lambda_PTV"]
    assert lam["values"] == [2.0, 4.0, 8.0]  # sorted: no per-patient vector survives
    assert lam["median"] == 4.0 and lam["min"] == 2.0 and lam["max"] == 8.0
    assert lam["geometric_mean"] == pytest.approx(4.0)
    assert "geometric_mean" not in kb["parameters"]["t_PTV"]
    assert kb["parameters"]["t_PTV"]["q1"] == pytest.approx(1.015)
    # plans already at full score at the start carry the start TPPs: the base says how many
    assert kb["source"]["full_score_at_start"] == 0 and "from the start" not in knowledge_table(kb)
    untouched = dataclasses.replace(record(4), steps=0)
    kb = build_knowledge([*recs, untouched], {"policy": "acer:x", "scenario": "S1", "cohort": "knowledge"})
    assert kb["source"]["full_score_at_start"] == 1
    assert "(4/5 full-score plans; 1 of them at full score from the start, before any step)" in knowledge_table(kb)
    with pytest.warns(UserWarning, match=r"every full-score plan \(1 of 2 episodes\) was at full score from its start"):
        kb = build_knowledge([untouched, record(9, full=False)], {"policy": "default", "scenario": "S1"})
    assert kb["source"]["full_score_at_start"] == kb["source"]["successful"] == 1
    with pytest.raises(ValueError, match="no full-score plan"):
        build_knowledge([record(1, full=False)], {})
    other = record(2)
    other.final_tpp = {**other.final_tpp, "t_bowel": 0.5}  # a TPP the first record lacks
    with pytest.raises(ValueError, match="differ in their TPPs"):
        build_knowledge([record(1), other], {})


def test_quartiles_and_geometric_sd_by_hand():
    records = [EpisodeRecord(case=f"c{i}", initial_score=5, final_score=9, initial_binary_score=5, final_binary_score=9,
                             max_score=9, steps=1, full_score=True, final_tpp={"lambda_PTV": lam}, final_dv_metrics={})
               for i, lam in enumerate([2.0, 4.0, 8.0])]
    p = build_knowledge(records, {})["parameters"]["lambda_PTV"]
    assert (p["q1"], p["median"], p["q3"]) == pytest.approx((3.0, 4.0, 6.0))  # numpy's linear quantiles
    assert p["geometric_sd"] == pytest.approx(2.0)  # exp(sample sd of ln 2, ln 4, ln 8) = exp(ln 2)


def test_save_load_and_validation(tmp_path):
    kb = build_knowledge([record(1), record(2)], {"policy": "p", "scenario": "S1", "cohort": "knowledge"})
    path = save_knowledge(kb, tmp_path / "kb.json")
    assert load_knowledge(path) == kb and kb["source"]["target"] == "PTV"
    # an organ's V may be 0.9 (only the target's is capped at 0.3); the target is found by the recorded key
    organ = {**kb, "source": {**kb["source"], "target": "prostate"},
             "parameters": {"t_prostate": kb["parameters"]["t_PTV"],
                            "V_prostate": kb["parameters"]["V_PTV"],
                            "V_bladder": {**kb["parameters"]["V_PTV"], "values": [0.9], "median": 0.9, "q1": 0.9,
                                          "q3": 0.9, "min": 0.9, "max": 0.9}}}
    save_knowledge(organ, tmp_path / "organ.json")
    # a base without weights plots its two kinds (the CLI's plot of it failed on the empty panel)
    organ_values = {"organ": {n: p["values"] for n, p in organ["parameters"].items()}}
    assert plot_tpp_distributions(organ_values, tmp_path / "organ.png").stat().st_size > 5000
    from llm_policy.prompt import knowledge_guidance

    guide = knowledge_guidance(organ, ["PTV", "Rectum"])  # another site: pooled by role
    assert guide["V_PTV"]["source"] == ["V_prostate"] and guide["V_rectum"]["source"] == ["V_bladder"]
    assert guide["t_PTV"]["source"] == ["t_prostate"]
    assert "lambda_PTV" in knowledge_table(kb)
    bad = {
        "format": ({**kb, "format": "other"}, "format is 'other'"),
        "version": ({**kb, "version": 7}, "version 7"),
        "values": ({**kb, "parameters": {"t_PTV": {**kb["parameters"]["t_PTV"], "values": [math.nan]}}},
                   "not finite numbers"),
        "bool": ({**kb, "parameters": {"t_PTV": {**kb["parameters"]["t_PTV"], "values": [True]}}},
                 "not finite numbers"),
        "stat": ({**kb, "parameters": {"t_PTV": {**kb["parameters"]["t_PTV"], "median": math.nan}}},
                 "lacks statistic 'median' \\(a finite number\\), got nan"),
        "target range": ({**kb, "parameters": {"t_PTV": {**kb["parameters"]["t_PTV"], "values": [0.5]}}},
                         r"'t_PTV' has value 0.5 outside its target range \[1, 1.2\]"),
        "V target": ({**kb, "parameters": {**kb["parameters"],
                                           "V_PTV": {**kb["parameters"]["V_PTV"], "values": [0.9]}}},
                     r"'V_PTV' has value 0.9 outside its target range \(0, 0.3\]"),
        "target": ({**kb, "source": {**kb["source"], "target": "CTV"}}, "source target 'CTV' names no parameter"),
        "empty": ({**kb, "parameters": {}}, "empty"),
        "name": ({**kb, "parameters": {"tPTV": kb["parameters"]["t_PTV"]}}, "'tPTV' is not a TPP name"),
        "kind": ({**kb, "parameters": {"V_PTV": kb["parameters"]["t_PTV"]}}, "has kind 't', its name says 'V'"),
        "range": ({**kb, "parameters": {"t_PTV": {**kb["parameters"]["t_PTV"], "values": [1.5]}}},
                  r"outside its target range \[1, 1.2\]"),
        "target type": ({**kb, "source": {**kb["source"], "target": ["PTV"]}},
                        r"source target must be a structure key \(a string\), got \['PTV'\]"),
        "huge": ({**kb, "parameters": {"t_PTV": {**kb["parameters"]["t_PTV"], "values": [10 ** 400]}}},
                 "not finite numbers"),
        "unsorted": ({**kb, "parameters": {"t_PTV": {**kb["parameters"]["t_PTV"], "values": [1.02, 1.01]}}},
                     "'t_PTV' has values that are not sorted in ascending order"),
        "stale stat": ({**kb, "parameters": {"t_PTV": {**kb["parameters"]["t_PTV"], "median": 1.1}}},
                       "'t_PTV' has median 1.1, but its values give 1.015"),
        "stale geometric": ({**kb, "parameters": {"lambda_PTV": {**kb["parameters"]["lambda_PTV"],
                                                                "geometric_mean": 1.0}}},
                            "'lambda_PTV' has geometric_mean 1.0, but its values give 2.82843"),
    }
    for name, (data, message) in bad.items():
        f = tmp_path / f"{name}.json"
        f.write_text(json.dumps(data))
        with pytest.raises(KnowledgeFormatError, match=message):
            load_knowledge(f)
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(KnowledgeFormatError, match=r"junk.json is not a knowledge base \(JSON\): invalid JSON at line"):
        load_knowledge(tmp_path / "junk.json")
    (tmp_path / "figure.png").write_bytes(b"\x89PNG\r\n\x1a\n")  # a figure given for its knowledge base
    with pytest.raises(KnowledgeFormatError, match=r"figure.png is not a knowledge base \(JSON\): it is not UTF-8"):
        load_knowledge(tmp_path / "figure.png")
    with pytest.raises(FileNotFoundError):
        load_knowledge(tmp_path / "none.json")


def test_spearman_by_construction(tmp_path):
    recs = [record(i).to_dict() for i in range(6)]
    table = spearman_table(recs)
    i, j = table["tpps"].index("lambda_PTV"), table["metrics"].index("PTV hot spot")
    assert table["rho"][i][j] == pytest.approx(-1.0)  # hot spot falls as lambda_PTV rises
    assert table["p"][i][j] == pytest.approx(2 / 720)  # exact: 2 of the 6! pairings are as extreme
    three = spearman_table(recs[:3])  # scipy's t-approximation said p = 0 here
    assert three["p"][i][j] == pytest.approx(1 / 3)
    assert np.isnan(table["rho"][table["tpps"].index("V_PTV")][j])  # constant TPP: undefined
    with pytest.raises(ValueError, match="at least 3"):
        spearman_table(recs[:2])
    assert plot_spearman(table, tmp_path / "s.png").stat().st_size > 5000
    groups = {"guided": {k: [r["final_tpp"][k] for r in recs] for k in recs[0]["final_tpp"]}}
    assert plot_tpp_distributions(groups, tmp_path / "d.png").stat().st_size > 5000
    # records of two scenarios are refused by name, whichever comes first
    other = {**recs[1], "case": "S2-case", "final_tpp": {**recs[1]["final_tpp"], "t_femur": 0.5}}
    for mixed in ([*recs[:3], other], [other, *recs[:3]]):
        with pytest.raises(ValueError, match=r"records differ in their final_tpp: .*'t_femur'"):
            spearman_table(mixed)


def test_distribution_plots_take_every_groups_names(tmp_path):
    # a name only a later group has is plotted too (the first group's box there is empty)
    assert tpp_panels(["t_PTV", "lambda_PTV", "t_femur", "V_rectum"]) == {
        "t": ["t_PTV", "t_femur"], "lambda": ["lambda_PTV"], "V": ["V_rectum"]}
    assert tpp_panels(["t_PTV", "V_PTV"]) == {"t": ["t_PTV"], "V": ["V_PTV"]}
    with pytest.raises(ValueError, match="no TPP names"):
        tpp_panels(["PTV hot spot"])
    groups = {"S1": {"t_PTV": [1.0, 1.1]}, "S2": {"t_PTV": [1.05], "t_femur": [0.5, 0.6], "lambda_femur": [0.1]}}
    assert plot_tpp_distributions(groups, tmp_path / "two.png").stat().st_size > 5000
    assert plot_metric_distributions({"a": {}, "b": {"Heart mean": [3.0]}}, tmp_path / "m.png").stat().st_size > 5000
    for plot in (plot_tpp_distributions, plot_metric_distributions):
        with pytest.raises(ValueError, match="no groups to plot"):
            plot({}, tmp_path / "none.png")


def test_metric_panels_take_the_protocols_units(tmp_path):
    metrics = ["PTV hot spot", "Bladder V70Gy", "rectum_v70", "Heart mean"]
    assert metric_panels(metrics) == {"Gy": ["PTV hot spot", "rectum_v70", "Heart mean"], "%": ["Bladder V70Gy"]}
    assert metric_panels(metrics, {"rectum_v70": "%"})["%"] == ["Bladder V70Gy", "rectum_v70"]
    assert metric_panels(metrics, {"rectum_v70": "cc"})["cc"] == ["rectum_v70"]  # a V criterion in cc
    with pytest.raises(ValueError, match="'cGy'"):
        metric_panels(metrics, {"Heart mean": "cGy"})
    groups = {"a": {m: [1.0, 2.0] for m in metrics}}
    assert plot_metric_distributions(groups, tmp_path / "m.png", units={"rectum_v70": "%"}).stat().st_size > 5000


def test_search_knowledge_and_the_shipped_base(tmp_path):
    from knowledge_extraction.knowledge import builtin_knowledge, export_search_knowledge

    kb, records = export_search_knowledge("S1", "test", generations=6, popsize=8, seed=0, cases=2)
    assert len(records) == 2 and kb["source"]["successful"] == sum(r.full_score for r in records) >= 1
    for r in records:
        assert r.final_score >= r.initial_score and r.steps <= 6
        assert r.full_score == (r.final_binary_score == r.max_score)
    assert set(kb["parameters"]) == set(records[0].final_tpp)
    assert {"S1-acer", "S1-search"} <= set(builtin_knowledge())
    shipped = load_knowledge("S1-search")
    assert shipped["source"]["scenario"] == "S1" and shipped["source"]["successful"] == 20
    assert all(p["values"] == sorted(p["values"]) for p in shipped["parameters"].values())
    with pytest.raises(FileNotFoundError, match="shipped ones: .*S1-search"):
        load_knowledge("S9-nothing")
