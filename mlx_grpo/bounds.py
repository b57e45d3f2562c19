"""The shortest time each stage of a GRPO step could take on this machine: the work the step did,
counted in FLOPs and bytes, over the limits ``limits.py`` measured.

What is counted (``ModelCost`` per token, ``positions``/``continuations`` per pass):

- a forward pass over a token costs 2 FLOPs per parameter of the transformer body (every
  parameter but the input embedding table, whose lookup does no arithmetic, and the output head),
  2 per parameter of the output head at each position whose logits are needed, and 4 x the query
  width (heads x head dim, summed over layers) per key attended (q.k and the weighted values).
  Quantized weights count as the parameters they stand for; LoRA/DoRA parameters count like any
  other (2 FLOPs each per token: x A, then B);
- prompts: each distinct prompt runs once and the prefix all of them share runs once (the same
  computation as every prompt whole, as ``prefill.py`` runs it);
- a completion of n tokens continues its prompt with n - 1 positions (its last token is only
  sampled or scored, never fed back);
- generate: a prefill pass over the prompts (logits at each prompt's last position), then decode
  steps: the longest completion - 1 of them, each reading every weight once (as held in memory:
  quantized, float32, ...) and each row reading its own keys and values (the prompt's included:
  the cache is repeated for a group's rows); the logits of every decoded position;
- score: one pass over the rows in the update per policy scored, as ``learner.score_batch`` runs
  them: the KL reference when beta > 0, the sampling policy when num_iterations > 1 (none: no
  bound); logits at each completion position;
- update: num_iterations times the same forward, then its backward pass: through the
  activations (as much again: each matmul's input gradient) and, for full fine-tuning only, the
  weight gradients (as much again). So 2 x a forward with adapters on a frozen base (their own
  weight gradients are too small to count), 3 x with ``adapter.type: full``; the weights are
  read in the forward and again in the backward.

Not counted, so the bound stays below anything the step could do: rows padded to a batch's
longest row, finished rows still decoded until they are compacted out, micro-batches re-running
their rows' prompts, recomputation (``grad_checkpoint``, the output head under ``mx.checkpoint``
in scoring), the copies of a prompt's cache for its rows, the optimizer step, norms, activations
and softmaxes. Each pass is bound by its arithmetic or by its reads, whichever takes longer at
the measured limits (the roofline); a stage's bound is the sum over its passes. A KL reference
model of its own (``policy.reference``) is counted like the policy. Layers with a sliding window
are counted as attending every earlier key (more than they read), and layers without ``q_proj``,
``k_proj`` and ``v_proj`` (fused projections) add no attention work at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, NamedTuple, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .config import Config

STAGES = ("generate", "score", "update")


def _own_arrays(module: nn.Module) -> Dict[str, mx.array]:
    """The arrays a module holds itself (not its children's)."""
    return {k: v for k, v in module.items() if isinstance(v, mx.array)}


def logical_parameters(module: nn.Module) -> int:
    """Parameters of ``module`` and its children, quantized weights counted as the values they
    stand for (a 4-bit ``QuantizedLinear``'s packed uint32 word holds 8; its scales and biases
    are not parameters of the model it stands for)."""
    total = 0
    for _, m in module.named_modules():
        own = _own_arrays(m)
        bits = getattr(m, "bits", None)
        if bits and "weight" in own:
            total += own["weight"].size * 32 // bits
            total += own["bias"].size if "bias" in own else 0
        else:
            total += sum(v.size for v in own.values())
    return total


def parameter_bytes(module: nn.Module) -> int:
    """Bytes of every array of ``module`` and its children as held in memory (packed weights,
    their scales and biases included)."""
    return sum(v.nbytes for _, m in module.named_modules() for v in _own_arrays(m).values())


def _out_features(module: nn.Module) -> int:
    """Output width of a linear layer, or of the one inside an adapter (``.linear``); 0 if none."""
    for m in (module, getattr(module, "linear", None)):
        w = getattr(m, "weight", None) if m is not None else None
        if isinstance(w, mx.array) and w.ndim == 2:
            return int(w.shape[0])
    return 0


def _activation_bytes(model: nn.Module) -> int:
    """Bytes per value of the activations (and so of the KV cache): the embedding's output dtype
    (a quantized embedding's scales' dtype)."""
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    for name in ("scales", "weight"):
        a = getattr(embed, name, None)
        if isinstance(a, mx.array) and mx.issubdtype(a.dtype, mx.floating):
            return a.dtype.size
    return 4


@dataclass(frozen=True)
class ModelCost:
    """What one token costs a model (see the module docstring).

    body_params: parameters used on every position (all but the input embedding and the head);
    head_params: the output head's (vocabulary x hidden), used where logits are needed;
    weight_bytes: what one decode step reads of the weights (all of them, as held in memory, but
        an untied input embedding table, of which it reads a row per token);
    attention_width: heads x head dim summed over layers (0 when the layers have no ``q_proj``);
    kv_bytes: one token's keys and values over all layers (0 when they have no ``k_proj``/``v_proj``).
    """

    body_params: int
    head_params: int
    weight_bytes: int
    attention_width: int
    kv_bytes: int

    def forward_flops(self, tokens: float, head_positions: float, context: float) -> float:
        """FLOPs of a forward pass over ``tokens`` positions, ``head_positions`` of them through
        the output head, attending ``context`` keys in all (summed over the positions)."""
        matmuls = 2.0 * (self.body_params * tokens + self.head_params * head_positions)
        return matmuls + 4.0 * self.attention_width * context


def model_cost(model: nn.Module) -> ModelCost:
    """``ModelCost`` of an mlx-lm decoder (the transformer in ``model.model`` with its
    ``embed_tokens``; the head ``lm_head`` or, tied, the embedding). Without that layout every
    parameter counts as body and the head as nothing."""
    total, total_bytes = logical_parameters(model), parameter_bytes(model)
    inner = getattr(model, "model", None)
    embed = getattr(inner, "embed_tokens", None) if inner is not None else None
    lm_head = getattr(model, "lm_head", None)
    embed_params = logical_parameters(embed) if embed is not None else 0
    if lm_head is not None:  # untied: the embedding is a lookup, the head a matmul of its own
        head_params = logical_parameters(lm_head)
        body = total - embed_params - head_params
        weight_bytes = total_bytes - (parameter_bytes(embed) if embed is not None else 0)
    else:  # tied (or no embedding found): the embedding table is the head
        head_params = embed_params
        body = total - embed_params
        weight_bytes = total_bytes
    attention = kv = 0
    for name, m in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "q_proj":
            attention += _out_features(m)
        elif leaf in ("k_proj", "v_proj"):
            kv += _out_features(m)
    return ModelCost(body, head_params, weight_bytes, attention, kv * _activation_bytes(model))


class Positions(NamedTuple):
    """The positions of (part of) a forward pass: ``tokens`` run through the body, attending
    ``context`` keys in all (each position attends itself and everything before it)."""

    tokens: int
    context: int


def _triangle(n: int) -> int:
    return n * (n + 1) // 2


def positions(prompts: Sequence[Sequence[int]]) -> Positions:
    """The prompt positions a pass has to run: each distinct prompt once, and the prefix every
    one of them starts with once (capped so each keeps a token of its own, which predicts its
    first completion token)."""
    distinct = sorted({tuple(p) for p in prompts if len(p)})
    if not distinct:
        return Positions(0, 0)
    shared = 0
    if len(distinct) > 1:
        shortest = min(len(p) for p in distinct)
        while shared < shortest - 1 and all(p[shared] == distinct[0][shared] for p in distinct):
            shared += 1
    tokens = shared + sum(len(p) - shared for p in distinct)
    context = _triangle(shared) + sum(_triangle(len(p)) - _triangle(shared) for p in distinct)
    return Positions(tokens, context)


def continuations(prompt_lengths: Sequence[int], lengths: Sequence[int]) -> Positions:
    """The completion positions of rows continuing their prompts: a row of n tokens after a
    prompt of L runs n - 1 of them (positions L + 1 ... L + n - 1, each attending that many keys)."""
    L = np.asarray(prompt_lengths, dtype=np.int64)
    n = np.maximum(np.asarray(lengths, dtype=np.int64) - 1, 0)
    context = n * L + n * (n + 1) // 2
    return Positions(int(n.sum()), int(context.sum()))


class Phase(NamedTuple):
    """One pass (or a run of them) of a stage: its FLOPs and the bytes it has to read (a tuple,
    so a step's metrics that carry it stay JSON-ready)."""

    flops: float
    bytes: float

    def seconds(self, limits: Dict[str, float]) -> float:
        """The roofline: the arithmetic at the matmul peak or the reads at the bandwidth,
        whichever takes longer."""
        return max(self.flops / (limits["matmul_gflops"] * 1e9), self.bytes / (limits["bandwidth_gbs"] * 1e9))

    def limited_by(self, limits: Dict[str, float]) -> str:
        return "matmul" if self.flops / limits["matmul_gflops"] >= self.bytes / limits["bandwidth_gbs"] else "bandwidth"


@dataclass
class Rows:
    """Rows of a pass: the prompts' real tokens (no padding), each row's prompt index and its
    completion length in tokens."""

    prompts: List[List[int]]
    row_prompt: List[int]
    lengths: List[int]

    @classmethod
    def of(cls, prompt_tokens: mx.array, left_padding: Sequence[int], row_prompt: Sequence[int],
           lengths: Sequence[int]) -> "Rows":
        """From a left-padded prompt batch (``Rollouts``/``StepBatch`` layout)."""
        padded = np.array(prompt_tokens).tolist()
        return cls([row[p:] for row, p in zip(padded, left_padding)],
                   [int(i) for i in row_prompt], [int(n) for n in lengths])

    def used_prompts(self) -> List[List[int]]:
        return [self.prompts[i] for i in sorted(set(self.row_prompt))]

    def continuations(self) -> Positions:
        return continuations([len(self.prompts[i]) for i in self.row_prompt], self.lengths)


def rollout_phases(cost: ModelCost, rows: Rows) -> List[Phase]:
    """A rollout's prefill and decode (``Rows`` of every completion sampled)."""
    used = rows.used_prompts()
    p = positions(used)
    distinct = len({tuple(x) for x in used})  # logits at each distinct prompt's last position
    prefill = Phase(cost.forward_flops(p.tokens, distinct, p.context), cost.weight_bytes)
    c = rows.continuations()
    steps = max(rows.lengths, default=1) - 1
    decode = Phase(cost.forward_flops(c.tokens, c.tokens, c.context),
                   steps * cost.weight_bytes + c.context * cost.kv_bytes)
    return [prefill, decode] if steps > 0 else [prefill]


def forward_pass(cost: ModelCost, rows: Rows) -> Phase:
    """One scoring forward over ``rows``: prompts and completions, logits at every completion token."""
    p, c = positions(rows.used_prompts()), rows.continuations()
    return Phase(cost.forward_flops(p.tokens + c.tokens, sum(rows.lengths), p.context + c.context), cost.weight_bytes)


def step_phases(cost: ModelCost, rollouts: Sequence[Rows], update_rows: Optional[Rows],
                cfg: Config) -> Dict[str, List[Phase]]:
    """Every stage's passes for a step that sampled ``rollouts`` (more than one under dynamic
    sampling) and updated on ``update_rows`` (None: no row in the loss)."""
    out: Dict[str, List[Phase]] = {"generate": [ph for r in rollouts for ph in rollout_phases(cost, r)],
                                   "score": [], "update": []}
    if update_rows is None or not update_rows.lengths:
        return out
    fwd = forward_pass(cost, update_rows)
    passes = int(cfg.grpo.beta > 0) + int(cfg.grpo.num_iterations > 1)
    out["score"] = [fwd] * passes
    factor = 3.0 if cfg.adapter.type == "full" else 2.0
    out["update"] = [Phase(factor * fwd.flops, 2.0 * fwd.bytes)] * cfg.grpo.num_iterations
    return out


def stage_bound(phases: Sequence[Phase], limits: Dict[str, float]) -> Dict[str, Any]:
    """A stage's bound in seconds, its FLOPs and bytes, and the limit of its longest pass."""
    if not phases:
        return {"bound_s": 0.0, "gflop": 0.0, "gb": 0.0, "limited_by": None}
    longest = max(phases, key=lambda ph: ph.seconds(limits))
    return {
        "bound_s": sum(ph.seconds(limits) for ph in phases),
        "gflop": sum(ph.flops for ph in phases) / 1e9,
        "gb": sum(ph.bytes for ph in phases) / 1e9,
        "limited_by": longest.limited_by(limits),
    }


def bounds_report(measured: Dict[str, float], phases: Sequence[Dict[str, List[Phase]]],
                  limits: Dict[str, float]) -> Dict[str, Dict[str, Any]]:
    """{stage: measured_s, bound_s, ratio, gflop, gb, limited_by} for the steps whose passes are
    ``phases`` and whose median stage times are ``measured``; bounds and work are medians over
    the steps, ratio = measured / bound (None where the stage had no work: no bound)."""
    out: Dict[str, Dict[str, Any]] = {}
    for stage in STAGES:
        per_step = [stage_bound(p[stage], limits) for p in phases]
        mid = {k: float(np.median([s[k] for s in per_step])) for k in ("bound_s", "gflop", "gb")}
        bound = mid["bound_s"]
        out[stage] = {"measured_s": measured[stage], "bound_s": bound,
                      "ratio": measured[stage] / bound if bound > 0 else None,
                      "gflop": mid["gflop"], "gb": mid["gb"], "limited_by": per_step[0]["limited_by"]}
    return out


def limits_line(limits: Dict[str, float]) -> str:
    """A Markdown table row: the limits measured."""
    return (f"| machine limits (measured now, float32) | memory {limits['bandwidth_gbs']:.1f} GB/s, "
            f"matmul {limits['matmul_gflops']:.0f} GFLOP/s |")


def bound_lines(bounds: Dict[str, Dict[str, Any]], label: str = "") -> List[str]:
    """Markdown table rows: each stage's measured s, bound s and their ratio (``label`` before
    the stage's name, e.g. which step)."""
    lines = []
    for stage in STAGES:
        b = bounds[stage]
        name = f"{label}{stage}: measured / bound at the limits"
        if b["ratio"] is None:
            lines.append(f"| {name} | {b['measured_s']:.3f} s / none (no pass to count) |")
            continue
        lines.append(f"| {name} | {b['measured_s']:.3f} / {b['bound_s']:.4f} s (**{b['ratio']:.1f}x**; "
                     f"{b['gflop']:.2f} GFLOP, {b['gb']:.3f} GB; {b['limited_by']}-bound) |")
    return lines
