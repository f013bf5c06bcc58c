"""rsoptim's extensions for half-precision params beyond torch.optim: ``master_weights=True`` (a
float32 copy of each bfloat16/float16 param in its state, updated by the step, the param its
rounding) and ``stochastic_rounding=True`` (the param written with unbiased stochastic rounding,
its random bits keyed by a seed, the param's stream, the step and the element index).

References are built from rsoptim's float32 step, which the parity tests hold to torch's.
"""

from __future__ import annotations

import copy

import pytest
import torch

import rsoptim
from conftest import OPTIMIZERS, assert_tensor_match, seeded_grads

NAMES = list(OPTIMIZERS)
HALF = [torch.float16, torch.bfloat16]
HALF_IDS = ["float16", "bfloat16"]
KWARGS = {
    "SGD": dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1),
    "Adam": dict(lr=0.05, betas=(0.8, 0.95), eps=1e-3, weight_decay=0.1, amsgrad=True),
    "AdamW": dict(lr=0.05, betas=(0.8, 0.95), eps=1e-3, weight_decay=0.1),
    "RMSprop": dict(lr=0.01, alpha=0.9, eps=1e-3, momentum=0.5, centered=True),
}
SHAPES = [(), (1,), (7,), (33,), (4, 5), (300,)]


def _start(seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen, dtype=torch.float64) for shape in SHAPES]


def _master_reference(name, dtype, state_dtype, steps, grads):
    """The float32 step on float32 params that are never rounded (the master copies), the
    state rounded to its dtype after each step; each param is its master rounded."""
    params = [s.to(dtype).float().requires_grad_() for s in _start()]
    opt = OPTIMIZERS[name][1](params, **KWARGS[name])
    history = []
    for step in range(steps):
        for index, p in enumerate(params):
            p.grad = grads(step, index, p).to(dtype).float()
        opt.step()
        with torch.no_grad():
            for p in params:
                for key, value in opt.state[p].items():
                    if key != "step":
                        value.copy_(value.to(state_dtype or dtype))
        history.append([(p.detach().clone(), p.detach().to(dtype)) for p in params])
    return history


@pytest.mark.parametrize("state_dtype", [None, torch.float32], ids=["half_state", "float32_state"])
@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
@pytest.mark.parametrize("name", NAMES)
def test_master_weights_step_the_float32_copy_and_round_the_param(name, dtype, state_dtype):
    grads = seeded_grads(3)
    expected = _master_reference(name, dtype, state_dtype, 4, grads)
    params = [s.to(dtype).requires_grad_() for s in _start()]
    extra = {"state_dtype": state_dtype} if state_dtype else {}
    opt = OPTIMIZERS[name][1](params, **KWARGS[name], master_weights=True, **extra)
    for step in range(4):
        for index, p in enumerate(params):
            p.grad = grads(step, index, p).to(dtype)
        opt.step()
        for p, (master, rounded) in zip(params, expected[step]):
            assert opt.state[p]["master_param"].dtype == torch.float32
            assert_tensor_match(opt.state[p]["master_param"], master, exact=True, msg=f"master step {step}")
            assert_tensor_match(p.detach(), rounded, exact=True, msg=f"param step {step}")
    assert opt.__dict__.get("_rsoptim_plans"), "the steps after the first should reuse a plan"


@pytest.mark.parametrize("name", NAMES)
def test_master_weights_keep_updates_smaller_than_half_an_ulp(name):
    """A bfloat16 param of 1.0 does not move under updates below half its ulp (2^-8); its master
    copy adds them up, and the param follows once they are large enough."""
    kwargs = dict(lr=1e-4) if name != "RMSprop" else dict(lr=1e-5)
    plain_p = torch.ones(8, dtype=torch.bfloat16, requires_grad=True)
    master_p = torch.ones(8, dtype=torch.bfloat16, requires_grad=True)
    plain = OPTIMIZERS[name][1]([plain_p], **kwargs)
    master = OPTIMIZERS[name][1]([master_p], **kwargs, master_weights=True)
    for _ in range(200):
        plain_p.grad = torch.ones_like(plain_p)
        master_p.grad = torch.ones_like(master_p)
        plain.step()
        master.step()
    assert torch.equal(plain_p.detach(), torch.ones_like(plain_p))
    assert (master.state[master_p]["master_param"] < 1.0 - 1e-3).all()
    assert (master_p.detach() < 1.0).all()
    assert torch.equal(master_p.detach(), master.state[master_p]["master_param"].to(torch.bfloat16))


