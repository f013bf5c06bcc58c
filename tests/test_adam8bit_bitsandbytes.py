"""Checkpoints move between rsoptim.AdamW8bit and bitsandbytes' AdamW8bit (CPU, bitsandbytes >=
0.50; skipped where it is not installed).

Both keep the same state keys, block size (256) and layout. The code tables differ: ours are
small floats cut from float32 bits, which encode with a few integer operations (bitsandbytes'
decimal "dynamic" map needs a search per value); each state carries its table (``qmap1``/
``qmap2``), and both decode as ``qmap[code] * absmax``. So bitsandbytes reads our state exactly,
and ours re-encodes a bitsandbytes state with our table on load (one rounding, at most 1/16 of
each value).
"""

from __future__ import annotations

import copy

import pytest
import torch

import rsoptim
from rsoptim.adam8bit import QMAP_SIGNED, QMAP_UNSIGNED, QUANT_BLOCK, dequantize

bnb = pytest.importorskip("bitsandbytes")

LR = 1e-3
SHAPES = [(40, 250), (100,)]  # an 8-bit param (10,000 elements, a short last block) and a small one


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in SHAPES]


def _grads(step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(shape, generator=g) * 0.1 * (step + 1) for shape in SHAPES]


def _train(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], steps: range) -> None:
    for step in steps:
        for p, grad in zip(params, _grads(step)):
            p.grad = grad.clone()
        optimizer.step()


def _moments(state: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """A param's moments as ``qmap[code] * absmax`` (bitsandbytes' reading), or as they are."""
    nested = state.get("__bnb_optimizer_quant_state__", state)
    if nested["state1"].dtype != torch.uint8:
        return nested["state1"], nested["state2"]
    return tuple(
        dequantize(nested[f"state{i}"], nested[f"absmax{i}"], nested[f"qmap{i}"]) for i in (1, 2)
    )


def test_bitsandbytes_reads_our_state_as_we_do_and_steps_on_from_it():
    ours_params = _params()
    ours = rsoptim.AdamW8bit(ours_params, lr=LR)
    _train(ours, ours_params, range(3))
    state_dict = ours.state_dict()

    theirs_params = [torch.nn.Parameter(p.detach().clone()) for p in ours_params]
    theirs = bnb.optim.AdamW8bit(theirs_params, lr=LR)
    theirs.load_state_dict(copy.deepcopy(state_dict))
    for p, q in zip(ours_params, theirs_params):
        loaded = theirs.state[q]
        assert int(loaded["step"]) == 3
        for mine, read in zip(_moments(ours.state[p]), _moments(loaded)):
            assert torch.equal(mine, read)  # the same values, bit for bit
        if p.numel() >= 4096:
            # bitsandbytes' own dequantization of our codes with our table.
            mine_m, _ = _moments(ours.state[p])
            read = bnb.functional.dequantize_blockwise(
                loaded["state1"], absmax=loaded["absmax1"], code=loaded["qmap1"], blocksize=QUANT_BLOCK
            )
            assert torch.equal(read.view(p.shape), mine_m)

    # One more step of each from the same state and grads: the same update, up to the last bits
    # that torch's float32 sqrt (which bitsandbytes' CPU step calls, and which is not correctly
    # rounded on every CPU) and the two ways of writing the moments' update move, and the
    # rounding of the new param (a unit in its last place).
    before = [p.detach().clone() for p in ours_params]
    _train(ours, ours_params, range(3, 4))
    _train(theirs, theirs_params, range(3, 4))
    for start, p, q in zip(before, ours_params, theirs_params):
        a, b = p.detach(), q.detach()
        last_place = torch.maximum(a.abs(), b.abs()) * 2**-23
        assert bool(((a - b).abs() <= 1e-5 * (b - start).abs() + 2 * last_place).all())


def test_a_bitsandbytes_checkpoint_loads_re_encoded_and_trains_on():
    theirs_params = _params(1)
    theirs = bnb.optim.AdamW8bit(theirs_params, lr=LR)
    _train(theirs, theirs_params, range(3))
    state_dict = theirs.state_dict()  # step a Python int; codes nested by bitsandbytes >= 0.49.2
    assert any("__bnb_optimizer_quant_state__" in s for s in state_dict["state"].values())

    ours_params = [torch.nn.Parameter(p.detach().clone()) for p in theirs_params]
    ours = rsoptim.AdamW8bit(ours_params, lr=LR)
    ours.load_state_dict(copy.deepcopy(state_dict))
    for p, q in zip(ours_params, theirs_params):
        state = ours.state[p]
        assert state["step"].dtype == torch.float32 and float(state["step"]) == 3.0
        m_ours, v_ours = _moments(state)
        m_theirs, v_theirs = _moments(theirs.state[q])
        if p.numel() < 4096:
            assert torch.equal(m_ours, m_theirs) and torch.equal(v_ours, v_theirs)  # float32 kept
            continue
        assert torch.equal(state["qmap1"], QMAP_SIGNED) and torch.equal(state["qmap2"], QMAP_UNSIGNED)
        for mine, read, absmax in ((m_ours, m_theirs, state["absmax1"]), (v_ours, v_theirs, state["absmax2"])):
            # Our codes keep 3 mantissa bits (rounding error <= 1/16 of the value), and values
            # under 2^-16 of their block's absmax become zero.
            scale = absmax.repeat_interleave(QUANT_BLOCK)[: p.numel()].view(p.shape)
            assert bool(((mine - read).abs() <= read.abs() / 16 + scale * 2**-16).all())

    # Both train on; their params stay within a small part of a step of each other (the moments
    # differ by the re-encoding above, so the updates differ by a few percent of their size).
    _train(ours, ours_params, range(3, 6))
    _train(theirs, theirs_params, range(3, 6))
    for p, q in zip(ours_params, theirs_params):
        assert float(ours.state[p]["step"]) == 6.0
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=0.3 * LR)
