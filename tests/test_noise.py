import math
import re

import pytest
import torch

import gradnoise
from conftest import assert_standard_normal_scaled, count_jobs, trained_params
from gradnoise import GradientNoise, ReplicatedGradientNoise, UserError, add_noise_, schedules, streams

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _zero_grad_model(dtype=torch.float32, sizes=((300, 200), (200,), (50, 40))):
    params = [torch.nn.Parameter(torch.zeros(size, dtype=dtype)) for size in sizes]
    for p in params:
        p.grad = torch.zeros_like(p)
    return params


@pytest.mark.parametrize("dtype", DTYPES)
def test_noise_on_zero_gradients_has_mean_zero_and_std_sigma(dtype):
    params = _zero_grad_model(dtype)
    optimizer = torch.optim.SGD(params, lr=0.0)
    gn = GradientNoise(optimizer, schedules.Exponential(sigma0=0.2, gamma=0.5), seed=3)
    optimizer.step()
    for p in params:
        assert p.grad.dtype == dtype
        assert_standard_normal_scaled(p.grad, 0.2)
    assert_standard_normal_scaled(torch.cat([p.grad.flatten().float() for p in params]), 0.2)
    assert gn.sigma == pytest.approx(0.2) and gn.step == 1

    for p in params:
        p.grad.zero_()
    optimizer.step()  # σ_1 = 0.2 · 0.5
    assert_standard_normal_scaled(torch.cat([p.grad.flatten().float() for p in params]), 0.1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_relative_mode_scales_noise_by_the_gradient_rms(dtype):
    params = _zero_grad_model(dtype)
    rms = 3.0
    for p in params:
        p.grad.fill_(rms)  # RMS of a constant gradient is the constant
    optimizer = torch.optim.SGD(params, lr=0.0)
    gn = GradientNoise(optimizer, schedules.Constant(0.1), seed=0, mode="relative")
    optimizer.step()
    assert gn.mode == "relative" and gn.sigma == pytest.approx(0.3, rel=1e-3)
    added = torch.cat([(p.grad.float() - rms).flatten() for p in params])
    assert_standard_normal_scaled(added, 0.3)


def test_relative_schedule_spec_equals_relative_mode():
    params = _zero_grad_model()
    by_mode = GradientNoise(torch.optim.SGD(params, lr=0.0), "const:sigma=0.1", mode="relative")
    by_spec = GradientNoise(torch.optim.SGD(params, lr=0.0), "relative:const:sigma=0.1")
    assert by_mode.schedule == by_spec.schedule


def _noisy_run(seed, steps, state=None, start=0):
    params = _zero_grad_model()
    optimizer = torch.optim.SGD(params, lr=1.0)
    gn = GradientNoise(optimizer, schedules.Exponential(0.1, 0.9), seed=seed)
    if state is not None:
        gn.load_state_dict(state)
    drawn = []
    for _ in range(start, steps):
        for p in params:
            p.grad.zero_()
        optimizer.step()
        drawn.append(torch.cat([p.grad.flatten().clone() for p in params]))
    return gn, drawn


def test_same_seed_same_noise_different_seed_different_noise():
    _, a = _noisy_run(seed=1, steps=3)
    _, b = _noisy_run(seed=1, steps=3)
    _, c = _noisy_run(seed=2, steps=3)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not any(torch.equal(x, z) for x, z in zip(a, c, strict=True))
    assert not torch.equal(a[0] / a[0].std(), a[1] / a[1].std())  # fresh noise each step


def test_state_dict_round_trip_continues_the_stream_exactly():
    _, uninterrupted = _noisy_run(seed=5, steps=6)
    first_half, _ = _noisy_run(seed=5, steps=3)
    state = first_half.state_dict()
    resumed, second_half = _noisy_run(seed=999, steps=6, state=state, start=3)
    assert resumed.step == 6
    assert all(torch.equal(x, y) for x, y in zip(uninterrupted[3:], second_half, strict=True))


def test_load_state_dict_refuses_another_schedule():
    gn, _ = _noisy_run(seed=0, steps=1)
    other = GradientNoise(torch.optim.SGD(_zero_grad_model(), lr=0.1), "const:sigma=0.1")
    with pytest.raises(UserError, match=r"exp:sigma0=0\.1"):
        other.load_state_dict(gn.state_dict())


def test_a_noisy_step_leaves_the_global_rng_alone():
    torch.manual_seed(0)
    before = torch.get_rng_state()
    _noisy_run(seed=0, steps=2)
    add_noise_([torch.zeros(10)], 0.1, torch.Generator().manual_seed(1))
    assert torch.equal(before, torch.get_rng_state())


def test_noise_is_drawn_once_per_optimizer_step_under_accumulation():
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    reference = torch.nn.Linear(8, 4)
    reference.load_state_dict(model.state_dict())
    data = [torch.randn(16, 8) for _ in range(12)]

    accumulating_opt = torch.optim.SGD(model.parameters(), lr=0.1)
    accumulating = GradientNoise(accumulating_opt, "const:sigma=0.05", seed=7)
    for step in range(3):  # 3 optimizer steps of 4 micro-batches
        for micro in range(4):
            (model(data[4 * step + micro]).square().mean() / 4).backward()
        accumulating_opt.step()
        accumulating_opt.zero_grad()

    reference_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    GradientNoise(reference_opt, "const:sigma=0.05", seed=7)
    for step in range(3):  # the same gradients in one backward each
        reference(torch.cat(data[4 * step : 4 * step + 4])).square().mean().backward()
        reference_opt.step()
        reference_opt.zero_grad()

    assert accumulating.step == 3
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q)


