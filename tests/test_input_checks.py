"""The checks behind issue 10's exit-2 cases, one by one (test_cli_errors.py runs them through
the CLI): seed bounds, archives and corpora, damaged weights and states, the study store,
sampling arguments, and the messages that used to read badly."""

import gzip
import json
import os
import sqlite3
import tracemalloc

import pytest
import torch

from gradnoise.errors import UserError
from gradnoise.lm.config import MAX_SEED, TrainConfig
from gradnoise.lm.data import corpora, sources
from gradnoise.lm.model.gpt import GPT, GPTConfig
from gradnoise.lm.model.sampling import sample_text
from gradnoise.lm.storage import checkpoint, files
from gradnoise.study.spec import parse_spec
from gradnoise.study.store import Store

# --- seeds ---------------------------------------------------------------------------


def test_seeds_are_bounded_to_what_torch_and_sqlite_take(tmp_path):
    assert TrainConfig(seed=MAX_SEED).seed == 2**63 - 1
    for seed in (2**63, -1, 10**20):
        with pytest.raises(UserError, match=r"seed must be an integer in \[0, 2\*\*63 - 1\]"):
            TrainConfig(seed=seed)
    spec = {"name": "s", "datasets": ["shakespeare_char"], "methods": {"baseline": {}}}
    with pytest.raises(UserError, match="seeds="):
        parse_spec({**spec, "seeds": [2**63]})
    with pytest.raises(UserError, match="a count of seeds must be ≥ 1 and ≤ 10,000"):
        parse_spec({**spec, "seeds": 10**9})
    # The largest allowed seed goes through the store (SQLite INTEGER is 64-bit signed).
    run = parse_spec({**spec, "seeds": [MAX_SEED]}).runs[0]
    with Store(tmp_path / "study.sqlite") as store:
        store.add_runs([(run.run_id, run.dataset, run.method, run.seed, run.config.to_dict())])
        assert store.runs()[0]["seed"] == MAX_SEED


# --- corpora -------------------------------------------------------------------------


