"""Tripwires: warnings, never stops, for a run that is not learning or learns the wrong thing.

Five signs, each checked on the records the run writes anyway:

- a flat start: every group had equal rewards in each of the first ``START_STEPS`` steps (the
  loss is zero: nothing to learn from), said with the rewards that paid nothing, minutes before
  the flat-groups sign below (a real model's step takes tens of seconds on a laptop);
- flat groups: more than ``FLAT_SHARE`` of the groups had equal rewards for ``FLAT_STEPS``
  steps in a row, so almost no row carries a policy gradient;
- a still model: at step ``STILL_AFTER``, or later until it has moved, a gradient norm that has
  been zero at every step, or adapters whose values have not changed since the run (or resume)
  began;
- reward hacking: the training reward rose while held-out accuracy fell: lenient accuracy below
  its best evaluation's, and strict accuracy no higher than at that evaluation;
- a reward collapse: the training reward (mean of ``REWARD_WINDOW`` steps) fell back to within
  ``COLLAPSE_SHARE`` of the way from its best to its start, after gaining: too large steps (a
  learning rate too high, no KL anchor) undo what was learned; checkpoints from before hold it.

Each warning is said once when its condition begins (again only after it ended and came back),
and written to metrics.jsonl as ``{"kind": "warning", "step", "tripwire", "message"}``.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

FLAT_SHARE = 0.9
FLAT_STEPS = 10
START_STEPS = 3
STILL_AFTER = 3  # step 1 of LoRA can have a zero gradient for some arrays; three cannot
REWARD_WINDOW = 10  # training steps averaged on each side of the reward comparison
ACCURACY_DROP = 0.05  # held-out accuracy this far below its best...
REWARD_RISE = 0.05  # ...while the mean training reward rose this much
# A collapse: the reward's window mean gave back more than half of what it had gained over the
# first window's, after gaining at least COLLAPSE_GAIN x max(1, |best|) (noise on a flat curve is no gain).
COLLAPSE_SHARE = 0.5
COLLAPSE_GAIN = 0.05


def fingerprint(model: nn.Module) -> np.ndarray:
    """Sum and sum of squares of each trainable array: equal fingerprints mean unmoved weights
    (read without a second copy of the weights, which full fine-tuning could not afford)."""
    arrays = [v.astype(mx.float32) for _, v in tree_flatten(model.trainable_parameters())]
    sums = [mx.stack([a.sum(), (a * a).sum()]) for a in arrays]
    return np.array(mx.concatenate(sums)) if sums else np.zeros(0)


class Tripwires:
    """Watches a run's train and eval records; ``train``/``evaluated`` return new warnings."""

    def __init__(self, weights: Optional[Callable[[], np.ndarray]] = None):
        self.weights = weights  # the model's fingerprint now (None: not watched)
        self.start = weights() if weights is not None else None
        self.flat_streak = 0
        self.seen = 0  # steps watched by this process (a resumed run starts again)
        self.flat_start = True
        self.never_paid: Optional[set] = None  # rewards whose mean was 0 at every step so far
        self.still_warned = False
        self.any_gradient = False
        self.hacking = False
        self.rewards: Dict[int, float] = {}
        self.first_window: Optional[float] = None  # the reward's mean over this process's first steps
        self.peak: Optional[tuple] = None  # (window mean, its last step): the best so far
        self.collapsed = False
        self.best: Optional[Dict[str, Any]] = None  # the eval with the best lenient accuracy so far

    def train(self, step: int, m: Dict[str, Any]) -> List[Dict[str, Any]]:
        """Check one training step's metrics."""
        out = []
        self.rewards[step] = float(m["reward_mean"])
        share = float(m.get("zero_std_groups", 0.0))
        self.flat_streak = self.flat_streak + 1 if share > FLAT_SHARE else 0
        self.seen += 1
        if self.seen <= START_STEPS:
            zero = {k[len("rewards/"):] for k, v in m.items() if k.startswith("rewards/") and v == 0.0}
            self.never_paid = zero if self.never_paid is None else self.never_paid & zero
            self.flat_start = self.flat_start and share >= 1.0
            if self.seen == START_STEPS and self.flat_start:
                out.append(_warning(step, "flat_start", _flat_start_message(sorted(self.never_paid))))
        if self.flat_streak == FLAT_STEPS:
            out.append(_warning(step, "flat_groups", (
                f"over {FLAT_SHARE:.0%} of the groups had equal rewards for {FLAT_STEPS} steps in a row "
                f"(now {share:.0%}, mean reward {m['reward_mean']:.3f}): little learning signal; raise rollout.group_size "
                "or rollout.temperature, or change the prompts' difficulty (all right: harder; all "
                "wrong: easier)")))
        out += self._collapse(step)
        self.any_gradient = self.any_gradient or float(m.get("grad_norm", 0.0)) > 0.0
        if step >= STILL_AFTER and not self.still_warned and not (self.any_gradient and self.weights is None):
            # Once a gradient was seen and the weights moved, the setup works: a zero gradient
            # later (every group flat with beta 0) is the flat_groups tripwire's business.
            why = None
            if not self.any_gradient:
                why = "the gradient norm has been zero at every step"
            elif self.weights is not None and np.array_equal(self.weights(), self.start):
                why = "the adapters have not changed since the start"
            if why:
                self.still_warned = True
                out.append(_warning(step, "not_learning", (
                    f"{why} ({step} steps): nothing is learned; check train.learning_rate, the "
                    "adapter (adapter.keys, adapter.num_layers) and that the rewards differ within groups")))
            else:
                self.weights = None  # it moved: no need to read the weights again
        return out

    def evaluated(self, step: int, e: Dict[str, Any]) -> List[Dict[str, Any]]:
        """Check one held-out evaluation (after the training steps up to ``step``)."""
        acc, strict = e.get("lenient_accuracy"), e.get("accuracy", 0.0)
        if acc is None:
            return []
        out = []
        if self.best is not None and step > self.best["step"]:
            # Strict accuracy above that evaluation's while lenient falls is a model learning the
            # format (the default run's first steps), not a reward paying for something else.
            fell = acc <= self.best["acc"] - ACCURACY_DROP and strict <= self.best["strict"]
            rose = self._reward_near(step) >= self._reward_near(self.best["step"]) + REWARD_RISE
            if fell and rose and not self.hacking:
                out.append(_warning(step, "reward_hacking", (
                    f"the training reward rose ({self._reward_near(self.best['step']):.3f} -> "
                    f"{self._reward_near(step):.3f}) while held-out lenient accuracy fell "
                    f"({self.best['acc']:.3f} at step {self.best['step']} -> {acc:.3f}): the rewards "
                    "pay for something other than right answers; check them with `cli.py reward`, "
                    "raise grpo.beta or lower train.learning_rate")))
            self.hacking = fell and rose
        if self.best is None or acc > self.best["acc"]:
            self.best = {"step": step, "acc": acc, "strict": strict}
        return out

    def _collapse(self, step: int) -> List[Dict[str, Any]]:
        """The reward_collapse check after ``step`` (said once per onset; again only after the
        reward came back above the line)."""
        if self.seen < REWARD_WINDOW:
            return []
        now = self._reward_near(step)
        if self.first_window is None:
            self.first_window = now
        if self.peak is None or now > self.peak[0]:
            self.peak = (now, step)
        start, (best, best_step) = self.first_window, self.peak
        gain = best - start
        line = start + COLLAPSE_SHARE * gain
        fell = gain > COLLAPSE_GAIN * max(1.0, abs(best)) and now <= line
        out = []
        if fell and not self.collapsed:
            out.append(_warning(step, "reward_collapse", (
                f"the training reward fell to {now:.3f} (mean of the last {REWARD_WINDOW} steps) from "
                f"{best:.3f} (steps {best_step - REWARD_WINDOW + 1}-{best_step}), giving back "
                f"{(best - now) / gain:.0%} of its gain since the start ({start:.3f}): the updates may be "
                f"undoing what was learned; if it goes on falling, lower train.learning_rate or raise "
                f"grpo.beta; a checkpoint of step {best_step} or earlier (checkpoints/, while kept) "
                f"holds the better adapters")))
        self.collapsed = fell
        return out

    def _reward_near(self, step: int) -> float:
        """Mean training reward of the REWARD_WINDOW steps up to ``step`` (the first ones for 0)."""
        steps = sorted(s for s in self.rewards if s <= step)[-REWARD_WINDOW:]
        if not steps:
            steps = sorted(self.rewards)[:REWARD_WINDOW]
        return float(np.mean([self.rewards[s] for s in steps])) if steps else float("nan")


def _flat_start_message(never_paid: List[str]) -> str:
    paid = (f"{', '.join(never_paid)} paid 0 on every completion: the model does not write what "
            "they check for (the <think>/<answer> layout, say); " if never_paid else "")
    return (f"every group had equal rewards in the first {START_STEPS} steps, so the loss is 0 and "
            f"nothing is learned; {paid}give partial credit (rewards lenient_accuracy, tag_count, "
            "soft_format) or open the response with prompt.response_prefix (e.g. \"<think>\"), as "
            "configs/smollm2.yaml does")


def _warning(step: int, name: str, message: str) -> Dict[str, Any]:
    return {"kind": "warning", "step": step, "tripwire": name, "message": f"tripwire {name}: {message}"}