@pytest.mark.parametrize("name", NAMES)
def test_master_weights_survive_state_dicts_in_float32(name):
    grads = seeded_grads(4)

    def fresh(**extra):
        params = [s.to(torch.bfloat16).requires_grad_() for s in _start()]
        return params, OPTIMIZERS[name][1](params, **KWARGS[name], **extra)

    ref_params, ref = fresh(master_weights=True)
    for step in range(4):
        for index, p in enumerate(ref_params):
            p.grad = grads(step, index, p).to(torch.bfloat16)
        ref.step()
    params, opt = fresh(master_weights=True)
    for step in range(2):
        for index, p in enumerate(params):
            p.grad = grads(step, index, p).to(torch.bfloat16)
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    assert saved["param_groups"][0]["master_weights"] is True
    resumed_params, resumed = fresh()  # the loaded groups bring master_weights
    with torch.no_grad():
        for p, q in zip(resumed_params, params):
            p.copy_(q)
    resumed.load_state_dict(saved)
    for p in resumed_params:
        assert resumed.state[p]["master_param"].dtype == torch.float32
    for step in range(2, 4):
        for index, p in enumerate(resumed_params):
            p.grad = grads(step, index, p).to(torch.bfloat16)
        resumed.step()
    for p, q in zip(resumed_params, ref_params):
        assert torch.equal(p.detach(), q.detach())
        assert torch.equal(resumed.state[p]["master_param"], ref.state[q]["master_param"])
    # torch.optim loads the same state dict (an extra state key is its to ignore) and rsoptim
    # loads torch's: the master copy is then made from the param on the next step.
    torch_params = [s.to(torch.bfloat16).requires_grad_() for s in _start()]
    torch_opt = OPTIMIZERS[name][0](torch_params, **KWARGS[name])
    torch_opt.load_state_dict(copy.deepcopy(saved))
    for index, p in enumerate(torch_params):
        p.grad = grads(0, index, p).to(torch.bfloat16)
    torch_opt.step()
    # torch.optim keeps the master copy it cannot use (cast to bfloat16, never updated): loaded
    # back, it is dropped and made afresh from the params torch stepped.
    back_params, back = fresh(master_weights=True)
    with torch.no_grad():
        for p, q in zip(back_params, torch_params):
            p.copy_(q)
    back.load_state_dict(copy.deepcopy(torch_opt.state_dict()))
    assert all("master_param" not in back.state[p] for p in back_params)
    for index, p in enumerate(back_params):
        p.grad = grads(1, index, p).to(torch.bfloat16)
    back.step()
    plain_params, plain = fresh()
    with torch.no_grad():
        for p, q in zip(plain_params, torch_params):
            p.copy_(q)
    plain.load_state_dict(copy.deepcopy(torch_opt.state_dict()))
    for index, p in enumerate(plain_params):
        p.grad = grads(1, index, p).to(torch.bfloat16)
    plain.step()
    for p, q in zip(back_params, plain_params):
        # One step from the same param: the master copy is that param, unrounded afterwards.
        assert back.state[p]["master_param"].dtype == torch.float32
        assert torch.equal(p.detach(), q.detach())


