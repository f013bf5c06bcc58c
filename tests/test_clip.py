"""rsoptim.clip_grad_norm_ / get_total_norm / clip_grads_with_norm_ against torch.nn.utils.

Every test runs torch's function and rsoptim's on identical copies of the same grads and
compares the returned total norm AND the grads afterwards.

How close they must be:

* float64 (and complex128): the kernels reduce in a different order than torch, so results
  differ by a few ulps: ``rtol=1e-12`` (observed <= 3e-15).
* norms that do not sum (inf, -inf, 0) and everything that rsoptim routes to torch's own ops
  (float16, bfloat16, norm types <= 0, complex grads with p != 2) must be bit-for-bit torch's.
* float32 p-norms (p = 1, 2, 3, 0.5): torch sums in float32, so its own total norm carries an
  error that grows with the number of elements (measured: up to 1.2e-4 relative for p=3 over
  3x1e6 elements), while rsoptim's kernels accumulate more precisely. Comparing the two at a
  fixed rtol would either be too loose for small tensors or fail for large ones, so the check
  is against the float64 truth: rsoptim must be within a few float32 ulps of it, and no further
  from torch than torch itself is from the truth (plus those few ulps). The grads are then
  compared with the relative difference of the two clip coefficients plus rounding.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import rsoptim

EPS32 = torch.finfo(torch.float32).eps
INF = math.inf


def make_params(dtype, shapes, seed=0, scale=1.0, with_grad=None):
    """Params with deterministic grads (``with_grad`` lists which params get one)."""
    g = torch.Generator().manual_seed(seed)
    params = []
    for i, shape in enumerate(shapes):
        p = torch.nn.Parameter(torch.zeros(shape, dtype=dtype))
        if with_grad is None or i in with_grad:
            p.grad = torch.randn(shape, generator=g, dtype=dtype) * scale
        params.append(p)
    return params


def clone_params(params):
    out = []
    for p in params:
        q = torch.nn.Parameter(p.detach().clone())
        if p.grad is not None:
            # Keep the grad's own strides (non-dense / transposed grads are part of the tests).
            q.grad = torch.empty_strided(p.grad.size(), p.grad.stride(), dtype=p.grad.dtype)
            q.grad.copy_(p.grad)
        out.append(q)
    return out


def grads(params):
    return [p.grad for p in params if p.grad is not None]


def exact_total(gs, norm_type):
    """The float64 truth of the total norm of ``gs``."""
    wide = [g.to(torch.complex128 if g.is_complex() else torch.float64) for g in gs]
    return torch.nn.utils.get_total_norm(wide, norm_type).item()


def _sums(norm_type):
    return float(norm_type) not in (INF, -INF, 0.0)


def assert_grads_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape and x.stride() == y.stride()
        torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)


def compare_clip(params, max_norm, norm_type=2.0, **kwargs):
    """Runs both clip functions on copies of ``params``; checks norm and grads; returns them."""
    pt, pr = clone_params(params), clone_params(params)
    before = [g.clone() for g in grads(params)]
    nt = torch.nn.utils.clip_grad_norm_(pt, max_norm, norm_type=norm_type, **kwargs)
    nr = rsoptim.clip_grad_norm_(pr, max_norm, norm_type=norm_type, **kwargs)
    assert isinstance(nr, torch.Tensor) and nr.dim() == 0
    assert nr.dtype == nt.dtype and nr.device == nt.device
    gt, gr = grads(pt), grads(pr)
    dtypes = {g.dtype for g in before}
    complex_not_2 = any(d.is_complex for d in dtypes) and float(norm_type) != 2.0
    routed = not _sums(norm_type) or dtypes & {torch.float16, torch.bfloat16} or complex_not_2 or not nt.isfinite()
    if routed or not before:
        assert_grads_equal(gr, gt)
        torch.testing.assert_close(nr, nt, rtol=0, atol=0, equal_nan=True)
    elif nt.dtype == torch.float64 and dtypes <= {torch.float64, torch.complex128}:
        torch.testing.assert_close(nr, nt, rtol=1e-12, atol=0)
        for x, y in zip(gr, gt):
            torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-300)
    else:
        truth = exact_total(before, norm_type)
        r, t = nr.item(), nt.item()
        ulps = 8 * EPS32 * abs(truth)
        assert abs(r - truth) <= ulps, (r, t, truth)
        assert abs(r - t) <= abs(t - truth) + ulps, (r, t, truth)
        # Grads: g * min(max_norm / (norm + 1e-6), 1) with the two norms.
        coef_t = min(max_norm / (t + 1e-6), 1.0)
        coef_r = min(max_norm / (r + 1e-6), 1.0)
        rtol = abs(coef_r - coef_t) / coef_t + 4 * EPS32
        for x, y in zip(gr, gt):
            assert x.dtype == y.dtype and x.stride() == y.stride()
            torch.testing.assert_close(x, y, rtol=rtol, atol=1e-30)
    return nt, nr, gt, gr, before


# ---------------------------------------------------------------------------------------------
# norm types

NORM_TYPES = [1, 2, 3, 0.5, INF, "inf", 0, -INF, 2.0]
SMALL = [(10, 7), (13,), (2, 3, 4)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("norm_type", NORM_TYPES, ids=str)
@pytest.mark.parametrize("max_norm", [0.1, 1e4], ids=["clipped", "not_clipped"])
def test_norm_types(norm_type, dtype, max_norm):
    params = make_params(dtype, SMALL)
    nt, nr, gt, gr, before = compare_clip(params, max_norm, norm_type)
    if max_norm == 1e4 and nt.item() < 1e4:
        # Not clipped: the grads are exactly what they were.
        assert_grads_equal(gr, before)
    elif nt.item() > 0.1 and nt.isfinite():
        # Clipped: every grad is scaled by the same factor, and the new norm is max_norm.
        for g, b in zip(gr, before):
            assert not torch.equal(g, b)
        if _sums(norm_type) and float(norm_type) > 0:
            after = torch.nn.utils.get_total_norm([g.double() for g in gr], norm_type).item()
            assert after == pytest.approx(0.1, rel=1e-5)


@pytest.mark.parametrize("norm_type", [1, 2, 3, 0.5, INF, 0, -INF], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_large_tensors(norm_type, dtype):
    """Several grads over 2 * 65536 elements each (the kernels split them across threads)."""
    params = make_params(dtype, [(140_001,), (300, 500), (2 * 65536 + 7,), (5,)], seed=1)
    compare_clip(params, 1.0, norm_type)


def test_large_float32_three_norm_is_closer_to_truth_than_torch():
    """Documents the float32 accuracy argument of the module docstring on real data."""
    params = make_params(torch.float32, [(1_000_000,)] * 3, seed=2)
    _, nr, *_ = compare_clip(params, 1.0, 3)
    truth = exact_total(grads(params), 3)
    assert abs(nr.item() - truth) <= 8 * EPS32 * truth


def test_norm_type_string_inf_equals_float_inf():
    params = make_params(torch.float32, SMALL)
    a, b = clone_params(params), clone_params(params)
    na = rsoptim.clip_grad_norm_(a, 0.5, norm_type="inf")
    nb = rsoptim.clip_grad_norm_(b, 0.5, norm_type=INF)
    assert torch.equal(na, nb)
    assert_grads_equal(grads(a), grads(b))


# ---------------------------------------------------------------------------------------------
# inputs


def test_single_tensor_input():
    p = make_params(torch.float32, [(40, 3)])[0]
    pt, pr = clone_params([p])[0], clone_params([p])[0]
    nt = torch.nn.utils.clip_grad_norm_(pt, 0.5)
    nr = rsoptim.clip_grad_norm_(pr, 0.5)
    torch.testing.assert_close(nr, nt, rtol=2 * EPS32, atol=0)
    torch.testing.assert_close(pr.grad, pt.grad, rtol=4 * EPS32, atol=0)
    assert nr.item() > 0.5


def test_generator_input():
    params = make_params(torch.float64, SMALL)
    pt, pr = clone_params(params), clone_params(params)
    nt = torch.nn.utils.clip_grad_norm_((p for p in pt), 0.5)
    nr = rsoptim.clip_grad_norm_((p for p in pr), 0.5)
    torch.testing.assert_close(nr, nt, rtol=1e-12, atol=0)
    for x, y in zip(grads(pr), grads(pt)):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=0)
    assert nr.item() > 0.5  # so the generator's grads really were clipped


def test_empty_generator_warns_like_torch():
    with warnings.catch_warnings(record=True) as wt:
        warnings.simplefilter("always")
        nt = torch.nn.utils.clip_grad_norm_((p for p in []), 1.0)
    with warnings.catch_warnings(record=True) as wr:
        warnings.simplefilter("always")
        nr = rsoptim.clip_grad_norm_((p for p in []), 1.0)
    assert [str(w.message) for w in wr] == [str(w.message) for w in wt]
    assert [w.category for w in wr] == [w.category for w in wt] == [UserWarning]
    assert wr[0].filename == __file__  # reported at the caller, as torch does
    assert torch.equal(nr, nt) and nr.dtype == nt.dtype


def test_mixed_float32_float64_grads():
    params = make_params(torch.float32, [(10, 7), (13,)], seed=3) + make_params(torch.float64, [(4, 5), (9,)], seed=4)
    for norm_type in (1, 2, 3, INF):
        nt, nr, *_ = compare_clip(params, 0.2, norm_type)
        assert nr.dtype == torch.float64  # promotion across the groups


def test_mixed_float32_first_float64_later_and_half():
    params = (
        make_params(torch.float16, [(6,)], seed=5)
        + make_params(torch.float32, [(10, 7)], seed=6)
        + make_params(torch.bfloat16, [(3, 3)], seed=7)
    )
    nt, nr, *_ = compare_clip(params, 0.2, 2)
    assert nr.dtype == torch.float32


@pytest.mark.parametrize("norm_type", [1, 2, 3, INF, 0, -INF], ids=str)
@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_complex_grads(dtype, norm_type):
    params = make_params(dtype, [(10, 7), (13,), (140_001,)], seed=8)
    nt, nr, *_ = compare_clip(params, 0.5, norm_type)
    assert nr.dtype == (torch.float32 if dtype == torch.complex64 else torch.float64)


def test_params_without_grads_are_ignored():
    params = make_params(torch.float64, SMALL + [(7,)], with_grad=(0, 2))
    nt, nr, gt, gr, _ = compare_clip(params, 0.3)
    assert len(gr) == 2
    assert exact_total(gr, 2) == pytest.approx(0.3, rel=1e-5)


@pytest.mark.parametrize("params", [[], "no_grads"], ids=["empty_list", "no_grads"])
def test_no_grads_at_all_returns_zero(params):
    if params == "no_grads":
        params = make_params(torch.float64, SMALL, with_grad=())
    nt = torch.nn.utils.clip_grad_norm_(params, 1.0)
    nr = rsoptim.clip_grad_norm_(params, 1.0)
    assert torch.equal(nr, torch.tensor(0.0)) and nr.dtype == nt.dtype == torch.float32
    assert all(p.grad is None for p in params)


def test_small_max_norm_scales_every_grad():
    params = make_params(torch.float64, SMALL, seed=9)
    nt, nr, gt, gr, before = compare_clip(params, 1e-3)
    factor = 1e-3 / (nr.item() + 1e-6)
    for g, b in zip(gr, before):
        torch.testing.assert_close(g, b * factor, rtol=1e-12, atol=0)


def test_large_max_norm_leaves_grads_untouched():
    params = make_params(torch.float32, SMALL, seed=10)
    nt, nr, gt, gr, before = compare_clip(params, 1e6)
    assert_grads_equal(gr, before)


def test_max_norm_equal_to_norm_scales_by_just_under_one():
    params = make_params(torch.float64, SMALL, seed=11)
    total = rsoptim.get_total_norm(grads(params)).item()
    nt, nr, gt, gr, before = compare_clip(params, total)
    assert any(not torch.equal(g, b) for g, b in zip(gr, before))  # the 1e-6 makes it < 1


def _non_dense_grads(dtype):
    p1 = torch.nn.Parameter(torch.zeros(8, 5, dtype=dtype))
    p1.grad = torch.randn(8, 10, dtype=dtype, generator=torch.Generator().manual_seed(12))[:, ::2]
    p2 = torch.nn.Parameter(torch.zeros(6, 4, dtype=dtype))
    p2.grad = torch.randn(4, 6, dtype=dtype, generator=torch.Generator().manual_seed(13)).t()  # dense, transposed
    p3 = torch.nn.Parameter(torch.zeros(3, 4, dtype=dtype))
    p3.grad = torch.randn(3, 4, dtype=dtype, generator=torch.Generator().manual_seed(14))
    p4 = torch.nn.Parameter(torch.zeros(5, dtype=dtype))
    p4.grad = torch.randn(1, dtype=dtype, generator=torch.Generator().manual_seed(15)).expand(5)  # stride 0
    return [p1, p2, p3, p4]


@pytest.mark.parametrize("norm_type", [1, 2, INF], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_non_dense_grads(dtype, norm_type):
    params = _non_dense_grads(dtype)
    assert not params[0].grad.is_contiguous() and not params[1].grad.is_contiguous()
    compare_clip(params[:3], 0.1, norm_type)


def test_expanded_grad_raises_like_torch():
    """A stride-0 (expanded) grad cannot be scaled in place: torch refuses, and so must rsoptim."""
    pt, pr = torch.nn.Parameter(torch.zeros(5)), torch.nn.Parameter(torch.zeros(5))
    pt.grad = torch.tensor([3.0]).expand(5)
    pr.grad = torch.tensor([3.0]).expand(5)
    with pytest.raises(RuntimeError) as et:
        torch.nn.utils.clip_grad_norm_([pt], 0.1)
    with pytest.raises(RuntimeError) as er:
        rsoptim.clip_grad_norm_([pr], 0.1)
    assert str(er.value) == str(et.value)
    assert torch.equal(pr.grad, torch.full((5,), 3.0))


def test_non_dense_grad_view_does_not_touch_the_gaps():
    base = torch.randn(8, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(16))
    p = torch.nn.Parameter(torch.zeros(8, 5, dtype=torch.float64))
    p.grad = base[:, ::2]
    gaps = base[:, 1::2].clone()
    rsoptim.clip_grad_norm_([p], 0.01)
    assert torch.equal(base[:, 1::2], gaps)


# ---------------------------------------------------------------------------------------------
# non-finite grads


@pytest.mark.parametrize("bad", [math.nan, INF, -INF], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("norm_type", [2, 1, INF, "inf"], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_error_if_nonfinite_raises_and_leaves_grads(bad, norm_type, dtype):
    params = make_params(dtype, SMALL, seed=17)
    params[1].grad[3] = bad
    pt, pr = clone_params(params), clone_params(params)
    with pytest.raises(RuntimeError) as et:
        torch.nn.utils.clip_grad_norm_(pt, 1.0, norm_type=norm_type, error_if_nonfinite=True)
    with pytest.raises(RuntimeError) as er:
        rsoptim.clip_grad_norm_(pr, 1.0, norm_type=norm_type, error_if_nonfinite=True)
    assert str(er.value) == str(et.value)
    assert "is non-finite, so it cannot be clipped" in str(er.value)
    assert_grads_equal(grads(pr), grads(params))


@pytest.mark.parametrize("bad", [math.nan, INF], ids=["nan", "inf"])
@pytest.mark.parametrize("norm_type", [2, 1, INF], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_nonfinite_without_flag_gives_torchs_result(bad, norm_type, dtype):
    params = make_params(dtype, SMALL, seed=18)
    params[0].grad[1, 2] = bad
    nt, nr, gt, gr, _ = compare_clip(params, 1.0, norm_type)
    assert not nr.isfinite()
    # An inf (or nan) total makes the coefficient 0 (or nan): the inf grad becomes nan.
    assert gr[0][1, 2].isnan()


# ---------------------------------------------------------------------------------------------
# float16 / bfloat16


@pytest.mark.parametrize("norm_type", [1, 2, 3, INF, 0, -INF], ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_grads(dtype, norm_type):
    params = make_params(dtype, [(10, 7), (13,), (140_001,)], seed=19)
    nt, nr, *_ = compare_clip(params, 0.5, norm_type)
    assert nr.dtype == dtype


# ---------------------------------------------------------------------------------------------
# foreach, get_total_norm, clip_grads_with_norm_


@pytest.mark.parametrize("foreach", [None, True, False])
def test_foreach_argument(foreach):
    compare_clip(make_params(torch.float64, SMALL, seed=20), 0.5, 2, foreach=foreach)
    compare_clip(make_params(torch.bfloat16, SMALL, seed=20), 0.5, 2, foreach=foreach)


@pytest.mark.parametrize("norm_type", [1, 2, 3, 0.5, INF, "inf", 0, -INF], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.complex64, torch.float16])
def test_get_total_norm(norm_type, dtype):
    gs = grads(make_params(dtype, SMALL, seed=21))
    snapshot = [g.clone() for g in gs]
    t = torch.nn.utils.get_total_norm(gs, norm_type)
    r = rsoptim.get_total_norm(gs, norm_type)
    assert r.dtype == t.dtype and r.dim() == 0
    assert_grads_equal(gs, snapshot)  # get_total_norm does not write
    if not _sums(norm_type) or dtype == torch.float16:
        assert torch.equal(r, t)
    elif dtype == torch.float64:
        torch.testing.assert_close(r, t, rtol=1e-12, atol=0)
    else:
        truth = exact_total(gs, norm_type)
        assert abs(r.item() - truth) <= 8 * EPS32 * truth
        assert abs(r.item() - t.item()) <= abs(t.item() - truth) + 8 * EPS32 * truth


def test_get_total_norm_single_tensor_and_empty_and_nonfinite():
    g = torch.randn(33, dtype=torch.float64, generator=torch.Generator().manual_seed(22))
    torch.testing.assert_close(rsoptim.get_total_norm(g), torch.nn.utils.get_total_norm(g), rtol=1e-12, atol=0)
    assert torch.equal(rsoptim.get_total_norm([]), torch.nn.utils.get_total_norm([]))
    g[0] = math.nan
    with pytest.raises(RuntimeError) as et:
        torch.nn.utils.get_total_norm([g], error_if_nonfinite=True)
    with pytest.raises(RuntimeError) as er:
        rsoptim.get_total_norm([g], error_if_nonfinite=True)
    assert str(er.value) == str(et.value)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("total", [0.5, 3.0, 1e9, math.inf, math.nan], ids=str)
def test_clip_grads_with_norm(dtype, total):
    params = make_params(dtype, SMALL, seed=23, with_grad=(0, 2))
    pt, pr = clone_params(params), clone_params(params)
    total_norm = torch.tensor(total, dtype=dtype)
    assert torch.nn.utils.clip_grads_with_norm_(pt, 1.0, total_norm) is None
    assert rsoptim.clip_grads_with_norm_(pr, 1.0, total_norm) is None
    assert_grads_equal(grads(pr), grads(pt))
    assert pr[1].grad is None


def test_clip_grads_with_norm_single_tensor_and_no_grads():
    p = make_params(torch.float32, [(12,)], seed=24)[0]
    q = clone_params([p])[0]
    torch.nn.utils.clip_grads_with_norm_(p, 0.25, torch.tensor(2.0))
    rsoptim.clip_grads_with_norm_(q, 0.25, torch.tensor(2.0))
    assert torch.equal(q.grad, p.grad)
    empty = make_params(torch.float32, [(3,)], with_grad=())
    rsoptim.clip_grads_with_norm_(empty, 0.25, torch.tensor(2.0))
    assert empty[0].grad is None


def test_get_total_norm_then_clip_equals_clip_grad_norm():
    params = make_params(torch.float32, [(140_001,), (17,)], seed=25)
    a, b = clone_params(params), clone_params(params)
    total = rsoptim.get_total_norm(grads(a))
    rsoptim.clip_grads_with_norm_(a, 1.0, total)
    total_b = rsoptim.clip_grad_norm_(b, 1.0)
    assert torch.equal(total, total_b)
    assert_grads_equal(grads(a), grads(b))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("norm_type", [1.0, 2.0, 3.0, float("inf")])
@pytest.mark.parametrize("max_norm", [1e-2, 1e3], ids=["clips", "no clip"])
def test_half_precision_grads_are_clipped_as_torch_does(dtype, norm_type, max_norm):
    """Half-precision grads run on the kernels: norms summed in float64 from float32 terms,
    scaled in float32 and rounded once; torch sums in float32, so the totals may differ in
    their last bit (so far they have not), and the grads then by a unit of the half type."""
    gen = torch.Generator().manual_seed(3)
    grads = [(torch.randn(s, generator=gen) * 2).to(dtype) for s in [(33,), (4, 129), (1,), (70_000,)]]
    results = []
    for clip in (torch.nn.utils.clip_grad_norm_, rsoptim.clip_grad_norm_):
        params = [torch.zeros_like(g, requires_grad=True) for g in grads]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        total = clip(params, max_norm, norm_type=norm_type)
        results.append((total, [p.grad for p in params]))
    (t_torch, g_torch), (t_ours, g_ours) = results
    assert t_ours.dtype == t_torch.dtype == dtype
    torch.testing.assert_close(t_ours, t_torch)
    for a, b, original in zip(g_ours, g_torch, grads):
        if torch.equal(t_ours, t_torch):  # the same factor: the same product, rounded once
            assert torch.equal(a, b)
        torch.testing.assert_close(a, b)
        if t_torch.item() + 1e-6 < max_norm:  # nothing to clip: untouched, bit for bit
            assert torch.equal(a, original)


@pytest.mark.parametrize("max_norm", [1e-3, 1e6], ids=["clips", "no clip"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64])
def test_grads_versions_move_as_torchs_multiply_moves_them(max_norm, dtype):
    """torch's clip multiplies every grad in place (also by 1), which autograd sees in each
    grad's version: a graph that saved a grad then refuses to run backward."""

    def versions(module):
        params = make_params(dtype, SMALL, seed=12)
        before = [p.grad._version for p in params]
        (rsoptim if module is rsoptim else torch.nn.utils).clip_grad_norm_(params, max_norm)
        return [p.grad._version - b for p, b in zip(params, before)]

    assert versions(rsoptim) == versions(torch) != [0] * len(SMALL)


