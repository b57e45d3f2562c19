"""The run log: where a training run's events go, one call per event (in the spirit of mlx-lm's
``TrainingCallback``): metrics.jsonl and samples.jsonl, the trackers (loggers.py), the progress
bar, console lines and the tripwires' warnings (tripwires.py).

    log.step(step, metrics, samples)   a training step: records, trackers, tripwires, progress
    log.eval(step, result)             a held-out evaluation: record, trackers, tripwires, a line
    log.warning(w)                     a warning record: into metrics.jsonl and on the console
    log.line(text)                     a console line (above the progress bar while it shows)
    log.end_progress(); log.close()    the bar goes after the loop; the trackers at the end

Under ``mlx.launch`` only rank 0 keeps a log: the others get ``RunLog(..., main=False)``, which
drops every event.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Dict, List

from .config import Config
from .loggers import Trackers
from .rundir import METRICS, SAMPLES
from .tripwires import Tripwires


class RunLog:
    """One run's log; ``main=False`` (a process other than rank 0) makes every method a no-op."""

    def __init__(self, out: Path, cfg: Config, say: Callable[[str], None], tripwires: Tripwires,
                 done_steps: int = 0, main: bool = True):
        self.main = main
        self.say = say
        self.metrics_path, self.samples_path = Path(out) / METRICS, Path(out) / SAMPLES
        self.trackers = Trackers(cfg, Path(out)) if main else None
        self.tripwires = tripwires
        self.bar = _progress(cfg.train.steps, cfg.output.progress and main)
        if self.bar is not None:
            self.bar.update(done_steps)

    def line(self, text: str) -> None:
        """Say ``text``; above the progress bar while one is shown, so the bar stays whole."""
        if not self.main:
            return
        if self.bar is not None and not self.bar.disable:
            self.bar.write(text)
        else:
            self.say(text)

    def step(self, step: int, m: Dict[str, Any], samples: List[Dict[str, Any]]) -> None:
        """A finished training step: its metrics record and samples, the trackers, the tripwires'
        warnings, and one tick of the progress bar."""
        if not self.main:
            return
        _append_jsonl(self.metrics_path, {"step": step, "kind": "train", **m})
        self.trackers.log(step, m)
        for s in samples:
            _append_jsonl(self.samples_path, {"step": step, **s})
        for w in self.tripwires.train(step, m):
            self.warning(w)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(bar_line(m))

    def eval(self, step: int, res: Dict[str, Any], announce: bool = True) -> None:
        """A held-out evaluation at ``step`` (``res`` holds its "step"): its record, the trackers,
        the tripwires' warnings, and (with ``announce``) its line on the console."""
        if not self.main:
            return
        _append_jsonl(self.metrics_path, {"kind": "eval", **res})
        self.trackers.log(step, res, "eval")
        for w in self.tripwires.evaluated(step, res):
            self.warning(w)
        if announce:
            self.line(f"held-out at step {step}: {eval_line(res)}")

    def warning(self, w: Dict[str, Any]) -> None:
        """A warning record (tripwires.py's shape): warnings never stop the run; they are written
        to metrics.jsonl and said on the console."""
        if not self.main:
            return
        _append_jsonl(self.metrics_path, w)
        self.line(f"warning: {w['message']}")

    def end_progress(self) -> None:
        """Close the progress bar (after the loop, on any exit): later lines go to ``say``."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def close(self) -> None:
        """Close the bar if still open, and the trackers (at the end of a finished run)."""
        self.end_progress()
        if self.trackers is not None:
            self.trackers.close()


def _progress(total: int, enabled: bool):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with huggingface-hub
        return None
    return tqdm(total=total, disable=not enabled, dynamic_ncols=True, unit="step")


def _append_jsonl(path: Path, obj: Dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(obj) + "\n")


def bar_line(m: Dict[str, Any]) -> str:
    """The progress bar's figures: this step's training reward, accuracy and format (the reward
    columns of that name, when configured), KL, length and speed."""
    shown = "".join(f" {label} {m[k]:.3f}" for k, label in (("rewards/accuracy", "acc"), ("rewards/format", "fmt"))
                    if isinstance(m.get(k), float))
    kl = "-" if m.get("kl") is None else f"{m['kl']:.4f}"  # "-": no row in this step's loss
    return (f"reward {m['reward_mean']:.3f}{shown} kl {kl} len {m['completion_length']:.1f} "
            f"{m['tokens_per_sec']:.0f} tok/s")


def eval_line(e: Dict[str, Any]) -> str:
    """A held-out evaluation in one line."""
    return (
        f"format {e['format_rate']:.3f}, accuracy {e['accuracy']:.3f}, "
        f"lenient accuracy {e['lenient_accuracy']:.3f} on {e['n']} prompts"
    )


def compare_line(a: Dict[str, Any], b: Dict[str, Any]) -> str:
    """Two held-out evaluations, before -> after, in one line."""
    keys = [("format_rate", "format"), ("accuracy", "accuracy"), ("lenient_accuracy", "lenient accuracy")]
    return ", ".join(f"{name} {a[k]:.3f} -> {b[k]:.3f}" for k, name in keys) + f" ({b['n']} prompts)"

