"""rsoptim.Adam8bit / AdamW8bit: block-wise 8-bit Adam states (bitsandbytes' names and keys).

The reference is ``rsoptim.adam8bit.reference_step``: torch's own for-loop Adam's moments from
the decoded ones, the param updated with the second moment's bias correction folded into the step
size and eps (bitsandbytes' form of the same update), then the moments encoded again. The Rust
kernel must match it bit for bit; both run
with an IEEE square root here (``conftest.ieee_sqrt``: torch's float32 CPU ``sqrt`` is not
correctly rounded, the kernels' is), and so does torch.optim.Adam where it is compared.
"""

from __future__ import annotations

import contextlib
import copy
import io
import pickle
import re
import warnings
from typing import Any, Callable, Iterator

import numpy as np
import pytest
import torch

import rsoptim
from conftest import ieee_sqrt
from rsoptim import _rsoptim
from rsoptim.adam8bit import (
    QMAP_SIGNED,
    QMAP_UNSIGNED,
    QUANT_BLOCK,
    decode_signed,
    decode_unsigned,
    dequantize,
    encode_signed,
    encode_unsigned,
    quantize,
)

HAS_KERNEL = hasattr(_rsoptim, "adam8bit_step")
needs_kernel = pytest.mark.skipif(not HAS_KERNEL, reason="_rsoptim.adam8bit_step is not built yet")

HALF = (torch.bfloat16, torch.float16)
SIZES = (1, 255, 256, 257, 4096, 70_000)
EIGHT_BIT_KEYS = ("step", "state1", "state2", "absmax1", "absmax2")


@contextlib.contextmanager
def reference_path() -> Iterator[None]:
    """Within the block, 8-bit params are stepped by ``reference_step`` (as without the
    binding), with the IEEE square root the kernels use."""
    kernel = getattr(_rsoptim, "adam8bit_step", None)
    if kernel is not None:
        delattr(_rsoptim, "adam8bit_step")
    try:
        with ieee_sqrt():
            yield
    finally:
        if kernel is not None:
            _rsoptim.adam8bit_step = kernel


def make_params(dtype: torch.dtype, sizes: tuple[int, ...], seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(n, generator=g).to(dtype)) for n in sizes]