def test_a_step_skipped_by_grad_scaler_draws_no_noise_and_is_not_counted():
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    gn = GradientNoise(optimizer, "exp:sigma0=0.1,gamma=0.5", seed=0)
    scaler = torch.amp.GradScaler("cpu", init_scale=16.0)
    for overflow in (False, True, False):
        optimizer.zero_grad()
        scaler.scale(model(torch.randn(3, 4)).sum()).backward()
        if overflow:
            model.weight.grad[0, 0] = float("inf")
        before = [p.detach().clone() for p in model.parameters()]
        scaler.unscale_(optimizer)
        scaler.step(optimizer)
        scaler.update()
        changed = any(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
        assert changed != overflow
    assert gn.step == 2
    assert gn.sigma == pytest.approx(0.05)  # σ_1: the skipped step did not advance t


def _scaled_step(model, optimizer, scaler, overflow: bool, unscale: bool = True) -> None:
    optimizer.zero_grad()
    scaler.scale(model(torch.randn(3, 4)).sum()).backward()
    if overflow:
        model.weight.grad[0, 0] = float("inf")
    if unscale:
        scaler.unscale_(optimizer)
    scaler.step(optimizer)
    scaler.update()


def test_a_fused_optimizer_step_skipped_by_grad_scaler_draws_no_noise():
    """GradScaler hands a fused optimizer found_inf instead of skipping its step()."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    gn = GradientNoise(optimizer, "exp:sigma0=0.1,gamma=0.5", seed=0)
    scaler = torch.amp.GradScaler("cpu", init_scale=16.0)
    steps = []
    for overflow in (False, True, False):
        _scaled_step(model, optimizer, scaler, overflow)
        steps.append(gn.step)
        if overflow:  # no noise was added: the inf is still the only change
            assert torch.isinf(model.weight.grad[0, 0])
    assert steps == [1, 1, 2]  # as with an unfused optimizer
    assert gn.sigma == pytest.approx(0.05)  # σ_1


def test_still_scaled_gradients_of_a_fused_optimizer_are_refused():
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    gn = GradientNoise(optimizer, "const:sigma=0.1", seed=0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    with pytest.raises(UserError, match=r"scaler\.unscale_\(optimizer\)"):
        _scaled_step(model, optimizer, scaler, overflow=False, unscale=False)
    assert gn.step == 0


def test_sigma_of_the_last_step_survives_a_resume():
    gn, _ = _noisy_run(seed=5, steps=4)
    assert gn.sigma == pytest.approx(0.1 * 0.9**3)
    resumed = GradientNoise(torch.optim.SGD(_zero_grad_model(), lr=0.1), schedules.Exponential(0.1, 0.9))
    resumed.load_state_dict(gn.state_dict())
    assert resumed.sigma == gn.sigma and resumed.step == 4


@pytest.mark.parametrize("schedule", ["exp:sigma0=0.1,gamma=0.9", "relative:const:sigma=0.5"])
def test_track_stats_does_not_change_the_noise(schedule):
    def run(track_stats):
        torch.manual_seed(0)
        params = [
            torch.nn.Parameter(torch.zeros(size)) for size in ((300, 200), (77,), (2 * streams._CPU_CHUNK,))
        ]
        optimizer = torch.optim.SGD(
            [{"params": params[:2]}, {"params": params[2:], "noise_scale": 0.5}], lr=0.1
        )
        gn = GradientNoise(optimizer, schedule, seed=3, track_stats=track_stats)
        grads = []
        for _ in range(3):
            for p in params:
                p.grad = torch.randn_like(p)
            optimizer.step()
            grads.append(torch.cat([p.grad.flatten() for p in params]))
        return gn, grads

    (tracked, with_stats), (_, without) = run(True), run(False)
    assert all(torch.equal(a, b) for a, b in zip(with_stats, without, strict=True))
    assert tracked.last_stats["noise_norm"] > 0


@pytest.mark.parametrize(
    "schedule",
    [
        "const:sigma=0.1",
        "exp:sigma0=0.1,gamma=0.9",
        "linear:sigma0=0.1,total_steps=3",
        "cosine:sigma0=0.1,total_steps=4,sigma_end=0.01",
        "neelakantan:eta=0.01,gamma=0.55",
        "relative:exp:sigma0=0.5,gamma=0.8",
    ],
)
def test_capturable_noise_equals_the_default_bit_for_bit(schedule):
    """capturable=True keeps t, σ_t and the step key as tensors (no host sync on a GPU)."""

    def run(capturable):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.zeros(size)) for size in ((300, 200), (77,))]
        optimizer = torch.optim.SGD(params, lr=0.1)
        gn = GradientNoise(optimizer, schedule, seed=(1 << 63) + 9, capturable=capturable)
        grads = []
        for _ in range(5):
            for p in params:
                p.grad = torch.randn_like(p)
            optimizer.step()
            grads.append(torch.cat([p.grad.flatten() for p in params]))
        return gn, grads

    (captured, a), (default, b) = run(True), run(False)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert isinstance(captured._step, torch.Tensor) and captured.step == default.step == 5
    assert captured.sigma == pytest.approx(default.sigma, rel=1e-6)
    resumed = GradientNoise(torch.optim.SGD(_zero_grad_model(), lr=0.1), schedule, capturable=True)
    resumed.load_state_dict(captured.state_dict())
    assert resumed.step == 5


def test_capturable_counts_the_steps_a_fused_optimizer_skips_on_the_device():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    gn = GradientNoise(optimizer, "exp:sigma0=0.1,gamma=0.5", capturable=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=16.0)
    steps = []
    for overflow in (False, True, False):
        _scaled_step(model, optimizer, scaler, overflow)
        steps.append(gn.step)
    assert steps == [1, 1, 2]
    with pytest.raises(UserError, match="capturable"):
        GradientNoise(optimizer, "plateau:sigma0=0.1", capturable=True)


def test_noise_lands_after_gradient_clipping():
    params = _zero_grad_model()
    for p in params:
        p.grad.fill_(10.0)
    optimizer = torch.optim.SGD(params, lr=1.0)
    GradientNoise(optimizer, "const:sigma=1.0", seed=0)
    before = [p.detach().clone() for p in params]
    torch.nn.utils.clip_grad_norm_(params, max_norm=1e-3)
    optimizer.step()
    update = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, params, strict=True)])
    # A clipped update has norm 1e-3; noise added after clipping has std 1 per element.
    assert_standard_normal_scaled(update, 1.0)


def test_noise_scale_per_param_group():
    quiet, loud, normal = _zero_grad_model(sizes=((100, 100), (100, 100), (100, 100)))
    optimizer = torch.optim.SGD(
        [
            {"params": [quiet], "noise_scale": 0.0},
            {"params": [loud], "noise_scale": 2.0},
            {"params": [normal]},
        ],
        lr=0.0,
    )
    GradientNoise(optimizer, "const:sigma=0.1", seed=0)
    optimizer.step()
    assert torch.count_nonzero(quiet.grad) == 0
    assert_standard_normal_scaled(loud.grad, 0.2)
    assert_standard_normal_scaled(normal.grad, 0.1)
    # Groups of equal shapes get independent noise, not one noise scaled twice.
    assert abs(torch.corrcoef(torch.stack([loud.grad.flatten(), normal.grad.flatten()]))[0, 1]) < 5 / 100


def test_the_old_noise_multiplier_key_still_works_with_a_deprecation_warning():
    def noisy(key):
        (param,) = _zero_grad_model(sizes=((100, 100),))
        optimizer = torch.optim.SGD([{"params": [param], key: 2.0}], lr=0.0)
        GradientNoise(optimizer, "const:sigma=0.1", seed=3)
        optimizer.step()
        return param.grad

    with pytest.warns(DeprecationWarning, match="noise_scale"):
        old = noisy("noise_multiplier")
    assert torch.equal(old, noisy("noise_scale"))


@pytest.mark.parametrize(
    ("group", "words"),
    [
        ({"noise_scale": -1}, ["noise_scale=-1", "≥ 0"]),
        ({"noise_scale": float("nan")}, ["noise_scale=nan"]),
        ({"noise_scale": "2"}, ["noise_scale='2'"]),
        ({"noise_scale": 1.0, "noise_multiplier": 1.0}, ["both", "noise_scale"]),
    ],
)
def test_bad_noise_scales_are_refused(group, words):
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(UserError) as error:
        GradientNoise(torch.optim.SGD([{"params": [p], **group}], lr=0.1), "const:sigma=0.1")
    for word in words:
        assert word in str(error.value)


def test_remove_detaches_the_hook():
    params = _zero_grad_model()
    optimizer = torch.optim.SGD(params, lr=0.0)
    gn = GradientNoise(optimizer, "const:sigma=0.1")
    gn.remove()
    optimizer.step()
    assert gn.step == 0 and all(torch.count_nonzero(p.grad) == 0 for p in params)


def test_relative_rms_covers_only_the_gradients_that_get_noise():
    silent, noisy = _zero_grad_model(sizes=((200, 100), (200, 100)))
    silent.grad.fill_(1000.0)  # would dominate an RMS over every gradient
    noisy.grad.fill_(2.0)
    optimizer = torch.optim.SGD([{"params": [silent], "noise_scale": 0.0}, {"params": [noisy]}], lr=0.0)
    gn = GradientNoise(optimizer, "relative:const:sigma=0.1", seed=0)
    optimizer.step()
    assert gn.sigma == pytest.approx(0.2, rel=1e-6)  # 0.1 × RMS(noisy) = 0.1 × 2
    assert torch.all(silent.grad == 1000.0)
    assert_standard_normal_scaled(noisy.grad - 2.0, 0.2)


def test_track_stats_reports_gradient_and_noise_norms():
    params = _zero_grad_model(sizes=((400, 250),))
    params[0].grad.fill_(0.5)  # ‖g‖ = 0.5 · √100000
    optimizer = torch.optim.SGD(params, lr=0.0)
    gn = GradientNoise(optimizer, "const:sigma=0.1", track_stats=True)
    optimizer.step()
    n = 100_000
    assert gn.last_stats["grad_norm"] == pytest.approx(0.5 * math.sqrt(n), rel=1e-5)
    # ‖σε‖² / σ² ~ χ²_n: mean n, sd √(2n)
    assert abs(gn.last_stats["noise_norm"] ** 2 / 0.01 - n) < 5 * math.sqrt(2 * n)
    assert gn.last_stats["noise_to_grad"] == pytest.approx(
        gn.last_stats["noise_norm"] / gn.last_stats["grad_norm"]
    )
    assert_standard_normal_scaled(params[0].grad - 0.5, 0.1)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"mode": "loud"}, ["mode='loud'", "absolute", "relative"]),
        ({"schedule": "exp:sigma0=0.1"}, ["gamma"]),
        ({"schedule": 0.1}, ["schedule"]),
    ],
)
def test_bad_arguments_raise_user_errors(kwargs, words):
    arguments = {"schedule": "const:sigma=0.1", **kwargs}
    optimizer = torch.optim.SGD(_zero_grad_model(), lr=0.1)
    with pytest.raises(UserError) as error:
        GradientNoise(optimizer, **arguments)
    for word in words:
        assert word in str(error.value)
    with pytest.raises(UserError, match="Optimizer"):
        GradientNoise(torch.nn.Linear(2, 2), "const:sigma=0.1")
    with pytest.raises(UserError, match="sigma=-1"):
        add_noise_([torch.zeros(2)], -1.0)


def test_add_noise_batches_tensors_independently():
    big, small = torch.zeros(3 * streams._CPU_CHUNK + 17), torch.zeros(1000)
    add_noise_([big, small], 1.0, torch.Generator().manual_seed(0))
    assert_standard_normal_scaled(big, 1.0)
    assert_standard_normal_scaled(small, 1.0)
    chunks = big.split(streams._CPU_CHUNK)
    # Chunks come from different generators: their correlation is ~N(0, 1/n).
    correlation = torch.corrcoef(torch.stack([chunks[0], chunks[1]]))[0, 1]
    assert abs(correlation) < 5 / math.sqrt(streams._CPU_CHUNK)
    assert not torch.equal(big[:1000], small)


@pytest.mark.parametrize("dtype", DTYPES)
def test_keys_that_differ_only_in_their_high_32_bits_give_different_noise(dtype):
    def noisy(key):
        tensors = [torch.zeros(3 * streams._CPU_CHUNK + 5, dtype=dtype), torch.zeros(100, dtype=dtype)]
        add_noise_(tensors, 1.0, key=key)
        return torch.cat(tensors)

    low = 0x1234_5678
    first, again = noisy(low), noisy(low)
    assert torch.equal(first, again)
    for high in (1, 1 << 31, 0xFFFF_FFFF):
        other = noisy(high << 32 | low)
        # Two independent normal samples: equal elements only by chance (often in bf16/fp16).
        assert torch.count_nonzero(first == other) < first.numel() // 50
    # The same holds for the seed of GradientNoise, whose step keys are 64-bit.
    _, a = _noisy_run(seed=7, steps=2)
    _, b = _noisy_run(seed=7 + (1 << 32), steps=2)
    assert not any(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_chunk_states_of_distinct_streams_differ_in_almost_every_word():
    """Distinct (key, stream, chunk) give distinct mt19937 states that differ in
    nearly every word (a state differing in a few words only would start a
    nearly identical stream)."""
    key = 0xDEADBEEF_01234567
    cases = {
        "next chunk": (streams._chunk_states(key, 0, 2)[0], streams._chunk_states(key, 0, 2)[1]),
        "other stream": (streams._chunk_states(key, 0, 1)[0], streams._chunk_states(key, 1, 1)[0]),
        "high key bit": (streams._chunk_states(key, 0, 1)[0], streams._chunk_states(key ^ 1 << 63, 0, 1)[0]),
        "low key bit": (streams._chunk_states(key, 0, 1)[0], streams._chunk_states(key ^ 1, 0, 1)[0]),
    }
    for name, (a, b) in cases.items():
        words_a, words_b = a.view(torch.int64)[streams._STATE_MT], b.view(torch.int64)[streams._STATE_MT]
        differing = torch.count_nonzero(words_a != words_b).item()
        assert differing >= streams._MT_WORDS - 6, name  # all but the verbatim words may differ
        # And torch accepts each as a generator state whose stream depends on it.
        draws = []
        for state in (a, b):
            generator = torch.Generator()
            generator.set_state(state.clone())
            draws.append(torch.randn(1000, generator=generator))
        assert not torch.equal(*draws), name


def test_a_chunk_state_does_not_depend_on_how_many_chunks_there_are():
    many, few = streams._chunk_states(99, 3, 130), streams._chunk_states(99, 3, 61)
    assert torch.equal(many[:61], few)  # states are built in blocks: block edges change nothing


def test_step_keys_can_be_computed_on_a_tensor():
    seeds = [0, 1, (1 << 63) + 5, (1 << 64) - 1, 0x1234_5678_9ABC_DEF0]
    steps = [0, 1, 2, 4999, 10**6, (1 << 40) + 3]
    for seed in seeds:
        on_tensor = streams.mix(seed, torch.tensor(steps, dtype=torch.int64))
        assert [v & streams._MASK64 for v in on_tensor.tolist()] == [
            streams.mix(seed, step) for step in steps
        ]


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_noise_does_not_depend_on_the_number_of_threads(monkeypatch, workers):
    def noisy():
        tensors = [
            torch.zeros(5 * streams._CPU_CHUNK + 3),
            torch.zeros(7, 9).t(),
        ]  # the second not contiguous
        add_noise_(tensors, 0.5, key=11)
        return torch.cat([t.flatten() for t in tensors])

    monkeypatch.setattr(streams, "_worker_count", lambda: 1)
    serial = noisy()
    monkeypatch.setattr(streams, "_worker_count", lambda: workers)
    assert torch.equal(noisy(), serial)


def test_add_noise_with_tensor_sigma_and_key_equals_floats():
    first, second = torch.zeros(5000), torch.zeros(5000)
    add_noise_([first], torch.tensor(0.3), key=torch.tensor(1 << 40))
    add_noise_([second], 0.3, key=1 << 40)
    assert torch.equal(first, second)
    assert_standard_normal_scaled(first, 0.3)
    with pytest.raises(UserError, match=r"key=0\.5"):
        add_noise_([first], 0.3, key=0.5)


def test_public_api_is_exported():
    assert gradnoise.GradientNoise is GradientNoise
    assert gradnoise.add_noise_ is add_noise_
    assert gradnoise.schedules.parse("none") is None


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _cuda_params(dtype, sizes=((1000, 300), (7,), (4097,), (64, 64)), fill=1.0):
    params = [torch.nn.Parameter(torch.zeros(size, device="cuda", dtype=dtype)) for size in sizes]
    for p in params:
        p.grad = torch.full_like(p, fill)
    return params


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_noise_statistics_and_determinism(dtype, fused, monkeypatch):
    if not fused:
        monkeypatch.setenv("GRADNOISE_DISABLE_TRITON", "1")

    def noisy_gradients(seed, mode="absolute"):
        params = _cuda_params(dtype)
        optimizer = torch.optim.SGD(params, lr=0.0)
        GradientNoise(optimizer, "const:sigma=0.25", seed=seed, mode=mode)
        optimizer.step()
        return [(p.grad.float() - 1).cpu() for p in params]

    first, again, other = noisy_gradients(4), noisy_gradients(4), noisy_gradients(5)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], other[0])
    # The key is 64 bits wide: seeds apart only in the high 32 bits give other noise.
    assert not torch.equal(first[0], noisy_gradients(4 + (1 << 32))[0])
    assert not torch.equal(first[0], noisy_gradients(4 + (1 << 62))[0])
    for added in first:
        if added.numel() > 1000:
            assert_standard_normal_scaled(added, 0.25)
    assert_standard_normal_scaled(torch.cat([a.flatten() for a in first]), 0.25)
    relative = noisy_gradients(4, mode="relative")  # RMS of all-ones gradients is 1
    assert_standard_normal_scaled(torch.cat([a.flatten() for a in relative]), 0.25)


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("fused", [True, False])
def test_cuda_key_and_sigma_on_the_device_equal_host_values(fused, monkeypatch):
    if not fused:
        monkeypatch.setenv("GRADNOISE_DISABLE_TRITON", "1")
    key = (1 << 63) + 12345
    on_host, on_device = _cuda_params(torch.float32), _cuda_params(torch.float32)
    add_noise_([p.grad for p in on_host], 0.3, key=key)
    add_noise_(
        [p.grad for p in on_device],
        torch.tensor(0.3, device="cuda"),
        key=torch.tensor(streams._signed(key), device="cuda"),
    )
    for a, b in zip(on_host, on_device, strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-6)
    # A bf16 tensor in the call is another stream, which leaves the fp32 group's noise alone.
    twin = _cuda_params(torch.float32)
    add_noise_([p.grad for p in twin] + [torch.zeros(5, device="cuda", dtype=torch.bfloat16)], 0.3, key=key)
    assert torch.equal(twin[0].grad, on_host[0].grad)
    # Streams of one key are independent: two param groups of equal shape get different noise.
    first, second = _cuda_params(torch.float32, sizes=((4097,), (4097,)), fill=0.0)
    optimizer = torch.optim.SGD([{"params": [first]}, {"params": [second]}], lr=0.0)
    GradientNoise(optimizer, "const:sigma=0.3").apply()
    assert torch.count_nonzero(first.grad == second.grad) < 10


@pytest.mark.cuda
@cuda
def test_capturable_noise_replays_in_a_cuda_graph():
    """t, σ_t and the key live on the device: each replay of a captured step draws the next step's noise."""
    schedule = "exp:sigma0=0.1,gamma=0.9"
    reference_params = _cuda_params(torch.float32, fill=0.0)
    reference = GradientNoise(torch.optim.SGD(reference_params, lr=0.0), schedule, seed=1, attach=False)
    expected = []
    for _ in range(3):
        for p in reference_params:
            p.grad.zero_()
        reference.apply()
        expected.append([p.grad.clone() for p in reference_params])

    params = _cuda_params(torch.float32, fill=0.0)
    gn = GradientNoise(torch.optim.SGD(params, lr=0.0), schedule, seed=1, capturable=True, attach=False)

    def step():
        for p in params:
            p.grad.zero_()
        gn.apply()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up, eager: step 0
    torch.cuda.current_stream().wait_stream(side)
    got = [[p.grad.clone() for p in params]]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for _ in range(2):
        graph.replay()
        got.append([p.grad.clone() for p in params])
    torch.cuda.synchronize()
    assert gn.step == 3
    for step_got, step_expected in zip(got, expected, strict=True):
        for a, b in zip(step_got, step_expected, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("as_keyword", [False, True])
def test_noise_follows_the_closure_when_step_gets_one(as_keyword):
    params = _zero_grad_model()
    optimizer = torch.optim.SGD(params, lr=1.0)
    gn = GradientNoise(optimizer, "const:sigma=1.0", seed=0)

    def closure():  # computes (and clips) the gradients the step will use
        for p in params:
            p.grad = torch.full_like(p, 10.0)
        torch.nn.utils.clip_grad_norm_(params, max_norm=1e-3)
        return torch.tensor(0.0)

    before = [p.detach().clone() for p in params]
    loss = optimizer.step(closure=closure) if as_keyword else optimizer.step(closure)
    assert loss == 0.0 and gn.step == 1
    update = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, params, strict=True)])
    # Noise added before the closure would be overwritten, leaving an update of norm 1e-3.
    assert_standard_normal_scaled(update, 1.0)


