"""Figures: DVH curves and axial dose slices, written as PNG files (never shown interactively).

Figures are built as :class:`matplotlib.figure.Figure` objects without pyplot, so importing this
module leaves the caller's matplotlib backend alone and a figure is freed with its last reference.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps, patheffects
from matplotlib.figure import Figure

from rtenv.case import PlanningCase
from rtenv.evaluation import cumulative_dvh, dose_at_volume_percent

STRUCTURE_COLORS = {
    "PTV": "tab:red", "Bladder": "tab:olive", "Rectum": "tab:brown", "FemoralHead_L": "tab:purple",
    "FemoralHead_R": "tab:pink", "Liver": "tab:orange", "Heart": "tab:blue",
}


_COLORS_BY_KEY = {name.lower(): colour for name, colour in STRUCTURE_COLORS.items()}


def _color(name: str, i: int) -> str:
    """A structure's colour by name, in any case (TPP names lower-case the organs'); else the
    ``i``-th of the default cycle."""
    return _COLORS_BY_KEY.get(name.lower(), f"C{i % 10}")


_LINE_STYLES = ("-", "--", ":", "-.")


def draw_dvh(ax: Any, case: PlanningCase, doses: Mapping[str, np.ndarray], legend_fontsize: float = 8) -> None:
    """Draw cumulative DVHs on ``ax``: every structure of each plan (``label -> dose vector`` in Gy;
    plans after the first dashed), the prescription line and each plan's target D95 point; the
    legend sits outside the axes, to the right, so that it hides no curve."""
    finite = {str(label): _finite_dose(d, f"dose {label!r}") for label, d in doses.items()}
    if not finite:
        raise ValueError("doses is empty: give one dose vector (Gy) or a mapping label -> dose vector")
    plans = {label: case.structure_doses(d) for label, d in finite.items()}
    rx = case.prescription_gy
    top = max(float(d.max()) for d in finite.values())  # over every dose row, the slice's body voxels too
    grid = np.linspace(0.0, max(top, rx) * 1.05, 400)
    target = case.target.name
    for p, by_structure in enumerate(plans.values()):
        ls = _LINE_STYLES[p % len(_LINE_STYLES)]
        for i, (name, d) in enumerate(by_structure.items()):
            ax.plot(grid, 100 * cumulative_dvh(d, grid), color=_color(name, i), ls=ls,
                    label=name if p == 0 else None)
    ax.axvline(rx, color="0.4", lw=0.9, ls=":", label=f"Rx {rx:g} Gy")
    for p, (label, by_structure) in enumerate(plans.items()):
        d95 = dose_at_volume_percent(by_structure[target], 95.0)  # as the protocols measure it
        ax.plot([d95], [95.0], marker="osD^v"[p % 5], ms=5, mfc="none", color="k", ls="none",
                label=f"{target} D95 = {d95:.2f} Gy" + (f" ({label})" if len(plans) > 1 else ""))
    ax.set_xlabel("dose (Gy)")
    ax.set_ylabel("volume (%)")
    ax.set_ylim(0, 102)
    ax.set_xlim(0, grid[-1])
    ax.grid(alpha=0.3)
    if len(plans) > 1:
        for p, label in enumerate(plans):
            ax.plot([], [], color="k", ls=_LINE_STYLES[p % len(_LINE_STYLES)], label=label)
    ax.legend(fontsize=legend_fontsize, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)


def plot_dvh(
    case: PlanningCase, doses: Mapping[str, np.ndarray] | np.ndarray, path: str | Path,
    title: str | None = None, subtitle: str | None = None,
) -> Path:
    """Cumulative DVHs of every structure, with the prescription and the target's D95.

    Args:
        case: The case (for structure names and the prescription).
        doses: One plan's dose (a vector over dose rows in Gy) or several, ``label -> vector``;
            plans after the first are drawn dashed.
        path: PNG file to write (``.png``).
        title: Figure title; default: the case name and its prescription.
        subtitle: A second title line (e.g. the plan's score), under the title.
    """
    path = _png_path(path)
    if not isinstance(doses, Mapping):
        doses = {"plan": doses}
    fig, ax = new_figure(figsize=(8.5, 4.5))
    draw_dvh(ax, case, doses)
    head = title or f"{case.name}: DVH (Rx {case.prescription_gy:g} Gy)"
    ax.set_title(head + (f"\n{subtitle}" if subtitle else ""), fontsize=10)
    return save_figure(fig, path)


def plot_dose_slice(case: PlanningCase, dose: np.ndarray, path: str | Path, title: str | None = None,
                    subtitle: str | None = None) -> Path:
    """Axial dose colour-wash (Gy) with structure outlines, on the slice through the isocentre
    (the case's ``metadata["iso_slice"]``; without it, as in imported cases, the slice with the
    largest target cross-section).

    The colour scale runs to 110 % of the prescription; hotter voxels are drawn magenta (the colour
    bar's arrow) and the slice's maximum dose is given beside the bar. Only voxels that are dose
    rows carry dose; built-in cases include every body voxel of that slice. ``title`` replaces the
    default (case, slice); ``subtitle`` adds a second line.
    """
    k = case.metadata.get("iso_slice")
    if k is None:
        k = int(np.argmax(case.mask(case.target.name).sum(axis=(1, 2))))
    path = _png_path(path)
    grid = case.dose_grid(_finite_dose(dose, "dose"))[k]
    dz, dy, dx = case.voxel_mm
    ny, nx = grid.shape
    origin = case.metadata.get("grid_origin_mm", [0.0, 0.0, 0.0])
    extent = (origin[0] - dx / 2, origin[0] + (nx - 0.5) * dx, origin[1] - dy / 2, origin[1] + (ny - 0.5) * dy)
    fig, ax = new_figure(figsize=(7, 5))
    if case.density is not None:
        ax.imshow(case.density[k], cmap="gray", origin="lower", extent=extent, vmin=0, vmax=1.8)
    rx = case.prescription_gy
    masked = np.ma.masked_where(~np.isfinite(grid) | (grid < 0.1 * rx), grid)
    top = float(np.nanmax(grid)) if np.isfinite(grid).any() else None  # None: no dose row on this slice
    cmap = colormaps["jet"].with_extremes(over="magenta")
    im = ax.imshow(masked, cmap=cmap, origin="lower", extent=extent, alpha=0.55, vmin=0, vmax=1.1 * rx)
    xs = origin[0] + dx * np.arange(nx)
    ys = origin[1] + dy * np.arange(ny)
    # the target's contour on top and each one drawn under it a little wider, so that contours
    # sharing an edge (a ring around the PTV, a core against it) all show; a white rim keeps a
    # contour visible on a wash of its own colour (the red PTV on the high-dose red)
    slices = [(i, s, case.mask(s.name)[k]) for i, s in enumerate(case.structures)]
    shown = [(i, s, m) for i, s, m in slices if m.any()]
    for depth, (i, s, m) in enumerate(reversed(shown)):
        width = 1.6 + 1.0 * (len(shown) - 1 - depth)
        ax.contour(xs, ys, m.astype(float), levels=[0.5], colors=_color(s.name, i), linewidths=width,
                   zorder=3 + depth, path_effects=[patheffects.withStroke(linewidth=width + 1.0, foreground="w")])
    for i, s, _ in shown:
        ax.plot([], [], color=_color(s.name, i), label=s.name)
    fig.colorbar(im, ax=ax, label="dose (Gy); " + ("no dose on this slice" if top is None else
                                                   f"slice maximum {top:.1f} Gy"),
                 extend="max" if top is not None and top > 1.1 * rx else "neither")
    ax.set_xlabel("x, patient left (mm)")
    ax.set_ylabel("y, anterior (mm)")
    ax.legend(fontsize=7, loc="lower right")
    head = title or f"{case.name}: axial dose at isocentre (slice {k}), Rx {rx:g} Gy"
    ax.set_title(head + (f"\n{subtitle}" if subtitle else ""), fontsize=10)
    return save_figure(fig, path)


def _finite_dose(dose: Any, label: str) -> np.ndarray:
    arr = np.asarray(dose, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{label} contains NaN or inf values")
    return arr


def _png_path(path: str | Path) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"figure path {str(path)!r} must end in .png (figures are written as PNG)")
    return path


def new_figure(nrows: int = 1, ncols: int = 1, figsize: tuple[float, float] = (7, 4.5), dpi: int = 110,
               layout: str | None = None, **subplots: Any) -> tuple[Figure, Any]:
    """A figure (size in inches) with a grid of axes (further ``Figure.subplots`` arguments), not
    registered with pyplot; ``layout`` is matplotlib's layout engine (default: tight at save)."""
    fig = Figure(figsize=figsize, dpi=dpi, layout=layout)
    return fig, fig.subplots(nrows, ncols, **subplots)


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as a PNG to ``path`` (which must end in ``.png``; parent folders are created)
    and return the path."""
    path = _png_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fig.get_layout_engine() is None:
        fig.tight_layout()
    fig.savefig(path, format="png")
    return path


_TPP_PANELS = (("t", "threshold t (fraction of Rx)", "linear"), ("lambda", "weight lambda", "log"),
               ("V", "volume fraction V", "linear"))


def plot_tpp_trajectory(tpps: Sequence[Mapping[str, float]], path: str | Path,
                        scores: Sequence[float] | None = None, max_score: float | None = None,
                        title: str = "TPPs per step") -> Path:
    """Each TPP's value per step of an episode (step 0: the start), one panel per kind: ``t``
    (fraction of Rx), ``lambda`` (log scale) and ``V`` (fraction of the structure's volume), a
    line per structure in its DVH colour; with ``scores`` (one per step), the plan score in a
    panel above, with ``max_score`` marked. ``tpps``: TPP dicts keyed by :mod:`rtenv.tpp` names
    (``t_PTV``, ``lambda_bladder``, ...), all with the same names."""
    if not tpps:
        raise ValueError("tpps is empty: give one TPP dict per step, the start first")
    names = list(tpps[0])
    for step, tpp in enumerate(tpps):
        if list(tpp) != names:
            raise ValueError(f"step {step} has TPPs {list(tpp)}; step 0 has {names}")
    values = np.array([[float(tpp[n]) for n in names] for tpp in tpps])
    if not np.all(np.isfinite(values)):
        raise ValueError("a TPP value is NaN or inf")
    kinds = [n.split("_", 1)[0] for n in names]
    unknown = sorted({k for k in kinds if k not in ("t", "lambda", "V")})
    if unknown:
        raise ValueError(f"TPP names must start with t_, lambda_ or V_; got kinds {unknown}")
    if scores is not None and len(scores) != len(tpps):
        raise ValueError(f"{len(scores)} scores for {len(tpps)} steps: give one score per step")
    panels = [p for p in _TPP_PANELS if p[0] in kinds]
    rows = len(panels) + (scores is not None)
    fig, axes = new_figure(rows, 1, figsize=(7.5, 1.9 * rows + 0.6), sharex=True, squeeze=False)
    axes = list(axes[:, 0])
    steps = np.arange(len(tpps))
    if scores is not None:
        ax = axes.pop(0)
        ax.plot(steps, scores, marker=".", color="k")
        if max_score is not None:
            ax.axhline(max_score, color="0.4", lw=0.9, ls=":", label=f"full score ({max_score:g})")
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
        ax.set_ylabel("score")
        ax.grid(alpha=0.3)
    structures = list(dict.fromkeys(n.split("_", 1)[1] for n in names))
    for ax, (kind, label, scale) in zip(axes, panels, strict=True):
        for j, name in enumerate(names):
            if kinds[j] == kind:
                structure = name.split("_", 1)[1]
                i = structures.index(structure)  # equal values overlap: hollow markers shrinking per structure
                ax.plot(steps, values[:, j], color=_color(structure, i), label=structure,
                        ls=_LINE_STYLES[i % len(_LINE_STYLES)], marker="osD^v"[i % 5], ms=max(8 - 1.5 * i, 3),
                        mfc="none")
        ax.set_yscale(scale)
        ax.set_ylabel(label, fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    axes[-1].set_xlabel("step")
    axes[-1].xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)
