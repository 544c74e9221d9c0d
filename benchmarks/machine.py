"""What a timing ran on, and how much it varied, for the speed benchmarks: timings (and, through
the ratio of fixed to per-plan costs, speedups) differ several-fold between CPU models and by tens
of percent between rounds on a shared machine, so a figure is only read with both beside it."""

from __future__ import annotations

import platform
from pathlib import Path

import torch


def cpu_model(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """The CPU's model as Linux's ``/proc/cpuinfo`` gives it: its ``model name`` (x86), ``cpu``
    (POWER), ``Model`` or ``Hardware`` (boards), else the architecture with the ARM ``CPU
    implementer`` and ``CPU part`` codes; without that file :func:`platform.processor`, or the
    architecture when that is empty."""
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if value.strip():
            fields.setdefault(key.strip(), value.strip())  # the first processor's
    for key in ("model name", "cpu", "Model", "Hardware"):
        if key in fields:
            return fields[key]
    arch = platform.machine() or "unknown CPU"
    if "CPU implementer" in fields and "CPU part" in fields:
        return f"{arch} (CPU implementer {fields['CPU implementer']}, part {fields['CPU part']})"
    return (platform.processor() if not text else "") or arch


def device_name(device: torch.device) -> str:
    """The GPU's name for a CUDA device, the CPU's model otherwise."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


def speedup_spread(ratios: list[float]) -> str:
    """``"; rounds 6.2-7.6x"`` for two or more per-round speedups (what machine noise does to the
    median beside it), nothing otherwise (one round, or a JSON from before rounds were kept)."""
    return f"; rounds {min(ratios):.1f}-{max(ratios):.1f}x" if len(ratios) > 1 else ""