def test_step_keys_are_distinct_across_seeds_and_steps():
    keys = {streams.mix(seed, step) for seed in range(50) for step in range(2000)}
    assert len(keys) == 50 * 2000
    assert all(0 <= key < 1 << 64 for key in keys)


# --- replicas: M models trained as one, each parameter's leading dimension the replica ---

REPLICA_SIZES = ((3, 300, 200), (3, 200), (3, 50, 40))


def _replica_noise(schedules_, seeds, modes, gradient: float = 0.0, steps: int = 2, sizes=REPLICA_SIZES):
    """The noise a replicated GradientNoise adds over `steps` steps, per step: a list of the
    parameters' added noise (M, …)."""
    params = [torch.nn.Parameter(torch.zeros(size)) for size in sizes]
    optimizer = torch.optim.SGD([{"params": params[:2]}, {"params": params[2:]}], lr=0.0)
    gn = ReplicatedGradientNoise(optimizer, schedules_, seed=seeds, mode=modes)
    added = []
    for _ in range(steps):
        for p in params:
            p.grad = torch.full_like(p, gradient) * (1 + torch.arange(len(p)).view(-1, *[1] * (p.dim() - 1)))
        before = [p.grad.clone() for p in params]
        optimizer.step()
        added.append([p.grad - b for p, b in zip(params, before, strict=True)])
    return gn, added