def clones(params: list[torch.Tensor]) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def set_grads(params_lists: list[list[torch.Tensor]], seed: int, scale: float = 1.0) -> None:
    """The same random grads (each param its own) on every list of twin params."""
    g = torch.Generator().manual_seed(seed)
    for twins in zip(*params_lists):
        grad = (torch.randn(twins[0].shape, generator=g) * scale).to(twins[0].dtype)
        for p in twins:
            p.grad = grad.clone()


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits, so that NaNs and signed zeros compare exactly."""
    views = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return t.detach().contiguous().view(views[t.element_size()])


def assert_same(a: Any, b: Any, what: str) -> None:
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: {a.dtype} {a.shape} vs {b.dtype} {b.shape}"
        differ = int((bits(a) != bits(b)).sum())
        assert differ == 0, f"{what}: {differ} of {a.numel()} elements differ"
    else:
        assert a == b, f"{what}: {a!r} vs {b!r}"


def assert_states_equal(opt_a: torch.optim.Optimizer, params_a: list, opt_b: torch.optim.Optimizer, params_b: list):
    for i, (p, q) in enumerate(zip(params_a, params_b)):
        assert_same(p, q, f"param {i}")
        state_a, state_b = opt_a.state[p], opt_b.state[q]
        assert state_a.keys() == state_b.keys(), f"param {i}: {sorted(state_a)} vs {sorted(state_b)}"
        for key in state_a:
            assert_same(state_a[key], state_b[key], f"param {i} state[{key!r}]")


# -------------------------------------------------------------------------------------------
# The codes
# -------------------------------------------------------------------------------------------


def test_every_code_round_trips_and_the_tables_are_monotone():
    codes = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(encode_signed(decode_signed(codes)), codes)
    assert torch.equal(encode_unsigned(decode_unsigned(codes)), codes)
    assert torch.equal(decode_signed(codes), QMAP_SIGNED) and torch.equal(decode_unsigned(codes), QMAP_UNSIGNED)
    # Ends and zeros: code 0 is -1, 127 is -0.0, 128 is +0.0, 255 is 1; unsigned 0 is 0, 255 is 1.
    assert QMAP_SIGNED[[0, 255]].tolist() == [-1.0, 1.0] and QMAP_UNSIGNED[[0, 255]].tolist() == [0.0, 1.0]
    assert bits(QMAP_SIGNED[127:129]).tolist() == [-(2**31), 0]
    # Strictly increasing but for the two zeros (which compare equal).
    signed_steps = QMAP_SIGNED.diff()
    assert (signed_steps[:126] > 0).all() and signed_steps[127] == 0 and (signed_steps[128:] > 0).all()
    assert (signed_steps[126] > 0) and (QMAP_UNSIGNED.diff() > 0).all()
    # 3 mantissa bits over about 4.7 decades (first moment) and 9.5 (second moment).
    assert QMAP_SIGNED[129] == 1.25 * 2.0**-16 and QMAP_UNSIGNED[1] == 1.25 * 2.0**-32


def expected_codes(y: np.ndarray, table: np.ndarray, signed: bool) -> np.ndarray:
    """Brute force over the 256 decoded values, with the rules the codes follow: the nearest
    value, ties away from zero; magnitudes above 1 clamp to 1; magnitudes below 1.1875 times the
    binade of the smallest nonzero code (2^-16 signed, 2^-32 unsigned) flush to zero (the
    rounding is done on the bit pattern, as if a code 1.125 * 2^-16 existed below the smallest,
    1.25 * 2^-16), and zeros keep the value's sign (signed codes); positive values never encode
    as zero (unsigned codes: they take the smallest)."""
    y64 = y.astype(np.float64)
    distance = np.abs(table.astype(np.float64)[None, :] - y64[:, None])
    nearest = distance == distance.min(axis=1, keepdims=True)
    # Among tied codes, the one of the largest magnitude.
    magnitude = np.where(nearest, np.abs(table.astype(np.float64))[None, :], -1.0)
    codes = magnitude.argmax(axis=1)
    if signed:
        codes = np.where((codes == 127) | (codes == 128), np.where(np.signbit(y), 127, 128), codes)
    flush = np.abs(y64) < 1.1875 * 2.0 ** (-16 if signed else -32)
    # (Positive second moments never flush: they take the smallest code.)
    zero = np.where(np.signbit(y), 127, 128) if signed else np.where(y64 > 0, 1, 0)
    return np.where(flush, zero, codes)


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_codes_are_the_nearest_values(signed):
    rng = np.random.default_rng(0)
    magnitudes = np.exp2(rng.uniform(-40, 0.5, 40_000)).astype(np.float32)  # past 1.0, to clamp
    y = magnitudes * (rng.choice([-1, 1], magnitudes.size) if signed else 1)
    table = (QMAP_SIGNED if signed else QMAP_UNSIGNED).numpy()
    # Every midpoint between neighbouring codes (a tie) and both zeros.
    mids = ((table[1:].astype(np.float64) + table[:-1]) / 2).astype(np.float32)
    y = np.concatenate([y.astype(np.float32), mids, np.float32([0.0, -0.0 if signed else 0.0])])
    encode = encode_signed if signed else encode_unsigned
    actual = encode(torch.from_numpy(y)).numpy()
    np.testing.assert_array_equal(actual, expected_codes(y, table, signed))
    # Non-finite values encode as the largest magnitude (no absmax makes them fit).
    special = torch.tensor([float("inf"), -float("inf"), float("nan"), 3.0])
    assert encode(special).tolist() == ([255, 0, 255, 255] if signed else [255, 255, 255, 255])


def test_encoding_is_monotone():
    y = torch.sort(torch.randn(20_000) * torch.exp2(torch.randint(-20, 2, (20_000,)).float())).values
    assert (decode_signed(encode_signed(y)).diff() >= 0).all()
    assert (decode_unsigned(encode_unsigned(y.abs().sort().values)).diff() >= 0).all()


def test_quantize_blocks():
    assert getattr(_rsoptim, "QUANT_BLOCK", QUANT_BLOCK) == QUANT_BLOCK == 256
    # Blocks of 256 elements from the first one; the absmax keeps NaN; a zero block stays zero.
    x = torch.zeros(3 * QUANT_BLOCK + 5)
    x[0], x[300], x[301] = -4.0, 2.0, float("nan")
    x[QUANT_BLOCK * 3 + 4] = 0.5
    codes, absmax = quantize(x, signed=True)
    assert absmax.shape == (4,) and absmax[0] == 4.0 and absmax[1].isnan() and absmax[2] == 0 and absmax[3] == 0.5
    decoded = dequantize(codes, absmax, QMAP_SIGNED)
    assert decoded[0] == -4.0 and decoded[-1] == 0.5 and (decoded[QUANT_BLOCK * 2 : QUANT_BLOCK * 3] == 0).all()


# -------------------------------------------------------------------------------------------
# Numbers: against torch.optim.Adam (first step, small params) and the reference (later steps)
# -------------------------------------------------------------------------------------------


def ulps_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many representable values of their (equal) dtype lie between each pair of elements."""
    def ordered(t: torch.Tensor) -> torch.Tensor:
        raw = bits(t).to(torch.int64)
        sign = 1 << (8 * t.element_size() - 1)
        return torch.where(raw < 0, -(raw + sign), raw)  # sign and magnitude to a number line

    return (ordered(a) - ordered(b)).abs()


