"""The Table 3 harness: a tiny run end to end, resume after a kill, parallel and Ray execution."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from benchmarks.table3 import LLMOptions, episode_specs, parse_policy, run_table3
from llm_policy.backends import BackendError
from rtenv.cli import main
from rtenv.runlog import read_jsonl

pytestmark = pytest.mark.slow
ARGS = {"scenarios": ["S1"], "policies": ["default", "random"], "cases": 2, "max_steps": 3, "seed": 0}


def finals(records):
    return {r["key"]: (r["final_score"], r["steps"], r["final_tpp"]) for r in records}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("t3ref")
    summary = run_table3(**ARGS, out=out, workers=1, progress=False)
    return out, summary


def test_tiny_table3_end_to_end(reference):
    out, summary = reference
    records = read_jsonl(out / "results.jsonl")
    assert len(records) == 4 and len({r["key"] for r in records}) == 4
    rows = summary["scenarios"]["S1"]
    assert rows["default"]["steps_mean"] == 0 and rows["default"]["final_score_mean"] == rows["default"][
        "initial_score_mean"]
    assert all(r["steps"] <= 3 and 0 <= r["final_score"] <= r["max_score"] == 9 for r in records)
    table = (out / "table3.md").read_text()
    assert "| random | 2 |" in table and "GPT-4o with knowledge (paper) | 10 | 6.0 +- 1.8 | 9.0 +- 0.0" in table
    for name in ("trajectories_S1.png", "final_tpps_S1.png", "dv_metrics_S1.png"):
        assert (out / name).stat().st_size > 10_000
    # per criterion: the final values' mean and how many plans meet the goal, by the records' own metrics
    hot = rows["random"]["dv_metrics"]["PTV hot spot"]
    values = [r["final_dv_metrics"]["PTV hot spot"] for r in records if r["policy"] == "random"]
    assert hot["mean"] == pytest.approx(sum(values) / 2) and hot["goal"] == pytest.approx(1.07 * 79.2)
    assert hot["goal_met"] == sum(v <= 1.07 * 79.2 for v in values)
    cells = [f"{m['mean']:.1f} +- {m['sd']:.1f} ({m['goal_met']}/2)" for m in
             (rows[p]["dv_metrics"]["Rectum V75Gy"] for p in ("default", "random"))]
    assert f"| Rectum V75Gy | <= 15 % | {cells[0]} | {cells[1]} |" in table


def test_resume_after_kill_gives_the_same_table(reference, tmp_path):
    ref_out, _ = reference
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "benchmarks.table3", "--scenarios", "S1", "--policies", "default,random",
           "--cases", "2", "--max-steps", "3", "--workers", "1", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not read_jsonl(out / "results.jsonl"):
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = read_jsonl(out / "results.jsonl")
    assert 1 <= len(partial) < 4, "the run should have been killed mid-way"
    with (out / "results.jsonl").open("a") as f:
        f.write('{"key": "torn record')  # a crash mid-write leaves a torn last line
    assert main(["bench", "table3", "--scenarios", "S1", "--policies", "default,random", "--cases", "2",
                 "--max-steps", "3", "--workers", "1", "--out", str(out)]) == 0
    records = read_jsonl(out / "results.jsonl")
    assert len(records) == 4 and len({r["key"] for r in records}) == 4  # nothing duplicated or missing
    assert finals(records) == finals(read_jsonl(ref_out / "results.jsonl"))
    assert (out / "table3.md").read_text() == (ref_out / "table3.md").read_text()


def _children(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(c) for c in f.read().split()]


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children"), reason="needs Linux /proc")
def test_a_stopped_parallel_run_stops_its_workers(tmp_path):
    # SIGTERM to the main process only (a scheduler's stop): it stops at once, its workers do too
    # (they used to run on as orphans), and what had finished is kept for the resume
    out = tmp_path / "stopped"
    cmd = [sys.executable, "-m", "benchmarks.table3", "--scenarios", "S1", "--policies", "random", "--cases", "10",
           "--max-steps", "20", "--workers", "2", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not read_jsonl(out / "results.jsonl"):
        time.sleep(0.1)
    workers = [c for c in _children(proc.pid) if "spawn" in open(f"/proc/{c}/cmdline").read()]
    assert workers, "the pool should be running"
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143 and time.time() - t0 < 30
    deadline = time.time() + 30
    while time.time() < deadline and any(_alive(w) for w in workers):
        time.sleep(0.2)
    assert not any(_alive(w) for w in workers)
    done = read_jsonl(out / "results.jsonl")
    assert 1 <= len(done) < 10 and len({r["key"] for r in done}) == len(done)


def test_parallel_workers_match_sequential(reference, tmp_path):
    ref_out, _ = reference
    run_table3(**ARGS, out=tmp_path, workers=2, progress=False, figures=False)
    assert finals(read_jsonl(tmp_path / "results.jsonl")) == finals(read_jsonl(ref_out / "results.jsonl"))


def test_ray_local_matches_sequential(reference, tmp_path):
    ray = pytest.importorskip("ray")
    ref_out, _ = reference
    try:
        run_table3(**ARGS, out=tmp_path, workers=2, ray_address="", progress=False, figures=False)
    finally:
        ray.shutdown()
    assert finals(read_jsonl(tmp_path / "results.jsonl")) == finals(read_jsonl(ref_out / "results.jsonl"))


def test_resume_with_other_shared_settings_is_refused(tmp_path):
    kw = {"cases": 1, "max_steps": 1, "workers": 1, "progress": False, "figures": False}
    run_table3(["S1"], ["random"], tmp_path, knowledge="S1-acer", **kw)
    run_table3(["S1"], ["random"], tmp_path, knowledge="S1-acer", **kw)  # same settings: resumes
    settings = json.loads((tmp_path / "run_settings.json").read_text())
    assert settings["device"] == "cpu"
    assert json.loads((tmp_path / "summary.json").read_text())["command"]["device"] == "cpu"
    settings["device"] = "cuda:0"  # plans on a GPU may part from CPU ones: not mixed in
    (tmp_path / "run_settings.json").write_text(json.dumps(settings))
    with pytest.raises(ValueError, match=r"other settings \(device: 'cuda:0' there, 'cpu' now\); use another --out"):
        run_table3(["S1"], ["random"], tmp_path, knowledge="S1-acer", **kw)
    del settings["device"]  # a run from before the device was recorded was a CPU run: it resumes
    (tmp_path / "run_settings.json").write_text(json.dumps(settings))
    run_table3(["S1"], ["random"], tmp_path, knowledge="S1-acer", **kw)
    assert json.loads((tmp_path / "run_settings.json").read_text())["device"] == "cpu"
    with pytest.raises(ValueError, match=r"other settings \(knowledge_sha256: '[0-9a-f]{64}' there, '[0-9a-f]{64}'"):
        run_table3(["S1"], ["random"], tmp_path, knowledge="S1-search", **kw)
    assert len(read_jsonl(tmp_path / "results.jsonl")) == 1
    (tmp_path / "run_settings.json").write_text("[1]")  # not this harness's file
    with pytest.raises(ValueError, match=r"run_settings.json is not a Table 3 run settings file \(a JSON object\)"):
        run_table3(["S1"], ["random"], tmp_path, knowledge="S1-acer", **kw)
    # a folder whose run finished no episode (it failed first) has nothing to mix: other settings go
    empty = tmp_path / "failed"
    broken = tmp_path / "broken.zip"  # there, so the run starts; its one episode fails loading it
    broken.write_bytes(b"not a zip archive")
    with pytest.raises(Exception, match="broken.zip"):
        run_table3(["S1"], [f"acer:{broken}"], empty, knowledge="S1-acer", **kw)
    assert (empty / "run_settings.json").is_file() and not read_jsonl(empty / "results.jsonl")
    run_table3(["S1"], ["random"], empty, knowledge="S1-search", **kw)
    assert len(read_jsonl(empty / "results.jsonl")) == 1
    # ... unless a run is still writing there (its settings would be swapped under it)
    from rtenv.runlog import exclusive
    with exclusive(empty, "table3 run"), pytest.raises(ValueError, match="another table3 run is writing to"):
        run_table3(["S1"], ["random"], empty, knowledge="S1-acer", **kw)
    run_table3(["S1"], ["random"], empty, knowledge="S1-search", **kw)  # the lock went with its holder


def test_resume_with_another_model_file_is_refused(tmp_path):
    from drl.train import policy_file

    model = tmp_path / "model.zip"
    model.write_bytes(policy_file("acer:default").read_bytes())
    kw = {"cases": 1, "max_steps": 1, "workers": 1, "progress": False, "figures": False}
    out = tmp_path / "run"
    run_table3(["S1"], [f"acer:{model}"], out, **kw)
    run_table3(["S1"], [f"acer:{model}", "random"], out, **kw)  # same file, one more policy: resumes
    recorded = json.loads((out / "run_settings.json").read_text())["model_sha256"]
    assert list(recorded) == [f"acer:{model}"] and len(recorded[f"acer:{model}"]) == 64
    model.write_bytes(model.read_bytes() + b"retrained")
    with pytest.raises(ValueError, match=r"another model file"):
        run_table3(["S1"], [f"acer:{model}"], out, **kw)
    run_table3(["S1"], ["random"], out, **kw)  # a resume without that policy is not concerned
    assert len(read_jsonl(out / "results.jsonl")) == 2


def test_a_failing_parallel_episode_keeps_the_others(tmp_path):
    broken = tmp_path / "broken.zip"  # there, so the run starts; its episode fails when loading it
    broken.write_bytes(b"not a zip archive")
    out = tmp_path / "run"
    with pytest.raises(Exception, match="broken.zip"):
        run_table3(["S1"], [f"acer:{broken}@1", "random@3"], out, max_steps=2, workers=2,
                   progress=False, figures=False)
    assert sorted(r["policy"] for r in read_jsonl(out / "results.jsonl")) == ["random"] * 3


def test_missing_models_and_bad_llm_settings_stop_the_run_before_any_episode(tmp_path):
    out = tmp_path / "run"
    kw = {"cases": 1, "max_steps": 1, "workers": 2, "progress": False, "figures": False}
    with pytest.raises(FileNotFoundError, match="no model file at /nonexistent/model.zip"):
        run_table3(["S1"], ["random", "acer:/nonexistent/model.zip"], out, **kw)
    with pytest.raises(BackendError, match=r"policy 'llm:llama_cpp:/tmp:unguided': no GGUF model file at /tmp"):
        run_table3(["S1"], ["random", "llm:llama_cpp:/tmp:unguided"], out, **kw)  # a folder is no GGUF file
    with pytest.raises(ValueError, match=r"unknown backend 'foo'; valid: \['llama_cpp', 'transformers', 'openai'\]"):
        run_table3(["S1"], ["random", "llm:foo:bar:unguided"], out, **kw)
    with pytest.raises(ValueError, match="'llm:openai:m:unguided': the openai backend needs a base URL"):
        run_table3(["S1"], ["llm:openai:m:unguided"], out, **kw)
    with pytest.raises(ValueError, match="base_url 'localhost:8000' must be an http"):
        run_table3(["S1"], ["llm:openai:m:unguided"], out, llm=LLMOptions(base_url="localhost:8000"), **kw)
    with pytest.raises(ValueError, match=r"memory_k \(--memory-k\) = -1 must be an integer in \[0, 20\]"):
        LLMOptions(memory_k=-1)
    with pytest.raises(ValueError, match=r"action_scope 'priorities' is invalid"):
        LLMOptions(action_scope="priorities")
    assert not out.exists()  # nothing was run or written
    afile = tmp_path / "afile"
    afile.write_text("")
    for bad, message in (("", "--out is empty"), (str(afile), "is an existing file"),
                         (str(afile / "sub"), "which is a file, not a folder")):
        with pytest.raises(ValueError, match=message):
            run_table3(["S1"], ["default"], bad, **kw)


def test_specs_and_policy_names(tmp_path):
    specs = episode_specs(["S1", "S3"], ["default"], cases=3)
    assert [s.start for s in specs] == ["default"] * 3 + ["random:0", "random:1", "random:2"]
    assert {s.case for s in specs if s.scenario == "S3"} == {0}  # the seed: one liver case, random starts
    assert parse_policy("llm:llama_cpp:default:unguided") == {"kind": "llm", "backend": "llama_cpp", "model": None,
                                                               "guided": False}
    assert parse_policy("acer:runs/x/model.zip")["kind"] == "sb3"
    for bad in ("greedy", "llm:llama_cpp", "llm:a:b:half", "acer:"):
        with pytest.raises(ValueError, match="policy"):
            parse_policy(bad)
    with pytest.raises(ValueError, match="--cases 11"):
        episode_specs(["S1"], ["default"], cases=11)
    with pytest.raises(ValueError, match=r"policies \['random'\] are listed more than once"):
        episode_specs(["S1"], ["random@2", "default", "random"], cases=3)
    with pytest.raises(ValueError, match=r"scenarios \['S1'\] are listed more than once"):  # ran and counted twice
        episode_specs(["S1", "S3", "S1"], ["default"], cases=3)
    few = episode_specs(["S1", "S3"], ["default", "random@2"], cases=3)
    assert [(s.policy, s.case, s.start) for s in few if s.scenario == "S1"] == [
        ("default", 0, "default"), ("default", 1, "default"), ("default", 2, "default"),
        ("random", 0, "default"), ("random", 1, "default")]
    assert [s.start for s in few if s.scenario == "S3" and s.policy == "random"] == ["random:0", "random:1"]
    for bad in ("random@0", "random@11", "random@x"):
        with pytest.raises(ValueError, match="after '@'"):
            episode_specs(["S1"], [bad], cases=3)
    with pytest.raises(ValueError, match=r"need --knowledge"):
        run_table3(["S1"], ["knowledge-sample"], tmp_path, cases=1, max_steps=1, workers=1, progress=False)
