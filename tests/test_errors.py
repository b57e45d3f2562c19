"""The two error families and the one guard every command runs in (cli.reported)."""

import pytest

from mlx_grpo.checkpoint import CheckpointError
from mlx_grpo.cli import reported
from mlx_grpo.config import ConfigError
from mlx_grpo.distributed import PeerLost
from mlx_grpo.errors import RunFault, UserError
from mlx_grpo.models import ModelLoadError, NonFiniteError
from mlx_grpo.rundir import RunDirError
from mlx_grpo.plot import PlotError
from mlx_grpo.preflight import OutOfMemory
from mlx_grpo.rewards import RewardError
from mlx_grpo.runs import RunLogError
from mlx_grpo.shapes import ShapeError
from mlx_grpo.tasks import DataError

USER = [ConfigError, DataError, RewardError, ModelLoadError, RunDirError, CheckpointError, ShapeError,
        PlotError, RunLogError]
FAULTS = [NonFiniteError, OutOfMemory, PeerLost]


def test_every_named_error_is_in_one_family_and_keeps_its_older_base():
    for cls in USER:
        assert issubclass(cls, UserError) and not issubclass(cls, RunFault), cls
    for cls in FAULTS:
        assert issubclass(cls, RunFault) and not issubclass(cls, UserError), cls
    # Older except clauses (ValueError, RuntimeError, ArithmeticError) still catch them.
    assert issubclass(ConfigError, ValueError) and issubclass(OutOfMemory, RuntimeError)
    assert issubclass(NonFiniteError, ArithmeticError) and issubclass(PlotError, RuntimeError)


@pytest.mark.parametrize("error, code", [
    (ConfigError("grpo.beta: must be >= 0, got -1"), 2),
    (RunLogError("r/metrics.jsonl:2: not valid JSON"), 2),
    (FileNotFoundError("d.jsonl: data file not found"), 2),
    (OutOfMemory("out of memory at step 3; lower rollout.group_size"), 1),
    (NonFiniteError("adapters: lora_a holds NaN or infinite values; not saved"), 1),
])
def test_the_guard_says_one_line_and_exits_with_the_familys_code(capsys, error, code):
    with pytest.raises(SystemExit) as stop:
        with reported(debug=False):
            raise error
    assert stop.value.code == code
    assert capsys.readouterr().err == f"error: {error}\n"


def test_the_guard_lets_bugs_and_debug_through():
    with pytest.raises(KeyError):  # a bug: its traceback, not a one-line error
        with reported(debug=False):
            raise KeyError("x")
    with pytest.raises(ConfigError):  # --debug: the traceback
        with reported(debug=True):
            raise ConfigError("grpo.beta: must be >= 0, got -1")