@pytest.mark.parametrize("dtype", [torch.float32, *HALF], ids=str)
@pytest.mark.parametrize("decoupled", [False, True], ids=["Adam", "AdamW"])
def test_first_step_is_torch_adams(dtype, decoupled):
    """The first step starts from zero moments: the state holds torch.optim.Adam's moments,
    encoded, bit for bit. The param is torch's update with the second moment's bias correction
    c folded into the step size and eps (``p - (lr c / bc1) m / (sqrt(v) + eps c)``, one
    division fewer), bit for bit on torch's own moments, and so within a few roundings of
    torch's param (on a float32 copy of a half-precision param, rounded once)."""
    ours_cls, torch_cls = (rsoptim.AdamW8bit, torch.optim.AdamW) if decoupled else (rsoptim.Adam8bit, torch.optim.Adam)
    lr, weight_decay, (beta1, beta2), eps = 1e-2, 0.1, (0.9, 0.999), 1e-8
    params = make_params(dtype, (300, 5000))
    reference = [torch.nn.Parameter(p.detach().to(torch.float32, copy=True)) for p in params]
    before = [r.detach().clone() for r in reference]
    ours = ours_cls(params, lr=lr, weight_decay=weight_decay, min_8bit_size=0)
    torch_opt = torch_cls(reference, lr=lr, weight_decay=weight_decay, foreach=False)
    set_grads([params], seed=1)
    for p, r in zip(params, reference):
        r.grad = p.grad.float()
    ours.step()
    with ieee_sqrt():
        torch_opt.step()
        for p, r, p0 in zip(params, reference, before):
            state, torch_state = ours.state[p], torch_opt.state[r]
            assert_same(state["step"], torch_state["step"], "step")
            for key, moment, signed in (("state1", "exp_avg", True), ("state2", "exp_avg_sq", False)):
                codes, absmax = quantize(torch_state[moment], signed)
                assert_same(state[key], codes, key)
                assert_same(state["absmax" + key[-1]], absmax, "absmax" + key[-1])
            correction = (1 - beta2) ** 0.5  # step 1
            expected = p0 * (1 - lr * weight_decay) if decoupled else p0.clone()
            denominator = torch_state["exp_avg_sq"].sqrt().add_(eps * correction)
            expected.addcdiv_(torch_state["exp_avg"], denominator, value=-lr / (1 - beta1) * correction)
            assert_same(p, expected.to(dtype), "param")
            if dtype == torch.float32:
                # Each form rounds about five times on the way to the update: the two updates
                # differ by a few units of the update's last place, and each sum by half a unit
                # of the param's.
                update = (r.detach() - (p0 * (1 - lr * weight_decay) if decoupled else p0)).abs()
                bound = 16 * 2.0**-24 * update + torch.finfo(dtype).eps * r.detach().abs()
                assert bool(((p.detach() - r.detach()).abs() <= bound).all())
            else:  # the float32 results differ far below a half-precision unit, rounded once
                apart = ulps_apart(p.detach(), r.detach().to(dtype))
                assert int(apart.max()) <= 1, f"{int(apart.max())} units apart from torch's param"
    if dtype == torch.float32:  # (not a test that cannot fail: the fold changes some roundings)
        assert any(bool((p.detach() != r.detach()).any()) for p, r in zip(params, reference))


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, *HALF], ids=str)
@pytest.mark.parametrize("cls", [rsoptim.Adam8bit, rsoptim.AdamW8bit], ids=lambda c: c.__name__)
def test_kernel_is_the_reference(dtype, cls):
    """Later steps: the kernel gives the reference's params and state bit for bit, for every
    block layout (one element, short and long last blocks), two groups with other options."""

    def build(params: list[torch.Tensor]) -> torch.optim.Optimizer:
        half = len(params) // 2
        return cls(
            [
                {"params": params[:half]},
                {"params": params[half:], "weight_decay": 0.1, "maximize": True, "lr": torch.tensor(3e-3)},
            ],
            lr=1e-2,
            min_8bit_size=0,
        )

    params = make_params(dtype, SIZES * 2)
    twins = clones(params)
    kernel_opt, reference_opt = build(params), build(twins)
    for step in range(3):
        set_grads([params, twins], seed=step, scale=10.0 ** (step - 1))
        kernel_opt.step()
        with reference_path():
            reference_opt.step()
        assert_states_equal(kernel_opt, params, reference_opt, twins)