@pytest.mark.parametrize("name", NAMES)
def test_params_changed_outside_the_optimizer_win_over_their_master_copies(name):
    """torch.optim steps whatever the param holds: a param written between steps (a clamp, a
    load of new weights) is copied into its master copy before the next step."""
    p = torch.ones(1000, dtype=torch.bfloat16, requires_grad=True)
    opt = OPTIMIZERS[name][1]([p], lr=1e-3, master_weights=True)
    for step in range(3):
        p.grad = torch.ones_like(p)
        opt.step()
        if step == 1:
            with torch.no_grad():
                p.fill_(5.0)
    assert (opt.state[p]["master_param"] > 4.9).all() and (p.detach() > 4.9).all()


# --- stochastic rounding ------------------------------------------------------------------


def _sr_run(name, dtype, steps=3, seed=7, big=False, **extra):
    grads = seeded_grads(5)
    params = [s.to(dtype).requires_grad_() for s in _start()]
    if big:  # big enough to be cut into pieces over the threads (see rust/core/src/exec.rs)
        params.append(torch.linspace(-3, 3, (1 << 20) + 3).to(dtype).requires_grad_())
    opt = OPTIMIZERS[name][1](
        params, **KWARGS[name], stochastic_rounding=True, stochastic_rounding_seed=seed, **extra
    )
    for step in range(steps):
        for index, p in enumerate(params):
            p.grad = grads(step, index, p).to(dtype)
        opt.step()
    return [p.detach().clone() for p in params], opt


@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
@pytest.mark.parametrize("name", NAMES)
def test_stochastic_rounding_is_reproducible_and_keyed_by_the_seed(name, dtype):
    a, _ = _sr_run(name, dtype, seed=7)
    b, _ = _sr_run(name, dtype, seed=7)
    c, _ = _sr_run(name, dtype, seed=8)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


@pytest.mark.parametrize("name", NAMES)
def test_stochastic_rounding_is_the_same_for_any_thread_count_and_simd_path(name):
    threads, level = rsoptim.get_num_threads(), rsoptim._rsoptim.simd_level()
    try:
        results = []
        for simd in rsoptim._rsoptim.available_simd_levels():
            for n in (1, 2):
                rsoptim._rsoptim.set_simd_level(simd)
                rsoptim.set_num_threads(n)
                results.append(_sr_run(name, torch.bfloat16, big=True)[0] + _sr_run(name, torch.float16, big=True)[0])
    finally:
        rsoptim.set_num_threads(threads)
        rsoptim._rsoptim.set_simd_level(level)
    for other in results[1:]:
        assert all(torch.equal(x, y) for x, y in zip(results[0], other))


