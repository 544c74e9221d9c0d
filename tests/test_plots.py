"""Figures are PNG files written without pyplot: the caller's backend is left alone, nothing leaks."""

import re
import subprocess
import sys

import numpy as np
import pytest
from matplotlib.image import imread

from rtenv.plots import plot_dose_slice, plot_dvh, plot_tpp_trajectory
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


def test_dvh_marks_rx_and_the_target_d95_and_its_legend_hides_no_curve(case):
    from rtenv.evaluation import dose_at_volume_percent
    from rtenv.plots import draw_dvh, new_figure

    dose = np.linspace(0.5, 1.2, case.n_rows) * case.prescription_gy
    fig, ax = new_figure()
    draw_dvh(ax, case, {"plan": dose})
    d95 = dose_at_volume_percent(case.structure_doses(dose)["PTV"], 95.0)
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == [*case.structure_names, "Rx 79.2 Gy", f"PTV D95 = {d95:.2f} Gy"]
    fig.draw_without_rendering()  # the legend sat on the PTV shoulder, over the Rx line and D95
    assert ax.get_legend().get_window_extent().x0 >= ax.get_window_extent().x1


def test_dose_slice_shows_voxels_above_its_colour_scale(case, tmp_path):
    def magenta_pixels(dose):
        img = imread(plot_dose_slice(case, dose, tmp_path / "slice.png"))[..., :3]
        r, g, b = img[..., 0], img[..., 1], img[..., 2]
        return int(((r - g > 0.5) & (b - g > 0.5)).sum())

    rx = case.prescription_gy
    dose = np.full(case.n_rows, 1.05 * rx)
    assert magenta_pixels(dose) == 0
    dose[case.structure("PTV").rows] = 1.3 * rx  # drawn as 1.1 Rx before: the hot spot did not show
    assert magenta_pixels(dose) > 500


def test_tpp_trajectory_draws_each_tpp_per_step(tmp_path):
    start = {"t_PTV": 1.0, "t_bladder": 1.0, "lambda_PTV": 1.0, "lambda_bladder": 1.0, "V_PTV": 0.1, "V_bladder": 1.0}
    later = {**start, "t_bladder": 0.6, "lambda_PTV": 30.0}
    path = plot_tpp_trajectory([start, later, later], tmp_path / "tpp.png", scores=[5, 7, 9], max_score=9)
    image = imread(path)
    assert image.shape[0] > image.shape[1] > 500  # score panel over three TPP panels
    for tpps, scores, message in (([], None, "tpps is empty"),
                                  ([start, {**start, "t_rectum": 1.0}], None, "step 1 has TPPs"),
                                  ([start, {**start, "t_PTV": float("nan")}], None, "NaN or inf"),
                                  ([{"w_PTV": 1.0}], None, "start with t_, lambda_ or V_"),
                                  ([start, later], [5], "1 scores for 2 steps")):
        with pytest.raises(ValueError, match=re.escape(message)):
            plot_tpp_trajectory(tpps, tmp_path / "bad.png", scores=scores)
