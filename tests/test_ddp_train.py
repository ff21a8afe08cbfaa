"""DDP: `torchrun --nproc_per_node 2 -m gradnoise train` on CPU (gloo) follows the same loss
curve as one process with the same global batch, noise included."""

import json
import os
import subprocess
import sys

import pytest
import torch

from gradnoise.lm.config import resolve_config
from gradnoise.lm.storage import checkpoint
from gradnoise.lm.training.trainer import train
from helpers import configs

pytestmark = pytest.mark.usefixtures("one_thread")

PER_RANK = configs.two_layers(4, 16, eval_interval=8, log_interval=4, checkpoint_interval=8, eval_iters=3)
PER_RANK |= dict(
    grad_accum=2, warmup_iters=4, dropout=0.0, final_eval=True, noise="exp:sigma0=0.05,gamma=0.95"
)


def curve(run_dir):
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return [
        (r["kind"], r["step"], *(r[k] for k in ("loss", "train_loss", "val_loss") if k in r)) for r in records
    ]


def test_two_gloo_ranks_match_one_process_with_the_global_batch(tmp_path, monkeypatch):
    single = train(
        resolve_config("shakespeare_char", "tiny", {**PER_RANK, "batch_size": 2 * PER_RANK["batch_size"]}),
        tmp_path / "single",
        progress=False,
    )

    overrides = [f"{k}={v}" for k, v in PER_RANK.items()]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "gradnoise",
        "train",
        "--run-dir",
        str(tmp_path / "ddp"),
        "--no-progress",
        *overrides,
    ]
    env = dict(os.environ)
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]

    ddp = json.loads((tmp_path / "ddp" / "result.json").read_text())
    assert ddp["status"] == "done" and ddp["world_size"] == 2 and single["world_size"] == 1
    ddp_curve, single_curve = curve(tmp_path / "ddp"), curve(tmp_path / "single")
    assert [r[:2] for r in ddp_curve] == [r[:2] for r in single_curve]
    for got, want in zip(ddp_curve, single_curve, strict=True):
        assert got[2:] == pytest.approx(want[2:], rel=1e-4, abs=1e-5), got[:2]
    for key in ("val_loss_full", "best_val_loss", "final_sigma"):
        assert ddp["finals"][key] == pytest.approx(single["finals"][key], rel=1e-4), key

    weights_ddp, _ = checkpoint.load(checkpoint.latest(tmp_path / "ddp"))
    weights_single, _ = checkpoint.load(checkpoint.latest(tmp_path / "single"))
    for key, value in weights_single.items():
        torch.testing.assert_close(weights_ddp[key], value, rtol=1e-3, atol=1e-4)
