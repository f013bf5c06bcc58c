"""rsoptim.functional: in-place steps on NumPy arrays, checked against the torch optimizers.

Each test runs the functional step on NumPy arrays and the torch optimizer on tensors holding the
same data and grads, and compares params, state and step counts. float64 is compared at
rtol 1e-10 / atol 1e-12 (the kernels reorder float64 arithmetic by a few ulps; any wrong
hyperparameter shows at 1e-3); float32 at torch's own float32 optimizer tolerances
(rtol 1.3e-6, atol 1e-5, from torch's optimizer test harness).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import rsoptim
from rsoptim import functional as F

TOL = {np.float64: dict(rtol=1e-10, atol=1e-12), np.float32: dict(rtol=1.3e-6, atol=1e-5)}
SHAPES = [(6, 5), (7,), (2, 3, 4)]
EPS32 = float(np.finfo(np.float32).eps)


def arrays(dtype, seed=0, shapes=SHAPES, positive=False):
    rng = np.random.default_rng(seed)
    out = [rng.standard_normal(s).astype(dtype) for s in shapes]
    return [np.abs(a) for a in out] if positive else out


def grads_at(step, dtype, shapes=SHAPES):
    return arrays(dtype, seed=1000 + step, shapes=shapes)


def torch_params(arrs):
    return [torch.nn.Parameter(torch.from_numpy(a.copy())) for a in arrs]


def assert_close(np_arrays, tensors, dtype):
    assert len(np_arrays) == len(tensors)
    for a, t in zip(np_arrays, tensors):
        assert a.dtype == dtype and a.shape == tuple(t.shape)
        torch.testing.assert_close(torch.from_numpy(a), t.detach(), **TOL[dtype])


def run_torch(name, params, steps, **kwargs):
    opt = getattr(torch.optim, name)(params, **kwargs)
    dtype = params[0].dtype
    for i in range(steps):
        for p, g in zip(params, grads_at(i, np.float64 if dtype == torch.float64 else np.float32)):
            p.grad = torch.from_numpy(g)
        opt.step()
    return opt


# ---------------------------------------------------------------------------------------------
# the same numbers as the torch optimizers

ADAM_CONFIGS = [
    dict(lr=0.01),
    dict(lr=0.05, betas=(0.8, 0.95), eps=1e-6),
    dict(lr=0.01, weight_decay=0.1),
    dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True),
    dict(lr=0.01, amsgrad=True),
    dict(lr=0.01, maximize=True, amsgrad=True, weight_decay=0.05),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kwargs", ADAM_CONFIGS, ids=str)
def test_adam_matches_torch(kwargs, dtype):
    init = arrays(dtype)
    params = [a.copy() for a in init]
    m = [np.zeros_like(a) for a in init]
    v = [np.zeros_like(a) for a in init]
    vmax = [np.zeros_like(a) for a in init] if kwargs.get("amsgrad") else None
    steps = np.zeros(len(init), dtype=np.float32)
    for i in range(6):
        F.adam_(params, grads_at(i, dtype), m, v, steps, max_exp_avg_sqs=vmax, **kwargs)

    tp = torch_params(init)
    opt = run_torch("Adam", tp, 6, **kwargs)
    assert_close(params, tp, dtype)
    assert_close(m, [opt.state[p]["exp_avg"] for p in tp], dtype)
    assert_close(v, [opt.state[p]["exp_avg_sq"] for p in tp], dtype)
    if vmax is not None:
        assert_close(vmax, [opt.state[p]["max_exp_avg_sq"] for p in tp], dtype)
    assert steps.tolist() == [opt.state[p]["step"].item() for p in tp] == [6.0] * 3


def test_adamw_via_decoupled_weight_decay_matches_torch_adamw():
    init = arrays(np.float64, seed=1)
    params = [a.copy() for a in init]
    m, v = [np.zeros_like(a) for a in init], [np.zeros_like(a) for a in init]
    steps = np.zeros(len(init), dtype=np.float64)  # float64 step counts work too
    for i in range(5):
        F.adam_(params, grads_at(i, np.float64), m, v, steps, lr=0.02, weight_decay=0.01, decoupled_weight_decay=True)
    tp = torch_params(init)
    run_torch("AdamW", tp, 5, lr=0.02)
    assert_close(params, tp, np.float64)
    assert steps.tolist() == [5.0] * 3


def test_adam_single_arrays_and_per_tensor_step_counts():
    """A single array is a list of one; step counts are per tensor (a lagging one gets a
    different bias correction, as a param that skipped steps does in torch)."""
    init = arrays(np.float64, seed=2, shapes=[(9,)])[0]
    w, m, v = init.copy(), np.zeros(9), np.zeros(9)
    steps = np.array([3.0])  # as if three steps had already been taken
    F.adam_(w, grads_at(0, np.float64, [(9,)])[0], m, v, steps, lr=0.1)
    assert steps[0] == 4.0
    p = torch.nn.Parameter(torch.from_numpy(init.copy()))
    opt = torch.optim.Adam([p], lr=0.1)
    p.grad = torch.from_numpy(grads_at(0, np.float64, [(9,)])[0])
    opt.step()  # initialises state with step 1; redo with step 3 to compare
    p.data.copy_(torch.from_numpy(init))
    opt.state[p]["step"].fill_(3.0)
    opt.state[p]["exp_avg"].zero_()
    opt.state[p]["exp_avg_sq"].zero_()
    opt.step()
    assert_close([w], [p], np.float64)


SGD_CONFIGS = [
    dict(lr=0.1),
    dict(lr=0.1, weight_decay=0.01, maximize=True),
    dict(lr=0.1, momentum=0.9),
    dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
    dict(lr=0.1, momentum=0.5, dampening=0.3),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kwargs", SGD_CONFIGS, ids=str)
def test_sgd_matches_torch(kwargs, dtype):
    init = arrays(dtype, seed=3)
    params = [a.copy() for a in init]
    buffers = None
    for i in range(6):
        buffers = F.sgd_(params, grads_at(i, dtype), buffers, **kwargs)
    tp = torch_params(init)
    opt = run_torch("SGD", tp, 6, **kwargs)
    assert_close(params, tp, dtype)
    if kwargs.get("momentum"):
        assert_close(buffers, [opt.state[p]["momentum_buffer"] for p in tp], dtype)
    else:
        assert buffers == [None] * 3 and len(opt.state) == 0


def test_sgd_first_momentum_buffer_is_the_grad():
    w = np.ones(5)
    g = np.arange(5.0)
    (buf,) = F.sgd_([w], [g], [None], lr=0.1, momentum=0.9, dampening=0.5)
    np.testing.assert_array_equal(buf, g)  # a copy of the grad, no dampening on the first step
    assert buf is not g and not np.shares_memory(buf, g)
    np.testing.assert_array_equal(w, 1.0 - 0.1 * g)


RMSPROP_CONFIGS = [
    dict(lr=0.01),
    dict(lr=0.01, alpha=0.9, eps=1e-6, weight_decay=0.1),
    dict(lr=0.01, momentum=0.9),
    dict(lr=0.01, centered=True),
    dict(lr=0.01, momentum=0.5, centered=True, maximize=True),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kwargs", RMSPROP_CONFIGS, ids=str)
def test_rmsprop_matches_torch(kwargs, dtype):
    init = arrays(dtype, seed=4)
    params = [a.copy() for a in init]
    sq = [np.zeros_like(a) for a in init]
    mb = [np.zeros_like(a) for a in init] if kwargs.get("momentum") else None
    ga = [np.zeros_like(a) for a in init] if kwargs.get("centered") else None
    steps = np.zeros(len(init), dtype=np.float32)
    for i in range(6):
        F.rmsprop_(params, grads_at(i, dtype), sq, steps, momentum_buffers=mb, grad_avgs=ga, **kwargs)
    tp = torch_params(init)
    opt = run_torch("RMSprop", tp, 6, **kwargs)
    assert_close(params, tp, dtype)
    assert_close(sq, [opt.state[p]["square_avg"] for p in tp], dtype)
    if mb is not None:
        assert_close(mb, [opt.state[p]["momentum_buffer"] for p in tp], dtype)
    if ga is not None:
        assert_close(ga, [opt.state[p]["grad_avg"] for p in tp], dtype)
    assert steps.tolist() == [6.0] * 3


@pytest.mark.parametrize("norm_type", [1, 2, 3, 0.5, math.inf])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_grad_norms_match_torch(norm_type, dtype):
    gs = arrays(dtype, seed=5, shapes=SHAPES + [(140_001,)])
    norms = F.grad_norms(gs, norm_type)
    assert norms.dtype == np.float64 and norms.shape == (len(gs),)
    for n, g in zip(norms, gs):
        truth = torch.linalg.vector_norm(torch.from_numpy(g).double(), norm_type).item()
        # Within a few ulps of the exact (float64) norm of the array's values.
        assert n == pytest.approx(truth, rel=1e-12 if dtype == np.float64 else 8 * EPS32)


@pytest.mark.parametrize("norm_type", [0, -math.inf, -1, math.nan])
def test_grad_norms_refuses_non_positive_norm_types(norm_type):
    with pytest.raises(ValueError, match="norm_type"):
        F.grad_norms([np.ones(4)], norm_type)


@pytest.mark.parametrize("norm_type", [1, 2, 3, math.inf])
@pytest.mark.parametrize("max_norm", [0.1, 1e6])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_clip_grad_norm_matches_torch(dtype, max_norm, norm_type):
    gs = arrays(dtype, seed=6, shapes=SHAPES + [(140_001,)])
    before = [g.copy() for g in gs]
    total = F.clip_grad_norm_(gs, max_norm, norm_type)
    assert isinstance(total, float)
    tp = torch_params([np.zeros_like(g) for g in before])
    for p, g in zip(tp, before):
        p.grad = torch.from_numpy(g.copy())
    tt = torch.nn.utils.clip_grad_norm_(tp, max_norm, norm_type=norm_type).item()
    truth = torch.nn.utils.get_total_norm([torch.from_numpy(g).double() for g in before], norm_type).item()
    if dtype == np.float64:
        assert total == pytest.approx(tt, rel=1e-12)
        rtol = 1e-12
    else:
        # torch sums float32 in float32 (see tests/test_clip.py): compare with the truth.
        assert abs(total - truth) <= 8 * EPS32 * truth
        assert abs(total - tt) <= abs(tt - truth) + 8 * EPS32 * truth
        rtol = abs(min(max_norm / (total + 1e-6), 1) / min(max_norm / (tt + 1e-6), 1) - 1) + 4 * EPS32
    for g, p in zip(gs, tp):
        torch.testing.assert_close(torch.from_numpy(g), p.grad, rtol=rtol, atol=1e-30)
    if max_norm == 1e6:
        for g, b in zip(gs, before):
            np.testing.assert_array_equal(g, b)
    else:
        assert F.grad_norms(gs, norm_type).max() < 0.1 + 1e-5


# ---------------------------------------------------------------------------------------------
# errors: refused before anything is written


class AdamArrays:
    def __init__(self, dtype=np.float64, n=16):
        rng = np.random.default_rng(7)
        self.params = [rng.standard_normal(n).astype(dtype) for _ in range(2)]
        self.grads = [rng.standard_normal(n).astype(dtype) for _ in range(2)]
        self.m = [np.zeros(n, dtype) for _ in range(2)]
        self.v = [np.zeros(n, dtype) for _ in range(2)]
        self.steps = np.zeros(2, dtype=np.float32)

    def everything(self):
        return self.params + self.grads + self.m + self.v + [self.steps]

    def call(self, **kw):
        F.adam_(kw.pop("params", self.params), kw.pop("grads", self.grads), kw.pop("m", self.m),
                kw.pop("v", self.v), kw.pop("steps", self.steps), lr=0.1, **kw)


def _refused(exc, match, mutate):
    a = AdamArrays()
    mutate(a)
    before = [x.copy() for x in a.everything()]
    with pytest.raises(exc, match=match):
        a.call()
    for x, y in zip(a.everything(), before):
        np.testing.assert_array_equal(x, y)


def test_valid_call_writes_everything():
    """Positive control for the refusals below."""
    a = AdamArrays()
    before = [x.copy() for x in a.everything()]
    a.call()
    for i in (0, 1, 4, 5, 6, 7):  # params, m, v
        assert not np.array_equal(a.everything()[i], before[i])
    assert a.steps.tolist() == [1.0, 1.0]


@pytest.mark.parametrize(
    "where",
    ["params", "grads", "m", "v"],
)
def test_wrong_dtype(where):
    def mutate(a):
        getattr(a, where)[1] = getattr(a, where)[1].astype(np.float32)

    _refused(TypeError, "dtype", mutate)


@pytest.mark.parametrize("dtype", [np.int64, np.complex128, np.uint16])
def test_unsupported_dtype(dtype):
    def mutate(a):
        a.params = [p.astype(dtype) for p in a.params]

    _refused(TypeError, "params must be numpy arrays of", mutate)


def test_float16_params_with_float64_grads_are_refused():
    def mutate(a):
        a.params = [p.astype(np.float16) for p in a.params]

    _refused(TypeError, "float16 is expected", mutate)


@pytest.mark.parametrize("where", ["params", "grads", "m", "v"])
def test_non_contiguous(where):
    def mutate(a):
        big = np.zeros(32)
        big[::2] = getattr(a, where)[0]
        getattr(a, where)[0] = big[::2]

    _refused(ValueError, "not C-contiguous", mutate)


def test_fortran_ordered_2d_is_refused():
    def mutate(a):
        a.params = [np.asfortranarray(p.reshape(4, 4)) for p in a.params]
        a.grads = [g.reshape(4, 4) for g in a.grads]
        a.m = [x.reshape(4, 4) for x in a.m]
        a.v = [x.reshape(4, 4) for x in a.v]

    _refused(ValueError, "not C-contiguous", mutate)


@pytest.mark.parametrize("where", ["params", "m", "v", "steps"])
def test_read_only_written_arrays(where):
    def mutate(a):
        target = a.steps if where == "steps" else getattr(a, where)[1]
        target.flags.writeable = False

    _refused(ValueError, "read-only|writeable", mutate)


def test_read_only_grads_are_fine():
    a = AdamArrays()
    for g in a.grads:
        g.flags.writeable = False
    a.call()
    assert a.steps.tolist() == [1.0, 1.0]


@pytest.mark.parametrize("where", ["grads", "m", "v"])
def test_mismatched_shapes(where):
    def mutate(a):
        getattr(a, where)[0] = np.zeros(17)

    _refused(ValueError, "shape", mutate)


def test_mismatched_list_lengths_and_steps_shape():
    _refused(ValueError, "arrays for", lambda a: setattr(a, "m", a.m[:1]))
    _refused(ValueError, "steps", lambda a: setattr(a, "steps", np.zeros(3, np.float32)))
    _refused(ValueError, "steps", lambda a: setattr(a, "steps", np.zeros(2, np.int32)))


def test_same_array_as_param_and_exp_avg():
    def mutate(a):
        a.m[0] = a.params[0]

    _refused(ValueError, "share memory", mutate)


def test_same_array_as_param_and_grad():
    def mutate(a):
        a.grads[1] = a.params[1]

    _refused(ValueError, "share memory", mutate)


def test_view_overlapping_another_array():
    def mutate(a):
        buf = np.zeros(24)
        a.m[0] = buf[:16]
        a.v[0] = buf[8:]  # overlaps the exp_avg view by 8 elements

    _refused(ValueError, "share memory", mutate)


def test_two_params_overlapping_views():
    def mutate(a):
        buf = np.random.default_rng(8).standard_normal(20)
        a.params = [buf[:16], buf[4:]]

    _refused(ValueError, "share memory", mutate)


def test_steps_inside_a_param():
    def mutate(a):
        a.steps = a.params[1][:2]  # a float64 (2,) array, but it is the param's memory

    _refused(ValueError, "share memory", mutate)


def test_grads_may_share_memory_with_each_other():
    """Grads are only read, so one grad array may serve two params."""
    a, b = AdamArrays(), AdamArrays()
    a.grads[1] = a.grads[0]
    b.grads[1] = b.grads[0].copy()
    a.call()
    b.call()
    for x, y in zip(a.params + a.m + a.v, b.params + b.m + b.v):
        np.testing.assert_array_equal(x, y)


def test_sgd_and_rmsprop_refuse_shared_memory():
    w = np.ones(8)
    before = w.copy()
    with pytest.raises(ValueError, match="share memory"):
        F.sgd_([w], [w], lr=0.1)
    with pytest.raises(ValueError, match="share memory"):
        F.sgd_([w], [np.ones(8)], [w], lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="share memory"):
        F.rmsprop_([w], [np.ones(8)], [w], np.zeros(1))
    np.testing.assert_array_equal(w, before)


def test_clip_refuses_non_contiguous_and_wrong_dtype():
    with pytest.raises(ValueError, match="C-contiguous"):
        F.clip_grad_norm_([np.ones(16)[::2]], 1.0)
    with pytest.raises(TypeError):
        F.clip_grad_norm_([np.ones(4, np.float32), np.ones(4)], 1.0)
    g = np.full(4, 10.0)
    g.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        F.clip_grad_norm_([g], 1.0)
    # Refused whether or not this call would clip: the answer must not depend on the data.
    with pytest.raises(ValueError, match="read-only"):
        F.clip_grad_norm_([g], 1e3)
    assert F.grad_norms([g])[0] == pytest.approx(20.0)  # reading is fine


# ---------------------------------------------------------------------------------------------
# the module docstring's example


def _docstring_example():
    text = F.__doc__
    block = text.split("Example::", 1)[1]
    lines = [line[4:] for line in block.splitlines() if line.startswith("    ") or not line.strip()]
    code = "\n".join(lines).strip("\n")
    assert "F.adam_" in code and "w = np.zeros" in code
    return code


def test_docstring_example_converges():
    namespace: dict = {}
    exec(compile(_docstring_example(), "<rsoptim.functional docstring>", "exec"), namespace)
    w = namespace["w"]
    assert w.dtype == np.float32 and w.shape == (1000,)
    assert np.all(w == w[0])
    # From 0 to within 0.05 of 3 (100 Adam steps with lr=0.1 end at 2.98).
    assert abs(float(w[0]) - 3.0) < 0.05
    assert namespace["steps"].tolist() == [100.0]

    # And it is the same trajectory as torch.optim.Adam on the same problem.
    p = torch.nn.Parameter(torch.zeros(1000, dtype=torch.float32))
    opt = torch.optim.Adam([p], lr=0.1)
    for _ in range(100):
        p.grad = 2 * (p.detach() - 3.0)
        opt.step()
    torch.testing.assert_close(torch.from_numpy(w), p.detach(), **TOL[np.float32])


def test_functional_does_not_need_torch_objects():
    """Plain Python lists of arrays (not tuples of tensors) are what the API takes; a torch
    tensor is refused rather than silently read through."""
    with pytest.raises(TypeError):
        F.adam_([np.ones(3)], [torch.ones(3, dtype=torch.float64)], [np.zeros(3)], [np.zeros(3)], np.zeros(1))
    assert rsoptim.functional is F


# --- half-precision params ------------------------------------------------------------------

_HALF_NUMPY = [np.float16]
try:
    import ml_dtypes

    _HALF_NUMPY.append(ml_dtypes.bfloat16)
except ImportError:  # bfloat16 arrays need ml_dtypes; the float16 cases still run
    pass


@pytest.mark.parametrize("state", ["same", "float32"])
@pytest.mark.parametrize("dtype", _HALF_NUMPY, ids=lambda d: np.dtype(d).name)
def test_half_precision_adam_matches_the_torch_optimizers(dtype, state):
    # The torch optimizer with the same layout (state_dtype=float32 for float32 state), which
    # test_dtypes_devices checks against torch's fused kernel and the float32 rule.
    torch_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}[np.dtype(dtype).name]
    w0 = np.linspace(-1, 1, 1000).astype(dtype)
    grads = [(np.linspace(1, -1, 1000) * (i + 1)).astype(dtype) for i in range(3)]
    state_dtype = dtype if state == "same" else np.float32
    w, m, v = w0.copy(), np.zeros(1000, state_dtype), np.zeros(1000, state_dtype)
    steps = np.zeros(1, np.float32)
    p = torch.tensor(w0.astype(np.float32)).to(torch_dtype).requires_grad_()
    opt = rsoptim.Adam([p], lr=1e-2, **({} if state == "same" else {"state_dtype": torch.float32}))
    for g in grads:
        F.adam_([w], [g], [m], [v], steps, lr=1e-2)
        p.grad = torch.tensor(g.astype(np.float32)).to(torch_dtype)
        opt.step()
    np.testing.assert_array_equal(w.astype(np.float32), p.detach().float().numpy())
    np.testing.assert_array_equal(m.astype(np.float32), opt.state[p]["exp_avg"].float().numpy())
    assert m.dtype == np.dtype(state_dtype)


@pytest.mark.parametrize("dtype", _HALF_NUMPY, ids=lambda d: np.dtype(d).name)
def test_half_precision_state_of_another_dtype_is_refused(dtype):
    w = np.zeros(4, dtype)
    with pytest.raises(TypeError, match="dtype"):
        F.adam_([w], [np.ones(4, dtype)], [np.zeros(4, np.float64)], [np.zeros(4, np.float64)], np.zeros(1, np.float32))
    with pytest.raises(TypeError, match="dtype"):  # one state float32, the other not
        F.adam_([w], [np.ones(4, dtype)], [np.zeros(4, np.float32)], [np.zeros(4, dtype)], np.zeros(1, np.float32))


@pytest.mark.parametrize("dtype", _HALF_NUMPY, ids=lambda d: np.dtype(d).name)
def test_half_precision_norms_and_clipping(dtype):
    g = np.linspace(-3, 4, 1001).astype(dtype)
    wide = g.astype(np.float64)
    np.testing.assert_allclose(F.grad_norms([g]), [np.linalg.norm(wide)], rtol=1e-6)
    total = F.clip_grad_norm_([g], 1.0)
    assert total == pytest.approx(np.linalg.norm(wide), rel=1e-6)
    np.testing.assert_allclose(g.astype(np.float64), wide / (total + 1e-6), rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("dtype", _HALF_NUMPY, ids=lambda d: np.dtype(d).name)
def test_half_precision_sgd_starts_float32_buffers_when_asked(dtype):
    torch_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}[np.dtype(dtype).name]
    w = np.linspace(-1, 1, 100).astype(dtype)
    p = torch.tensor(w.astype(np.float32)).to(torch_dtype).requires_grad_()
    opt = rsoptim.SGD([p], lr=0.1, momentum=0.9, dampening=0.5, state_dtype=torch.float32)
    buffers = None
    for i in range(3):
        g = (np.linspace(1, -1, 100) * (i + 1)).astype(dtype)
        buffers = F.sgd_([w], [g], buffers, lr=0.1, momentum=0.9, dampening=0.5, state_dtype=np.float32)
        p.grad = torch.tensor(g.astype(np.float32)).to(torch_dtype)
        opt.step()
    assert buffers[0].dtype == np.float32
    np.testing.assert_array_equal(w.astype(np.float32), p.detach().float().numpy())
    np.testing.assert_array_equal(buffers[0], opt.state[p]["momentum_buffer"].numpy())
    with pytest.raises(TypeError, match="state_dtype"):
        F.sgd_([np.zeros(3)], [np.ones(3)], lr=0.1, momentum=0.9, state_dtype=np.float32)