def test_a_gzip_bomb_is_refused_after_reading_what_the_corpus_may_hold(tmp_path):
    source = tmp_path / "bomb.gz"
    source.write_bytes(gzip.compress(b"\0" * 40_000_000))  # 40 MB of zeros in 39 KB
    tracemalloc.start()
    try:
        with pytest.raises(UserError, match=r"unpacks to more than 1,115,394 bytes"):
            corpora.prepare("shakespeare_char", str(source), home=tmp_path / "home", progress=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Decompressing it whole would hold 40 MB; streaming stops at the corpus's size.
    assert peak < 8_000_000
    assert not (tmp_path / "home").exists()


def test_a_user_checksum_allows_a_margin_over_the_canonical_size():
    spec = sources.CORPORA["text8"]
    assert sources.size_limit(spec, None) == spec.size
    assert sources.size_limit(spec, "0" * 64) == spec.size + spec.size // 10


def test_default_download_addresses_use_https():
    for spec in sources.CORPORA.values():
        assert spec.url.startswith("https://"), spec.url


@pytest.mark.parametrize(
    "meta, message",
    [
        (b"\x00\x01", "not valid JSON"),
        (
            b'{"format_version": 1, "name": "x"}',
            r"damaged \(vocab, vocab_size, dtype, splits, source_sha256\)",
        ),
        (b'{"format_version": 7}', "prepared in format 7"),
    ],
)
def test_a_damaged_meta_json_says_to_prepare_again(tmp_path, meta, message):
    directory = tmp_path / "shakespeare_char"
    directory.mkdir()
    (directory / "meta.json").write_bytes(meta)
    for read in (
        lambda: corpora.load("shakespeare_char", home=tmp_path),
        lambda: corpora.prepared(home=tmp_path),
    ):
        with pytest.raises(UserError, match=message) as error:
            read()
        assert "gradnoise data prepare shakespeare_char` again" in str(error.value)


# --- weights, checkpoint states ------------------------------------------------------


def test_check_tensors_names_the_first_difference():
    expected = {"a": torch.zeros(2, 3), "b": torch.zeros(4)}
    files.check_tensors({"a": torch.ones(2, 3), "b": torch.ones(4)}, expected, "w")
    with pytest.raises(UserError, match=r"w do not match the model: missing \['b'\], unexpected \['c'\]"):
        files.check_tensors({"a": torch.ones(2, 3), "c": torch.ones(4)}, expected, "w")
    with pytest.raises(UserError, match=r"a is \(3, 2\) torch.float32, the model needs \(2, 3\)"):
        files.check_tensors({"a": torch.ones(3, 2), "b": torch.ones(4)}, expected, "w")
    with pytest.raises(UserError, match=r"b is \(4,\) torch.int64"):
        files.check_tensors({"a": torch.ones(2, 3), "b": torch.ones(4, dtype=torch.long)}, expected, "w")


def test_random_bytes_in_state_pt_are_damage_not_code(tmp_path):
    path = checkpoint.save(tmp_path, 1, {"w": torch.zeros(2)}, {"step": 1}) / "state.pt"
    path.write_bytes(os.urandom(2048))
    with pytest.raises(UserError, match=r"is damaged: it is not a torch\.save archive") as error:
        checkpoint.load_state(path)
    assert "run code" not in str(error.value)
    torch.save({"step": 1}, path)
    path.write_bytes(path.read_bytes()[:100])  # a torch archive, cut short
    with pytest.raises(UserError, match="is damaged"):
        checkpoint.load_state(path)


def test_restoring_turns_what_a_damaged_state_raises_into_user_errors(tmp_path):
    damaged = pytest.raises(UserError, match=r"checkpoint ck is damaged .*no entry 'optimizer'")
    with damaged, checkpoint.restoring("ck"):
        raise KeyError("optimizer")
    damaged = pytest.raises(UserError, match="checkpoint ck is damaged or from another version: size")
    with damaged, checkpoint.restoring("ck"):
        raise RuntimeError("size mismatch for weight")
    with pytest.raises(UserError, match=r"^bad \(checkpoint ck\)$"), checkpoint.restoring("ck"):
        raise UserError("bad")


# --- the study store, sampling, messages ---------------------------------------------


def test_a_store_that_is_not_a_database_is_a_user_error_and_stays_as_it_was(tmp_path):
    path = tmp_path / "study.sqlite"
    path.write_bytes(b"not a database " * 300)
    with pytest.raises(UserError, match=r"cannot open the study store .*file is not a database"):
        Store(path)
    assert path.read_bytes() == b"not a database " * 300
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study.sqlite"]
    sqlite3.connect(tmp_path / "fine.sqlite").close()  # a real empty database opens
    Store(tmp_path / "fine.sqlite").close()


def test_sampling_temperature_must_be_finite_and_not_negative():
    model = GPT(GPTConfig(vocab_size=4, block_size=8, n_layer=1, n_head=1, n_embd=8))
    prompt = torch.zeros(1, 1, dtype=torch.long)
    for temperature in (float("nan"), float("inf"), -0.5):
        with pytest.raises(UserError, match=f"temperature={temperature} is not allowed"):
            model.generate(prompt, 2, temperature=temperature)
    assert model.generate(prompt, 2, temperature=0.0).shape == (1, 3)


def test_a_character_outside_the_vocabulary_reads_well():
    model = GPT(GPTConfig(vocab_size=3, block_size=8, n_layer=1, n_head=1, n_embd=8))
    with pytest.raises(UserError) as error:
        sample_text(model, list("abc"), "z", 1)
    assert "is not in the model's vocabulary" in str(error.value)
    assert "vocabulary vocabulary" not in str(error.value)


def test_read_json_names_the_file_and_what_it_is(tmp_path):
    path = tmp_path / "config.json"
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(UserError, match=f"the config file {path} is damaged: not valid JSON"):
        files.read_json(path, "config file")
    path.write_text(json.dumps({"a": 1}))
    assert files.read_json(path, "config file") == {"a": 1}