def test_a_graph_that_saved_a_clipped_grad_refuses_backward_as_in_torch():
    def run(clip):
        w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
        (w**3).sum().backward(create_graph=True)
        saved = (w.grad**2).sum()  # saves w.grad
        clip([w], 1.0)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            saved.backward()

    run(torch.nn.utils.clip_grad_norm_)
    run(rsoptim.clip_grad_norm_)


@pytest.mark.parametrize("max_norm", [1e-3, 1e6], ids=["clips", "no clip"])
def test_inference_grads_are_refused_outside_inference_mode_as_in_torch(max_norm):
    def run(clip):
        p = torch.nn.Parameter(torch.zeros(5))
        with torch.inference_mode():
            grad = torch.arange(5.0)
        p.grad = grad
        with pytest.raises(RuntimeError, match="[Ii]nference tensor"):
            clip([p], max_norm)
        return grad

    assert torch.equal(run(torch.nn.utils.clip_grad_norm_), run(rsoptim.clip_grad_norm_))


def test_inference_grads_are_clipped_inside_inference_mode_as_in_torch():
    def run(clip):
        with torch.inference_mode():
            p = torch.zeros(5)
            p.grad = torch.arange(5.0)
            return clip([p], 1.0), p.grad

    (nt, gt), (nr, gr) = run(torch.nn.utils.clip_grad_norm_), run(rsoptim.clip_grad_norm_)
    assert torch.equal(nt, nr) and torch.equal(gt, gr)


@pytest.mark.parametrize("norm_type", [2.0, INF, -1.0, 0.0])
def test_get_total_norm_of_tensors_that_require_grad_is_outside_autograd_as_in_torch(norm_type):
    """torch's get_total_norm runs without autograd, whichever ops compute the norms."""
    w = torch.nn.Parameter(torch.linspace(-1, 1, 7))
    tensors = [w * 2, w[:3] + 1]
    ours, theirs = rsoptim.get_total_norm(tensors, norm_type), torch.nn.utils.get_total_norm(tensors, norm_type)
    assert ours.requires_grad == theirs.requires_grad == False  # noqa: E712
    assert torch.equal(ours, theirs)
