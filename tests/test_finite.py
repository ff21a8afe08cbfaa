"""A run whose optimizer state or weights became non-finite has diverged, even where its loss
is still finite (AdamW with an infinite second moment stops moving and looks healthy)."""

import json

import pytest
import torch

from gradnoise.cli import main
from gradnoise.lm.storage import checkpoint
from gradnoise.lm.training import finite
from helpers import configs

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = configs.tiny(max_iters=20, eval_interval=10, log_interval=5, checkpoint_interval=5)


def adamw_after_one_step(gradient_scale: float):
    params = [torch.nn.Parameter(torch.ones(3, 2)), torch.nn.Parameter(torch.zeros(4))]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    for p in params:
        p.grad = torch.full_like(p, gradient_scale)
    optimizer.step()
    return optimizer, params


def test_nonfinite_names_what_broke():
    optimizer, params = adamw_after_one_step(1.0)
    assert finite.nonfinite(optimizer, params) is None
    optimizer, params = adamw_after_one_step(1e30)  # g² overflows float32: v = inf, update 0
    assert torch.isfinite(params[0]).all()
    assert finite.nonfinite(optimizer, params) == "non-finite optimizer state (exp_avg_sq)"
    with torch.no_grad():
        params[1][2] = float("nan")
    assert finite.nonfinite(optimizer, params) == "non-finite weights"


def test_all_finite_sees_nan_and_inf_but_not_large_finite_values():
    big = torch.full((1000,), 3e38)  # its 2-norm would overflow; max |x| does not
    assert finite.all_finite([big, torch.ones(2, dtype=torch.bfloat16)])
    assert not finite.all_finite([big, torch.tensor([0.0, float("-inf")])])
    assert not finite.all_finite([torch.tensor([float("nan")]), big])
    assert finite.all_finite([])


def test_adamw_with_infinite_second_moment_diverges_and_exits_3(tmp_path, capsys):
    run = tmp_path / "run"
    overrides = [f"{k}={v}" for k, v in TINY.items()]
    assert main(["train", "--run-dir", str(run), "--no-progress", *overrides, "noise=const:sigma=1e30"]) == 3
    assert "non-finite optimizer state (exp_avg_sq) at step 5" in capsys.readouterr().err
    result = json.loads((run / "result.json").read_text())
    assert result["status"] == "diverged"
    assert "no checkpoint was written before" in result["error"]
    assert checkpoint.latest(run) is None  # the broken state was never checkpointed


def test_every_floating_state_tensor_is_checked_not_only_adams():
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([param], lr=0.1, momentum=0.9)
    param.grad = torch.ones(3)
    optimizer.step()
    assert finite.nonfinite(optimizer, [param]) is None
    optimizer.state[param]["momentum_buffer"][1] = float("nan")
    assert finite.nonfinite(optimizer, [param]) == "non-finite optimizer state (momentum_buffer)"