def _neighbours(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The two values of ``dtype`` around each float32 in ``x`` (equal where x is one)."""
    nearest = x.to(dtype)
    toward = torch.where(nearest.float() > x, -float("inf"), float("inf")).to(dtype)
    other = torch.where(nearest.float() == x, nearest, torch.nextafter(nearest, toward))
    return torch.minimum(nearest, other), torch.maximum(nearest, other)


@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
def test_stochastic_rounding_is_unbiased(dtype):
    """SGD with float32 master copies and a zero grad: each step writes the param as the same
    master rounded stochastically. Each draw is one of its two neighbours, and the mean over
    many steps is the master to within a few standard errors; the values cover negative ones,
    -0.0, the float16 subnormals and the boundary at 2^-14."""
    gen = torch.Generator().manual_seed(0)
    master = torch.rand(64, generator=gen) * 4 - 2
    master[0] = -0.0
    master[1] = 2.0**-14 * (1 - 2.0**-12)
    master[2] = 2.0**-14 * (1 + 2.0**-12)
    if dtype == torch.float16:
        master[3:10] *= 1e-6  # float16 subnormals
    p = master.to(dtype).requires_grad_()
    opt = rsoptim.SGD([p], lr=0.1, master_weights=True, stochastic_rounding=True, stochastic_rounding_seed=3)
    opt.state[p]["master_param"] = master.clone()
    low, high = _neighbours(master, dtype)
    total, draws = torch.zeros(64, dtype=torch.float64), 4000
    for _ in range(draws):
        p.grad = torch.zeros_like(p)
        opt.step()
        value = p.detach()
        assert ((value == low) | (value == high)).all()
        total += value.double()
    assert torch.equal(opt.state[p]["master_param"], master)
    assert p.detach()[0].item() == 0.0 and torch.signbit(p.detach()[0])
    mean = total / draws
    # A draw is one of two neighbours an ulp apart: the standard error is at most ulp/2/sqrt(n).
    tolerance = 6 * (high.double() - low.double()) / 2 / draws**0.5
    assert ((mean - master.double()).abs() <= tolerance).all(), (mean - master.double()).abs().max()
    # Rounding to nearest would be biased by up to half an ulp: the test can tell the two apart.
    assert ((master.to(dtype).double() - master.double()).abs() > tolerance).any()


@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
def test_stochastic_rounding_keeps_finite_values_finite(dtype):
    """Past the largest finite value, up to where rounding to nearest overflows, stochastic
    rounding keeps the largest finite value (it never makes an inf that nearest would not)."""
    largest = torch.finfo(dtype).max
    master = torch.tensor([largest * (1 + 2.0**-12), -largest * (1 + 2.0**-12), largest])
    p = master.to(dtype).requires_grad_()
    opt = rsoptim.SGD([p], lr=0.1, master_weights=True, stochastic_rounding=True, stochastic_rounding_seed=3)
    opt.state[p]["master_param"] = master.clone()
    for _ in range(200):
        p.grad = torch.zeros_like(p)
        opt.step()
        assert torch.equal(p.detach(), torch.tensor([largest, -largest, largest], dtype=dtype))


def test_stochastic_rounding_seed_follows_torch_manual_seed():
    p = torch.zeros(4, dtype=torch.bfloat16, requires_grad=True)
    torch.manual_seed(123)
    a = rsoptim.Adam([p], stochastic_rounding=True)
    torch.manual_seed(123)
    b = rsoptim.Adam([p], stochastic_rounding=True)
    torch.manual_seed(124)
    c = rsoptim.Adam([p], stochastic_rounding=True)
    seeds = [o.param_groups[0]["stochastic_rounding_seed"] for o in (a, b, c)]
    assert seeds[0] == seeds[1] == 123 and seeds[2] == 124
    assert rsoptim.Adam([p], stochastic_rounding=True, stochastic_rounding_seed=9).defaults["stochastic_rounding_seed"] == 9


@pytest.mark.parametrize("name", NAMES)
def test_stochastic_rounding_resumes_from_a_state_dict_bit_for_bit(name):
    full, _ = _sr_run(name, torch.bfloat16, steps=4)
    half_params, opt = _sr_run(name, torch.bfloat16, steps=2)
    saved = copy.deepcopy(opt.state_dict())
    params = [p.clone().requires_grad_() for p in half_params]
    resumed = OPTIMIZERS[name][1](params, **KWARGS[name])
    resumed.load_state_dict(saved)
    assert resumed.param_groups[0]["stochastic_rounding_seed"] == 7
    grads = seeded_grads(5)
    for step in range(2, 4):
        for index, p in enumerate(params):
            p.grad = grads(step, index, p).to(torch.bfloat16)
        resumed.step()
    assert all(torch.equal(p.detach(), q) for p, q in zip(params, full))


@pytest.mark.parametrize("name", NAMES)
def test_stochastic_rounding_leaves_the_state_as_nearest_rounding_does(name):
    """Only the param is rounded stochastically: after one step from the same start, the state
    equals that of a run rounded to nearest."""
    _, sr = _sr_run(name, torch.bfloat16, steps=1)
    grads = seeded_grads(5)
    params = [s.to(torch.bfloat16).requires_grad_() for s in _start()]
    nearest = OPTIMIZERS[name][1](params, **KWARGS[name])
    for index, p in enumerate(params):
        p.grad = grads(0, index, p).to(torch.bfloat16)
    nearest.step()
    for p, q in zip(sr.param_groups[0]["params"], params):
        for key, value in nearest.state[q].items():
            assert torch.equal(sr.state[p][key], value), key


def test_stochastic_rounding_where_torch_steps_the_param():
    """Tensor betas leave a group to torch's implementation: torch steps a float32 copy, and the
    param is written with the random bits a kernel would draw: one of the two bfloat16
    neighbours of torch's float32 result, the same in every run, not always the nearest."""
    start = torch.linspace(-1, 1, 4000)
    betas = (torch.tensor(0.9), torch.tensor(0.999))
    reference = start.to(torch.bfloat16).float().requires_grad_()
    torch_opt = torch.optim.Adam([reference], lr=1e-2, betas=betas)
    reference.grad = torch.ones_like(reference)
    torch_opt.step()
    want = reference.detach()
    outcomes = []
    for _ in range(2):
        p = start.to(torch.bfloat16).requires_grad_()
        opt = rsoptim.Adam([p], lr=1e-2, betas=betas, stochastic_rounding=True, stochastic_rounding_seed=1)
        p.grad = torch.ones_like(p)
        opt.step()
        assert int(opt.state[p]["step"]) == 1 and opt.state[p]["exp_avg"].dtype == torch.bfloat16
        outcomes.append(p.detach().clone())
    assert torch.equal(outcomes[0], outcomes[1])
    got = outcomes[0]
    down = torch.where(got.float() <= want, got, torch.nextafter(got, torch.tensor(-float("inf"), dtype=torch.bfloat16)))
    up = torch.nextafter(down, torch.tensor(float("inf"), dtype=torch.bfloat16))
    assert ((down.float() <= want) & (want <= up.float())).all()
    assert not torch.equal(got, want.to(torch.bfloat16))


# --- what makes no sense, and what is a no-op ---------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    "extra, error",
    [
        (dict(master_weights="yes"), TypeError),
        (dict(stochastic_rounding=1), TypeError),
        (dict(stochastic_rounding_seed=3), ValueError),  # without stochastic_rounding
        (dict(stochastic_rounding=True, stochastic_rounding_seed=-1), ValueError),
        (dict(stochastic_rounding=True, stochastic_rounding_seed=2**64), ValueError),
        (dict(stochastic_rounding=True, stochastic_rounding_seed=1.5), ValueError),
    ],
)
def test_bad_extension_options_raise_before_anything_is_built(name, extra, error):
    with pytest.raises(error):
        OPTIMIZERS[name][1]([torch.zeros(3, dtype=torch.bfloat16, requires_grad=True)], lr=0.1, **extra)


