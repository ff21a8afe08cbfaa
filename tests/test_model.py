"""The GPT: shapes, causality, tied weights, the loss, sampling, save/load."""

import math

import pytest
import torch
from torch.nn import functional as F

from gradnoise.errors import UserError
from gradnoise.lm import GPT, GPTConfig
from gradnoise.lm.model.sampling import sample_text
from gradnoise.lm.model.weights import read_vocab

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = GPTConfig(vocab_size=11, block_size=16, n_layer=2, n_head=2, n_embd=16, dropout=0.0)


def make_model(config=SMALL, seed=0) -> GPT:
    torch.manual_seed(seed)
    return GPT(config).eval()


def tokens(batch, length, vocab=SMALL.vocab_size, seed=1):
    return torch.randint(vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_shapes_with_and_without_targets():
    model = make_model()
    x = tokens(3, 10)
    logits, loss = model(x, x)
    assert logits.shape == (3, 10, SMALL.vocab_size)
    assert loss.shape == ()
    logits, loss = model(x)
    assert logits.shape == (3, 1, SMALL.vocab_size)
    assert loss is None


def test_initial_loss_is_near_uniform():
    # N(0, 0.02) weights give near-zero logits: cross-entropy ≈ ln(vocab).
    model = make_model()
    x, y = tokens(8, 16, seed=2), tokens(8, 16, seed=3)
    _, loss = model(x, y)
    assert abs(loss.item() - math.log(SMALL.vocab_size)) < 0.05


def test_future_tokens_do_not_change_earlier_logits():
    model = make_model()
    x = tokens(2, 12)
    changed = x.clone()
    t = 7
    changed[:, t] = (changed[:, t] + 1) % SMALL.vocab_size
    before, _ = model(x, x)
    after, _ = model(changed, changed)
    torch.testing.assert_close(after[:, :t], before[:, :t], rtol=0, atol=1e-6)
    # ...and the changed token does reach the positions from t on.
    assert (after[:, t:] - before[:, t:]).abs().max() > 1e-4


def test_tied_embedding_and_parameter_count():
    model = make_model()
    assert model.lm_head.weight is model.transformer.wte.weight
    V, T, L, d = SMALL.vocab_size, SMALL.block_size, SMALL.n_layer, SMALL.n_embd
    # Per block: attention 3d² + d², MLP 4d² + 4d², two LayerNorm weights; then the final LN.
    expected = V * d + T * d + L * (12 * d * d + 2 * d) + d
    assert model.num_params(non_embedding=False) == expected
    assert model.num_params() == expected - T * d

    with_bias = GPT(GPTConfig(**{**SMALL.__dict__, "bias": True}))
    # Biases: c_attn 3d, c_proj d, c_fc 4d, mlp c_proj d, two LN biases d each; final LN d.
    assert with_bias.num_params(non_embedding=False) == expected + L * (3 * d + d + 4 * d + d + 2 * d) + d


def test_label_smoothing_matches_its_formula():
    model = make_model()
    x, y = tokens(4, 8, seed=4), tokens(4, 8, seed=5)
    epsilon = 0.1
    logits, smoothed = model(x, y, label_smoothing=epsilon)
    log_p = F.log_softmax(logits.double(), dim=-1).view(-1, SMALL.vocab_size)
    nll = -log_p.gather(1, y.view(-1, 1)).mean()
    uniform = -log_p.mean()  # mean over tokens and vocabulary of -log p
    expected = (1 - epsilon) * nll + epsilon * uniform
    assert smoothed.item() == pytest.approx(expected.item(), rel=1e-5)


def test_bad_config_and_too_long_input_are_user_errors():
    with pytest.raises(UserError, match="n_head"):
        GPTConfig(n_embd=30, n_head=4)
    with pytest.raises(UserError, match="n_head=0 must be a positive integer"):
        GPTConfig(n_head=0)  # checked before n_embd % n_head, which would divide by zero
    with pytest.raises(UserError, match="block_size=16"):
        make_model()(tokens(1, 17))


def test_generate_is_deterministic_for_a_seed():
    model = make_model()
    prompt = tokens(1, 3)

    def sample(seed, **kwargs):
        generator = torch.Generator().manual_seed(seed)
        return model.generate(prompt, 20, generator=generator, **kwargs)

    first, again, other = sample(7), sample(7), sample(8)
    assert first.shape == (1, 23)
    assert torch.equal(first[:, :3], prompt)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    # top_k=1 leaves only the most likely token: the same as greedy decoding.
    greedy = model.generate(prompt, 20, temperature=0.0)
    assert torch.equal(sample(3, top_k=1), greedy)
    # Generation beyond block_size crops the context instead of failing.
    assert model.generate(prompt, SMALL.block_size + 5, generator=torch.Generator()).shape[1] == 24


def test_save_and_from_pretrained_round_trip(tmp_path):
    model = make_model(GPTConfig(**{**SMALL.__dict__, "bias": True}), seed=3)
    vocab = [chr(ord("a") + i) for i in range(SMALL.vocab_size)]
    model.save_pretrained(tmp_path / "export", vocab)
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == [
        "config.json",
        "model.safetensors",
        "vocab.json",
    ]
    loaded = GPT.from_pretrained(tmp_path / "export").eval()
    assert loaded.config == model.config
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    x = tokens(2, 9)
    torch.testing.assert_close(loaded(x, x)[0], model(x, x)[0], rtol=0, atol=0)
    assert read_vocab(tmp_path / "export") == vocab

    # Saving again replaces the directory whole; nothing temporary is left beside it.
    make_model(seed=4).save_pretrained(tmp_path / "export", vocab)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    assert not GPT.from_pretrained(tmp_path / "export").config.bias

    (tmp_path / "export" / "vocab.json").unlink()
    with pytest.raises(UserError, match=r"vocab\.json"):
        GPT.from_pretrained(tmp_path / "export")


def test_sample_text_encodes_prompt_and_decodes_output():
    model = make_model()
    vocab = list("abcdefghij\n")
    text = sample_text(model, vocab, "abc", 15, temperature=1.0, seed=5)
    assert text.startswith("abc") and len(text) == 18
    assert set(text) <= set(vocab)
    assert text == sample_text(model, vocab, "abc", 15, temperature=1.0, seed=5)
    with pytest.raises(UserError, match="'z'"):
        sample_text(model, vocab, "z", 5)


def test_replicas_have_their_own_dropout_rates():
    from gradnoise.lm.model.gpt import Dropout

    rates, n = (0.0, 0.3, 0.6), 40_000
    torch.manual_seed(0)
    out = Dropout(rates).train()(torch.ones(len(rates), n))
    for m, rate in enumerate(rates):
        dropped = (out[m] == 0).float().mean().item()
        # A binomial fraction: within 5 standard errors of the rate.
        assert abs(dropped - rate) <= 5 * math.sqrt(rate * (1 - rate) / n) + 1e-9, m
        kept = out[m][out[m] != 0]
        torch.testing.assert_close(kept, torch.full_like(kept, 1 / (1 - rate)))  # inverted dropout
    assert torch.equal(Dropout(rates).eval()(torch.ones(3, 5)), torch.ones(3, 5))


def test_a_batched_model_is_its_replicas_side_by_side():
    config = GPTConfig(**{**SMALL.__dict__, "bias": True})
    batched = GPT(config, replicas=3, seeds=[4, 5, 6]).eval()
    x, y = tokens(6, 9).view(3, 2, 9), tokens(6, 9, seed=2).view(3, 2, 9)
    smoothing = torch.tensor([0.0, 0.1, 0.2])
    logits, loss = batched(x, y, label_smoothing=smoothing)
    assert logits.shape == (3, 2, 9, SMALL.vocab_size) and loss.shape == (3,)
    for m in range(3):
        alone = GPT(config, seeds=[4 + m]).eval()
        alone_logits, alone_loss = alone(x[m], y[m], label_smoothing=float(smoothing[m]))
        torch.testing.assert_close(logits[m], alone_logits, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(loss[m], alone_loss, rtol=1e-5, atol=1e-6)
    with pytest.raises(UserError, match="shape \\(M, B, T\\)"):
        batched(x[0])
    with pytest.raises(UserError, match="seeds has 2 values for replicas=3"):
        GPT(config, replicas=3, seeds=[1, 2])


def embedding_sum(model: GPT, x: torch.Tensor, **forward) -> torch.Tensor:
    """What the model feeds its first dropout: token (+ NEFTune noise) + position embeddings."""
    seen = []
    handle = model.transformer.drop.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    with torch.no_grad():
        model(x, x, **forward)
    handle.remove()
    return seen[0]


def test_neftune_noise_has_its_scale_in_training_only():
    alpha, (batch, length) = 5.0, (64, 16)
    model = make_model()
    x = tokens(batch, length)
    clean = embedding_sum(model, x)
    model.train()
    noise = embedding_sum(model, x, embedding_noise_alpha=alpha) - clean
    # Uniform(−b, b) with b = α/√(L·d): std b/√3. The sample std of n uniforms has relative
    # standard error √((μ₄/σ⁴ − 1)/(4n)) = √((9/5 − 1)/(4n)) = 0.447/√n; five of them.
    bound = alpha / math.sqrt(length * SMALL.n_embd)
    n = noise.numel()
    assert noise.abs().max().item() <= bound * (1 + 1e-5)
    assert abs(noise.std().item() / (bound / math.sqrt(3)) - 1) < 5 * 0.447 / math.sqrt(n)
    assert abs(noise.mean().item()) < 5 * bound / math.sqrt(3 * n)
    # Off at α = 0 (no draw from the global RNG either) and in eval mode.
    state = torch.get_rng_state()
    assert torch.equal(embedding_sum(model, x, embedding_noise_alpha=0.0), clean)
    assert torch.equal(state, torch.get_rng_state())
    model.eval()
    assert torch.equal(embedding_sum(model, x, embedding_noise_alpha=alpha), clean)
