"""Optional experiment trackers (TensorBoard, Weights & Biases), through their own libraries.

Off by default: ``output.log_to: [tensorboard, wandb]`` turns them on. metrics.jsonl is always
written and stays the record; trackers get a copy of every train and eval record.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List

from .config import Config, ConfigError


def _scalars(record: Dict[str, Any], prefix: str) -> Dict[str, float]:
    out = {}
    for k, v in record.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or k == "step":
            continue
        if math.isfinite(v):
            out[f"{prefix}/{k}"] = float(v)
    return out


class _TensorBoard:
    def __init__(self, cfg: Config, out: Path):
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            raise ConfigError(
                "output.log_to: tensorboard needs the tensorboardX package: "
                "pip install 'mlx-grpo[tensorboard]' (or pip install tensorboardX)"
            ) from None
        self.writer = SummaryWriter(logdir=str(out / "tensorboard"))

    def log(self, step: int, scalars: Dict[str, float]) -> None:
        for k, v in scalars.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, cfg: Config, out: Path):
        try:
            import wandb
        except ImportError:
            raise ConfigError(
                "output.log_to: wandb needs the wandb package: pip install 'mlx-grpo[wandb]' "
                "(or pip install wandb)"
            ) from None
        self.run = wandb.init(
            project=cfg.output.wandb_project, name=out.name, dir=str(out), config=cfg.to_dict()
        )

    def log(self, step: int, scalars: Dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


class Trackers:
    """Every configured tracker; ``log`` sends one metrics record to all of them."""

    def __init__(self, cfg: Config, out: Path):
        kinds = {"tensorboard": _TensorBoard, "wandb": _WandB}
        self.active: List[Any] = [kinds[name](cfg, out) for name in cfg.output.log_to]

    def log(self, step: int, record: Dict[str, Any], kind: str = "train") -> None:
        if self.active:
            scalars = _scalars(record, kind)
            for t in self.active:
                t.log(step, scalars)

    def close(self) -> None:
        for t in self.active:
            t.close()
