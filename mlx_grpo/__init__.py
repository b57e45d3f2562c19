"""mlx-grpo: GRPO (DeepSeek-R1-Zero's reinforcement learning) for language models on Apple's MLX."""

from . import lanes as _lanes

_lanes.prepare()  # before MLX's first evaluation, which reads the setting it makes (lanes.py)

__version__ = "0.1.0"