@pytest.mark.parametrize("name", NAMES)
def test_bad_extension_options_in_param_groups_and_state_dicts_raise(name):
    p = torch.zeros(3, dtype=torch.bfloat16, requires_grad=True)
    opt = OPTIMIZERS[name][1]([p], lr=0.1)
    with pytest.raises(TypeError):
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)], "master_weights": "yes"})
    assert len(opt.param_groups) == 1
    saved = opt.state_dict()
    saved["param_groups"][0]["stochastic_rounding_seed"] = -4
    with pytest.raises(ValueError, match="stochastic_rounding"):
        opt.load_state_dict(saved)
    opt.param_groups[0]["master_weights"] = 1
    p.grad = torch.ones_like(p)
    with pytest.raises(TypeError):
        opt.step()
    assert torch.equal(p.detach(), torch.zeros_like(p))


@pytest.mark.parametrize("name", NAMES)
def test_extensions_leave_float32_params_as_they_are(name):
    """A float32 param is its own master copy, and every float32 result is stored exactly: the
    options change nothing for it (documented), and it keeps torch.optim's state keys."""

    def run(**extra):
        p = torch.linspace(-1, 1, 16).requires_grad_()
        opt = OPTIMIZERS[name][1]([p], **KWARGS[name], **extra)
        for i in range(3):
            p.grad = torch.linspace(1, -1, 16) * (i + 1)
            opt.step()
        return p.detach(), opt

    plain, plain_opt = run()
    extended, opt = run(master_weights=True, stochastic_rounding=True, stochastic_rounding_seed=2)
    assert torch.equal(plain, extended)
    ours, torchs = opt.state_dict()["state"], plain_opt.state_dict()["state"]
    assert ours.keys() == torchs.keys() and all(ours[i].keys() == torchs[i].keys() for i in ours)
    assert opt.__dict__.get("_rsoptim_plans"), "the steps after the first should reuse a plan"


