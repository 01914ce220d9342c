"""Training runs side by side: one model, one seed, one data order, different balancing rules.

``train_three_ways`` trains the same configuration with no balancing, with the sequence-wise
auxiliary loss (eqs. 17–20) and with auxiliary-loss-free balancing (the bias update of §2.1.2),
so that MaxVio and validation loss can be compared on equal terms (notebook 02).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from .balance import BALANCE_MODES
from .config import TrainConfig
from .trainer import train

THREE_WAYS = ("none", "aux-loss", "aux-free")


def train_rows(cfg: TrainConfig) -> list[dict]:
    """Run ``train(cfg)`` and return every metrics row it logged, in order."""
    rows: list[dict] = []
    train(cfg, on_log=rows.append)
    return rows


def train_three_ways(
    base: TrainConfig, out_root: str | os.PathLike, modes: tuple[str, ...] = THREE_WAYS
) -> dict[str, list[dict]]:
    """Train ``base`` once per balancing mode into ``out_root/<mode>``; the logged rows per mode.

    Only ``balance`` and ``out`` change between the runs: seed, data order, steps, learning
    rate, γ and α are those of ``base`` (γ only acts in 'aux-free', α only in 'aux-loss').
    """
    unknown = [m for m in modes if m not in BALANCE_MODES]
    if unknown:
        raise ValueError(f"modes {unknown} unknown; allowed: {BALANCE_MODES}")
    root = Path(out_root)
    return {
        mode: train_rows(dataclasses.replace(base, balance=mode, out=str(root / mode)))
        for mode in modes
    }


def tail_mean(rows: list[dict], key: str, fraction: float = 0.5) -> float:
    """Mean of ``key`` over the last ``fraction`` of the rows that hold it: a steadier summary
    of a noisy per-step statistic (MaxVio of one batch) than its last value."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    values = [r[key] for r in rows if r.get(key) is not None]
    if not values:
        raise ValueError(f"no row holds {key!r}")
    tail = values[-max(1, round(len(values) * fraction)) :]
    return sum(tail) / len(tail)
