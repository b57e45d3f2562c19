"""Data parallelism over several processes or machines, on MLX's own distributed engine.

Started with ``mlx.launch -n N -- python cli.py train ...`` (or ``mlx.launch --hostfile``), each
process runs the same command. ``mx.distributed.init()`` connects them (run alone it is a group of
one, and every helper here returns its input unchanged). Each step every process

* draws the same global batch of prompts (same seed, same data) and takes its contiguous share
  (``shard``): a prompt's group of G completions never straddles processes;
* samples, scores and keeps its rows, then ``gather``s every row's reward, length and entropy
  term, so advantages and metrics are computed on the whole batch, exactly as one process would;
* computes its gradient with the loss normalised by the whole step's sizes, so the gradients
  add up (``sum_gradients``) to the single-process gradient, and applies one identical update.

Rank 0 alone writes files; on resume it reads the checkpoint and ``broadcast``s it. A process that
dies closes its sockets: the others' next collective raises and they stop with ``PeerLost``
instead of waiting forever.
"""

from __future__ import annotations

import json
import os
from typing import Any, List, Optional

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from .errors import RunFault
from .config import ConfigError

_group: Optional[mx.distributed.Group] = None

# Test hook: "RANK:STEP" makes process RANK exit (code 3, no message) as step STEP begins.
TEST_EXIT = "MLX_GRPO_TEST_EXIT_AT"


class PeerLost(RunFault, RuntimeError):
    """Another process of the run stopped or died, so this one cannot go on."""


def group() -> mx.distributed.Group:
    """The group of all processes of this run (connected on first use)."""
    global _group
    if _group is None:
        _group = mx.distributed.init()
        shared = _processes_on_this_machine(_group.rank())
        if shared > 1:
            from . import blas

            blas.limit_threads(max(1, (os.cpu_count() or 1) // shared), dict(os.environ))
    return _group


def _processes_on_this_machine(me: int) -> int:
    """How many processes of the run share this machine, read from the ring backend's host list
    (``MLX_HOSTFILE``: one list of "ip:port" per rank); 1 when unknown."""
    try:
        with open(os.environ["MLX_HOSTFILE"]) as f:
            hosts = json.load(f)
        ips = [{a.rsplit(":", 1)[0] for a in h} for h in hosts]
        return sum(1 for x in ips if x == ips[me])
    except (KeyError, OSError, ValueError, TypeError, IndexError, AttributeError):
        return 1


def rank() -> int:
    return group().rank()


def size() -> int:
    return group().size()


def is_main() -> bool:
    """True in the process that writes files and prints (rank 0; the only one when run alone)."""
    return rank() == 0


def check_batch(prompts_per_step: int) -> None:
    """The global batch must split evenly into whole prompt groups per process."""
    n = size()
    if prompts_per_step % n:
        raise ConfigError(
            f"train.prompts_per_step: {prompts_per_step} prompts do not split evenly over {n} "
            f"processes; use a multiple of {n} (the global batch is split, not multiplied)"
        )


def shard(n: int) -> slice:
    """This process's contiguous share of ``n`` items (``n`` divisible by the group size)."""
    per = n // size()
    return slice(rank() * per, (rank() + 1) * per)


def _collect(arr: mx.array, op: str) -> mx.array:
    """Evaluate a collective now, turning a lost peer into ``PeerLost``."""
    try:
        mx.eval(arr)
    except RuntimeError as e:
        raise PeerLost(
            f"rank {rank()}: lost the connection to another process during {op} ({e}); it stopped or "
            "died (see its output); the run stops here"
        ) from None
    return arr


def gather(values: np.ndarray) -> np.ndarray:
    """Every process's ``values`` (the same shape on each) concatenated along axis 0 in rank order.

    Sent as raw bytes, so any dtype (float64 included) arrives bit for bit.
    """
    values = np.ascontiguousarray(values)
    if size() == 1:
        return values
    raw = mx.array(values.reshape(-1).view(np.uint8))
    got = _collect(mx.distributed.all_gather(raw, stream=mx.cpu), "gather")
    return np.array(got).view(values.dtype).reshape(size() * values.shape[0], *values.shape[1:])


def sum_values(values: List[float]) -> np.ndarray:
    """Element-wise sums over processes of a few numbers, in float64, in rank order."""
    return gather(np.asarray(values, dtype=np.float64)[None]).sum(axis=0)


def any_true(flag: bool) -> bool:
    """True on every process when ``flag`` is true on any (e.g. a stop signal seen by one)."""
    return bool(sum_values([float(flag)])[0] > 0)


def broadcast(obj: Any) -> Any:
    """Rank 0's JSON-serialisable ``obj`` on every process (the others' argument is ignored)."""
    if size() == 1:
        return obj
    data = json.dumps(obj).encode() if is_main() else b""
    n = int(sum_values([len(data)])[0])
    buf = np.zeros(n, dtype=np.uint8)
    buf[: len(data)] = np.frombuffer(data, dtype=np.uint8)
    return json.loads(gather(buf)[:n].tobytes().decode())


def broadcast_arrays(tree: Any) -> Any:
    """Rank 0's arrays on every process: a sum in which every other process adds zeros."""
    if size() == 1:
        return tree
    main = is_main()
    out = tree_map(lambda x: mx.distributed.all_sum(x if main else mx.zeros_like(x), stream=mx.cpu), tree)
    return _collect(out, "broadcast of weights")


def sum_gradients(grads: Any) -> Any:
    """The element-wise sum of every process's gradient tree, in one message per dtype.

    Each process's loss is already normalised by the whole step's sizes (rows, tokens,
    micro-batches), so the sum, not the mean, is the single-process gradient.
    """
    if size() == 1:
        return grads
    flat = tree_flatten(grads)
    summed = {}
    for dtype in {v.dtype for _, v in flat}:
        items = [(k, v) for k, v in flat if v.dtype == dtype]
        big = mx.distributed.all_sum(mx.concatenate([v.reshape(-1) for _, v in items]), stream=mx.cpu)
        offsets = np.cumsum([v.size for _, v in items])[:-1].tolist()
        for (k, v), part in zip(items, mx.split(big, offsets)):
            summed[k] = part.reshape(v.shape)
    out = tree_unflatten([(k, summed[k]) for k, _ in flat])
    return _collect(out, "gradient sum")


def test_exit_hook(step: int) -> None:
    """Die abruptly at ``step`` when the test hook names this process (for the dead-peer test)."""
    spec = os.environ.get(TEST_EXIT)
    if spec and spec == f"{rank()}:{step}":
        os._exit(3)