def _alone_noise(schedule, seed, mode, replica: int, gradient: float = 0.0, steps: int = 2):
    """The noise GradientNoise(schedule, seed) adds to replica `replica`'s slices alone."""
    params = [torch.nn.Parameter(torch.zeros(size[1:])) for size in REPLICA_SIZES]
    optimizer = torch.optim.SGD([{"params": params[:2]}, {"params": params[2:]}], lr=0.0)
    gn = GradientNoise(optimizer, schedule, seed=seed, mode=mode)
    added = []
    for _ in range(steps):
        for p in params:
            p.grad = torch.full_like(p, gradient * (1 + replica))
        before = [p.grad.clone() for p in params]
        optimizer.step()
        added.append([p.grad - b for p, b in zip(params, before, strict=True)])
    return gn, added


def test_each_replica_gets_exactly_the_noise_of_its_run_alone():
    specs = ["const:sigma=0.1", "exp:sigma0=0.3,gamma=0.5", "const:sigma=0.02"]
    modes = ["absolute", "relative", "absolute"]
    seeds = [11, 12, 11]
    gn, added = _replica_noise(specs, seeds, modes, gradient=1.0)
    assert gn.mode == modes and gn.seed == seeds and len(gn.sigma) == 3
    for m in range(3):
        alone, alone_added = _alone_noise(specs[m], seeds[m], modes[m], m, gradient=1.0)
        for step_added, step_alone in zip(added, alone_added, strict=True):
            for batched, single in zip(step_added, step_alone, strict=True):
                assert torch.equal(batched[m], single), m  # bit for bit
        assert gn.sigma[m] == alone.sigma
    # Relative: σ = r · RMS(g) of the replica's own gradient, (1 + m) for replica m.
    assert gn.sigma[1] == pytest.approx(0.3 * 0.5 * 2)
    # Replicas 0 and 2 share a seed: the same ε, scaled by their own σ (up to the rounding
    # of g + noise at g = 3, half an ulp of 3 = 1.2e-7, times 5).
    torch.testing.assert_close(added[0][0][2] * 5, added[0][0][0], rtol=0, atol=1e-6)


