"""Drawing the next token of every row of a rollout from its log-probabilities.

Two samplers draw from the same distribution, softmax of the (already temperature-scaled)
log-probabilities after mlx-lm's filters (top-p, min-p, top-k):

- on the device, Gumbel-max: argmax(logprobs + Gumbel noise), lazy MLX operations, so a GPU can
  queue the next decode step before this one is read back (``rollout.PIPELINE``);
- on the host, the inverse of the cumulative distribution in NumPy: one uniform per row, the
  first token whose cumulative probability passes it. MLX's CPU backend evaluates ``exp`` and
  ``log`` element by element at ~12 ns, so Gumbel noise over a 49k vocabulary (two logs per
  logit) cost a SmolLM2 decode step 9.5 ms of its ~120 ms for 16 rows; NumPy's vectorised ``exp``
  and one pass of block sums take about a millisecond.

With ``keys`` every row draws from its own PRNG key (``row_keys``), advanced once per token, so a
row's completion does not depend on which other rows decode beside it (several processes, rows
finishing); without, the rows draw from MLX's global PRNG.
"""

from __future__ import annotations

from typing import Optional, Tuple

import mlx.core as mx
import numpy as np

from .config import RolloutConfig

# Logits per block of the host sampler's two-level search: a row's block sums are one vectorised
# pass, then only the chosen block is summed token by token.
BLOCK = 256


def make_sampler(cfg: RolloutConfig, temperature: Optional[float] = None):
    """mlx-lm's sampler (temperature, top-p, top-k, min-p) taking log-probabilities; it divides
    them by ``temperature`` itself (as mlx-lm's generate loops expect)."""
    from mlx_lm.sample_utils import make_sampler as _make

    temp = cfg.temperature if temperature is None else temperature
    return _make(temp=temp, top_p=cfg.top_p if cfg.top_p < 1.0 else 0.0, min_p=cfg.min_p, top_k=cfg.top_k)


def row_keys(key: mx.array, n_prompts: int, group_size: int) -> mx.array:
    """[n_prompts * group_size, 2] PRNG keys, one per row: row g of prompt p gets split g of split
    p of ``key``. A row's key depends on (key, p, g) alone, so a row samples the same completion
    whichever slice of the prompts is decoded together (one process or several)."""
    per_prompt = mx.random.split(key, n_prompts)
    return mx.vmap(lambda k: mx.random.split(k, group_size))(per_prompt).reshape(-1, 2)


def inverse_cdf(logprobs: np.ndarray, u: np.ndarray, block: int = BLOCK) -> np.ndarray:
    """[B] int64: for each row of ``logprobs`` [B, V] (log-probabilities, -inf allowed, each row
    with some finite entry), the first token whose cumulative probability exceeds ``u`` [B] (in
    [0, 1)) times the row's total: a draw from softmax(logprobs) when ``u`` is uniform.

    Two levels: the sums of blocks of ``block`` tokens (one vectorised pass), the block where the
    target falls, then the running sum inside that block alone. A token of probability 0 is
    never returned: the running sum does not pass the target there.
    """
    B, V = logprobs.shape
    nb = -(-V // block)
    p = np.zeros((B, nb * block), dtype=np.float32)  # the tail past V stays 0: never drawn
    np.exp(logprobs, out=p[:, :V])
    blocks = p.reshape(B, nb, block)
    ends = np.cumsum(blocks.sum(axis=2, dtype=np.float64), axis=1)  # [B, nb] cumulative block sums
    total = ends[:, -1]
    target = u.astype(np.float64) * total
    out = np.empty(B, dtype=np.int64)
    for r in range(B):
        # target < total, so some block's end passes it; that block holds mass (NaN rows aside).
        b = min(int(np.searchsorted(ends[r], target[r], side="right")), nb - 1)
        run = (ends[r, b - 1] if b else 0.0) + np.cumsum(blocks[r, b], dtype=np.float64)
        j = int(np.searchsorted(run, target[r], side="right"))
        positive = np.flatnonzero(blocks[r, b])
        # Rounding can leave the block's running sum just short of its end: then its last token with mass.
        out[r] = b * block + min(j, int(positive[-1]) if positive.size else block - 1)
    return out


class Sampler:
    """mlx-lm's filters (top-p, min-p, top-k), then a draw per row: Gumbel-max on the device or
    the inverse CDF on the host (``host``); see the module docstring.

    Called with the temperature-scaled log-probabilities [B, V] of the batch's current rows;
    returns the drawn tokens [B] and their log-probabilities before filtering (what the rollout
    records). ``keys`` [B, 2] gives each row its own stream, advanced on every call; ``keep``
    follows the rows the decode loop keeps. Temperature 0 is greedy.
    """

    def __init__(self, cfg: RolloutConfig, temperature: float, keys: Optional[mx.array] = None, host: bool = False):
        from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

        self.greedy = temperature == 0
        self.keys = keys
        self.host = host
        self.filters = []
        if 0 < cfg.top_p < 1.0:
            self.filters.append(lambda x: apply_top_p(x, cfg.top_p))
        if cfg.min_p:
            self.filters.append(lambda x: apply_min_p(x, cfg.min_p))
        if cfg.top_k:
            self.filters.append(lambda x: apply_top_k(x, cfg.top_k))

    def _noise_keys(self) -> Optional[mx.array]:
        """This draw's key per row (advancing each row's stream), or None: the global PRNG."""
        if self.keys is None:
            return None
        pairs = mx.vmap(lambda k: mx.random.split(k, 2))(self.keys)  # [B, 2, 2]
        self.keys = pairs[:, 0]
        return pairs[:, 1]

    def __call__(self, logprobs: mx.array) -> Tuple[mx.array, mx.array]:
        filtered = logprobs
        for f in self.filters:
            filtered = f(filtered)
        if self.greedy:
            y = mx.argmax(filtered, axis=-1)
        elif self.host:
            y = self._host_draw(filtered)
        else:
            y = self._gumbel_max(filtered)
        return y, mx.take_along_axis(logprobs, y[:, None], axis=-1)[:, 0]

    def _gumbel_max(self, logprobs: mx.array) -> mx.array:
        B, vocab = logprobs.shape
        keys = self._noise_keys()
        if keys is None:
            noise = mx.random.gumbel(shape=(B, vocab))
        else:
            noise = mx.vmap(lambda k: mx.random.gumbel(shape=(vocab,), key=k))(keys)
        return mx.argmax(logprobs + noise, axis=-1)

    def _host_draw(self, logprobs: mx.array) -> mx.array:
        B = logprobs.shape[0]
        keys = self._noise_keys()
        u = mx.random.uniform(shape=(B,)) if keys is None else mx.vmap(lambda k: mx.random.uniform(key=k))(keys)
        mx.eval(logprobs, u)
        lp = np.asarray(logprobs.astype(mx.float32))  # a view of the evaluated buffer
        return mx.array(inverse_cdf(lp, np.array(u)).astype(np.int32))

    def keep(self, idx: mx.array) -> None:
        if self.keys is not None:
            self.keys = self.keys[idx]
