"""Strided layouts: rsoptim gives torch's for-loop results for every layout of param, grad and
state, and keeps the strides torch keeps (state made with ``preserve_format``, loaded state
left in its layout).

torch 2.13's own fused CPU Adam walks memory linearly and is wrong where a grad's strides
differ from its param's; ``test_torch_fused_adam_on_mismatched_strides`` records that as
information only (xfail while torch is wrong, skip once it is fixed).
"""

from __future__ import annotations

import copy
from typing import Callable

import pytest
import torch

import rsoptim
from conftest import OPTIMIZERS, assert_optimizers_match, assert_tensor_match, run_side_by_side, seeded_grads, twin

#: Every option on, so every state buffer exists.
CONFIGS = {
    "SGD": dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1),
    "Adam": dict(lr=0.05, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1, amsgrad=True, maximize=True),
    "AdamW": dict(lr=0.05, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1, amsgrad=True),
    "RMSprop": dict(lr=0.01, alpha=0.9, eps=1e-6, weight_decay=0.1, momentum=0.5, centered=True),
}
NAMES = list(OPTIMIZERS)
DTYPES = [torch.float64, torch.float32]
DTYPE_IDS = ["float64", "float32"]


def _randn(gen: torch.Generator, *shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


def _grads(layout: Callable[[torch.Tensor], torch.Tensor], seed: int = 0):
    """Seeded grads put into a layout by ``layout(contiguous_grad)``."""
    base = seeded_grads(seed)

    def make(step, index, p):
        return layout(base(step, index, p).contiguous())

    return make


def _check(name, dtype, build, grads, steps=4, **kw):
    """Side by side with torch's for-loop, strides of params and state compared too (torch's
    SGD momentum buffer is a clone of the grad, so it has the grad's layout, not the param's)."""
    torch_cls, our_cls = OPTIMIZERS[name]
    return run_side_by_side(
        torch_cls, our_cls, build, CONFIGS[name], steps=steps, grads=grads, check_stride=True, **kw
    )


# --- transposed and permuted params --------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("grad_layout", ["contiguous", "like_param"])
@pytest.mark.parametrize("name", NAMES)
def test_transposed_param(name, grad_layout, dtype):
    """``torch.randn(5, 7).t()`` as a leaf: dense but not contiguous. Its grads either
    contiguous (strides differ from the param's) or with the param's strides."""

    def build():
        gen = torch.Generator().manual_seed(1)
        return [
            _randn(gen, 5, 7, dtype=dtype).t().requires_grad_(),
            _randn(gen, 2, 3, 4, dtype=dtype).permute(2, 0, 1).requires_grad_(),
            _randn(gen, 3, dtype=dtype).requires_grad_(),
        ]

    params = build()
    assert not params[0].is_contiguous() and params[0].is_leaf
    layout = (lambda g: g) if grad_layout == "contiguous" else None

    def make(step, index, p):
        g = seeded_grads(2)(step, index, p).contiguous()
        if layout is None:  # the param's own strides
            out = torch.empty_strided(p.shape, p.stride(), dtype=p.dtype)
            out.copy_(g)
            return out
        return g

    ours, ref = _check(name, dtype, build, make)
    if grad_layout == "contiguous":
        assert ours.param_groups[0]["params"][0].grad.stride() != ours.param_groups[0]["params"][0].stride()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", NAMES)
def test_grad_with_other_strides_than_param(name, dtype):
    """A contiguous param whose grad is assigned with transposed strides (and one 3-D param
    whose grad is permuted)."""

    def build():
        gen = torch.Generator().manual_seed(3)
        return [_randn(gen, 5, 7, dtype=dtype).requires_grad_(), _randn(gen, 4, 3, 6, dtype=dtype).requires_grad_()]

    def layout(g):
        if g.dim() == 2:
            return g.t().contiguous().t()
        return g.permute(2, 1, 0).contiguous().permute(2, 1, 0)

    ours, _ = _check(name, dtype, build, _grads(layout, 4))
    p = ours.param_groups[0]["params"][0]
    assert p.is_contiguous() and p.grad.stride() == (1, 5)


# --- non-dense views -----------------------------------------------------------------------


class _Views:
    """Params that are strided leaf views into bigger tensors (kept to check the gaps)."""

    def __init__(self, dtype):
        self.dtype = dtype
        self.bases: list[list[torch.Tensor]] = []

    def build(self):
        gen = torch.Generator().manual_seed(5)
        base2 = _randn(gen, 6, 10, dtype=self.dtype)
        base1 = _randn(gen, 50, dtype=self.dtype)
        base3 = _randn(gen, 4, 6, 8, dtype=self.dtype)
        self.bases.append([base2, base1, base3])
        params = [
            base2[:, ::2],  # every other column: gaps between elements
            base1[3:40],  # dense, with a storage offset
            base1[41:49:3],  # a strided 1-D slice after it, in the same storage
            base3[1:3, ::2, 1::3].transpose(0, 2),  # non-dense and permuted
        ]
        for p in params:
            p.requires_grad_()
        return params


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", NAMES)
def test_non_dense_strided_leaf_views(name, dtype):
    views = _Views(dtype)
    probe = views.build()
    assert all(p.is_leaf for p in probe) and not probe[0].is_contiguous()
    views.bases.clear()
    ours, ref = _check(name, dtype, views.build, _grads(lambda g: g, 6))
    ref_bases, our_bases = views.bases
    # The whole storage agrees with torch's: the params' elements, and the gaps left as they were.
    for b_ours, b_ref in zip(our_bases, ref_bases):
        assert_tensor_match(b_ours, b_ref, msg="base tensor (params and gaps)")
    fresh = _Views(dtype)
    fresh.build()
    gap = torch.ones(6, 10, dtype=torch.bool)
    gap[:, ::2] = False
    untouched = fresh.bases[0][0][gap]
    assert torch.equal(our_bases[0][gap], untouched), "elements between the view's elements were written"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kind", ["non_dense", "expanded", "offset"])
@pytest.mark.parametrize("name", NAMES)
def test_grad_views(name, kind, dtype):
    """Grads that are views: with gaps, broadcast (stride 0), or at an offset in a storage."""

    def build():
        gen = torch.Generator().manual_seed(7)
        return [_randn(gen, 5, 7, dtype=dtype).requires_grad_(), _randn(gen, 9, dtype=dtype).requires_grad_()]

    base = seeded_grads(8)

    def make(step, index, p):
        g = base(step, index, p)
        if kind == "non_dense":
            big = torch.zeros((*p.shape[:-1], 2 * p.shape[-1]), dtype=p.dtype)
            big[..., ::2] = g
            return big[..., ::2]
        if kind == "expanded":
            row = g.reshape(-1)[: p.shape[-1]].clone()
            return row.expand(p.shape)
        big = torch.zeros(p.numel() + 11, dtype=p.dtype)
        big[5 : 5 + p.numel()] = g.reshape(-1)
        return big[5 : 5 + p.numel()].view(p.shape)

    _check(name, dtype, build, make)


# --- channels_last ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("grad_layout", ["channels_last", "contiguous"])
@pytest.mark.parametrize("name", NAMES)
def test_channels_last_params(name, grad_layout, dtype):
    """4-D channels_last params (some with size-1 dims, whose strides are ambiguous); the
    state torch makes with preserve_format is channels_last too."""

    def build():
        gen = torch.Generator().manual_seed(9)
        shapes = [(2, 3, 4, 5), (3, 8, 3, 3), (2, 1, 4, 1), (1, 3, 1, 1), (4, 3, 1, 2)]
        return [_randn(gen, *s, dtype=dtype).to(memory_format=torch.channels_last).requires_grad_() for s in shapes]

    def layout(g):
        return g.to(memory_format=torch.channels_last) if grad_layout == "channels_last" else g.contiguous()

    ours, ref = _check(name, dtype, build, _grads(layout, 10))
    p = ours.param_groups[0]["params"][0]
    assert p.is_contiguous(memory_format=torch.channels_last)
    for key, value in ours.state[p].items():
        if key != "step" and (name != "SGD" or grad_layout == "channels_last"):
            assert value.is_contiguous(memory_format=torch.channels_last), key


# --- loaded state in another layout -------------------------------------------------------


def _relayout(t: torch.Tensor) -> torch.Tensor:
    """The same values in another layout: transposed strides, channels_last, or a gap."""
    if t.dim() == 2:
        return t.t().contiguous().t()
    if t.dim() == 4:
        return t.to(memory_format=torch.channels_last)
    if t.dim() == 1 and t.numel() > 0:
        big = torch.zeros(2 * t.numel(), dtype=t.dtype)
        big[::2] = t
        return big[::2]
    return t.clone()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", NAMES)
def test_state_loaded_with_another_layout(name, dtype):
    """State saved by torch, turned into other layouts, loaded into torch.optim and rsoptim over
    identical params: both continue alike, and the loaded state keeps its layout."""
    torch_cls, our_cls = OPTIMIZERS[name]
    kwargs = CONFIGS[name]

    def build():
        gen = torch.Generator().manual_seed(11)
        return [
            _randn(gen, 5, 7, dtype=dtype).requires_grad_(),
            _randn(gen, 2, 3, 4, 5, dtype=dtype).requires_grad_(),
            _randn(gen, 13, dtype=dtype).requires_grad_(),
            _randn(gen, 6, 2, dtype=dtype).t().requires_grad_(),
        ]

    grads = seeded_grads(12)
    # Two steps with torch to make a state.
    warm = build()
    warm_opt = torch_cls(warm, foreach=False, **kwargs)
    for step in range(2):
        for i, p in enumerate(warm):
            p.grad = grads(step, i, p)
        warm_opt.step()
    saved = warm_opt.state_dict()
    for state in saved["state"].values():
        for key in list(state):
            if key != "step":
                state[key] = _relayout(state[key])
    params_at = [p.detach().clone() for p in warm]

    def resume():
        params = build()
        with torch.no_grad():
            for p, value in zip(params, params_at):
                p.copy_(value)
        return params

    loaded_strides: dict[str, tuple] = {}
    ref_params, our_params = resume(), resume()
    ref = torch_cls(ref_params, foreach=False, **kwargs)
    ours = our_cls(our_params, **kwargs)
    ref.load_state_dict(copy.deepcopy(saved))
    ours.load_state_dict(copy.deepcopy(saved))
    for key, value in ours.state[our_params[0]].items():
        if key != "step":
            loaded_strides[key] = value.stride()
            assert value.stride() == (1, 5), (key, value.stride())  # loaded with transposed strides
    assert_optimizers_match(ours, ref, check_stride=True, where="after loading")
    for step in range(2, 6):
        for i, (p, q) in enumerate(zip(our_params, ref_params)):
            g = grads(step, i, q)
            q.grad = g
            p.grad = twin(g)
        ref.step()
        ours.step()
        assert_optimizers_match(ours, ref, check_stride=True, where=f"after step {step + 1}")
    for key, value in ours.state[our_params[0]].items():
        if key != "step":
            assert value.stride() == loaded_strides[key]
    # The strided 1-D state (a view with gaps) was updated in place, like torch's.
    s_ours = ours.state[our_params[2]]
    key = next(k for k in s_ours if k != "step")
    assert s_ours[key].stride() == (2,)


@pytest.mark.parametrize("name", NAMES)
def test_an_expanded_state_tensor_is_refused_before_the_param_is_written(name):
    """A state tensor whose elements share memory (an expanded view) cannot be written: torch's
    step raises before it writes the param (AdamW's decoupled weight decay aside, which comes
    first), and so does rsoptim's, with torch's error (it wrote the param, then failed to write
    the state back)."""
    torch_cls, our_cls = OPTIMIZERS[name]
    kwargs = CONFIGS[name]
    errors, params = [], []
    for cls, extra in ((torch_cls, dict(foreach=False)), (our_cls, {})):
        p = torch.linspace(-1, 1, 64, dtype=torch.float32).requires_grad_()
        opt = cls([p], **kwargs, **extra)
        p.grad = torch.ones(64)
        opt.step()
        state = opt.state[p]
        key = next(k for k in state if k != "step")
        state[key] = torch.zeros(1).expand(64)
        before = p.detach().clone()
        with pytest.raises(RuntimeError) as error:
            opt.step()
        errors.append(str(error.value).split("\n")[0])
        params.append((before, p.detach().clone()))
    assert errors[1] == errors[0]
    written = [not torch.equal(after, before) for before, after in params]
    assert written[1] == written[0] == (name == "AdamW")


# --- torch's own fused Adam (information only) ---------------------------------------------


def _mismatched_run(make_opt):
    p = torch.linspace(-1, 1, 35).reshape(5, 7).requires_grad_()
    opt = make_opt([p])
    for i in range(3):
        g = torch.arange(35, dtype=torch.float32).reshape(5, 7) * 0.1 + i
        p.grad = g.t().contiguous().t()  # strides (1, 5), the param's are (7, 1)
        opt.step()
    return p.detach().clone()


def test_rsoptim_right_where_torch_fused_adam_is_wrong():
    """The case torch's fused Adam gets wrong: rsoptim agrees with torch's for-loop."""
    ref = _mismatched_run(lambda ps: torch.optim.Adam(ps, lr=0.1, foreach=False))
    ours = _mismatched_run(lambda ps: rsoptim.Adam(ps, lr=0.1))
    assert_tensor_match(ours, ref, msg="rsoptim vs torch for-loop")


@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.AdamW], ids=["Adam", "AdamW"])
def test_torch_fused_adam_on_mismatched_strides(cls):
    """Information about torch itself, never a failure: xfail while torch's fused CPU Adam is
    wrong on a grad whose strides differ from its param's, skip once torch gets it right."""
    ref = _mismatched_run(lambda ps: cls(ps, lr=0.1, foreach=False))
    try:
        fused = _mismatched_run(lambda ps: cls(ps, lr=0.1, fused=True))
    except RuntimeError as e:  # pragma: no cover - a torch without fused CPU Adam
        pytest.skip(f"torch {torch.__version__} has no fused CPU {cls.__name__}: {e}")
    diff = (fused - ref).abs().max().item()
    if diff > 1e-5:
        pytest.xfail(
            f"torch {torch.__version__} fused=True {cls.__name__} is wrong when grad strides differ "
            f"from the param's (max abs diff {diff:.3g} from the for-loop); rsoptim is right"
        )
    pytest.skip(f"torch {torch.__version__} fused {cls.__name__} now agrees with its for-loop (diff {diff:.3g})")


@pytest.mark.parametrize(
    "case", ["transposed_param_contiguous_grad", "contiguous_param_transposed_grad", "channels_last_param_contiguous_grad"]
)
def test_sgd_momentum_buffer_layout_follows_the_grad(case):
    """torch's SGD momentum buffer is ``grad.clone()``: it has the grad's layout, not the param's."""
    def build():
        gen = torch.Generator().manual_seed(13)
        if case == "transposed_param_contiguous_grad":
            return [_randn(gen, 5, 7, dtype=torch.float32).t().requires_grad_()]
        if case == "contiguous_param_transposed_grad":
            return [_randn(gen, 7, 5, dtype=torch.float32).requires_grad_()]
        return [_randn(gen, 2, 3, 4, 5, dtype=torch.float32).to(memory_format=torch.channels_last).requires_grad_()]

    def layout(g):
        if case == "contiguous_param_transposed_grad":
            return g.t().contiguous().t()
        return g.contiguous()

    torch_cls, our_cls = OPTIMIZERS["SGD"]
    run_side_by_side(
        torch_cls, our_cls, build, dict(lr=0.1, momentum=0.9), steps=2, grads=_grads(layout, 14), check_stride=True
    )