def test_replicated_noise_skips_a_step_grad_scaler_skips():
    model = torch.nn.Linear(4, 4)
    params = [torch.nn.Parameter(torch.stack([p.detach()] * 2)) for p in model.parameters()]
    optimizer = torch.optim.SGD(params, lr=0.1)
    gn = ReplicatedGradientNoise(optimizer, "exp:sigma0=0.1,gamma=0.5", seed=[0, 1])
    scaler = torch.amp.GradScaler("cpu", init_scale=16.0)
    for overflow in (False, True, False):
        optimizer.zero_grad()
        for p in params:
            p.grad = scaler.scale(torch.ones_like(p))
        if overflow:
            params[0].grad[1, 0, 0] = float("inf")
        before = [p.detach().clone() for p in params]
        scaler.unscale_(optimizer)
        scaler.step(optimizer)
        scaler.update()
        assert any(not torch.equal(b, p) for b, p in zip(before, params, strict=True)) != overflow
    assert gn.step == 2
    assert gn.sigma == [pytest.approx(0.05)] * 2


def test_replicated_state_dict_round_trip_continues_every_stream():
    specs = ["plateau:sigma0=0.1,patience=0", "const:sigma=0.2"]
    gn, _ = _replica_noise(specs, [3, 4], "absolute", steps=1, sizes=((2, 10, 10), (2, 10), (2, 5)))
    gn.observe([1.0, 1.0])
    gn.observe([2.0, 2.0])  # replica 0's plateau decays σ
    state = gn.state_dict()
    assert [lane["seed"] for lane in state["replicas"]] == [3, 4]
    params = [torch.nn.Parameter(torch.zeros(size)) for size in ((2, 10, 10), (2, 10), (2, 5))]
    optimizer = torch.optim.SGD([{"params": params[:2]}, {"params": params[2:]}], lr=0.0)
    restored = ReplicatedGradientNoise(optimizer, specs, seed=[0, 0])
    restored.load_state_dict(state)
    assert restored.state_dict() == state
    assert restored.schedule[0](restored.step) < 0.1  # the plateau's memory came back
    with pytest.raises(UserError, match="for 2 replicas"):
        ReplicatedGradientNoise(
            torch.optim.SGD([torch.nn.Parameter(torch.zeros(3, 2))], lr=0.0),
            "const:sigma=0.1",
            seed=[0, 1, 2],
        ).load_state_dict(state)