@pytest.mark.parametrize("name", NAMES)
def test_a_group_of_bfloat16_and_float32_params_with_master_copies_keeps_its_plan(name):
    params = [torch.randn(50).to(torch.bfloat16).requires_grad_(), torch.randn(20, requires_grad=True)]
    opt = OPTIMIZERS[name][1](params, **KWARGS[name], master_weights=True, stochastic_rounding=True)
    for _ in range(3):
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
    assert opt.__dict__.get("_rsoptim_plans")
    assert "master_param" in opt.state[params[0]] and "master_param" not in opt.state[params[1]]


@pytest.mark.parametrize("name", NAMES)
def test_groups_set_their_own_options_and_edits_take_effect(name):
    """Per-group options (in the constructor's dicts, add_param_group, or edited later) apply
    to their group only, whatever a plan had recorded."""
    a = torch.linspace(-1, 1, 500).to(torch.bfloat16).requires_grad_()
    b = torch.linspace(-1, 1, 500).to(torch.bfloat16).requires_grad_()
    opt = OPTIMIZERS[name][1]([{"params": [a], "stochastic_rounding": False}, {"params": [b]}], **KWARGS[name], stochastic_rounding=True)
    opt.add_param_group({"params": [torch.zeros(3, dtype=torch.bfloat16, requires_grad=True)], "stochastic_rounding_seed": 5})
    assert opt.param_groups[2]["stochastic_rounding_seed"] == 5 and opt.param_groups[2]["stochastic_rounding"]

    def nearest_reference(start, steps):
        q = start.clone().requires_grad_()
        ref = OPTIMIZERS[name][1]([q], **KWARGS[name])
        for _ in range(steps):
            q.grad = torch.ones_like(q)
            ref.step()
        return q.detach()

    start_a, start_b = a.detach().clone(), b.detach().clone()
    for _ in range(2):
        for p in (a, b):
            p.grad = torch.ones_like(p)
        opt.step()
    assert torch.equal(a.detach(), nearest_reference(start_a, 2))
    assert not torch.equal(b.detach(), nearest_reference(start_b, 2))
    # Turned off in the group after plans exist: the next step rounds to nearest.
    opt.param_groups[1]["stochastic_rounding"] = False
    before = b.detach().clone()
    b.grad = torch.ones_like(b)
    a.grad = None
    state_copy = copy.deepcopy(opt.state[b])
    opt.step()
    q = before.clone().requires_grad_()
    ref = OPTIMIZERS[name][1]([q], **KWARGS[name])
    ref.load_state_dict({"state": {0: state_copy}, "param_groups": [{**ref.param_groups[0], "params": [0]}]})
    q.grad = torch.ones_like(q)
    ref.step()
    assert torch.equal(b.detach(), q.detach())


@pytest.mark.filterwarnings("ignore:optimizer contains a parameter group with duplicate parameters")
@pytest.mark.parametrize("extra", [dict(master_weights=True), dict(stochastic_rounding=True), dict(state_dtype=torch.float32)])
def test_a_param_listed_twice_is_stepped_twice(extra):
    """torch steps a param listed twice twice; so does rsoptim where torch steps float32 copies."""
    p = torch.ones(8, dtype=torch.bfloat16, requires_grad=True)
    opt = rsoptim.SGD([p, p], lr=0.1, **extra)
    p.grad = torch.ones_like(p)
    opt.step()
    assert torch.allclose(p.detach().float(), torch.full((8,), 0.8), atol=2**-7)
    if "master_weights" in extra:
        assert torch.allclose(opt.state[p]["master_param"], torch.full((8,), 0.8))


