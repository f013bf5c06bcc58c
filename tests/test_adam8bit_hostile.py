"""Hostile input for rsoptim.Adam8bit / AdamW8bit and the raw ``_rsoptim.adam8bit_step``.

The project's rule: no call, however hostile its arguments, may crash the interpreter or write
out of bounds; it steps as torch.optim.Adam does (to 8-bit precision here) or raises a clear
error. Attacks that could crash run in a child process (``run_isolated``): a crash fails the
test instead of killing the test session. Attacks that could write out of bounds are aimed at
a canary: the victim tensor is a view at the start of a larger buffer, so that a stray write
lands in memory we own and can see, not in the allocator's.

Each test names the problem it guards against; see the review report for reproducers.
"""

from __future__ import annotations

import copy
import json
import pickle
import subprocess
import sys
import textwrap
import threading
import warnings

import pytest
import torch

import rsoptim
from rsoptim import _rsoptim
from rsoptim._columns import pack
from rsoptim.adam8bit import QMAP_SIGNED, QMAP_UNSIGNED, QUANT_BLOCK, dequantize

N = 5000  # an 8-bit param under the default min_8bit_size (4096): 20 blocks, a short last one
BLOCKS = -(-N // QUANT_BLOCK)

needs_kernel = pytest.mark.skipif(not hasattr(_rsoptim, "adam8bit_step"), reason="no 8-bit kernel built")


def run_isolated(code: str, timeout: float = 120) -> dict:
    """Runs ``code`` in a fresh interpreter; it must exit normally (not crash) and print one JSON
    object as its last line, which is returned."""
    prelude = "import json, sys, warnings, torch, rsoptim\nwarnings.simplefilter('ignore')\n"
    proc = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, (
        f"the child process died (exit status {proc.returncode}: a negative status is a signal, 134 an abort)\n"
        f"stdout: {proc.stdout[-2000:]}\nstderr: {proc.stderr[-3000:]}"
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def make(n: int = N, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.nn.Parameter:
    g = torch.Generator().manual_seed(seed)
    p = torch.nn.Parameter(torch.randn(n, generator=g).to(dtype))
    p.grad = torch.randn(n, generator=g).to(dtype)
    return p


def stepped(cls=rsoptim.Adam8bit, n: int = N, **kwargs) -> tuple[torch.nn.Parameter, torch.optim.Optimizer]:
    p = make(n)
    opt = cls([p], **kwargs)
    opt.step()
    return p, opt


def snapshot(opt: torch.optim.Optimizer, p: torch.Tensor) -> tuple[torch.Tensor, dict]:
    return p.detach().clone(), {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in opt.state[p].items()}


def assert_unchanged(opt: torch.optim.Optimizer, p: torch.Tensor, before: tuple[torch.Tensor, dict], what: str) -> None:
    value, state = before
    assert torch.equal(p.detach(), value), f"{what}: the param moved"
    assert sorted(opt.state[p]) == sorted(state), f"{what}: state keys {sorted(opt.state[p])} vs {sorted(state)}"
    for key, v in state.items():
        now = opt.state[p][key]
        if isinstance(v, torch.Tensor):
            same = isinstance(now, torch.Tensor) and now.dtype == v.dtype and now.shape == v.shape and torch.equal(now, v)
            assert same, f"{what}: state[{key!r}] changed to {now if not isinstance(now, torch.Tensor) else (now.dtype, tuple(now.shape))}"


# ==========================================================================================
# Problems found (these fail until fixed)
# ==========================================================================================

# --- OOB: the element counts handed to Rust are read after user code has run ---------------


@needs_kernel
def test_a_hook_run_after_the_checks_cannot_make_the_kernel_write_past_the_state():
    """``_kernel_tensors`` checks each state tensor against ``param.shape``; ``_run_kernel``
    then runs user code (``float(group['eps'])``: a float subclass's ``__float__``; a Tensor
    lr's ``item``; another thread) before it reads the param's numel and address. A hook that
    swaps ``p.data`` for a larger tensor there makes the kernel write the codes and scales past
    their ends (here into canaries; with plain state tensors, into the heap)."""
    out = run_isolated(
        """
        N, EXTRA = 4096, 4096
        p = torch.nn.Parameter(torch.zeros(N))
        grads = torch.ones(N + EXTRA)          # room behind the grad too: the kernel reads as far
        p.grad = grads[:N]
        opt = rsoptim.Adam8bit([p], min_8bit_size=0)
        opt.step()
        state = opt.state[p]
        canvases = {}
        for key in ("state1", "state2", "absmax1", "absmax2"):
            t = state[key]
            canvas = torch.full((t.numel() + EXTRA,), 77, dtype=t.dtype)
            canvas[: t.numel()] = t
            state[key], canvases[key] = canvas[: t.numel()], canvas
        bigger = torch.zeros(N + EXTRA)

        class Eps(float):
            def __float__(self):
                p.data = bigger            # after the checks, before numels and addresses are read
                return 1e-8

        opt.param_groups[0]["eps"] = Eps(1e-8)
        try:
            opt.step()
        except Exception:
            pass
        print(json.dumps({k: int((c[state[k].numel():] != 77).sum()) for k, c in canvases.items()}))
        """
    )
    assert out == {"state1": 0, "state2": 0, "absmax1": 0, "absmax2": 0}, f"elements written past the end: {out}"


@needs_kernel
def test_a_hook_that_shrinks_a_state_storage_after_the_checks_does_not_crash():
    """The same window: ``check_storage`` ran in ``step()``'s checks; a hook in ``_run_kernel``
    shrinks state1's storage (``untyped_storage().resize_(16)``) and the kernel writes 64 KiB
    into a 16-byte allocation (glibc aborts: 'munmap_chunk(): invalid pointer')."""
    out = run_isolated(
        """
        N = 1 << 16
        p = torch.nn.Parameter(torch.zeros(N)); p.grad = torch.ones(N)
        opt = rsoptim.Adam8bit([p], min_8bit_size=0)
        opt.step()
        state = opt.state[p]

        class Eps(float):
            def __float__(self):
                state["state1"].untyped_storage().resize_(16)
                return 1e-8

        opt.param_groups[0]["eps"] = Eps(1e-8)
        try:
            opt.step()
            outcome = "stepped"
        except Exception as e:
            outcome = type(e).__name__
        junk = [torch.randn(100) for _ in range(2000)]  # give a corrupted heap a chance to show
        print(json.dumps({"outcome": outcome}))
        """
    )
    assert out["outcome"] in ("stepped", "RuntimeError", "ValueError")


@needs_kernel
@pytest.mark.parametrize(
    "when", ["stepping an earlier group", "stepping an earlier call of its group", "checking a later group", "reading its group"]
)
def test_code_run_between_a_groups_native_check_and_its_kernels_does_not_crash(when):
    """From the second step on, a group is checked by one native read of its tensors. Code may
    run after that and before its kernels: a caller's mode while torch's ops step an earlier
    group (here params whose memory overlaps, which the kernels refuse), or a param subclass's
    ``__hash__`` while a later group is checked. Code that frees a state storage or swaps a
    param's data there must not make the kernels write to freed memory: the group is read again
    right before its kernels (and then stepped, or refused by the per-param checks), and params
    the kernels refuse are stepped by torch's ops after the group's kernels."""
    out = run_isolated(
        f"""
        from torch.overrides import TorchFunctionMode
        when = {when!r}
        base = torch.zeros(9000)
        overlapping = [torch.nn.Parameter(base[:6000]), torch.nn.Parameter(base[3000:])]
        big, small = torch.nn.Parameter(torch.zeros(1 << 16)), torch.nn.Parameter(torch.zeros(10))
        armed = False

        class Hashing(torch.nn.Parameter):
            def __hash__(self):
                if armed:
                    big.data = torch.zeros(16)
                return id(self)

        other = Hashing(torch.zeros(10))
        groups = [{{"params": overlapping}}, {{"params": [big, small]}}]
        if when == "checking a later group":
            groups = [{{"params": [big, small]}}, {{"params": [other]}}]
        elif when == "stepping an earlier call of its group":
            big = torch.nn.Parameter(torch.zeros(1 << 16, dtype=torch.bfloat16))  # (a call of its own)
            groups = [{{"params": [*overlapping, big]}}]
        elif when == "reading its group":

            class Group(dict):
                def get(self, key, default=None):
                    if armed and sys._getframe(2).f_code.co_name == "_run_kernel":  # (as the call is made)
                        big.data = torch.zeros(16)
                    return super().get(key, default)

            groups = [Group(params=[big, small])]
        opt = rsoptim.Adam8bit(groups)
        for p in (*overlapping, big, small, other):
            p.grad = torch.ones_like(p)
        opt.step()

        moved = []  # big's codes as they were, kept alive and marked once they are moved away

        class Shrinking(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                if not moved:
                    codes = opt.state[big]["state1"]
                    moved.append(codes.detach().clone().view(-1))
                    old = torch.empty(0, dtype=torch.uint8).set_(codes.untyped_storage())
                    moved.append(old)  # (holds the old memory: a stale write lands here, visibly)
                    codes.set_(torch.zeros(16, dtype=torch.uint8))
                    old.fill_(77)
                return func(*args, **(kwargs or {{}}))

        armed = True
        try:
            if when.startswith("stepping"):
                with Shrinking():
                    opt.step()
            else:
                opt.step()
            outcome = "stepped"
        except Exception as e:
            outcome = type(e).__name__
        junk = [torch.randn(100) for _ in range(2000)]  # give a corrupted heap a chance to show
        stale = int((moved[1] != 77).sum()) if moved else 0
        print(json.dumps({{"outcome": outcome, "written after being moved": stale}}))
        """
    )
    assert out["outcome"] in ("stepped", "RuntimeError", "ValueError")
    assert out["written after being moved"] == 0


@needs_kernel
@pytest.mark.parametrize("name", ["Adam8bit", "Adam"])
def test_a_hook_that_frees_the_param_during_the_step_does_not_crash(name):
    """A hook run inside step() (a float subclass's ``__float__`` as eps) replaces ``p.data``,
    freeing the param's 32 MiB. Adam8bit reads the param's address after the hook (and the
    element count with it: that is the test above). rsoptim.Adam's general path packed the
    address before ``_kernel_call`` reads eps, and holds ``p`` itself, not its storage: the
    kernel writes freed memory (SIGSEGV). torch.optim.Adam never calls ``__float__`` on eps."""
    out = run_isolated(
        f"""
        N = 1 << 23
        p = torch.nn.Parameter(torch.zeros(N)); p.grad = torch.ones(N)
        opt = rsoptim.Adam8bit([p]) if {name == "Adam8bit"} else rsoptim.Adam([p])
        opt.step()

        class Eps(float):
            def __float__(self):
                p.data = torch.zeros(16)
                return 1e-8

        opt.param_groups[0]["eps"] = Eps(1e-8)
        try:
            opt.step()
        except Exception:
            pass
        print(json.dumps({{"survived": True}}))
        """
    )
    assert out == {"survived": True}


@needs_kernel
@pytest.mark.parametrize("name", ["Adam8bit", "Adam"])
def test_a_tensor_subclass_lying_about_its_shape_is_not_written_past(name):
    """A state tensor whose class overrides ``shape`` and ``stride`` (so that ``fits_storage``,
    which reads them, passes): ``_KernelTensors.add`` (and rsoptim.Adam's ``BufferTable``, same
    flaw) trust the Python-level shape and hand the kernel the param's element count for a
    16-element buffer. torch's ops read the real sizes and raise."""
    out = run_isolated(
        f"""
        N = 4096
        class Liar(torch.Tensor):
            @property
            def shape(self):
                return torch.Size([N])
            def stride(self, *dim):
                return 0 if dim else (0,)

        p = torch.nn.Parameter(torch.zeros(N)); p.grad = torch.ones(N)
        eight_bit = {name == "Adam8bit"}
        opt = rsoptim.Adam8bit([p], min_8bit_size=0) if eight_bit else rsoptim.Adam([p])
        opt.step()
        key = "state1" if eight_bit else "exp_avg"
        canvas = torch.full((2 * N,), 77, dtype=torch.uint8 if eight_bit else torch.float32)
        opt.state[p][key] = canvas[:16].as_subclass(Liar)
        try:
            opt.step()
        except Exception:
            pass
        print(json.dumps({{"past_the_end": int((canvas[16:] != 77).sum())}}))
        """
    )
    assert out["past_the_end"] == 0, f"{out['past_the_end']} elements written past a 16-element state tensor"


# --- wrong results after an error: "everything is checked before anything is stepped" ------


@pytest.mark.parametrize("bad", ["absmax of one element", "absmax of shape (blocks, 1)"])
def test_8bit_state_of_the_wrong_layout_raises_before_the_param_moves(bad):
    """A state dict (or an edit) left absmax1 with one element, or shaped (blocks, 1): the
    kernel refuses it, ``reference_step`` decodes it by broadcasting, steps the param, then
    fails copying the new scales back. step() raises with the param moved, state1 re-encoded
    and absmax1 stale; every retry moves the param again. (torch.optim.Adam with an exp_avg of
    the wrong shape raises before writing the param.)"""
    p, opt = stepped()
    absmax = opt.state[p]["absmax1"]
    opt.state[p]["absmax1"] = absmax[:1].clone() if bad.startswith("absmax of one") else absmax.clone().view(-1, 1)
    before = p.detach().clone()
    codes = opt.state[p]["state1"].clone()
    try:
        opt.step()
    except Exception:  # noqa: BLE001 - raising is fine; moving the param is not
        assert torch.equal(p.detach(), before), "step() raised after it had moved the param"
        assert torch.equal(opt.state[p]["state1"], codes), "step() raised after it had rewritten the codes"


def test_a_float64_param_with_8bit_state_is_refused_before_anything_is_stepped():
    """``p.data = p.data.double()`` after the param got 8-bit state: the kernel call for it
    raises ValueError from the binding ('8-bit states are for float32, bfloat16 and float16
    params, not float64') after the calls for the group's other params have stepped them."""
    q, p = make(seed=1), make()
    opt = rsoptim.Adam8bit([q, p])
    opt.step()
    p.data, p.grad = p.data.double(), p.grad.double()
    before = snapshot(opt, q)
    with pytest.raises((ValueError, RuntimeError)):
        opt.step()
    assert_unchanged(opt, q, before, "another param of the group")


def test_a_param_that_cannot_be_written_in_place_loses_no_other_params_update():
    """An expanded param (one memory location for all its elements) fails the write-back of its
    contiguous copy, after the kernel has stepped every param of the call: the strided params
    whose write-back comes after it keep their old values while their state and step count
    moved on (rsoptim.Adam writes them). Refusing such params up front (torch raises
    'unsupported operation: more than one element of the written-to tensor refers to a single
    memory location') or writing every copy back before raising would both do."""
    expanded = torch.nn.Parameter(torch.zeros(1).expand(N))
    expanded.grad = torch.ones(N)
    strided = torch.nn.Parameter(torch.randn(100, 50).t())
    strided.grad = torch.ones(50, 100)
    opt = rsoptim.Adam8bit([expanded, strided], min_8bit_size=0)
    value = strided.detach().clone()
    with pytest.raises(RuntimeError):
        opt.step()
    stepped_state = strided in opt.state and float(opt.state[strided]["step"]) > 0
    moved = not torch.equal(strided.detach(), value)
    assert moved == stepped_state, f"the strided param moved: {moved}; its state was stepped: {stepped_state}"


@needs_kernel
def test_a_strided_state_tensor_shared_by_two_params_steps_them_one_after_the_other():
    """Two params given the same state tensors: contiguous ones overlap in the kernel's check,
    so torch's ops step the params one after the other, as torch.optim does. Strided ones are
    passed as two private copies (``may_copy`` only looks at the params' storages), the kernel
    steps both from the same old state and the last write-back wins."""

    def run(strided: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        p, q = torch.nn.Parameter(torch.randn(N)), torch.nn.Parameter(torch.randn(N))
        opt = rsoptim.Adam8bit([p, q])
        p.grad, q.grad = torch.randn(N), torch.randn(N)
        opt.step()
        for key in ("state1", "state2", "absmax1", "absmax2"):
            t = opt.state[p][key]
            if strided:
                backing = torch.zeros(2 * t.numel(), dtype=t.dtype)
                backing[::2] = t
                t = backing[::2]
            opt.state[p][key] = opt.state[q][key] = t
        opt.step()
        return [p.detach(), q.detach(), opt.state[p]["state1"].contiguous()]

    sequential, got = run(strided=False), run(strided=True)
    torch.testing.assert_close(got[:2], sequential[:2], rtol=1e-6, atol=1e-7)
    assert torch.equal(got[2], sequential[2])


# --- load_state_dict ---------------------------------------------------------------------


def _checkpoint_with_blocks(p: torch.Tensor, opt: torch.optim.Optimizer, block: int) -> tuple[dict, torch.Tensor]:
    """A bitsandbytes-style state dict for ``p`` whose scales cover ``block`` elements each (as
    bitsandbytes before 0.44 saved them: 2048), with another code table (a step a Python int),
    and the first moment it holds."""
    n = p.numel()
    table = torch.linspace(-1, 1, 256)
    g = torch.Generator().manual_seed(5)
    codes1 = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)
    codes2 = torch.randint(128, 256, (n,), dtype=torch.uint8, generator=g)
    blocks = -(-n // block)
    absmax1, absmax2 = torch.rand(blocks, generator=g) + 0.5, torch.rand(blocks, generator=g) + 0.5
    moment1 = table[codes1.long()] * absmax1.repeat_interleave(block)[:n]
    state_dict = opt.state_dict()
    state_dict["state"] = {
        0: {"step": 7, "state1": codes1, "state2": codes2, "absmax1": absmax1, "absmax2": absmax2,
            "qmap1": table, "qmap2": table}
    }  # fmt: skip
    return state_dict, moment1


def test_a_checkpoint_with_2048_element_blocks_loads():
    """bitsandbytes before 0.44 kept one scale per 2048 elements. Loading such a checkpoint
    raises an unexplained broadcasting RuntimeError ('The size of tensor a (20) must match the
    size of tensor b (3)') for any param over 2048 elements (it works below, by luck of
    broadcasting). The block size can be read off the number of scales."""
    p, opt = stepped()
    state_dict, moment1 = _checkpoint_with_blocks(p, opt, 2048)
    opt.load_state_dict(state_dict)
    state = opt.state[p]
    assert state["state1"].dtype == torch.uint8 and state["absmax1"].shape == (BLOCKS,)
    decoded = dequantize(state["state1"], state["absmax1"], QMAP_SIGNED)
    assert bool(((decoded - moment1).abs() <= moment1.abs() / 16 + 2e-5).all())


def test_a_load_that_raises_leaves_the_optimizer_as_it_was():
    """A state dict refused half-way (here: 2048-element blocks, or a code table of 100
    entries) is refused after torch's ``Optimizer.load_state_dict`` has replaced the groups and
    every state with its casts: the 8-bit codes become float32 tensors of 0..255 under
    ``state1``/``state2``, which the next step() takes for moments (the param jumps by ~1e7)."""
    p, opt = stepped()
    bad, _ = _checkpoint_with_blocks(p, opt, 2048)  # (saved with lr 1e-3)
    opt.param_groups[0]["lr"] = 0.5
    bad["state"][0]["qmap1"] = bad["state"][0]["qmap1"][:100]  # refused whatever the block size
    before = snapshot(opt, p)
    with pytest.raises(Exception):  # noqa: B017 - which exception is the other test's business
        opt.load_state_dict(bad)
    assert opt.param_groups[0]["lr"] == 0.5, "the groups were replaced by a load that raised"
    assert_unchanged(opt, p, before, "after a load that raised")


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32])
def test_integer_codes_of_another_dtype_are_not_loaded_as_moments(dtype):
    """A state dict with its codes in int8 (a converter's, a hand edit): ``_state_from_saved``
    only knows uint8 codes and loads the others as float moments (|exp_avg| up to 127 where it
    was 0.4), silently. They should be refused (or read as the codes they are)."""
    p, opt = stepped()
    state_dict = opt.state_dict()
    saved = state_dict["state"][0]
    expected = dequantize(saved["state1"], saved["absmax1"], QMAP_SIGNED)
    saved["state1"], saved["state2"] = saved["state1"].to(dtype), saved["state2"].to(dtype)
    try:
        opt.load_state_dict(state_dict)
    except (ValueError, TypeError, RuntimeError):
        return
    state = opt.state[p]
    if state["state1"].dtype == torch.uint8:
        got = dequantize(state["state1"], state["absmax1"], QMAP_SIGNED)
    else:
        got = state["state1"].float()
    torch.testing.assert_close(got, expected, rtol=1 / 16, atol=1e-6)


def test_a_checkpoint_of_float32_params_loads_into_float64_params_and_trains_on():
    """``model.double()`` then loading an Adam8bit checkpoint: the uint8 codes are kept for the
    float64 param (``_state_from_saved`` never looks at the param's dtype), and every step()
    then raises ValueError from the binding ('8-bit states are for float32, bfloat16 and
    float16 params, not float64'). torch.optim.Adam casts the moments and trains on; float64
    params keep float64 moments here too (the module's docstring)."""
    p, opt = stepped()
    q = torch.nn.Parameter(p.detach().double())
    q.grad = p.grad.double()
    wide = rsoptim.Adam8bit([q])
    wide.load_state_dict(opt.state_dict())
    wide.step()
    assert wide.state[q]["state1"].dtype == torch.float64


# --- numerics: one element's outlier spoils its block ------------------------------------


def test_a_finite_grad_whose_square_overflows_does_not_turn_its_block_to_nan():
    """One grad of 1e30 (its square overflows float32): torch.optim.Adam gets exp_avg_sq = inf
    for that element, whose update is then 0; no NaN anywhere, ever. Adam8bit's block scale
    becomes inf, the block's other codes are 0 and decode as 0 * inf = NaN: from the next step
    on, all 256 params of the block are NaN."""
    p = make()
    q = torch.nn.Parameter(p.detach().clone())
    opt, reference = rsoptim.Adam8bit([p]), torch.optim.Adam([q])
    g = torch.Generator().manual_seed(1)
    for step in range(3):
        grad = torch.randn(N, generator=g)
        if step == 0:
            grad[10] = 1e30
        p.grad, q.grad = grad.clone(), grad.clone()
        opt.step()
        reference.step()
    assert int(q.isnan().sum()) == 0
    assert int(p.isnan().sum()) == 0, f"{int(p.isnan().sum())} NaN params where torch.optim.Adam has none"


def test_a_grad_spike_does_not_blow_up_the_rest_of_its_block():
    """One grad 1e6 times its neighbours' (finite, its square too): its exp_avg_sq is ~1e12
    times theirs, below the smallest code, so theirs encode as 0. exp_avg decays faster (beta1)
    than exp_avg_sq (beta2): ~25 steps later their exp_avg is representable again while their
    exp_avg_sq is still 0, and their update is exp_avg / eps: params that Adam moves by at most
    ~lr per step jump by 0.5 in a few steps. (Encoding nonzero exp_avg_sq values below the
    smallest code as the smallest code, not 0, bounds the update: checked with the reference.)"""
    torch.manual_seed(0)
    p, q = torch.nn.Parameter(torch.zeros(256)), torch.nn.Parameter(torch.zeros(256))
    opt, reference = rsoptim.Adam8bit([p], min_8bit_size=0), torch.optim.Adam([q])
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for step in range(60):
        grad = torch.randn(256, generator=g) * 1e-2
        if step == 5:
            grad[10] = 1e4
        p.grad, q.grad = grad.clone(), grad.clone()
        opt.step()
        reference.step()
        gap = (p - q).abs().detach()
        gap[10] = 0
        worst = max(worst, float(gap.max()))
    # (Adam moves a param by about lr a step: 0.06 in 60 steps. With the fix above the gap is 0.017.)
    assert worst < 0.05, f"params of the spike's block drifted {worst:.3g} from torch.optim.Adam's in 60 steps (lr 1e-3)"


# --- smaller surprises --------------------------------------------------------------------


@pytest.mark.parametrize("cls", [rsoptim.Adam8bit, torch.optim.Adam])
def test_an_inference_tensor_param_is_refused_as_torch_does(cls):
    """torch refuses to update an inference tensor outside inference mode; the kernels write it
    (rsoptim.Adam too). (The torch case documents the expected behaviour.)"""
    with torch.inference_mode():
        p = torch.zeros(N)
    p.grad = torch.ones(N)
    opt = cls([p])
    with pytest.raises(RuntimeError, match="[Ii]nference tensor"):
        opt.step()


# ==========================================================================================
# Attacks that are handled (these pass)
# ==========================================================================================

# --- the raw binding with bad columns --------------------------------------------------------

_KW = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, maximize=False, decoupled_weight_decay=False)


def _raw_buffers(n: int = 1000) -> dict[str, torch.Tensor]:
    blocks = -(-n // QUANT_BLOCK)
    return {
        "p": torch.zeros(n), "g": torch.ones(n),
        "c1": torch.zeros(n, dtype=torch.uint8), "c2": torch.zeros(n, dtype=torch.uint8),
        "a1": torch.zeros(blocks), "a2": torch.zeros(blocks), "s": torch.zeros(()),
    }  # fmt: skip


def _raw_call(t, numels=None, dtype="float32", step_dtype="float32", columns=None, **kwargs):
    cols = {k: pack([v.data_ptr()]) for k, v in t.items()}
    cols.update(columns or {})
    numels = pack([t["p"].numel()]) if numels is None else numels
    return _rsoptim.adam8bit_step(
        dtype, step_dtype, numels, cols["p"], cols["g"], cols["c1"], cols["c2"], cols["a1"], cols["a2"], cols["s"],
        **{**_KW, **kwargs},
    )  # fmt: skip


_RAW_CASES = {
    "numels not whole words": (lambda t: _raw_call(t, numels=b"\0" * 7), ValueError, "64-bit words"),
    "more numels than addresses": (lambda t: _raw_call(t, numels=pack([1000, 1000])), ValueError, "entries for 2"),
    "no scales column": (lambda t: _raw_call(t, columns={"a1": b""}), ValueError, "entries for 1"),
    "null param": (lambda t: _raw_call(t, columns={"p": pack([0])}), ValueError, "null"),
    "misaligned scales": (lambda t: _raw_call(t, columns={"a1": pack([t["a1"].data_ptr() + 1])}), ValueError, "aligned"),
    "the same scales twice": (lambda t: _raw_call(t, columns={"a2": pack([t["a1"].data_ptr()])}), _rsoptim.BufferOverlapError, "share memory"),
    "codes inside the param": (lambda t: _raw_call(t, columns={"c1": pack([t["p"].data_ptr() + 8])}), _rsoptim.BufferOverlapError, "share memory"),
    "grad is the param": (lambda t: _raw_call(t, columns={"g": pack([t["p"].data_ptr()])}), _rsoptim.BufferOverlapError, "share memory"),
    "step inside the scales": (lambda t: _raw_call(t, columns={"s": pack([t["a1"].data_ptr()])}), _rsoptim.BufferOverlapError, "share memory"),
    "float64 params": (lambda t: _raw_call(t, dtype="float64"), ValueError, "not float64"),
    "int8 params": (lambda t: _raw_call(t, dtype="int8"), ValueError, "not int8"),
    "bfloat16 steps": (lambda t: _raw_call(t, step_dtype="bfloat16"), ValueError, "float32 or float64"),
    "numel beyond the address space": (lambda t: _raw_call(t, numels=pack([2**62])), ValueError, "address space"),
    "address at the top": (lambda t: _raw_call(t, columns={"p": pack([2**64 - 64])}), ValueError, "address space"),
    "seed without streams": (lambda t: _raw_call(t, stochastic_rounding_seed=1), ValueError, "both a seed"),
    "streams of the wrong count": (lambda t: _raw_call(t, stochastic_rounding_seed=1, streams=pack([0, 1])), ValueError, "streams entries"),
    "master column of the wrong count": (lambda t: _raw_call(t, master_params=pack([])), ValueError, "master_param entries"),
    "master is the param": (lambda t: _raw_call(t, master_params=pack([t["p"].data_ptr()])), _rsoptim.BufferOverlapError, "share memory"),
    "str column": (lambda t: _raw_call(t, columns={"p": "abcdefgh"}), TypeError, "bytes"),
}  # fmt: skip


@needs_kernel
@pytest.mark.parametrize("case", list(_RAW_CASES))
def test_the_raw_binding_refuses_malformed_columns_before_writing(case):
    call, error, message = _RAW_CASES[case]
    t = _raw_buffers()
    before = {k: v.clone() for k, v in t.items()}
    with pytest.raises(error, match=message):
        call(t)
    for key, value in before.items():
        assert torch.equal(t[key], value), f"{case}: {key} was written"


@needs_kernel
def test_the_raw_binding_takes_empty_tensors_at_null_addresses():
    t = _raw_buffers()
    zero = pack([0])
    _rsoptim.adam8bit_step("float32", "float32", zero, zero, zero, zero, zero, zero, zero, pack([t["s"].data_ptr()]), **_KW)
    assert float(t["s"]) == 1.0
    with pytest.raises(ValueError, match="null"):  # the step count is one element, wherever
        _rsoptim.adam8bit_step("float32", "float32", zero, zero, zero, zero, zero, zero, zero, zero, **_KW)


# --- state tensors replaced between steps -------------------------------------------------


@pytest.mark.parametrize("scales", [5, BLOCKS + 3])
def test_absmax_of_another_length_raises_before_the_param_moves(scales):
    p, opt = stepped()
    absmax = opt.state[p]["absmax1"]
    opt.state[p]["absmax1"] = torch.cat([absmax, torch.ones(3)]) if scales > BLOCKS else absmax[:scales].clone()
    before = p.detach().clone()
    with pytest.raises(RuntimeError):
        opt.step()
    assert torch.equal(p.detach(), before)


@pytest.mark.parametrize("edit", ["codes as int8", "state1 float64", "absmax float64", "codes reshaped"])
def test_state_of_another_dtype_or_shape_raises_as_torch_does(edit):
    """torch.optim.Adam raises for an exp_avg of another dtype or shape (after counting the
    step, as here); the param does not move."""
    p, opt = stepped()
    state = opt.state[p]
    if edit == "codes as int8":
        state["state1"] = state["state1"].view(torch.int8)
    elif edit == "state1 float64":
        state["state1"], state["state2"] = torch.zeros(N, dtype=torch.float64), torch.zeros(N, dtype=torch.float64)
    elif edit == "absmax float64":
        state["absmax1"] = state["absmax1"].double()
    else:
        state["state1"] = state["state1"].view(50, 100)
    before = p.detach().clone()
    with pytest.raises(RuntimeError):
        opt.step()
    assert torch.equal(p.detach(), before)


def test_strided_codes_step_as_their_contiguous_twin():
    p, opt = stepped()
    q = torch.nn.Parameter(p.detach().clone())
    q.grad = p.grad.clone()
    twin = rsoptim.Adam8bit([q])
    twin.load_state_dict(opt.state_dict())
    backing = torch.zeros(2 * N, dtype=torch.uint8)
    backing[::2] = opt.state[p]["state1"]
    opt.state[p]["state1"] = backing[::2]
    opt.step()
    twin.step()
    assert torch.equal(p, q) and torch.equal(backing[::2], twin.state[q]["state1"])


@pytest.mark.parametrize(
    "step", [torch.tensor(1), torch.tensor([1.0], dtype=torch.float64), torch.tensor(1.0, requires_grad=True)],
    ids=["int64 0-dim", "float64 (1,)", "requires_grad"],
)
def test_step_counts_of_other_kinds_are_counted(step):
    p, opt = stepped()
    opt.state[p]["step"] = step
    opt.step()
    assert float(opt.state[p]["step"].detach()) == 2.0


def test_a_python_int_step_raises_as_torch_does():
    p, opt = stepped()
    q = make()
    reference = torch.optim.Adam([q])
    reference.step()
    opt.state[p]["step"], reference.state[q]["step"] = 1, 1
    with pytest.raises(RuntimeError, match="singleton tensors") as expected:
        reference.step()
    with pytest.raises(type(expected.value), match="singleton tensors"):
        opt.step()


def test_one_step_count_shared_by_two_params_is_counted_twice_as_torch_does():
    p, q = make(), make(seed=1)
    opt = rsoptim.Adam8bit([p, q])
    opt.step()
    opt.state[q]["step"] = opt.state[p]["step"]
    opt.step()
    assert float(opt.state[p]["step"]) == 3.0


@pytest.mark.parametrize("target", ["absmax1", "state1"])
def test_state_sharing_the_params_memory_is_stepped_without_crashing(target):
    """The kernel's overlap check sends the param to torch's ops (which step aliased memory as
    they do): no crash, no error."""
    p, opt = stepped()
    view = p.detach()[:BLOCKS] if target == "absmax1" else p.detach().view(torch.uint8)[:N]
    opt.state[p][target] = view
    opt.step()


# --- params and grads ---------------------------------------------------------------------


def test_overlapping_param_views_and_a_grad_aliasing_its_param_step_without_crashing():
    base = torch.randn(N + 1000)
    a, b = torch.nn.Parameter(base[:N]), torch.nn.Parameter(base[1000:])
    a.grad, b.grad = torch.randn(N), torch.randn(N)
    c = make(seed=2)
    c.grad = c.detach()
    opt = rsoptim.Adam8bit([a, b, c])
    for _ in range(2):
        opt.step()
    assert all(bool(torch.isfinite(t).all()) for t in (a, b, c))


def test_a_param_changed_to_float16_after_its_8bit_state_steps_on():
    p, opt = stepped()
    p.data, p.grad = p.data.half(), p.grad.half()
    opt.step()
    assert opt.state[p]["state1"].dtype == torch.uint8 and bool(torch.isfinite(p).all())


@pytest.mark.parametrize("size", [N // 2, 2 * N])
def test_a_param_resized_after_its_state_exists_raises_as_torch_does(size):
    p, opt = stepped()
    p.data, p.grad = torch.randn(size), torch.randn(size)
    before = p.detach().clone()
    with pytest.raises(RuntimeError, match="must match the size"):
        opt.step()
    assert torch.equal(p.detach(), before)


def test_empty_params_take_8bit_state():
    p = torch.nn.Parameter(torch.zeros(0))
    p.grad = torch.zeros(0)
    opt = rsoptim.Adam8bit([p], min_8bit_size=0)
    opt.step()
    opt.step()
    assert opt.state[p]["absmax1"].shape == (0,) and float(opt.state[p]["step"]) == 2.0


def test_non_finite_grads_give_torchs_nans_on_the_first_step():
    p = make()
    q = torch.nn.Parameter(p.detach().clone())
    grad = p.grad.clone()
    grad[3], grad[600], grad[1000] = float("nan"), float("inf"), -float("inf")
    p.grad, q.grad = grad.clone(), grad.clone()
    rsoptim.Adam8bit([p]).step()
    torch.optim.Adam([q]).step()
    assert torch.equal(p.isnan(), q.isnan())


def test_a_grad_of_another_dtype_is_refused_before_anything_is_stepped():
    p, opt = stepped()
    p.grad.data = p.grad.data.half()  # .data skips .grad's own check
    before = snapshot(opt, p)
    with pytest.raises(ValueError, match="must match its param's dtype"):
        opt.step()
    assert_unchanged(opt, p, before, "a float16 grad")


def test_backward_through_a_param_the_step_wrote_raises_as_torch_does():
    """The kernels bump the version counter, as torch's in-place ops do."""
    w = make()
    loss = (w * w).sum()
    rsoptim.Adam8bit([w]).step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_tensor_hyperparameters_step_as_torch_does():
    p = make()
    q = torch.nn.Parameter(p.detach().clone())
    q.grad = p.grad.clone()
    options = dict(lr=torch.tensor(1e-3), betas=(torch.tensor(0.9), torch.tensor(0.999)))
    rsoptim.Adam8bit([p], min_8bit_size=10**9, **options).step()
    torch.optim.Adam([q], **options).step()
    torch.testing.assert_close(p, q)


# --- groups, options, copies ---------------------------------------------------------------


def test_min_8bit_size_edits_keep_each_params_kind_of_state():
    big, small = make(), make(100, seed=1)
    opt = rsoptim.Adam8bit([big, small], min_8bit_size=1000)
    opt.step()
    for size in (50, 10**9):
        opt.param_groups[0]["min_8bit_size"] = size
        opt.step()
        assert (opt.state[big]["state1"].dtype, opt.state[small]["state1"].dtype) == (torch.uint8, torch.float32)
    for bad in (-1, 1.5, True):
        opt.param_groups[0]["min_8bit_size"] = bad
        with pytest.raises(ValueError, match="Invalid min_8bit_size"):
            opt.step()


def test_add_param_group_refuses_a_param_of_another_group_and_steps_one_listed_twice():
    p, q = make(), make(seed=1)
    opt = rsoptim.Adam8bit([p])
    with pytest.raises(ValueError, match="more than one parameter group"):
        opt.add_param_group({"params": [p]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.add_param_group({"params": [q, q]})
    opt.step()
    assert float(opt.state[q]["step"]) == 2.0


def test_deepcopy_and_pickle_step_on_as_the_original():
    p, opt = stepped()
    twin = copy.deepcopy(opt)
    unpickled = pickle.loads(pickle.dumps(opt))
    copies = [o.param_groups[0]["params"][0] for o in (twin, unpickled)]
    for c in copies:
        c.grad = p.grad.clone()  # (copies of a param do not keep its grad, as with torch)
    for o in (opt, twin, unpickled):
        o.step()
    for c in copies:
        assert torch.equal(c, p)


def test_zero_grad_keeping_zero_grads_steps_as_the_reference():
    p = make()
    q = torch.nn.Parameter(p.detach().clone())
    q.grad = p.grad.clone()
    a, b = rsoptim.Adam8bit([p], min_8bit_size=10**9), torch.optim.Adam([q])
    for opt in (a, b):
        opt.step()
        opt.zero_grad(set_to_none=False)
        opt.step()
    torch.testing.assert_close(p, q)


def test_a_closure_that_replaces_the_param_or_clears_the_state():
    p, opt = stepped()

    def shrink():
        p.data, p.grad = torch.randn(N // 2), torch.randn(N // 2)
        return 1.0

    with pytest.raises(RuntimeError):
        opt.step(shrink)
    p.data, p.grad = torch.randn(N), torch.randn(N)

    def clear():
        opt.state[p].clear()
        return 2.0

    assert opt.step(clear) == 2.0
    assert float(opt.state[p]["step"]) == 1.0


@pytest.mark.parametrize("flag", [{"differentiable": True}, {"amsgrad": True}, {"capturable": True}])
def test_options_without_an_8bit_counterpart_are_refused(flag):
    with pytest.raises(ValueError, match="not supported"):
        rsoptim.Adam8bit([make()], **flag)


# --- load_state_dict that works ----------------------------------------------------------


def test_a_checkpoint_with_2048_element_blocks_loads_for_params_of_one_block():
    p, opt = stepped(n=2000, min_8bit_size=0)
    state_dict, moment1 = _checkpoint_with_blocks(p, opt, 2048)
    opt.load_state_dict(state_dict)
    decoded = dequantize(opt.state[p]["state1"], opt.state[p]["absmax1"], QMAP_SIGNED)
    assert bool(((decoded - moment1).abs() <= moment1.abs() / 16 + 2e-5).all())


@pytest.mark.parametrize("edit", ["qmap of 100 entries", "no qmaps", "exp_avg_sq missing", "exp_avg of 7 elements"])
def test_malformed_state_dicts_raise(edit):
    p, opt = stepped()
    if edit.startswith("exp_avg"):
        q = torch.nn.Parameter(torch.zeros(N))
        q.grad = torch.ones(N)
        reference = torch.optim.Adam([q])
        reference.step()
        state_dict = reference.state_dict()
        saved = state_dict["state"][0]
        if edit == "exp_avg_sq missing":
            del saved["exp_avg_sq"]
        else:
            saved["exp_avg"] = torch.zeros(7)
    else:
        state_dict = opt.state_dict()
        saved = state_dict["state"][0]
        if edit == "no qmaps":
            del saved["qmap1"], saved["qmap2"]
        else:
            saved["qmap1"] = saved["qmap1"][:100].clone()
    with pytest.raises((ValueError, KeyError, IndexError, RuntimeError)):
        opt.load_state_dict(state_dict)


def test_a_state_dict_of_a_small_param_loaded_for_a_large_one_is_refused_on_load():
    """torch.optim.Adam loads it and raises at the next step; Adam8bit refuses it on load,
    before anything changes (the size of each saved state is checked against its param)."""
    small = torch.nn.Parameter(torch.zeros(10))
    small.grad = torch.ones(10)
    source = rsoptim.Adam8bit([small])
    source.step()
    p, opt = stepped()
    before = snapshot(opt, p)
    with pytest.raises(ValueError, match="elements, the param"):
        opt.load_state_dict(source.state_dict())
    assert_unchanged(opt, p, before, "after a refused load")


# --- threads -------------------------------------------------------------------------------


@needs_kernel
def test_threads_stepping_one_optimizer_lose_no_step():
    params = [torch.nn.Parameter(torch.zeros(1 << 16)) for _ in range(2)] + [torch.nn.Parameter(torch.zeros(10))]
    for p in params:
        p.grad = torch.ones_like(p)
    opt = rsoptim.AdamW8bit(params)
    errors = []

    def run():
        try:
            for _ in range(10):
                opt.step()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert [float(opt.state[p]["step"]) for p in params] == [30.0] * 3
    assert all(bool(torch.isfinite(p).all()) for p in params)


@needs_kernel
def test_threads_stepping_while_another_loads_state_dicts_do_not_crash():
    out = run_isolated(
        """
        import copy, threading
        params = [torch.nn.Parameter(torch.zeros(1 << 16)) for _ in range(2)]
        for p in params:
            p.grad = torch.ones_like(p)
        opt = rsoptim.Adam8bit(params)
        opt.step()
        stop, errors = threading.Event(), []

        def stepper():
            try:
                for _ in range(20):
                    opt.step()
            except BaseException as e:
                errors.append(repr(e))

        def loader():
            try:
                while not stop.is_set():
                    opt.load_state_dict(copy.deepcopy(opt.state_dict()))
            except BaseException as e:
                errors.append(repr(e))

        threads = [threading.Thread(target=stepper) for _ in range(2)]
        swap = threading.Thread(target=loader)
        swap.start()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stop.set()
        swap.join()
        print(json.dumps({"errors": errors, "moved": all(bool((p < 0).all()) for p in params)}))
        """
    )
    assert out == {"errors": [], "moved": True}


# --- DTensor state that is not laid out like its param -------------------------------------


def test_dtensor_state_not_laid_out_like_its_param_is_refused_clearly():
    out = run_isolated(
        """
        import torch.distributed as dist
        from torch.distributed.tensor import distribute_tensor, Shard, Replicate, DTensor
        from torch.distributed.device_mesh import init_device_mesh
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        mesh = init_device_mesh("cpu", (1,))
        N = 5000
        p = torch.nn.Parameter(distribute_tensor(torch.randn(N), mesh, [Shard(0)]))
        p.grad = distribute_tensor(torch.randn(N), mesh, [Shard(0)])
        opt = rsoptim.Adam8bit([p])
        opt.step()
        state, good = opt.state[p], dict(opt.state[p])
        outcomes = {}
        edits = {
            "plain absmax": lambda: state.update(absmax1=good["absmax1"].full_tensor()),
            "short absmax": lambda: state.update(absmax1=DTensor.from_local(
                torch.zeros(3), mesh, [Shard(0)], run_check=False, shape=(3,), stride=(1,))),
            "replicated codes": lambda: state.update(state1=DTensor.from_local(
                good["state1"].to_local().clone(), mesh, [Replicate()], run_check=False)),
        }
        for name, edit in edits.items():
            state.update(good)
            edit()
            try:
                opt.step()
                outcomes[name] = "stepped"
            except RuntimeError as e:
                outcomes[name] = "not laid out like it" in str(e)
        dist.destroy_process_group()
        print(json.dumps(outcomes))
        """
    )
    assert out == {"plain absmax": True, "short absmax": True, "replicated codes": True}


@pytest.mark.parametrize("cls", [rsoptim.Adam8bit, rsoptim.AdamW8bit])
def test_an_efficient_zero_tensor_grad_steps_as_the_zeros_it_stands_for(cls):
    """A grad that is an efficient zero tensor (no memory) is stepped bit for bit as a grad of
    zeros, on 8-bit and float32 state (a small param), and is left as it was."""
    results = []
    for zero in (True, False):
        torch.manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(5000)), torch.nn.Parameter(torch.randn(10))]
        opt = cls(ps, lr=0.1)
        for step in range(4):
            for p in ps:
                if step == 0:
                    p.grad = torch.randn_like(p)
                else:
                    p.grad = torch._efficientzerotensor(p.shape) if zero else torch.zeros_like(p)
            opt.step()
        assert ps[0].grad._is_zerotensor() == zero
        results.append([t.detach().clone() for p in ps for t in (p, *opt.state[p].values())])
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.parametrize(("key", "index"), [("param", 0), ("state1", 0), ("absmax2", 0), ("step", 0), ("state1", 1)])
def test_a_zero_tensor_param_or_state_raises_torchs_error_before_anything_is_written(key, index):
    """A param or state tensor that is an efficient zero tensor (no memory) is refused with the
    error torch's in-place ops raise on it, before any param moves (8-bit state and, for the
    small param, float32 state)."""
    ps = [torch.nn.Parameter(torch.randn(n)) for n in (5000, 10, 5000)]
    if key == "param":
        ps[index] = torch.nn.Parameter(torch._efficientzerotensor(5000))
    opt = rsoptim.Adam8bit(ps, lr=0.1)
    for p in ps:
        p.grad = torch.ones_like(p)
    if key != "param":
        opt.step()
        state = opt.state[ps[index]]  # (the param of 10 elements keeps float32 state)
        state[key] = torch._efficientzerotensor(state[key].shape, dtype=state[key].dtype)
    before = [p.detach().clone() for p in ps]
    with pytest.raises(RuntimeError, match="ZeroTensors are immutable"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, ps))