@pytest.mark.parametrize(
    "placement, optimizer_name, modes, correlations",
    [
        (
            "update",
            "adamw",
            ["absolute", "relative", "relative"],
            ["anticorrelated", "independent", "anticorrelated"],
        ),
        (
            "gradient",
            "sgd",
            ["relative", "absolute", "absolute"],
            ["anticorrelated", "anticorrelated", "independent"],
        ),
    ],
)
def test_each_replica_gets_its_run_alones_correlated_noise_wherever_placed(
    placement, optimizer_name, modes, correlations
):
    specs = ["exp:sigma0=0.2,gamma=0.7", "const:sigma=0.3", "const:sigma=0.05"]
    seeds, sizes, steps = [5, 6, 5], ((3, 120, 80), (3, 80), (3, 30, 20)), 4
    batched, gn = trained_params(
        sizes,
        None,
        steps,
        optimizer_name,
        schedule=specs,
        seed=seeds,
        mode=modes,
        correlation=correlations,
        placement=placement,
    )
    assert gn.correlation == correlations and gn.placement == placement
    for m in range(3):
        alone, alone_gn = trained_params(
            sizes,
            m,
            steps,
            optimizer_name,
            schedule=specs[m],
            seed=seeds[m],
            mode=modes[m],
            correlation=correlations[m],
            placement=placement,
        )
        for p, q in zip(batched, alone, strict=True):
            assert torch.equal(p[m], q), m  # bit for bit, over steps that feed back
        assert gn.sigma[m] == alone_gn.sigma > 0
        assert gn.state_dict()["replicas"][m] == alone_gn.state_dict()
    # The noise did something: without it replica 0 ends elsewhere.
    quiet, _ = trained_params(sizes, None, steps, optimizer_name, schedule="const:sigma=0", seed=seeds)
    assert not torch.equal(quiet[0][0], batched[0][0])


def test_replicated_anticorrelated_state_resumes_each_replicas_previous_sigma():
    sizes, kwargs = (
        ((2, 40, 30), (2, 30), (2, 10)),
        {
            "schedule": ["exp:sigma0=0.2,gamma=0.5", "const:sigma=0.1"],
            "seed": [1, 2],
            "mode": ["relative", "absolute"],
            "correlation": "anticorrelated",
            "placement": "update",
        },
    )
    straight, _ = trained_params(sizes, None, 3, "adamw", **kwargs)
    # Two steps, then a fresh GradientNoise on a fresh optimizer loaded with both states.
    params, gn = trained_params(sizes, None, 2, "adamw", **kwargs)
    assert gn.correlation == ["anticorrelated"] * 2
    optimizer = torch.optim.AdamW(
        [{"params": params[:2]}, {"params": params[2:], "noise_scale": 0.5}], lr=0.01, weight_decay=0.1
    )
    optimizer.load_state_dict(gn.optimizer.state_dict())
    gn.remove()
    resumed = ReplicatedGradientNoise(optimizer, **{**kwargs, "seed": [0, 0]})
    resumed.load_state_dict(gn.state_dict())
    for p in params:
        p.grad = torch.cos(3 * p.detach())
    optimizer.step()
    for p, q in zip(params, straight, strict=True):
        assert torch.equal(p, q)
    with pytest.raises(
        UserError, match="correlation='anticorrelated', but this one has correlation='independent'"
    ):
        ReplicatedGradientNoise(
            optimizer, **{**kwargs, "correlation": ["anticorrelated", "independent"]}, stack=True
        ).load_state_dict(gn.state_dict())


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"seed": []}, "seed=[]"),
        ({"seed": 5}, "one seed per replica"),
        ({"seed": [1, 2, 3]}, "replica dimension of 3 replicas"),
        ({"seed": [1, 2], "mode": ["absolute"]}, "mode=['absolute']"),
        ({"seed": [1, 2], "correlation": ["independent"]}, "correlation=['independent']"),
        ({"seed": [1, 2], "correlation": ["independent", "anti"]}, "correlation='anti'"),
        ({"seed": [1, 2**64]}, f"seed={2**64}"),
        (
            {"seed": [1, 2], "placement": ["update", "update"]},
            "placement=['update', 'update']",
        ),
    ],
)
def test_bad_replica_arguments_raise_user_errors(kwargs, words):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2, 4))], lr=0.1)
    with pytest.raises(UserError, match=re.escape(words)):
        ReplicatedGradientNoise(optimizer, "const:sigma=0.1", **kwargs)


# --- beyond the gradient: anticorrelated noise, noise on the update --------------------