@pytest.mark.parametrize("transposed", [False, True])
def test_where_torch_steps_the_param_it_gets_the_kernels_random_bits(transposed, monkeypatch):
    """SGD's float32 step is torch's bit for bit, so a param torch steps on a float32 copy must
    come out with exactly the bits the kernel writes, in memory order for a transposed param."""

    def run():
        base = torch.linspace(-1, 1, 40 * 30).reshape(40, 30).to(torch.bfloat16)
        p = (base.t() if transposed else base).requires_grad_()
        opt = rsoptim.SGD([p], lr=1e-2, momentum=0.9, master_weights=True, stochastic_rounding=True, stochastic_rounding_seed=4)
        for i in range(3):
            p.grad = torch.full_like(p, 0.37 * (i + 1))
            opt.step()
        return p.detach().clone(), opt.state[p]["master_param"].clone()

    kernel_param, kernel_master = run()
    monkeypatch.setattr(rsoptim.SGD, "_param_runs_on_kernel", lambda self, p, group, grad: False)
    torch_param, torch_master = run()
    assert torch.equal(kernel_master, torch_master)
    assert torch.equal(kernel_param, torch_param)


def test_options_loaded_onto_params_off_the_cpu_raise_before_a_step():
    """A state dict may bring stochastic_rounding to half params the kernels cannot step (the
    meta device stands in for CUDA): the step raises before anything changes."""
    a = rsoptim.Adam([torch.ones(4, dtype=torch.bfloat16, requires_grad=True)], lr=0.1, stochastic_rounding=True)
    q = torch.ones(4, dtype=torch.bfloat16, device="meta", requires_grad=True)
    b = rsoptim.Adam([q], lr=0.1)
    b.load_state_dict(a.state_dict())
    q.grad = torch.ones_like(q)
    with pytest.raises(ValueError, match="CPU"):
        b.step()
    assert len(b.state) == 0


