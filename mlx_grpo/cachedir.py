"""Where mlx-grpo keeps what it builds once and reuses: converted GGUF models, benchmark shapes,
the decode kernel (``$XDG_CACHE_HOME/mlx-grpo``, else ``~/.cache/mlx-grpo``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Optional


def cache_root(env: Optional[Mapping[str, str]] = None) -> Path:
    """``$XDG_CACHE_HOME/mlx-grpo`` (an empty value counts as unset, as the XDG spec says), else
    ``~/.cache/mlx-grpo``; ``env`` defaults to this process's environment."""
    env = os.environ if env is None else env
    return Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mlx-grpo"
