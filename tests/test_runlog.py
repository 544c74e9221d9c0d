"""Resumable runs: the run log itself, and `rtenv evaluate` / `knowledge export` resuming after a crash."""

import hashlib
import json

import pytest

import rtenv.rollout
from rtenv.cli import main
from rtenv.runlog import RunLog, check_output_path, file_sha256, read_json, read_jsonl, settings_changes, write_atomic


def test_run_log_resumes_and_refuses_other_settings(tmp_path):
    path = tmp_path / "sub" / "run.jsonl"
    log = RunLog(path, {"seed": 0, "cases": (1, 2)})
    assert len(log) == 0 and log.get(0) is None
    log.add(0, {"score": 1.5})
    log.add([1, "a"], [2.0])
    again = RunLog(path, {"cases": [1, 2], "seed": 0})  # the same settings, as they read back
    assert len(again) == 2 and again.get(0) == {"score": 1.5} and again.get([1, "a"]) == [2.0]
    with pytest.raises(ValueError, match=r"seed: 0 there, 1 now.*delete the file"):
        RunLog(path, {"seed": 1, "cases": [1, 2]})
    with pytest.raises(ValueError, match=r"extra: '\(absent\)' there, True now"):
        RunLog(path, {"seed": 0, "cases": [1, 2], "extra": True})
    with pytest.raises(ValueError, match=r"extra: '\(absent\)' there, None now\)"):  # None is a setting too
        RunLog(path, {"seed": 0, "cases": [1, 2], "extra": None})
    again.remove()
    assert not path.exists()


def test_a_log_without_items_takes_new_settings_and_a_removed_log_is_rewritten_whole(tmp_path):
    path = tmp_path / "run.jsonl"
    RunLog(path, {"max_steps": 0})  # a run that stopped on its bad argument before any episode
    log = RunLog(path, {"max_steps": 2})  # the corrected rerun is not refused
    assert read_jsonl(path) == [{"settings": {"max_steps": 2}}]
    log.add(0, "a")
    path.unlink()  # another run of the same command finished and removed the log
    log.add(1, "b")
    assert read_jsonl(path) == [{"settings": {"max_steps": 2}}, {"key": 0, "value": "a"}, {"key": 1, "value": "b"}]
    with pytest.raises(ValueError, match="other settings"):
        RunLog(path, {"max_steps": 3})


def test_a_torn_last_line_is_cut_and_other_files_are_refused(tmp_path):
    path = tmp_path / "run.jsonl"
    log = RunLog(path, {"n": 3})
    log.add(0, 10)
    with path.open("a") as f:
        f.write('{"key": 1, "val')  # a crash mid-write
    resumed = RunLog(path, {"n": 3})
    assert len(resumed) == 1 and resumed.get(1) is None and path.read_text().endswith("\n")
    resumed.add(1, 11)
    assert [v for v in read_jsonl(path)][1:] == [{"key": 0, "value": 10}, {"key": 1, "value": 11}]

    other = tmp_path / "results.json"
    other.write_text(json.dumps({"cases": []}) + "\n")
    with pytest.raises(ValueError, match="is not a run log"):
        RunLog(other, {"n": 3})
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"settings": {}}\nnot json\n{"key": 0, "value": 1}\n')
    with pytest.raises(ValueError, match="line 2, is not JSON"):
        read_jsonl(broken)


