"""The rtenv command line, run in-process."""

import json

import pytest

from rtenv.cli import main


def test_cases_list(capsys):
    assert main(["cases", "list"]) == 0
    out = capsys.readouterr().out
    for token in ("S1", "S2", "S3", "prostate15", "knowledge", "1000-1019"):
        assert token in out


@pytest.mark.parametrize("scenario,n_structures,n_beams", [("S1", 3, 7), ("S2", 5, 180), ("S3", 3, 7)])
def test_cases_show(capsys, scenario, n_structures, n_beams):
    assert main(["cases", "show", scenario, "--case", "1", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert len(info["structures"]) == n_structures and len(info["beams"]) == n_beams
    assert info["nnz"] > 0 and info["metadata"]["build_seconds"] > 0
    assert main(["cases", "show", scenario, "--case", "1"]) == 0
    assert "nnz" in capsys.readouterr().out


def test_dose_uniform_writes_figures(capsys, tmp_path):
    assert main(["dose", "S1", "--case", "0", "--uniform", "--out", str(tmp_path), "--mode", "binary"]) == 0
    out = capsys.readouterr().out
    assert "PTV hot spot" in out and "total" in out
    for name in ("dvh.png", "dose_slice.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["mode"] == "binary"
    assert all(c["score"] in (0, 1) for c in result["criteria"])


def test_bad_arguments_exit_with_usage(capsys):
    with pytest.raises(SystemExit):
        main(["cases", "show", "S9"])
    assert "invalid choice" in capsys.readouterr().err