@needs_kernel
def test_later_steps_check_their_tensors_natively_and_give_the_same_bits(monkeypatch):
    """From its second step on, a group of plain CPU params with their state is checked by one
    native read of all its tensors, not param by param in Python, and steps to the same bits as
    the per-param path; params whose memory overlaps still take that path (the kernel refuses
    them before writing anything)."""
    base = torch.zeros(9000)
    overlapping = [torch.nn.Parameter(base[:6000]), torch.nn.Parameter(base[3000:])]
    params = make_params(torch.float32, (5000, 10, 70_000)) + make_params(torch.bfloat16, (4096, 300), seed=1)
    twins = clones(params)
    twin_base = base.clone()
    twin_overlapping = [torch.nn.Parameter(twin_base[:6000]), torch.nn.Parameter(twin_base[3000:])]

    def build(params: list[torch.Tensor], overlapping: list[torch.Tensor]) -> torch.optim.Optimizer:
        return rsoptim.AdamW8bit([{"params": params}, {"params": overlapping, "lr": 1e-3}], lr=1e-2)

    native, per_param = build(params, overlapping), build(twins, twin_overlapping)
    per_param._native_calls = lambda group, params: None  # (an instance attribute: this one only)
    checked: list[tuple[torch.optim.Optimizer, int]] = []
    check = rsoptim.Adam8bit._check_param_and_state

    def counting_check(self, p, index, group, name):
        checked.append((self, self.param_groups.index(group)))
        return check(self, p, index, group, name)

    monkeypatch.setattr(rsoptim.Adam8bit, "_check_param_and_state", counting_check)
    for step in range(3):
        set_grads([params + overlapping, twins + twin_overlapping], seed=step)
        checked.clear()
        native.step()
        per_param.step()
        assert ((native, 0) in checked) == (step == 0), "the native check replaces the per-param ones"
        assert (per_param, 0) in checked
        assert_states_equal(native, params + overlapping, per_param, twins + twin_overlapping)


@pytest.mark.parametrize("beta2, first_step", [(0.999, 20_000), (0.999, 16_000), (0.95, 400)])
def test_late_steps_are_the_reference(beta2, first_step):
    """Late in training the second moment's bias correction rounds to 1: still the reference
    bit for bit (and just before)."""
    params = make_params(torch.float32, SIZES)
    twins = clones(params)
    kernel_opt = rsoptim.AdamW8bit(params, lr=1e-2, betas=(0.9, beta2), min_8bit_size=0)
    reference_opt = rsoptim.AdamW8bit(twins, lr=1e-2, betas=(0.9, beta2), min_8bit_size=0)
    for step in range(3):
        set_grads([params, twins], seed=step)
        kernel_opt.step()
        with reference_path():
            reference_opt.step()
        if step == 0:  # move both to the late step count
            for opt in (kernel_opt, reference_opt):
                for state in opt.state.values():
                    state["step"].fill_(first_step)
    assert_states_equal(kernel_opt, params, reference_opt, twins)