def _summed_noise(correlation: str, steps: int, sigma: float = 0.1, numel: int = 60_000) -> torch.Tensor:
    """Σ_t of the noise GradientNoise adds to zero gradients over `steps` steps (apply())."""
    (param,) = _zero_grad_model(sizes=((numel,),))
    gn = GradientNoise(
        torch.optim.SGD([param], lr=0.0),
        f"const:sigma={sigma}",
        seed=11,
        attach=False,
        correlation=correlation,
    )
    total = torch.zeros(numel, dtype=torch.float64)
    for _ in range(steps):
        param.grad.zero_()
        gn.apply()
        total += param.grad.double()
    assert gn.step == steps
    return total


@pytest.mark.parametrize(("correlation", "variance_in_sigma2"), [("anticorrelated", 1), ("independent", 20)])
def test_noise_summed_over_steps_has_variance_sigma2_anticorrelated_and_t_sigma2_independent(
    correlation, variance_in_sigma2
):
    sigma, steps = 0.1, 20
    total = _summed_noise(correlation, steps, sigma)
    n, expected = total.numel(), variance_in_sigma2 * sigma**2
    # The sample variance of n normals: variance·χ²_n/n, standard error variance·√(2/n).
    assert abs(total.var().item() - expected) < 5 * expected * math.sqrt(2 / n)
    assert abs(total.mean().item()) < 5 * math.sqrt(expected / n)


def test_anticorrelated_noise_is_the_difference_of_consecutive_independent_draws():
    # ξ_t = σ_t·ε_t − σ_{t−1}·ε_{t−1}, ε from the same keyed stream as independent noise;
    # relative mode, so σ_{t−1} is the σ the previous step used (its gradient's RMS).
    def added(correlation):
        params = _zero_grad_model()
        gn = GradientNoise(
            torch.optim.SGD(params, lr=0.0),
            "relative:exp:sigma0=0.5,gamma=0.9",
            seed=4,
            attach=False,
            correlation=correlation,
        )
        draws = []
        for step in range(4):
            for p in params:
                p.grad.fill_(1.0 + step)  # RMS(g_t) = 1 + t
            gn.apply()
            draws.append(torch.cat([(p.grad - 1.0 - step).flatten() for p in params]))
        return draws

    independent, anticorrelated = added("independent"), added("anticorrelated")
    torch.testing.assert_close(anticorrelated[0], independent[0], rtol=0, atol=0)  # ε_{−1} = 0
    for t in range(1, 4):
        torch.testing.assert_close(
            anticorrelated[t], independent[t] - independent[t - 1], rtol=1e-5, atol=1e-6
        )


def _update_noise_run(
    optimizer_name, steps, *, schedule="const:sigma=0.5", gradient=0.0, params=None, state=None, **options
):
    """`steps` steps with noise on the update, on a constant gradient: (noise, params, per-step moves)."""
    params = _zero_grad_model() if params is None else params
    optimizer = (
        torch.optim.SGD(params, lr=0.1)
        if optimizer_name == "sgd"
        else torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    )
    gn = GradientNoise(optimizer, schedule, seed=2, placement="update", **options)
    if state is not None:
        gn.load_state_dict(state)
    moves = []
    for _ in range(steps):
        for p in params:
            p.grad.fill_(gradient)
        before = torch.cat([p.detach().flatten().clone() for p in params])
        optimizer.step()
        moves.append(torch.cat([p.detach().flatten() for p in params]) - before)
    return gn, params, moves


@pytest.mark.parametrize(("optimizer_name", "lr"), [("sgd", 0.1), ("adamw", 1e-3)])
def test_update_noise_moves_the_weights_by_lr_sigma(optimizer_name, lr):
    # Zero gradients: SGD's update is 0, and so is Adam's (m = 0); the weights move by the noise alone.
    gn, _, moves = _update_noise_run(optimizer_name, steps=2)
    for move in moves:
        assert_standard_normal_scaled(move, lr * 0.5)
    assert gn.step == 2 and gn.sigma == 0.5


def test_update_noise_is_the_gradient_noise_draw_on_the_other_side_of_sgd():
    # SGD moves p by −lr·(g + σ·ε) with gradient noise, by +lr·σ·ε with update noise: the same ε.
    params = _zero_grad_model()
    GradientNoise(torch.optim.SGD(params, lr=0.1), "const:sigma=0.5", seed=2)
    params[0].grad.zero_()
    optimizer = torch.optim.SGD(params, lr=0.1)
    GradientNoise(optimizer, "const:sigma=0.5", seed=2)
    optimizer.step()
    on_gradient = torch.cat([p.detach().flatten() for p in params])
    _, _, (on_update,) = _update_noise_run("sgd", steps=1)
    torch.testing.assert_close(on_update, -on_gradient, rtol=1e-6, atol=0)


def test_relative_update_noise_follows_the_rms_of_the_update():
    # SGD, lr 0.1, gradient 1 everywhere: Δp = −0.1, RMS(Δp) = 0.1, so σ = 0.3·0.1.
    gn, _, moves = _update_noise_run(
        "sgd", steps=2, schedule="const:sigma=0.3", mode="relative", gradient=1.0
    )
    assert gn.sigma == pytest.approx(0.03, rel=1e-4)  # RMS in fp32 over 60,200 elements
    for move in moves:
        assert_standard_normal_scaled(move + 0.1, 0.03)


def test_update_noise_by_hand_goes_after_the_step_and_relative_mode_needs_the_hooks():
    params = _zero_grad_model()
    optimizer = torch.optim.SGD(params, lr=0.1)
    gn = GradientNoise(optimizer, "const:sigma=0.5", seed=2, placement="update", attach=False)
    optimizer.step()
    assert all(torch.equal(p, torch.zeros_like(p)) for p in params)  # not attached
    gn.apply()
    torch.testing.assert_close(
        torch.cat([p.detach().flatten() for p in params]), _update_noise_run("sgd", steps=1)[2][0]
    )
    with pytest.raises(UserError, match="attach=True"):
        GradientNoise(optimizer, "const:sigma=0.5", mode="relative", placement="update", attach=False)