@pytest.mark.cuda
@pytest.mark.parametrize("name", NAMES)
def test_extensions_refuse_half_params_off_the_cpu(name):
    p = torch.zeros(3, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    for extra in (dict(master_weights=True), dict(stochastic_rounding=True)):
        with pytest.raises(ValueError, match="CPU"):
            OPTIMIZERS[name][1]([p], lr=0.1, **extra)


# --- from the second review -----------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:optimizer contains a parameter group with duplicate parameters")
@pytest.mark.parametrize("numel", [1, 4])
def test_a_param_listed_twice_before_another_steps_each_as_torch_does(numel):
    """Params [a, a, b] on the float32-copy path: a twice, b once (found by identity, never by
    comparing tensors' values)."""
    a = torch.full((numel,), 1.0, dtype=torch.bfloat16, requires_grad=True)
    b = torch.full((numel,), 1.0, dtype=torch.bfloat16, requires_grad=True)
    opt = rsoptim.SGD([a, a, b], lr=0.25, master_weights=True)
    a.grad, b.grad = torch.ones_like(a), torch.ones_like(b)
    opt.step()
    assert torch.equal(a.detach(), torch.full_like(a, 0.5)) and torch.equal(b.detach(), torch.full_like(b, 0.75))


@pytest.mark.parametrize("layout", ["two_groups", "one_group_one_grad"])
def test_params_that_are_views_of_one_buffer_keep_their_master_precision(layout):
    """Views share a version counter: writing one must not look like a write to the others."""
    flat = torch.ones(8, dtype=torch.bfloat16)
    p1, p2 = flat[:4].requires_grad_(), flat[4:].requires_grad_()
    groups = [{"params": [p1]}, {"params": [p2]}] if layout == "two_groups" else [{"params": [p1, p2]}]
    opt = rsoptim.SGD(groups, lr=1e-4, master_weights=True)
    for step in range(5):
        p1.grad = torch.ones_like(p1)
        p2.grad = None if (layout == "one_group_one_grad" and step == 2) else torch.ones_like(p2)
        opt.step()
    assert torch.allclose(opt.state[p1]["master_param"], torch.full((4,), 1 - 5e-4), rtol=0, atol=1e-6)
    expected_p2 = 1 - (4e-4 if layout == "one_group_one_grad" else 5e-4)
    assert torch.allclose(opt.state[p2]["master_param"], torch.full((4,), expected_p2), rtol=0, atol=1e-6)


@pytest.mark.parametrize("how", ["deepcopy", "load_state_dict", "pickle"])
def test_a_write_after_a_copy_or_a_load_wins_over_the_master_copy(how):
    import pickle

    p = torch.ones(64, dtype=torch.bfloat16, requires_grad=True)
    opt = rsoptim.SGD([p], lr=1e-4, master_weights=True)
    p.grad = torch.ones_like(p)
    opt.step()
    if how == "deepcopy":
        opt = copy.deepcopy(opt)
        (p,) = opt.param_groups[0]["params"]
    elif how == "pickle":
        opt = pickle.loads(pickle.dumps(opt))
        (p,) = opt.param_groups[0]["params"]
    else:
        opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    precise = opt.state[p]["master_param"].clone()
    with torch.no_grad():
        p[:32].fill_(3.0)
    p.grad = torch.ones_like(p)
    opt.step()
    master = opt.state[p]["master_param"]
    assert torch.allclose(master[:32], torch.full((32,), 3.0 - 1e-4), rtol=0, atol=1e-6)
    # The elements nobody wrote keep the master's precision.
    assert torch.allclose(master[32:], precise[32:] - 1e-4, rtol=0, atol=1e-7)


def test_bfloat16_nan_bits_are_the_same_on_every_simd_path():
    level = rsoptim._rsoptim.simd_level()
    results = []
    try:
        for simd in rsoptim._rsoptim.available_simd_levels():
            rsoptim._rsoptim.set_simd_level(simd)
            p = torch.linspace(-1, 1, 64).to(torch.bfloat16).requires_grad_()
            opt = rsoptim.AdamW([p], lr=0.1)
            grad = torch.ones(64)
            grad[::3] = float("inf")
            grad[1::5] = -float("nan")
            p.grad = grad.to(torch.bfloat16)
            opt.step()
            results.append([p.detach().view(torch.int16).clone()] + [v.view(torch.int16).clone() for k, v in opt.state[p].items() if k != "step"])
    finally:
        rsoptim._rsoptim.set_simd_level(level)
    assert any(bool(t.isnan().any()) for t in [p.detach()])
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


@pytest.mark.parametrize("extra", [dict(master_weights=True), dict(stochastic_rounding=True)])
def test_float32_params_get_no_state_entry_of_their_own(extra):
    f32, bf16 = torch.ones(4, requires_grad=True), torch.ones(4, dtype=torch.bfloat16, requires_grad=True)
    opt = rsoptim.SGD([f32, bf16], lr=0.1, **extra)
    reference = torch.optim.SGD([torch.ones(4, requires_grad=True)], lr=0.1)
    for _ in range(3):
        f32.grad, bf16.grad = torch.ones_like(f32), torch.ones_like(bf16)
        opt.step()
    assert 0 not in opt.state_dict()["state"] and reference.state_dict()["state"] == {}


def test_two_threads_stepping_one_optimizer_through_float32_copies():
    """Tensor betas send every step through torch on float32 copies: two threads stepping one
    optimizer must not lose steps or mix up state."""
    import threading

    params = [torch.ones(32, dtype=torch.bfloat16, requires_grad=True) for _ in range(8)]
    betas = (torch.tensor(0.9), torch.tensor(0.999))
    opt = rsoptim.Adam(params, lr=1e-3, betas=betas, master_weights=True)
    for p in params:
        p.grad = torch.ones_like(p)
    errors = []

    def work():
        try:
            for _ in range(40):
                opt.step()
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert all(int(opt.state[p]["step"]) == 80 for p in params)
    masters = [opt.state[p]["master_param"] for p in params]
    assert all(torch.equal(m, masters[0]) for m in masters)
