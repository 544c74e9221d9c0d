"""The seed's analyses over sets of final plans: TPP distributions and Spearman correlations.

Works on :class:`rtenv.rollout.EpisodeRecord` dicts (``final_tpp``, ``final_dv_metrics``), so any
policy's results (DRL, LLM, baselines) can be compared. Figures are PNG files.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import rankdata, spearmanr

from rtenv.plots import new_figure, save_figure

EXACT_MAX_N = 8  # 8! = 40 320 pairings


def _exact_p(x: np.ndarray, y: np.ndarray, rho: float, perms: np.ndarray) -> float:
    """Two-sided permutation p-value of Spearman's rho: the fraction of all pairings of the ranks
    (``perms``: every permutation of the plans; ties keep their average ranks) whose |rho| reaches
    the observed one."""
    rx, ry = rankdata(x), rankdata(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    all_rho = (ry[perms] @ rx) / np.sqrt((rx @ rx) * (ry @ ry))
    return float(np.mean(np.abs(all_rho) >= abs(rho) - 1e-12))


def _same_keys(records: Sequence[Mapping[str, Any]], field: str) -> list[str]:
    """The keys of ``field`` that every record has, in the first record's order; records with
    other keys (e.g. of two scenarios) are refused."""
    names = list(records[0][field])
    for i, r in enumerate(records):
        if set(r[field]) != set(names):
            first, this = (repr(records[k].get("case", f"record {k}")) for k in (0, i))
            raise ValueError(f"records differ in their {field}: {this} has {sorted(r[field])}, {first} has "
                             f"{sorted(names)}; correlate the plans of one scenario at a time")
    return names


def spearman_table(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Spearman rho and p-value between every final TPP and every final dose-volume metric.

    Returns ``{"tpps": [...], "metrics": [...], "rho": [[...]], "p": [[...]], "n": N}``; a pair
    where either side is constant over the plans gets NaN. Two-sided p-values are exact (all
    pairings of the ranks) for up to :data:`EXACT_MAX_N` plans, where scipy's t-approximation is
    far off (it gives p = 0 for any perfect correlation, even of 3 plans), and scipy's above.
    Every record must have the same TPPs and metrics.
    """
    if len(records) < 3:
        raise ValueError(f"Spearman correlations need at least 3 plans, got {len(records)}")
    tpps = _same_keys(records, "final_tpp")
    metrics = _same_keys(records, "final_dv_metrics")
    X = np.array([[r["final_tpp"][k] for k in tpps] for r in records], dtype=np.float64)
    Y = np.array([[r["final_dv_metrics"][k] for k in metrics] for r in records], dtype=np.float64)
    perms = np.array(list(itertools.permutations(range(len(records))))) if len(records) <= EXACT_MAX_N else None
    rho = np.full((len(tpps), len(metrics)), np.nan)
    p = np.full_like(rho, np.nan)
    for i in range(len(tpps)):
        for j in range(len(metrics)):
            if np.ptp(X[:, i]) > 0 and np.ptp(Y[:, j]) > 0:
                res = spearmanr(X[:, i], Y[:, j])
                rho[i, j] = float(res.statistic)
                p[i, j] = _exact_p(X[:, i], Y[:, j], rho[i, j], perms) if perms is not None else float(res.pvalue)
    return {"tpps": tpps, "metrics": metrics, "rho": rho.tolist(), "p": p.tolist(), "n": len(records)}


def plot_spearman(table: Mapping[str, Any], path: str | Path, title: str = "Spearman correlation") -> Path:
    """Heatmap of rho (TPPs x metrics), pairs with p < 0.05 (uncorrected for the many pairs) marked
    with an asterisk; grey cells: no rho, as the TPP or the metric did not vary over the plans."""
    rho, p = np.array(table["rho"], dtype=float), np.array(table["p"], dtype=float)
    fig, ax = new_figure(figsize=(max(5.5, 2.0 + 0.6 * len(table["metrics"])), 1.6 + 0.4 * len(table["tpps"])))
    ax.set_facecolor("0.8")
    im = ax.imshow(np.ma.masked_invalid(rho), cmap="coolwarm", vmin=-1, vmax=1)
    ax.set_xticks(range(len(table["metrics"])), table["metrics"], rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(table["tpps"])), table["tpps"], fontsize=7)
    for i, j in zip(*np.nonzero(p < 0.05), strict=True):
        ax.text(j, i, "*", ha="center", va="center", fontsize=9)
    fig.colorbar(im, ax=ax, label="Spearman rho")
    ax.set_title(f"{title} (n = {table['n']})", fontsize=9)
    tests = int(np.isfinite(rho).sum())
    ax.set_xlabel(f"* p < 0.05, uncorrected: about {0.05 * tests:.0f} of these {tests} pairs by chance alone\n"
                  "grey: a TPP or metric that is constant over the plans", fontsize=7)
    return save_figure(fig, path)


