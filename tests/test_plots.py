"""Figures are PNG files written without pyplot: the caller's backend is left alone, nothing leaks."""

import subprocess
import sys

import numpy as np
import pytest
from matplotlib.image import imread

from rtenv.plots import plot_dose_slice, plot_dvh
from rtenv.scenarios import load_case


@pytest.fixture(scope="module")
def case():
    return load_case("S1", "test", 0)


def test_import_keeps_the_callers_backend():
    code = ("import matplotlib; matplotlib.use('svg'); import rtenv.plots, drl.explain, knowledge_extraction.analysis; "
            "print(matplotlib.get_backend())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "svg"


def test_figures_are_png_and_leave_no_open_pyplot_figures(case, tmp_path):
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    dose = np.linspace(0.0, 1.1 * case.prescription_gy, case.n_rows)
    dvh = plot_dvh(case, {"a": dose, "b": 0.9 * dose}, tmp_path / "dvh.png")
    sl = plot_dose_slice(case, dose, tmp_path / "slice.png")
    for path in (dvh, sl):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and imread(path).shape[0] > 100
    assert plt.get_fignums() == before


@pytest.mark.parametrize("doses, path, message", [
    ("nan", "dvh.png", "dose 'plan' contains NaN"),
    ("ok", "dvh.pdf", r"must end in \.png"),
    ("ok", "dvh", r"must end in \.png"),
    ({}, "dvh.png", "doses is empty"),
    ("short", "dvh.png", "dose has shape"),
])
def test_plot_dvh_rejects_bad_input(case, tmp_path, doses, path, message):
    dose = np.full(case.n_rows, case.prescription_gy)
    doses = {"nan": np.where(np.arange(case.n_rows) % 2, np.nan, dose), "ok": dose, "short": dose[:-1]}.get(
        doses, doses) if isinstance(doses, str) else doses
    with pytest.raises(ValueError, match=message):
        plot_dvh(case, doses, tmp_path / path)
    assert not list(tmp_path.iterdir())