def test_output_paths_are_checked_before_a_run(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("")
    assert check_output_path(tmp_path / "new" / "deeper", "--out") == tmp_path / "new" / "deeper"
    assert check_output_path(str(tmp_path / "r.json"), "--json", "file") == tmp_path / "r.json"
    for value, kind, message in (("", "dir", "--out is empty; give a folder path"),
                                 ("  ", "file", "--out is empty; give a file path"),
                                 (afile, "dir", f"--out {afile} is an existing file; expected a folder"),
                                 (tmp_path, "file", f"--out {tmp_path} is a folder; expected a file path"),
                                 (afile / "sub" / "x.json", "file", f"lies under {afile}, which is a file"),
                                 (tmp_path / "x", "folder", "kind = 'folder' must be 'dir' or 'file'")):
        with pytest.raises(ValueError, match=message):
            check_output_path(value, "--out", kind)
    assert not (tmp_path / "new").exists()  # a check creates nothing


def test_read_json_names_the_file_and_what_it_should_be(tmp_path):
    good, image, broken = tmp_path / "a.json", tmp_path / "b.png", tmp_path / "c.json"
    good.write_text('{"a": [1, 2]}')
    image.write_bytes(b"\x89PNG\r\n\x1a\n")
    broken.write_text('{"a": 1,\n}')
    assert read_json(good) == {"a": [1, 2]}
    with pytest.raises(ValueError, match=f"^{image} is not a settings file: it is not UTF-8 text$"):
        read_json(image, "settings file")
    with pytest.raises(ValueError, match=f"^{broken} is not a JSON file: invalid JSON at line 2, column 1"):
        read_json(broken)
    with pytest.raises(FileNotFoundError):
        read_json(tmp_path / "missing.json")


def test_file_sha256(tmp_path):
    data = bytes(range(256)) * 9000  # more than one read chunk
    (tmp_path / "f").write_bytes(data)
    assert file_sha256(tmp_path / "f") == hashlib.sha256(data).hexdigest()


class _Crash(Exception):
    pass


def _crash_after(monkeypatch, n: int) -> list[int]:
    """Make the n+1-th episode of a cohort run raise, as a crash would; returns the episodes begun."""
    begun: list[int] = []
    real = rtenv.rollout.run_episode

    def episode(env, policy, seed=None, options=None):
        begun.append(options["index"])
        if len(begun) > n:
            raise _Crash
        return real(env, policy, seed=seed, options=options)

    monkeypatch.setattr(rtenv.rollout, "run_episode", episode)
    return begun


@pytest.mark.slow
def test_evaluate_resumes_after_a_crash(tmp_path, monkeypatch, capsys):
    args = ["evaluate", "--policy", "acer:default", "--scenario", "S1", "--cases", "3", "--max-steps", "4"]
    whole = tmp_path / "whole.json"
    assert main([*args, "--json", str(whole)]) == 0
    assert not (tmp_path / "whole.json.partial.jsonl").exists()  # removed once the JSON is written

    cut = tmp_path / "cut.json"
    with monkeypatch.context() as m:
        begun = _crash_after(m, 2)
        with pytest.raises(_Crash):
            main([*args, "--json", str(cut)])
    assert begun == [0, 1, 2] and not cut.exists()
    partial = tmp_path / "cut.json.partial.jsonl"
    assert [line["key"] for line in read_jsonl(partial)[1:]] == [0, 1]

    assert main([*args, "--max-steps", "5", "--json", str(cut)]) == 2  # other settings: refused, not mixed
    assert "max_steps: 4 there, 5 now" in capsys.readouterr().err
    begun = _crash_after(monkeypatch, 99)
    assert main([*args, "--json", str(cut)]) == 0
    assert begun == [2]  # only the episode that had not finished
    assert "resuming: 2 episodes already run" in capsys.readouterr().out
    assert json.loads(cut.read_text()) == json.loads(whole.read_text())
    assert not partial.exists()


@pytest.mark.slow
def test_search_knowledge_export_resumes_after_a_crash(tmp_path, monkeypatch):
    import knowledge_extraction.knowledge as kn
    import rtenv.search  # the export imports search_episode from here when it runs

    calls: list[tuple] = []
    search_episode = rtenv.search.search_episode

    def counted(core, case_key, *a, **k):
        calls.append(case_key)
        if len(calls) == 2 and crash:
            raise _Crash
        return search_episode(core, case_key, *a, **k)

    monkeypatch.setattr(rtenv.search, "search_episode", counted)
    log_settings = {"scenario": "S1", "cases": 3}
    crash = False
    whole, _ = kn.export_search_knowledge("S1", "test", generations=3, cases=3,
                                          log=RunLog(tmp_path / "a", log_settings))
    crash = True
    calls.clear()
    with pytest.raises(_Crash):
        kn.export_search_knowledge("S1", "test", generations=3, cases=3, log=RunLog(tmp_path / "b", log_settings))
    crash = False
    calls.clear()
    resumed, _ = kn.export_search_knowledge("S1", "test", generations=3, cases=3,
                                            log=RunLog(tmp_path / "b", log_settings))
    assert calls == [("test", 1), ("test", 2)]
    for kb in (whole, resumed):
        kb["source"].pop("created")
    assert resumed == whole


def test_write_atomic_leaves_the_old_file_or_the_new_one(tmp_path, monkeypatch):
    import rtenv.runlog

    path = tmp_path / "settings.json"
    write_atomic(path, '{"a": 1}')
    assert path.read_text() == '{"a": 1}'

    def killed(src, dst):  # a kill between writing the new text and the rename
        raise KeyboardInterrupt

    monkeypatch.setattr(rtenv.runlog.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        write_atomic(path, '{"a": 2, "b": "a longer text"}')
    assert path.read_text() == '{"a": 1}' and [p.name for p in tmp_path.iterdir()] == ["settings.json"]


def test_settings_changes_name_each_difference_once():
    before, now = {"seed": 0, "device": None, "cases": [1, 2]}, {"seed": 1, "cases": [1, 2], "extra": True}
    assert settings_changes(before, now) == ["device: None there, '(absent)' now", "extra: '(absent)' there, True now",
                                             "seed: 0 there, 1 now"]
    assert settings_changes(before, now, keys=("seed", "cases", "unknown")) == ["seed: 0 there, 1 now"]
    assert settings_changes(now, json.loads(json.dumps(now))) == []
