"""`gradnoise export RUN DEST` never destroys data: DEST must be new or empty, or with --force
an earlier export; never the run, a directory around it or inside it, nor a plain file."""

import hashlib

import pytest

from gradnoise.cli import main
from gradnoise.errors import UserError
from gradnoise.lm import GPT, GPTConfig
from gradnoise.lm.config import resolve_config
from gradnoise.lm.training.trained import export
from gradnoise.lm.training.trainer import train
from helpers import configs

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = configs.tiny(max_iters=4, eval_interval=4, log_interval=2)
EXPORT_FILES = ["config.json", "model.safetensors", "vocab.json"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("export") / "run"
    train(resolve_config("shakespeare_char", "tiny", TINY), run_dir, progress=False)
    return run_dir


def tree(root):
    """{relative path: sha256 of the file, or "dir"}: what a refused export must not change."""
    return {
        str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
    }


def refused(run, dest, *flags, message):
    root = run.parent
    before = tree(root)
    with pytest.raises(UserError, match=message):
        export(run, dest, force="--force" in flags)
    assert tree(root) == before


def test_export_into_the_run_or_around_it_is_refused(run):
    files = tree(run)
    refused(run, run, message="is the run directory itself")
    refused(run, run / "checkpoints" / "..", "--force", message="is the run directory itself")
    refused(run, run / "model", message="is inside the run directory")
    refused(run, run.parent, "--force", message="contains the run directory")
    assert tree(run) == files  # checkpoints, log and result all still there


def test_a_non_empty_destination_needs_force_and_force_replaces_only_an_export(run, tmp_path):
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "notes").write_text("mine")
    refused(run, keep, message="it is not empty; .*--force")
    refused(run, keep, "--force", message=r"holds notes, not an earlier export")
    assert (keep / "notes").read_text() == "mine"

    plain = tmp_path / "plain"
    plain.write_text("a file")
    refused(run, plain, "--force", message="exists and is not a directory")
    assert plain.read_text() == "a file"

    # A new and an empty directory are fine; an earlier export is replaced only with --force.
    assert export(run, tmp_path / "new") == tmp_path / "new"
    (tmp_path / "empty").mkdir()
    export(run, tmp_path / "empty")
    assert sorted(p.name for p in (tmp_path / "empty").iterdir()) == EXPORT_FILES
    refused(run, tmp_path / "empty", message="it is not empty")
    export(run, tmp_path / "empty", force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "keep", "new", "plain"]

    # An export with anything added to it is no longer only an export.
    (tmp_path / "new" / "README").write_text("about this model")
    refused(run, tmp_path / "new", "--force", message="holds README")


def test_the_cli_exits_2_and_names_the_destination(run, tmp_path, capsys):
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "notes").write_text("mine")
    assert main(["export", str(run), str(keep)]) == 2
    assert f"cannot export to {keep}: it is not empty" in capsys.readouterr().err
    assert main(["export", str(run), str(run)]) == 2
    assert main(["export", str(run), str(tmp_path / "out")]) == 0
    assert main(["export", str(run), str(tmp_path / "out"), "--force"]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == EXPORT_FILES
    assert (keep / "notes").read_text() == "mine"


def test_save_pretrained_replaces_an_earlier_export_but_nothing_else(tmp_path):
    model = GPT(GPTConfig(vocab_size=5, block_size=8, n_layer=1, n_head=1, n_embd=8))
    target = tmp_path / "model"
    target.mkdir()
    (target / "data.csv").write_text("1,2,3")
    with pytest.raises(UserError, match="is not an earlier export"):
        model.save_pretrained(target, list("abcde"))
    assert [p.name for p in target.iterdir()] == ["data.csv"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
