"""Step 3 of a GRPO step: group-relative advantages, pure NumPy.

A(i) = (r_i - mean(r of its group)) / (std + eps), where std is the group's ("group"), the whole
batch's ("batch", TRL's scale_rewards) or 1 ("none", Dr. GRPO). A group whose rewards are all equal
carries no signal, so its advantages are exactly zero (never NaN, never rounding noise).
"""

from __future__ import annotations

import numpy as np

EPS = 1e-4


def group_advantages(
    rewards: np.ndarray, group_size: int, scale: str = "group", eps: float = EPS
) -> np.ndarray:
    """Advantages for rewards laid out group after group (row = prompt * group_size + g)."""
    r = np.asarray(rewards, dtype=np.float64)
    if r.ndim != 1 or r.size % group_size:
        raise ValueError(f"{r.size} rewards do not split into groups of {group_size}")
    # Rewards beyond float range give inf/NaN advantages without a NumPy warning: the update then
    # sees a non-finite loss and is skipped and counted (trainer.loop), which is the report.
    with np.errstate(over="ignore", invalid="ignore"):
        return _advantages(r.reshape(-1, group_size), r, scale, eps)


def flat_groups(rewards: np.ndarray, group_size: int) -> np.ndarray:
    """[P] bool: the groups whose G rewards are all equal (no learning signal)."""
    groups = np.asarray(rewards).reshape(-1, group_size)
    return groups.max(axis=1) == groups.min(axis=1)


def _advantages(groups: np.ndarray, r: np.ndarray, scale: str, eps: float) -> np.ndarray:
    centered = groups - groups.mean(axis=1, keepdims=True)
    if scale == "group":
        # ddof=0: the population std of the G rewards, as in the paper's formula.
        centered = centered / (groups.std(axis=1, keepdims=True) + eps)
    elif scale == "batch":
        centered = centered / (r.std() + eps)
    elif scale != "none":
        raise ValueError(f"scale must be group, batch or none, got {scale!r}")
    centered[flat_groups(groups, groups.shape[1])] = 0.0
    return centered.reshape(-1).astype(np.float32)