def test_small_params_keep_torch_adams_state():
    """Params under min_8bit_size (and float64 ones) keep torch.optim.Adam's float32 state
    under bitsandbytes' keys; float32/float64 ones are torch.optim.Adam's numbers."""
    params = make_params(torch.float32, (10, 4095)) + make_params(torch.float64, (5000,))
    twins = clones(params)
    ours = rsoptim.AdamW8bit(params, lr=1e-2)
    theirs = torch.optim.AdamW(twins, lr=1e-2, foreach=False)
    for step in range(3):
        set_grads([params, twins], seed=step)
        ours.step()
        with ieee_sqrt():
            theirs.step()
        for p, q in zip(params, twins):
            assert_same(p, q, "param")
            state = ours.state[p]
            assert sorted(state) == ["state1", "state2", "step"]
            for key, theirs_key in (("state1", "exp_avg"), ("state2", "exp_avg_sq"), ("step", "step")):
                assert_same(state[key], theirs.state[q][theirs_key], key)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_small_half_params_are_rsoptim_adams_with_float32_state(dtype):
    params = make_params(dtype, (10, 300))
    twins = clones(params)
    ours = rsoptim.Adam8bit(params, lr=1e-2, weight_decay=0.1)
    theirs = rsoptim.Adam(twins, lr=1e-2, weight_decay=0.1, state_dtype=torch.float32)
    for step in range(3):
        set_grads([params, twins], seed=step)
        ours.step()
        theirs.step()
        for p, q in zip(params, twins):
            assert_same(p, q, "param")
            assert_same(ours.state[p]["state1"], theirs.state[q]["exp_avg"], "state1")
            assert_same(ours.state[p]["state2"], theirs.state[q]["exp_avg_sq"], "state2")


@needs_kernel
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_master_weights_and_stochastic_rounding_match_the_reference(dtype):
    def build(params):
        options = {"master_weights": True, "stochastic_rounding": True, "stochastic_rounding_seed": 7}
        return rsoptim.AdamW8bit(params, lr=1e-2, min_8bit_size=1000, **options)

    params = make_params(dtype, (100, 3000))  # one small, one 8-bit
    twins = clones(params)
    kernel_opt, reference_opt = build(params), build(twins)
    for step in range(3):
        set_grads([params, twins], seed=step)
        kernel_opt.step()
        with reference_path():
            reference_opt.step()
        assert_states_equal(kernel_opt, params, reference_opt, twins)
    assert kernel_opt.state[params[1]]["master_param"].dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_clipping_in_the_step_is_clip_grad_norm_then_step(dtype):
    params = make_params(dtype, (100, 5000))
    twins = clones(params)
    clipping = rsoptim.Adam8bit(params, lr=1e-2, max_grad_norm=0.5)
    plain = rsoptim.Adam8bit(twins, lr=1e-2)
    for step in range(2):
        set_grads([params, twins], seed=step)
        clipping.step()
        total = rsoptim.clip_grad_norm_(twins, 0.5)
        plain.step()
        assert_same(clipping.last_grad_norm, total, "total norm")
        assert_states_equal(clipping, params, plain, twins)


def test_strided_params_step_as_their_contiguous_twins():
    """Blocks run over the param's elements in logical (row-major) order, whatever its
    strides: a transposed leaf steps as a contiguous copy of it."""
    strided = torch.nn.Parameter(torch.randn(60, 100).t())
    contiguous = torch.nn.Parameter(strided.detach().contiguous())
    opt_a, opt_b = rsoptim.Adam8bit([strided], min_8bit_size=0), rsoptim.Adam8bit([contiguous], min_8bit_size=0)
    for step in range(2):
        set_grads([[strided], [contiguous]], seed=step)
        opt_a.step()
        opt_b.step()
    assert not strided.is_contiguous()
    assert_states_equal(opt_a, [strided], opt_b, [contiguous])


def test_a_param_listed_twice_is_stepped_twice():
    """As torch.optim steps it: one step after the other, the second seeing the first's state
    (torch's ops step it, with the kernel's numbers)."""
    p = torch.nn.Parameter(torch.randn(5000))
    q = torch.nn.Parameter(p.detach().clone())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns of duplicate params
        twice = rsoptim.Adam8bit([p, p], min_8bit_size=0)
    once = rsoptim.Adam8bit([q], min_8bit_size=0)
    set_grads([[p], [q]], seed=0)
    with ieee_sqrt():
        twice.step()
    once.step()
    once.step()
    assert_states_equal(twice, [p], once, [q])