def _group_names(groups: Mapping[str, Mapping[str, Sequence[float]]]) -> list[str]:
    """Every name any group has, in first-seen order (a group may lack some: its box is empty)."""
    if not groups:
        raise ValueError("no groups to plot")
    return list(dict.fromkeys(n for values in groups.values() for n in values))


def _grouped_boxes(ax: Any, groups: Mapping[str, Mapping[str, Sequence[float]]], names: Sequence[str]) -> None:
    """One box per group beside each other at each name's position, in the groups' colours."""
    labels = list(groups)
    width = 0.8 / len(labels)
    for g, label in enumerate(labels):
        data = [list(groups[label].get(n, [])) or [np.nan] for n in names]
        pos = np.arange(len(names)) + (g - (len(labels) - 1) / 2) * width
        bp = ax.boxplot(data, positions=pos, widths=width * 0.9, patch_artist=True, showfliers=True,
                        medianprops={"color": "k"}, flierprops={"markeredgecolor": f"C{g}"})
        for box in bp["boxes"]:
            box.set_facecolor(f"C{g}")
            box.set_alpha(0.6)
        ax.plot([], [], color=f"C{g}", lw=6, alpha=0.6, label=label)
    ax.set_xticks(range(len(names)), names, rotation=40, ha="right", fontsize=8)
    ax.grid(alpha=0.3)


_KIND_TITLES = {"t": "dose thresholds t (x Rx)", "lambda": "weights lambda", "V": "volume fractions V"}


def tpp_panels(names: Sequence[str]) -> dict[str, list[str]]:
    """The TPP names by kind, ``{"t": [...], "lambda": [...], "V": [...]}``, kinds without a name
    left out; ``ValueError`` if no name is a TPP's."""
    panels = {kind: [n for n in names if n.split("_", 1)[0] == kind] for kind in _KIND_TITLES}
    panels = {kind: kind_names for kind, kind_names in panels.items() if kind_names}
    if not panels:
        raise ValueError(f"no TPP names (t_*, lambda_*, V_*) to plot among {list(names)}")
    return panels


def plot_tpp_distributions(groups: Mapping[str, Mapping[str, Sequence[float]]], path: str | Path,
                           title: str = "final TPP distributions") -> Path:
    """Box plots of each TPP per group (e.g. policy -> {tpp name: values}), one panel per kind
    that any group has (t, lambda on a log scale, V), as the seed's Fig. 2 and Fig. 5."""
    panels = tpp_panels(_group_names(groups))
    fig, axes = new_figure(1, len(panels), figsize=(4.4 * len(panels), 4), squeeze=False)
    for ax, (kind, kind_names) in zip(axes[0], panels.items(), strict=True):
        _grouped_boxes(ax, groups, kind_names)
        if kind == "lambda":
            ax.set_yscale("log")
        ax.set_title(_KIND_TITLES[kind])
    axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.suptitle(title)
    return save_figure(fig, path)


def metric_panels(metrics: Sequence[str], units: Mapping[str, str] | None = None) -> dict[str, list[str]]:
    """The metrics by unit, ``{"Gy": [...], "%": [...], "cc": [...]}`` (empty units left out):
    ``units`` gives a metric's unit; one it does not name is in % when its name has a
    ``V<number>`` word (``Bladder V70Gy``), else in Gy."""
    units = units or {}
    bad = {m: u for m, u in units.items() if u not in _AXIS_LABELS}
    if bad:
        raise ValueError(f"units {bad} are invalid; valid: {', '.join(map(repr, _AXIS_LABELS))}")
    unit = {m: units.get(m, "%" if re.search(r"\bV\d", m) else "Gy") for m in metrics}
    panels = {u: [m for m in metrics if unit[m] == u] for u in _AXIS_LABELS}
    return {u: names for u, names in panels.items() if names}


_AXIS_LABELS = {"Gy": "Gy", "%": "% of the structure volume", "cc": "cm$^3$"}


def plot_metric_distributions(groups: Mapping[str, Mapping[str, Sequence[float]]], path: str | Path,
                              title: str = "final dose-volume metrics",
                              units: Mapping[str, str] | None = None) -> Path:
    """Box plots of each dose-volume metric per group (e.g. policy -> {metric: values}), one panel
    per unit (Gy, %, cc), as the seed's Fig. 4 (organ dose-volume mean and spread per agent).

    ``units`` gives each metric's unit (``"Gy"``, ``"%"`` or ``"cc"``, e.g. from the protocol's criteria;
    see :func:`metric_panels` for the others).
    """
    panels = metric_panels(_group_names(groups), units)
    if not panels:
        raise ValueError("no dose-volume metrics to plot")
    fig, axes = new_figure(1, len(panels), figsize=(6.5 * len(panels), 4), squeeze=False)
    for ax, (unit, names) in zip(axes[0], panels.items(), strict=True):
        _grouped_boxes(ax, groups, names)
        ax.set_ylabel(_AXIS_LABELS[unit])
    axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.suptitle(title)
    return save_figure(fig, path)