@pytest.mark.parametrize("fused", [False, True])
def test_a_step_grad_scaler_skips_gets_no_update_noise_and_is_not_counted(fused):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=fused)
    gn = GradientNoise(
        optimizer, "exp:sigma0=0.1,gamma=0.5", placement="update", correlation="anticorrelated"
    )
    scaler = torch.amp.GradScaler("cpu", init_scale=16.0)
    steps = []
    for overflow in (False, True, False):
        before = [p.detach().clone() for p in model.parameters()]
        _scaled_step(model, optimizer, scaler, overflow)
        steps.append(gn.step)
        unchanged = all(torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
        assert unchanged == overflow
    assert steps == [1, 1, 2]
    assert gn.sigma == pytest.approx(0.05)  # σ_1: the skipped step did not advance t


def test_capturable_update_noise_skips_on_the_device():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    gn = GradientNoise(
        optimizer,
        "exp:sigma0=0.1,gamma=0.5",
        placement="update",
        correlation="anticorrelated",
        capturable=True,
    )
    scaler = torch.amp.GradScaler("cpu", init_scale=16.0)
    for overflow in (False, True, False):
        before = [p.detach().clone() for p in model.parameters()]
        _scaled_step(model, optimizer, scaler, overflow)
        unchanged = all(torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
        assert unchanged == overflow
    assert gn.step == 2 and gn.sigma == pytest.approx(0.05)  # σ of the last step taken


@pytest.mark.parametrize(
    "options",
    [
        {"correlation": "anticorrelated"},
        {"correlation": "anticorrelated", "schedule": "relative:exp:sigma0=0.5,gamma=0.9"},
        {"correlation": "anticorrelated", "mode": "relative"},
        {},
    ],
)
def test_update_and_anticorrelated_noise_resume_exactly(options):
    # SGD without momentum keeps no state of its own: the noise's state is all a resume needs.
    _, _, whole = _update_noise_run("sgd", steps=5, gradient=1.0, **options)
    first, params, _ = _update_noise_run("sgd", steps=2, gradient=1.0, **options)
    state = first.state_dict()
    assert state["sigma"] != 0 and state["placement"] == "update"
    params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for p in params:
        p.grad = torch.zeros_like(p)
    resumed, _, rest = _update_noise_run("sgd", steps=3, gradient=1.0, params=params, state=state, **options)
    assert resumed.step == 5
    assert all(torch.equal(a, b) for a, b in zip(whole[2:], rest, strict=True))


def test_anticorrelated_gradient_noise_resumes_exactly():
    def run(steps, state=None, start=0):
        params = _zero_grad_model()
        gn = GradientNoise(
            torch.optim.SGD(params, lr=0.0), "relative:exp:sigma0=0.5,gamma=0.9", correlation="anticorrelated"
        )
        if state is not None:
            gn.load_state_dict(state)
        drawn = []
        for step in range(start, steps):
            for p in params:
                p.grad.fill_(1.0 + step)
            gn.optimizer.step()
            drawn.append(torch.cat([p.grad.flatten().clone() for p in params]))
        return gn, drawn

    _, whole = run(5)
    first, _ = run(2)
    _, rest = run(5, first.state_dict(), start=2)
    assert all(torch.equal(a, b) for a, b in zip(whole[2:], rest, strict=True))


def test_load_state_dict_refuses_another_correlation_or_placement():
    gn, _ = _noisy_run(seed=0, steps=1)  # independent, on the gradient
    for options, words in (
        ({"correlation": "anticorrelated"}, "correlation='independent'"),
        ({"placement": "update"}, "placement='gradient'"),
    ):
        other = GradientNoise(
            torch.optim.SGD(_zero_grad_model(), lr=0.1), "exp:sigma0=0.1,gamma=0.9", **options
        )
        with pytest.raises(UserError, match=words):
            other.load_state_dict(gn.state_dict())
    state = gn.state_dict()
    del state["correlation"], state["placement"]  # saved before the options existed
    GradientNoise(torch.optim.SGD(_zero_grad_model(), lr=0.1), "exp:sigma0=0.1,gamma=0.9").load_state_dict(
        state
    )


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"correlation": "pink"}, ["correlation='pink'", "'independent'", "'anticorrelated'"]),
        ({"placement": "weights"}, ["placement='weights'", "'gradient'", "'update'"]),
    ],
)
def test_bad_correlation_or_placement_is_a_user_error(options, words):
    with pytest.raises(UserError) as error:
        GradientNoise(torch.optim.SGD(_zero_grad_model(), lr=0.1), "const:sigma=0.1", **options)
    for word in words:
        assert word in str(error.value)


def test_track_stats_on_the_update_measures_the_noise_added_to_the_weights():
    params = _zero_grad_model()
    for p in params:
        p.grad.fill_(2.0)
    optimizer = torch.optim.SGD(params, lr=0.1)
    gn = GradientNoise(optimizer, "const:sigma=0.5", placement="update", track_stats=True)
    optimizer.step()
    n = sum(p.numel() for p in params)
    assert gn.last_stats["grad_norm"] == pytest.approx(2.0 * math.sqrt(n))
    # ‖lr·σ·ε‖ = lr·σ·√n (1 ± 1/√(2n)); five standard deviations.
    assert gn.last_stats["noise_norm"] == pytest.approx(0.1 * 0.5 * math.sqrt(n), rel=5 / math.sqrt(2 * n))


def test_all_replicas_noise_goes_in_one_cpu_call_per_term(monkeypatch):
    calls = count_jobs(monkeypatch, streams, "_add_noise_cpu")
    sizes = ((3, 120, 80), (3, 80), (3, 30, 20))
    trained_params(
        sizes,
        None,
        3,
        "sgd",
        schedule="const:sigma=0.1",
        seed=[1, 2, 3],
        correlation=["anticorrelated", "independent", "anticorrelated"],
    )
    # Per step: σ_t·ε_t of 3 replicas × 2 param groups; from step 1 on, a second call
    # with the two anticorrelated replicas' −σ_{t−1}·ε_{t−1}.
    assert calls == [6, 6, 4, 6, 4]


def test_update_noise_reaches_large_parameters_from_every_worker_thread(monkeypatch):
    """Grad mode is per thread: the helper threads that add a big parameter's chunks
    must write into it under their own no_grad."""
    monkeypatch.setattr(streams, "_worker_count", lambda: 4)
    weight = torch.nn.Parameter(torch.zeros(8 * streams._CPU_CHUNK))
    weight.grad = torch.zeros_like(weight)
    optimizer = torch.optim.SGD([weight], lr=0.1)
    GradientNoise(optimizer, "const:sigma=0.5", placement="update")
    optimizer.step()
    assert_standard_normal_scaled(weight.detach(), 0.1 * 0.5)