def test_state_takes_at_most_2_1_bytes_per_element():
    params = make_params(torch.float32, (4096, 5000)) + make_params(torch.bfloat16, (4096, 70_000))
    opt = rsoptim.Adam8bit(params)
    set_grads([params], seed=0)
    opt.step()
    for p in params:
        state = opt.state[p]
        own = sum(t.numel() * t.element_size() for k, t in state.items() if not k.startswith("qmap"))
        assert own / p.numel() <= 2.1, f"{own / p.numel():.3f} bytes per element for {p.numel()} elements"
        # The code tables are one pair of tensors for all params.
        assert state["qmap1"] is opt.state[params[0]]["qmap1"] and state["qmap2"] is opt.state[params[0]]["qmap2"]


# -------------------------------------------------------------------------------------------
# State dicts
# -------------------------------------------------------------------------------------------


def mixed_params() -> list[torch.nn.Parameter]:
    """8-bit float32 and bfloat16 params, small ones, a float64 one."""
    return make_params(torch.float32, (5000, 10)) + make_params(torch.bfloat16, (4096, 100), seed=1) + make_params(
        torch.float64, (6000,), seed=2
    )


def saved_and_loaded(state_dict: dict[str, Any]) -> dict[str, Any]:
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer)


def test_state_dict_round_trip_resumes_bitwise():
    build: Callable[[list], torch.optim.Optimizer] = lambda ps: rsoptim.AdamW8bit(
        [{"params": ps[:3]}, {"params": ps[3:], "lr": 3e-3}], lr=1e-2
    )
    params = mixed_params()
    straight_params = clones(params)
    straight = build(straight_params)
    first = build(params)
    for step in range(3):
        set_grads([params, straight_params], seed=step)
        first.step()
        straight.step()
    saved = saved_and_loaded(first.state_dict())
    resumed_params = clones(params)
    resumed = build(resumed_params)
    resumed.load_state_dict(saved)
    for step in range(3, 5):
        set_grads([resumed_params, straight_params], seed=step)
        resumed.step()
        straight.step()
    assert_states_equal(resumed, resumed_params, straight, straight_params)
    # Codes stay uint8 and scales float32 (torch's loader casts floating state to the param's
    # dtype), and the loaded code tables are shared again.
    state = resumed.state[resumed_params[2]]
    assert state["state1"].dtype == torch.uint8 and state["absmax1"].dtype == torch.float32
    assert state["qmap1"] is resumed.state[resumed_params[0]]["qmap1"]
    assert resumed.state[resumed_params[3]]["state1"].dtype == torch.float32  # small bfloat16 param


@pytest.mark.parametrize(
    "source",
    [
        torch.optim.Adam,
        lambda ps, lr: torch.optim.Adam(ps, lr=lr, fused=True),
        lambda ps, lr: rsoptim.Adam(ps, lr=lr, state_dtype=torch.float32),
    ],
    ids=["torch", "torch-fused", "rsoptim-float32-state"],
)
def test_loads_adams_state_dict_quantized(source):
    """torch.optim.Adam's moments (or rsoptim.Adam's) are stored as a step would store them;
    torch's implementation flags and rsoptim's state_dtype are dropped."""
    params = mixed_params()
    torch_params = clones(params)
    torch_opt = source(torch_params, lr=1e-2)
    set_grads([torch_params], seed=0)
    torch_opt.step()
    ours = rsoptim.Adam8bit(params, lr=1e-2)
    ours.load_state_dict(torch_opt.state_dict())
    for p, q in zip(params, torch_params):
        state, torch_state = ours.state[p], torch_opt.state[q]
        if p.numel() >= 4096 and p.dtype != torch.float64:
            for key, moment, signed in (("state1", "exp_avg", True), ("state2", "exp_avg_sq", False)):
                codes, absmax = quantize(torch_state[moment].float(), signed)
                assert_same(state[key], codes, key)
                assert_same(state["absmax" + key[-1]], absmax, "absmax")
        else:
            wanted = torch.float32 if p.dtype in HALF else p.dtype
            assert_same(state["state1"], torch_state["exp_avg"].to(wanted), "state1")
        assert_same(state["step"], torch_state["step"].to(torch.float32), "step")
    group = ours.param_groups[0]
    assert group["fused"] is None and "state_dtype" not in group and group["min_8bit_size"] == 4096
    set_grads([params], seed=1)
    ours.step()


