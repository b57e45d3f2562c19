"""mlx-grpo: GRPO (DeepSeek-R1-Zero's reinforcement learning) for language models on Apple's MLX."""

__version__ = "0.1.0"
