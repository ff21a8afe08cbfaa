"""Checkpoints: atomic writes, the LATEST pointer, and refusing pickles that run code."""

import pickle
import threading

import pytest
import torch

from gradnoise.errors import UserError
from gradnoise.lm.storage import checkpoint


def weights(seed):
    generator = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(3, 4, generator=generator), "b": torch.randn(5, generator=generator)}


def test_save_load_round_trip_and_latest(tmp_path):
    generator = torch.Generator().manual_seed(11)
    torch.randn(3, generator=generator)  # a generator part-way through its stream
    state = {
        "step": 7,
        "generator": generator.get_state(),
        "optimizer": {"state": {0: {"exp_avg": torch.ones(2)}}, "param_groups": [{"lr": 1e-3}]},
        "floats": [1.5, None, "text"],
    }
    path = checkpoint.save(tmp_path, 7, weights(0), state)
    assert checkpoint.latest(tmp_path) == path
    loaded_weights, loaded_state = checkpoint.load(path)
    for key, value in weights(0).items():
        assert torch.equal(loaded_weights[key], value)
    assert loaded_state["step"] == 7 and loaded_state["floats"] == [1.5, None, "text"]
    restored = torch.Generator()
    restored.set_state(loaded_state["generator"])
    assert torch.equal(torch.randn(4, generator=restored), torch.randn(4, generator=generator))

    newer = checkpoint.save(tmp_path, 12, weights(1), {"step": 12})
    assert checkpoint.latest(tmp_path) == newer
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["LATEST", "step_0000012"]
    assert torch.equal(checkpoint.load(newer)[0]["b"], weights(1)["b"])


def test_failed_write_leaves_previous_checkpoint(tmp_path):
    good = checkpoint.save(tmp_path, 5, weights(0), {"step": 5})

    with pytest.raises(TypeError):  # a lock cannot be pickled: torch.save fails mid-write
        checkpoint.save(tmp_path, 6, weights(1), {"step": 6, "lock": threading.Lock()})
    assert checkpoint.latest(tmp_path) == good
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["LATEST", "step_0000005"]


def test_no_checkpoint_means_none(tmp_path):
    assert checkpoint.latest(tmp_path) is None
    # A half-written directory without the pointer is not a checkpoint.
    (tmp_path / "checkpoints" / ".step_0000003.x.partial").mkdir(parents=True)
    assert checkpoint.latest(tmp_path) is None


class RunsCode:
    """A pickle payload that would create a file when unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_that_would_run_code_is_refused(tmp_path):
    path = checkpoint.save(tmp_path, 1, weights(0), {"step": 1})
    marker = tmp_path / "code-ran"
    # torch.save pickles arbitrary objects; a malicious state.pt looks just like this.
    torch.save({"step": 1, "payload": RunsCode(marker)}, path / "state.pt")
    with pytest.raises(UserError, match="refusing to load"):
        checkpoint.load(path)
    assert not marker.exists()
    # A raw pickle (not a torch zip file) with the same payload is refused too.
    (path / "state.pt").write_bytes(pickle.dumps(RunsCode(marker), protocol=2))
    with pytest.raises(UserError):
        checkpoint.load_state(path / "state.pt")
    assert not marker.exists()