def test_loads_another_code_table_by_decoding_it():
    """A state saved with another table (bitsandbytes' dynamic map, a plain int step) is
    decoded with its table, as bitsandbytes reads it, and encoded with ours."""
    p = torch.nn.Parameter(torch.randn(5000))
    ours = rsoptim.Adam8bit([p])
    blocks = -(-p.numel() // QUANT_BLOCK)
    their_map = torch.linspace(-1, 1, 256)
    saved_state = {
        "step": 3,
        "state1": torch.randint(0, 256, (5000,), dtype=torch.uint8),
        "state2": torch.randint(128, 256, (5000,), dtype=torch.uint8),
        "absmax1": torch.rand(blocks),
        "absmax2": torch.rand(blocks),
        "qmap1": their_map,
        "qmap2": their_map,
    }
    state_dict = ours.state_dict()
    state_dict["state"] = {0: saved_state}
    ours.load_state_dict(state_dict)
    state = ours.state[p]
    for key, signed in (("1", True), ("2", False)):
        decoded = dequantize(saved_state["state" + key], saved_state["absmax" + key], their_map)
        codes, absmax = quantize(decoded, signed)
        assert_same(state["state" + key], codes, "state" + key)
        assert_same(state["absmax" + key], absmax, "absmax" + key)
    assert_same(state["qmap1"], QMAP_SIGNED, "qmap1")
    assert_same(state["step"], torch.tensor(3.0), "step")


# -------------------------------------------------------------------------------------------
# Errors and torch.optim behaviours
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"lr": -1.0},
        {"eps": -1.0},
        {"betas": (1.0, 0.9)},
        {"betas": (0.9, -0.1)},
        {"weight_decay": -1.0},
        {"betas": (0.9, torch.tensor(0.99))},
        {"lr": torch.tensor([1e-3, 1e-3])},
    ],
    ids=lambda k: next(iter(k)),
)
def test_torch_adams_argument_errors(kwargs):
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError) as torch_error:
        torch.optim.Adam([p], **kwargs)
    for cls in (rsoptim.Adam8bit, rsoptim.AdamW8bit):
        with pytest.raises(ValueError, match=re.escape(str(torch_error.value))):
            cls([p], **kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"amsgrad": True}, "amsgrad=True is not supported"),
        ({"foreach": True}, "foreach=True is not supported"),
        ({"fused": True}, "fused=True is not supported"),
        ({"capturable": True}, "capturable=True is not supported"),
        ({"differentiable": True}, "differentiable=True is not supported"),
        ({"min_8bit_size": -1}, "Invalid min_8bit_size"),
        ({"min_8bit_size": 1.5}, "Invalid min_8bit_size"),
    ],
    ids=lambda x: str(x)[:30],
)
def test_refused_options(kwargs, message):
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match=message):
        rsoptim.Adam8bit([p], **kwargs)
    opt = rsoptim.Adam8bit([p])
    with pytest.raises(ValueError, match=message):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], **kwargs})
    assert len(opt.param_groups) == 1


def test_refused_params_and_grads_before_anything_is_stepped():
    with pytest.raises(ValueError, match="not torch.complex64"):
        rsoptim.Adam8bit([torch.nn.Parameter(torch.zeros(3, dtype=torch.complex64))])
    with pytest.raises(ValueError, match="not torch.int64"):
        rsoptim.Adam8bit([torch.zeros(3, dtype=torch.int64)])
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt = rsoptim.Adam8bit([a, b])
    a.grad = torch.ones(3)
    b.grad = torch.ones(3).to_sparse()
    with pytest.raises(RuntimeError, match="Adam does not support sparse gradients"):
        opt.step()
    assert (a == 1).all() and len(opt.state) == 0
    opt.param_groups[0]["amsgrad"] = True  # edited after construction
    b.grad = torch.ones(3)
    with pytest.raises(ValueError, match="amsgrad=True is not supported"):
        opt.step()
    amsgrad_state = torch.optim.Adam([torch.nn.Parameter(torch.ones(3))], amsgrad=True).state_dict()
    with pytest.raises(ValueError, match="amsgrad=True is not supported"):
        rsoptim.Adam8bit([a]).load_state_dict(amsgrad_state)


@pytest.mark.parametrize("target", ["param", "grad", "step", "state1", "state2", "absmax1", "absmax2", "small state1"])
def test_memory_shrunk_under_a_tensor_is_refused_before_anything_is_stepped(target):
    """A storage resized in place (``untyped_storage().resize_()``) can be smaller than its
    tensor: handing it to the kernels would write out of bounds. It raises, before any group is
    stepped, whichever tensor it is."""
    first = torch.nn.Parameter(torch.ones(5000))  # another group, stepped before in group order
    big, small = torch.nn.Parameter(torch.ones(5000)), torch.nn.Parameter(torch.ones(10))
    opt = rsoptim.AdamW8bit([{"params": [first]}, {"params": [big, small]}])
    for p in (first, big, small):
        p.grad = torch.full_like(p, 0.5)
    opt.step()
    state = opt.state[small] if target.startswith("small") else opt.state[big]
    victim = {"param": big, "grad": big.grad}.get(target, state.get(target.split()[-1]))
    before = [(p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items() if k != target}) for p in (first, small)]
    victim.untyped_storage().resize_(0 if target == "step" else 16)
    with pytest.raises(RuntimeError, match="reaches past the end of its storage"):
        opt.step()
    for p, (value, saved) in zip((first, small), before):
        assert torch.equal(p.detach(), value)
        for key, v in saved.items():
            if opt.state[p][key] is not victim:
                assert torch.equal(opt.state[p][key], v), key


def test_torch_optimizer_behaviours():
    params = make_params(torch.float32, (5000, 10))
    unused = torch.nn.Parameter(torch.zeros(4))
    opt = rsoptim.AdamW8bit(params + [unused], lr=1e-2, foreach=False, fused=False)  # (the for-loop: accepted)
    assert repr(opt).startswith("AdamW8bit (") and "min_8bit_size: 4096" in repr(opt)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    set_grads([params], seed=0)
    assert opt.step(lambda: 1.5) == 1.5  # the closure's loss
    assert calls == ["pre", "post"] and unused not in opt.state  # no grad, no state
    # A scheduler's lr is read at each step: lr 0 leaves the params as they are (no decay).
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 0.0)
    assert opt.param_groups[0]["lr"] == 0.0
    before = [p.detach().clone() for p in params]
    opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    del scheduler
    opt.zero_grad()
    assert all(p.grad is None for p in params)
    # deepcopy and pickle keep the class, options and state.
    twin = copy.deepcopy(opt)
    twin_params = twin.param_groups[0]["params"][:2]
    assert type(twin) is rsoptim.AdamW8bit and twin.param_groups[0]["decoupled_weight_decay"]
    assert_states_equal(opt, params, twin, twin_params)
    unpickled = pickle.loads(pickle.dumps(opt))
    assert type(unpickled) is rsoptim.AdamW8bit and unpickled.param_groups[0]["min_8bit_size"] == 4096
    # add_param_group takes the defaults.
    extra = torch.nn.Parameter(torch.zeros(8192))
    opt.add_param_group({"params": [extra], "min_8bit_size": 10_000})
    extra.grad = torch.ones(8192)
    opt.step()
    assert opt.state[extra]["state1"].dtype == torch.float32  # 8192 < its group's min_8bit_size


@pytest.mark.cuda
def test_cuda_params_step_with_the_reference():
    cpu_params = make_params(torch.float32, (5000, 10))
    cuda_params = [torch.nn.Parameter(p.detach().cuda()) for p in cpu_params]
    cpu_opt, cuda_opt = rsoptim.Adam8bit(cpu_params, lr=1e-2), rsoptim.Adam8bit(cuda_params, lr=1e-2)
    for step in range(3):
        set_grads([cpu_params], seed=step)
        for p, q in zip(cpu_params, cuda_params):
            q.grad = p.grad.cuda()
        cpu_opt.step()
        cuda_opt.step()
    for p, q in zip(cpu_params, cuda_params):
        assert cuda_opt.state[q]["state1"].device.type == "cuda"
        torch.testing.assert_close(q.detach().cpu(), p.detach(), rtol=1e-5, atol=1e-6)
