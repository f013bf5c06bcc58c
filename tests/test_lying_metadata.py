"""Tensors whose Python-level metadata lies, and user code that runs inside a step: a Tensor
subclass's ``__torch_function__`` or a ``TorchFunctionMode`` can answer ``data_ptr()`` or the
``_cdata`` getter with any number, a NumPy subclass can override ``size`` or ``ctypes``, and a
mode (function or dispatch) or a ``__float__`` can resize a storage after it was checked. What
rsoptim hands its kernels must be what the memory is when they run (each attack below crashed
rsoptim before this was so); where torch steps params, subclasses and modes still see its ops.

Each attack runs in a child process, so that a crash fails its test instead of the whole run."""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap

import pytest

PRELUDE = """
import numpy as np
import torch
from torch.overrides import TorchFunctionMode
import rsoptim
from rsoptim import functional as F

FAR = 0x7F0000000000  # unmapped: a kernel writing there crashes


CDATA = torch._C.TensorBase._cdata  # the getter of the TensorImpl's address


def lie(func):
    # A far address, each time another (no two buffers seem to overlap), where func reads an
    # address; None where it does not.
    if getattr(func, "__name__", "") == "data_ptr" or getattr(func, "__self__", None) is CDATA:
        lie.count += 1
        return FAR + lie.count * (1 << 32)
    return None


lie.count = 0


class LyingMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        address = lie(func)
        return func(*args, **(kwargs or {})) if address is None else address


class LyingTensor(torch.Tensor):
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        address = lie(func)
        return super().__torch_function__(func, types, args, kwargs or {}) if address is None else address


def model(seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(shape, generator=g).requires_grad_() for shape in [(33, 7), (7,), (300,)]]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    return params


OPTIMIZERS = {
    "SGD": dict(lr=0.1, momentum=0.9),
    "Adam": dict(lr=0.01),
    "AdamW": dict(lr=0.01),
    "RMSprop": dict(lr=0.01, momentum=0.5),
}


class Interrupt(BaseException):  # what a signal handler raises (a Ctrl-C)
    pass


armed = [False]


def handler(*args):  # a SIGALRM handler: raises Interrupt once per arming
    if armed[0]:
        armed[0] = False
        raise Interrupt


def one_param(name, steps, **options):
    # A param of 5,000 elements stepped `steps` times (two make a plan for the next).
    p = torch.randn(5000)
    p.grad = torch.randn(5000)
    opt = getattr(rsoptim, name)([p], lr=0.01, **options)
    for _ in range(steps):
        opt.step()
    return p, opt


def expect_refused(opt, message):
    try:
        opt.step()
    except RuntimeError as e:
        assert message in str(e), e
    else:
        raise AssertionError(f"stepped where it should have raised: {message}")
    [torch.randn(1000) for _ in range(200)]  # heap activity: a corrupted heap aborts here


def check_equal(got, expected):
    for g, e in zip(got, expected):
        torch.testing.assert_close(g.detach().as_subclass(torch.Tensor), e.detach(), rtol=0, atol=0)
"""


def run_child(body: str) -> None:
    source = PRELUDE + textwrap.dedent(body) + "\nprint('child ok')\n"
    done = subprocess.run([sys.executable, "-c", source], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "child ok" in done.stdout, (
        f"child exited with {done.returncode} (negative: killed by that signal)\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    )


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW", "RMSprop"])
def test_a_mode_that_lies_about_addresses_changes_nothing(name):
    run_child(
        f"""
        expected, got, torchs = model(), model(), model()
        plain = getattr(rsoptim, "{name}")(expected, **OPTIMIZERS["{name}"])
        opt = getattr(rsoptim, "{name}")(got, **OPTIMIZERS["{name}"])
        ref = getattr(torch.optim, "{name}")(torchs, **OPTIMIZERS["{name}"])
        for step in range(3):  # the first step builds the plan, the next ones use it
            plain.step()
            ref.step()
            with LyingMode():
                opt.step()
        check_equal(got, expected)
        for g, t in zip(got, torchs):
            torch.testing.assert_close(g, t)  # torch's own tolerances, as the parity tests
        """
    )


def test_a_mode_that_lies_changes_nothing_for_adam8bit_and_clipping():
    run_child(
        """
        expected, got = model(), model()
        with LyingMode():
            total = rsoptim.clip_grad_norm_(got, max_norm=0.5)
            norm = rsoptim.get_total_norm([p.grad for p in got])
        ref_total = torch.nn.utils.clip_grad_norm_(expected, max_norm=0.5)
        torch.testing.assert_close(total, ref_total)
        torch.testing.assert_close(norm, torch.nn.utils.get_total_norm([p.grad for p in expected]))
        for g, e in zip(got, expected):
            torch.testing.assert_close(g.grad, e.grad)

        def big(seed):  # 8-bit state from 4,096 elements on
            g = torch.Generator().manual_seed(seed)
            params = [torch.randn(5000, generator=g).requires_grad_(), torch.randn(7, generator=g).requires_grad_()]
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
            return params

        runs = {}
        for kind in ("plain", "lied to"):
            eight, clipped = big(1), model()
            opts = [rsoptim.Adam8bit(eight, lr=0.01), rsoptim.Adam(clipped, lr=0.01, max_grad_norm=0.5)]
            for step in range(3):
                for opt in opts:
                    if kind == "plain":
                        opt.step()
                    else:
                        with LyingMode():
                            opt.step()
            runs[kind] = eight + clipped
        assert rsoptim.adam8bit.is_8bit_state(opts[0].state[eight[0]])
        check_equal(runs["lied to"], runs["plain"])
        """
    )


@pytest.mark.parametrize("name", ["SGD", "Adam", "RMSprop"])
@pytest.mark.parametrize("target", ["grad", "state"])
def test_a_lying_subclass_swapped_in_after_the_plan_is_stepped_as_torch_does(name, target):
    # A plan reads each step's grads and state tensors: a subclass in their place is torch's to
    # step, and what it says its memory is never reaches a kernel.
    run_child(
        f"""
        key = {{"SGD": "momentum_buffer", "Adam": "exp_avg", "RMSprop": "square_avg"}}["{name}"]
        runs = []
        for module in (torch.optim, rsoptim):
            params = model()
            torch.manual_seed(0)
            opt = getattr(module, "{name}")(params, **OPTIMIZERS["{name}"])
            opt.step()
            opt.step()
            for p in params:
                if "{target}" == "grad":
                    p.grad = p.grad.as_subclass(LyingTensor)
                else:
                    opt.state[p][key] = opt.state[p][key].as_subclass(LyingTensor)
            opt.step()
            runs.append(params)
        for got, expected in zip(runs[1], runs[0]):
            torch.testing.assert_close(got.as_subclass(torch.Tensor), expected.as_subclass(torch.Tensor))
        """
    )


def test_a_subclass_param_still_sees_the_ops_of_torchs_step():
    # Params torch steps (here: a subclass with __torch_function__) run torch's implementation
    # with the caller's torch function state, as under torch.optim.
    run_child(
        """
        class Counting(torch.Tensor):
            seen = 0

            @classmethod
            def __torch_function__(cls, func, types, args=(), kwargs=None):
                Counting.seen += 1
                return super().__torch_function__(func, types, args, kwargs or {})

        p = torch.nn.Parameter(torch.ones(5).as_subclass(Counting))
        p.grad = torch.ones(5)
        opt = rsoptim.Adam([p], lr=0.1)
        before = Counting.seen
        opt.step()
        assert Counting.seen > before, "torch's ops on the subclass param were not seen"
        """
    )


def test_functional_steps_numpy_subclasses_by_their_memory():
    run_child(
        """
        class LyingArray(np.ndarray):
            @property
            def size(self):
                return 1 << 30

            @property
            def ctypes(self):
                class Far:
                    data = FAR
                return Far()

        def arrays(cls):
            rng = np.random.default_rng(0)
            p, g = rng.standard_normal(100).astype(np.float32), rng.standard_normal(100).astype(np.float32)
            m, v = np.zeros(100, np.float32), np.zeros(100, np.float32)
            return [a.view(cls) if cls is not np.ndarray else a for a in (p, g, m, v)]

        plain, lying = arrays(np.ndarray), arrays(LyingArray)
        for arrays_ in (plain, lying):
            p, g, m, v = arrays_
            F.adam_([p], [g], [m], [v], np.zeros(1, np.float32), lr=0.1)
            F.sgd_([p], [g], lr=0.1)
        F.clip_grad_norm_([lying[1]], 0.5)
        F.clip_grad_norm_([plain[1]], 0.5)
        for a, b in zip(plain, lying):
            np.testing.assert_array_equal(np.asarray(b).view(np.ndarray), a)
        """
    )


def test_the_profiler_still_sees_each_step():
    # The step's profiler range is entered only while a profiler is on: this checks it is.
    run_child(
        """
        opt = rsoptim.Adam(model(), lr=0.01)
        with torch.profiler.profile() as prof:
            opt.step()
        names = {e.key for e in prof.key_averages()}
        assert "Optimizer.step#Adam.step" in names, sorted(names)[:20]
        """
    )


def test_a_mode_that_resizes_a_storage_mid_step_gets_an_error_not_a_crash():
    # The mode runs once the step has begun: in the clip norm (max_grad_norm) of Adam and
    # Adam8bit, and in a Tensor lr's .item() (a dispatch mode). Checks run after it.
    run_child(
        """
        from torch.utils._python_dispatch import TorchDispatchMode

        class ResizeOnce(TorchFunctionMode):
            def __init__(self, tensor, size):
                super().__init__()
                self.tensor, self.size = tensor, size

            def __torch_function__(self, func, types, args=(), kwargs=None):
                if self.tensor is not None:
                    self.tensor.untyped_storage().resize_(self.size)
                    self.tensor = None
                return func(*args, **(kwargs or {}))

        class ResizeInItem(TorchDispatchMode):
            def __init__(self, tensor):
                super().__init__()
                self.tensor = tensor

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func is torch.ops.aten._local_scalar_dense.default and self.tensor is not None:
                    self.tensor.untyped_storage().resize_(0)
                    self.tensor = None
                return func(*args, **(kwargs or {}))

        n = 1 << 20
        for make in (lambda ps: rsoptim.Adam(ps, lr=0.1, max_grad_norm=1.0), lambda ps: rsoptim.Adam8bit(ps, lr=0.1, max_grad_norm=1.0)):
            p = torch.zeros(n, requires_grad=True)
            p.grad = torch.ones(n)
            opt = make([p])
            opt.step()
            opt.step()
            try:
                with ResizeOnce(p, 64):
                    opt.step()
            except RuntimeError as e:
                assert "storage" in str(e), e
            else:
                raise AssertionError("a param resized mid-step was stepped")

        p = torch.zeros(n, requires_grad=True)
        p.grad = torch.ones(n)
        opt = rsoptim.SGD([p], lr=torch.tensor(0.1))
        opt.step()
        opt.step()
        with ResizeInItem(p):
            try:
                opt.step()
            except RuntimeError:
                pass  # torch's own ops refuse a resized storage too

        p = torch.zeros(n, requires_grad=True)
        p.grad = torch.ones(n)
        with ResizeInItem(p.grad):  # (crashed when clip read its factor after checking the grads)
            try:
                rsoptim.clip_grad_norm_([p], 1.0)
            except RuntimeError:
                pass
        """
    )


def test_a_step_count_subclass_that_lies_about_its_size_is_torchs_to_step():
    run_child(
        """
        class OneElement(torch.Tensor):
            @classmethod
            def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
                if func in (torch.ops.aten.sym_numel.default, torch.ops.aten.numel.default):
                    return 1
                if func is torch.ops.aten.sym_size.default:
                    return [1]
                if func in (torch.ops.aten.is_contiguous.default, torch.ops.aten.is_contiguous.memory_format):
                    return True
                raise RuntimeError(f"OneElement does not do {func}")

        p = torch.zeros(10, requires_grad=True)
        p.grad = torch.ones(10)
        opt = rsoptim.Adam([p], lr=0.1)
        opt.step()
        base = torch.zeros(8)
        opt.state[p]["step"] = torch.Tensor._make_subclass(OneElement, base[8:], False, dispatch_sizes_strides_policy="sizes")
        try:
            opt.step()
        except RuntimeError as e:
            assert "OneElement does not do" in str(e), e  # torch's `step += 1` on it, as in torch.optim
        assert base.tolist() == [0.0] * 8
        """
    )


def test_numpy_hyperparameters_and_generators_run_before_any_address_is_read():
    run_child(
        """
        n = 1 << 20
        p, g, m, v = (np.zeros(n, np.float32) for _ in range(4))

        class ShrinkingLr:
            def __float__(self):
                p.resize(16, refcheck=False)
                return 0.1

        try:
            F.adam_([p], [g], [m], [v], np.zeros(1, np.float32), lr=ShrinkingLr())
        except ValueError as e:
            assert "shape" in str(e), e
        q = np.zeros(n, np.float32)

        def grads():
            q.resize(16, refcheck=False)
            yield np.ones(n, np.float32)

        try:
            F.sgd_([q], grads(), lr=0.1)
        except ValueError as e:
            assert "shape" in str(e), e
        """
    )


def test_hooks_run_once_for_a_subclass_that_overrides_step():
    run_child(
        """
        class MyAdam(rsoptim.Adam):
            def step(self, closure=None):
                return super().step(closure)

        p = torch.nn.Parameter(torch.ones(5))
        p.grad = torch.ones(5)
        rsoptim.Adam([torch.nn.Parameter(torch.ones(1))])  # a base-class instance too
        opt = MyAdam([p], lr=0.1)
        calls = []
        opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
        opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
        opt.step()
        assert calls == ["pre", "post"], calls
        """
    )


def test_a_subclass_params_state_is_of_its_subclass_as_in_torch():
    run_child(
        """
        class Sub(torch.Tensor):
            pass

        kinds = []
        for module in (torch.optim, rsoptim):
            p = torch.nn.Parameter(torch.ones(5).as_subclass(Sub))
            p.grad = torch.ones(5)
            opt = module.Adam([p], lr=0.1)
            opt.step()
            kinds.append({k: type(v).__name__ for k, v in opt.state[p].items()})
        assert kinds[0] == kinds[1], kinds
        """
    )


def test_half_params_written_after_torchs_step_under_a_lying_mode():
    # bfloat16 params with stochastic rounding and Tensor betas: torch's ops step them (as the
    # caller's mode sees them), then rsoptim writes them, reading their addresses itself.
    run_child(
        """
        for make in (rsoptim.Adam, rsoptim.Adam8bit):
            results = []
            for lying in (False, True):
                p = torch.zeros(100, dtype=torch.bfloat16, requires_grad=True)
                p.grad = torch.ones(100, dtype=torch.bfloat16)
                opt = make([p], lr=0.1, betas=(torch.tensor(0.9), torch.tensor(0.999)), stochastic_rounding=True, stochastic_rounding_seed=3)
                if lying:
                    with LyingMode():
                        opt.step()
                else:
                    opt.step()
                results.append(p)
            check_equal([results[1]], [results[0]])
        """
    )


GARBAGE_CASES = {
    "Adam, general path": "lambda ps: rsoptim.Adam(ps, lr=0.1)",
    "Adam, plan": "lambda ps: rsoptim.Adam(ps, lr=0.1)",
    "SGD, general path": "lambda ps: rsoptim.SGD(ps, lr=0.1, momentum=0.9)",
    "RMSprop, general path": "lambda ps: rsoptim.RMSprop(ps, lr=0.01)",
    "Adam8bit, general path": "lambda ps: rsoptim.Adam8bit(ps, lr=0.1)",
    "clip_grad_norm_": None,
    "functional.adam_": None,
}


@pytest.mark.parametrize("case", list(GARBAGE_CASES))
def test_a_finalizer_that_resizes_storages_never_runs_between_a_check_and_its_kernel(case):
    # A garbage collection runs at any allocation, and with it any `__del__` of the garbage. Here
    # every collection inside an rsoptim call counts, and the k-th one (k = 0, 1, ...: every
    # point of the call in turn) shrinks every buffer of the call to 16 bytes. One in the window
    # between a check and its kernel crashed the optimizers (general path and plan), clipping
    # and rsoptim.functional (SIGSEGV: the kernel wrote freed memory); rsoptim now runs no
    # collection there. Elsewhere the call raises (its checks see the shrunk storages) or has
    # finished.
    make = GARBAGE_CASES[case]
    run_child(
        f"""
        import gc, sys

        n = 1 << 20  # 4 MB buffers: freed ones are unmapped, and a write there crashes
        case = {case!r}

        def rsoptim_frames():
            f = sys._getframe(1)
            while f is not None:
                if "rsoptim" in f.f_code.co_filename and f.f_code.co_name != "__del__":
                    return True
                f = f.f_back
            return False

        class Saboteur:
            countdown = None
            victims = []
            struck = False

            def __init__(self):
                self.cycle = self  # only a collection frees it

            def __del__(self):
                if Saboteur.countdown is not None and rsoptim_frames():
                    if Saboteur.countdown == 0:
                        Saboteur.countdown = None
                        Saboteur.struck = True
                        for v in Saboteur.victims:
                            if isinstance(v, np.ndarray):
                                v.resize(4, refcheck=False)
                            else:
                                v.untyped_storage().resize_(16)
                        return
                    Saboteur.countdown -= 1
                Saboteur()  # garbage for the next collection

        struck = 0
        for k in range(60):
            if case == "functional.adam_":
                arrays = [np.ones(n, np.float32) for _ in range(4)]
                steps = np.zeros(1, np.float32)
                call = lambda: F.adam_(arrays[:1], arrays[1:2], arrays[2:3], arrays[3:], steps, lr=0.1)
                victims = arrays
            else:
                params = [torch.ones(n, requires_grad=True) for _ in range(2)]
                for p in params:
                    p.grad = torch.ones(n)
                if case == "clip_grad_norm_":
                    call = lambda: rsoptim.clip_grad_norm_(params, 1e-3)
                    victims = [p.grad for p in params]
                else:
                    opt = ({make})(params)
                    opt.step()
                    if "general" in case:
                        call = lambda: (opt.__dict__.pop("_rsoptim_plans", None), opt.step())
                    else:
                        opt.step()
                        call = opt.step
                    victims = params + [p.grad for p in params] + [
                        v for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.dim()
                    ]
            Saboteur.victims, Saboteur.struck, Saboteur.countdown = victims, False, k
            Saboteur()
            gc.set_threshold(1, 1, 1)
            try:
                call()
            except (RuntimeError, ValueError) as e:
                assert Saboteur.struck and ("storage" in str(e) or "shape" in str(e)), e
            finally:
                gc.set_threshold(700, 10, 10)
                Saboteur.countdown = None
            struck += Saboteur.struck
        assert struck > 5, struck  # the collections inside the call were reached
        """
    )


def test_the_collector_is_left_as_the_caller_had_it():
    import gc

    import numpy as np
    import torch

    import rsoptim
    from rsoptim import functional as F

    p = torch.ones(10, requires_grad=True)
    p.grad = torch.ones(10)
    opt = rsoptim.Adam([p], lr=0.1)
    bad = torch.ones(3, requires_grad=True)
    bad.grad = torch.ones(3)
    failing = rsoptim.Adam([bad], lr=0.1)
    failing.step()
    failing.state[bad]["exp_avg"] = torch.ones(4)  # state of another shape: the step raises
    arrays = [np.ones(4, np.float32) for _ in range(4)]
    was = gc.isenabled()
    try:
        for enabled in (True, False):
            (gc.enable if enabled else gc.disable)()
            opt.step()
            opt.step()
            with pytest.raises(RuntimeError):
                failing.step()
            F.adam_(arrays[:1], arrays[1:2], arrays[2:3], arrays[3:], np.zeros(1, np.float32))
            with pytest.raises(ValueError):
                F.adam_(arrays[:1], arrays[1:2], arrays[2:3], [np.ones(5, np.float32)], np.zeros(1, np.float32))
            assert gc.isenabled() == enabled
            assert rsoptim._rsoptim.collector_pauses() == 0
    finally:
        (gc.enable if was else gc.disable)()


def test_a_resume_calls_its_pauses_undos_last_first_and_raises_the_first_error():
    # (what lets native_reads' __exit__ be the extension's resume, with nothing in Python)
    from rsoptim import _collector, _rsoptim

    calls = []

    def undo(name, error=None):
        calls.append(name)
        if error is not None:
            raise error

    was = gc.isenabled()
    with pytest.raises(RuntimeError, match="outside a pause"):
        _collector.at_resume(undo, "none")
    _collector.pause()
    try:
        _collector.at_resume(undo, "outer")
        _collector.pause()  # nested: the undos below are its own
        _collector.at_resume(undo, "first", KeyError("first"))
        _collector.at_resume(undo, "second", ValueError("second"))
        _collector.at_resume(undo, "third")
        with pytest.raises(ValueError, match="second"):
            _collector.resume(None, None, None)
        assert calls == ["third", "second", "first"]
        assert _rsoptim.collector_pauses() == 1 and not gc.isenabled()
    finally:
        _collector.resume()
    assert calls == ["third", "second", "first", "outer"]
    assert _rsoptim.collector_pauses() == 0 and gc.isenabled() == was
    _collector.resume()  # no pause of this thread's left: nothing to do
    assert calls[-1] == "outer" and gc.isenabled() == was


def test_an_interrupt_anywhere_leaves_no_pause_behind():
    # A signal handler's exception (a Ctrl-C) can be raised after any call, and at the start of
    # any Python function. Wherever it lands in a step (or in the functional API's pause), the
    # pause is ended (the collector is enabled again and no pause is left counted), and the
    # torch function state is the caller's again. (With the count kept in Python, one landed
    # between counting a pause and its `try`; with `native_reads.__exit__` a Python function,
    # one landed before its first line: either way the collector stayed off for good.)
    run_child(
        """
        import gc, signal, time
        from rsoptim import _rsoptim, _layout
        from rsoptim._collector import collector_paused
        from rsoptim._layout import as_caller, native_reads

        def enter_and_leave():  # (most of a step's windows are in these, so it is hit often)
            with native_reads():
                with as_caller():
                    pass

        params = model()
        opt = rsoptim.Adam(params, lr=0.01)
        arrays = [np.ones(300, np.float32) for _ in range(4)]
        steps = np.zeros(1, np.float32)
        calls = [
            opt.step,
            lambda: F.adam_(arrays[:1], arrays[1:2], arrays[2:3], arrays[3:], steps),
            lambda: rsoptim.clip_grad_norm_(params, 1e-3),
            enter_and_leave,
        ]
        torch_function = torch._C._get_torch_function_state()
        signal.signal(signal.SIGALRM, handler)
        signal.setitimer(signal.ITIMER_REAL, 2e-5, 2e-5)
        interrupted = 0
        deadline = time.monotonic() + 10
        try:
            while time.monotonic() < deadline:
                for call in calls:
                    try:
                        armed[0] = True
                        call()
                        with collector_paused():
                            pass
                    except Interrupt:
                        interrupted += 1
                    armed[0] = False
                    assert _rsoptim.collector_pauses() == 0 and gc.isenabled(), interrupted
                    assert torch._C._get_torch_function_state() == torch_function, interrupted
                    assert _layout._callers() == [], interrupted
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        assert interrupted > 100, interrupted
        """
    )


def test_an_interrupt_in_a_first_step_leaves_no_state_half_made():
    # A Ctrl-C landing while a first step makes the state left some params' state dicts with
    # "step" and without "exp_avg": every later step raised KeyError. Each state is now made
    # aside and added at once: after an interrupt, a state is empty or whole, and the next step
    # runs.
    run_child(
        """
        import signal, time

        kinds = {
            "SGD": lambda ps: rsoptim.SGD(ps, lr=0.1, momentum=0.9, dampening=0.5),
            "Adam": lambda ps: rsoptim.Adam(ps, lr=0.01, amsgrad=True),
            "RMSprop": lambda ps: rsoptim.RMSprop(ps, lr=0.01, momentum=0.5, centered=True),
            "Adam8bit": lambda ps: rsoptim.Adam8bit(ps, lr=0.01),
            "bf16 master": lambda ps: rsoptim.AdamW(ps, lr=0.01, master_weights=True),
        }
        def fresh(name):
            params = model()
            if name == "bf16 master":
                params = [p.detach().bfloat16().requires_grad_() for p in params]
                for p in params:
                    p.grad = torch.ones_like(p)
            return params, kinds[name](params)

        whole = {}
        for name in kinds:
            params, opt = fresh(name)
            opt.step()
            whole[name] = [set(opt.state[p]) for p in params]

        signal.signal(signal.SIGALRM, handler)
        interrupted = {name: 0 for name in kinds}
        deadline = time.monotonic() + 10
        try:
            while time.monotonic() < deadline:
                for name in kinds:
                    params, opt = fresh(name)
                    try:
                        armed[0] = True
                        signal.setitimer(signal.ITIMER_REAL, 1e-5 + 2e-4 * np.random.rand())
                        opt.step()
                    except Interrupt:
                        interrupted[name] += 1
                    armed[0] = False
                    signal.setitimer(signal.ITIMER_REAL, 0)
                    for p, keys in zip(params, whole[name]):
                        assert set(opt.state[p]) in (set(), keys), (name, set(opt.state[p]), keys)
                    opt.step()
                    for p, keys in zip(params, whole[name]):
                        assert set(opt.state[p]) == keys, (name, set(opt.state[p]), keys)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        assert min(interrupted.values()) > 50, interrupted
        """
    )


def test_a_finalizer_run_by_a_removed_groups_plan_runs_before_the_checks():
    # A param group removed after its plan was made: the plan holds the last reference to its
    # param, whose finalizer then shrinks another group's storages. The plan was let go between
    # the other group's checks and its kernel (SIGSEGV); now before any check.
    run_child(
        """
        import weakref

        n = 1 << 22
        p0 = torch.ones(n, requires_grad=True)
        p0.grad = torch.ones(n)
        p1 = torch.ones(8, requires_grad=True)
        p1.grad = torch.ones(8)
        opt = rsoptim.SGD([{"params": [p0]}, {"params": [p1]}], lr=0.1)
        opt.step()
        opt.step()  # both groups have plans now

        def shrink():
            p0.untyped_storage().resize_(16)
            p0.grad.untyped_storage().resize_(16)

        weakref.finalize(p1, shrink)
        opt.param_groups.pop()
        del p1
        try:
            opt.step()
        except RuntimeError as e:
            assert "storage" in str(e), e
        else:
            raise AssertionError("a shrunk param was stepped")
        """
    )


def test_a_mode_run_by_torchs_fallback_cannot_shrink_the_groups_next_call():
    # A group of a float32 and a bfloat16 param takes two kernel calls. The float32 grad shares
    # its param's memory, which the kernel refuses, so torch's implementation steps that param,
    # with the caller's dispatch mode on; the mode shrinks the bfloat16 param. Its call, checked
    # before, was then run on the shrunk storage (SIGSEGV, or heap corruption in torch's own
    # step); now it goes through the general path, which checks it again and refuses it.
    run_child(
        """
        from torch.utils._python_dispatch import TorchDispatchMode

        n = 1 << 20
        for first in ("float32", "bfloat16"):
            pa = torch.zeros(n, requires_grad=True)
            pa.grad = torch.ones(n)
            pb = torch.zeros(n, dtype=torch.bfloat16, requires_grad=True)
            pb.grad = torch.ones(n, dtype=torch.bfloat16)
            opt = rsoptim.Adam([pa, pb] if first == "float32" else [pb, pa], lr=0.1)
            opt.step()
            opt.step()
            pa.grad = pa.detach()

            class Shrink(TorchDispatchMode):
                done = False

                def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                    if not Shrink.done:
                        Shrink.done = True
                        pb.untyped_storage().resize_(16)
                    return func(*args, **(kwargs or {}))

            try:
                with Shrink():
                    opt.step()
            except RuntimeError as e:
                assert first == "float32" and "storage" in str(e), (first, e)
            else:
                assert first == "bfloat16" and Shrink.done  # (stepped before it was shrunk)
        """
    )


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW", "RMSprop"])
@pytest.mark.parametrize("option", ["lr", "flag", "betas"])
@pytest.mark.parametrize("planned", [False, True])
def test_an_option_whose_value_runs_code_runs_it_before_any_address_is_read(name, option, planned):
    # An option that is no float, bool or tuple (a class with __float__, __bool__ or __iter__)
    # is read when the kernel call is made: read there, after the addresses were checked and
    # packed, its code could free the param's memory under the kernel (it did: heap corruption).
    run_child(
        f"""
        name, option, planned = {name!r}, {option!r}, {planned!r}
        if option == "betas" and name not in ("Adam", "AdamW"):
            option = "lr"
        p, opt = one_param(name, 2 if planned else 0)

        def free():
            p.untyped_storage().resize_(0)

        class Lr:
            def __float__(self):
                free()
                return 0.01

        class Flag:
            def __bool__(self):
                free()
                return False

        class Betas:
            def __iter__(self):
                free()
                return iter((0.9, 0.999))

        group = opt.param_groups[0]
        if option == "lr":
            group["lr"] = Lr()
        elif option == "betas":
            group["betas"] = Betas()
        else:
            group["maximize" if name != "SGD" else "nesterov"] = Flag()
        expect_refused(opt, "past the end of its storage")
        """
    )


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW", "RMSprop"])
def test_a_group_replaced_by_a_dict_subclass_after_its_plan_is_torchs_to_step(name):
    # A dict subclass's reads may run code, so its params are torch's to step. A plan made for
    # the plain group it replaced must not run the kernel on it (reading the options for the
    # kernel call would run that code after the addresses were packed).
    run_child(
        f"""
        from rsoptim import _rsoptim
        name = {name!r}
        kernels = ("sgd_step", "adam_step", "rmsprop_step")
        calls = []
        for k in kernels:
            original = getattr(_rsoptim, k)
            setattr(_rsoptim, k, lambda *a, _f=original, **kw: (calls.append(1), _f(*a, **kw))[1])

        class Group(dict):
            reads = 0

            def __getitem__(self, key):
                Group.reads += 1
                return dict.__getitem__(self, key)

        options = dict(OPTIMIZERS[name])
        ours, theirs = model(), model()
        opt = getattr(rsoptim, name)(ours, **options)
        ref = getattr(torch.optim, name)(theirs, **options)
        for _ in range(2):
            opt.step()
            ref.step()
        assert calls, "the plain group was not stepped by the kernels"
        calls.clear()
        opt.param_groups[0] = Group(opt.param_groups[0])
        ref.param_groups[0] = Group(ref.param_groups[0])
        for _ in range(2):
            opt.step()
            ref.step()
        assert not calls, "the kernels stepped a dict subclass's group"
        for a, b in zip(ours, theirs):  # (torch's tolerances: the first steps were the kernels')
            torch.testing.assert_close(a.detach(), b.detach())
        """
    )


@pytest.mark.parametrize("name", ["Adam", "AdamW", "RMSprop", "Adam8bit"])
@pytest.mark.parametrize("planned", [False, True])
def test_a_step_count_whose_storage_was_shrunk_is_refused_not_stepped(name, planned):
    # torch's own step crashes on such a count (it reads and writes the freed memory); the
    # other state tensors were refused already, the count was handed to torch.
    run_child(
        f"""
        p, opt = one_param({name!r}, 2 if {planned!r} else 1)
        before = p.clone()
        opt.state[p]["step"].untyped_storage().resize_(0)
        expect_refused(opt, "state['step'] of shape () reaches past the end of its storage")
        assert torch.equal(p, before)
        """
    )


@pytest.mark.parametrize("name", ["Adam8bit", "AdamW8bit"])
@pytest.mark.parametrize("key", ["capturable", "a_key_of_the_callers"])
def test_an_8bit_groups_option_that_runs_code_runs_it_before_the_checks(name, key):
    # Whether a group's options are plain was asked after the native checks: reading an option
    # that is no built-in value ran its code there, which could free a param under the kernel.
    run_child(
        f"""
        p, opt = one_param({name!r}, 2)

        class Flag:  # (equal to False, so that the option's check lets it through)
            def __bool__(self):
                p.untyped_storage().resize_(0)
                return False

            def __eq__(self, other):
                return other is False

            def __hash__(self):
                return 0

        opt.param_groups[0][{key!r}] = Flag()
        expect_refused(opt, "past the end of its storage")
        """
    )


@pytest.mark.parametrize("case", ["differentiable", "tensor betas", "float64 grad"])
def test_params_torch_steps_are_refused_when_their_storage_was_shrunk(case):
    # Params rsoptim hands to torch's implementation are checked as the kernels' are: torch's
    # ops would read and write the memory the storage lost (torch 2.13 segfaults).
    run_child(
        f"""
        case = {case!r}
        if case == "differentiable":
            p, opt = one_param("SGD", 0, differentiable=True)
        elif case == "tensor betas":
            p, opt = one_param("Adam", 0, betas=(torch.tensor(0.9), torch.tensor(0.999)))
        else:
            p, opt = one_param("SGD", 0)
            p.grad.data = torch.randn(5000, dtype=torch.float64)
        opt.step()
        p.untyped_storage().resize_(0)
        expect_refused(opt, "a param of shape (5000,) reaches past the end of its storage")
        """
    )


@pytest.mark.parametrize("name", ["SGD", "Adam", "RMSprop", "Adam8bit"])
def test_options_of_the_callers_are_read_as_torch_reads_them(name):
    # Options are read into built-in values before the checks, but only as the kernels read
    # them: an iterator of the caller's kept in a group is not consumed (an endless one would
    # hang the step), and an array of several values is no error.
    import itertools

    import numpy as np
    import torch

    import rsoptim

    p = torch.randn(5000)
    p.grad = torch.randn(5000)
    opt = getattr(rsoptim, name)([p], lr=0.01)
    group = opt.param_groups[0]
    group["counter"], group["values"], group["table"] = itertools.count(), iter(range(3)), np.array([1.0, 2.0])
    group["lr"] = np.float32(0.01)  # (not a float subclass: read with float())
    for _ in range(3):
        opt.step()
    assert next(group["counter"]) == 0 and next(group["values"]) == 0


@pytest.mark.parametrize("name", ["SGD", "Adam", "RMSprop", "Adam8bit"])
def test_an_option_whose_read_adds_a_key_to_its_group_is_read_as_torch_reads_it(name):
    # Reading the options into built-in values walks the group: an option whose __float__
    # edits the group ("dictionary changed size during iteration" before) steps as in torch.
    import torch

    import rsoptim

    results = []
    for cls in (getattr(torch.optim, name.removesuffix("8bit")), getattr(rsoptim, name)):
        p = torch.nn.Parameter(torch.linspace(-1, 1, 64))  # (under min_8bit_size: float32 state)
        p.grad = torch.ones(64)
        opt = cls([p], lr=0.01)
        group = opt.param_groups[0]

        class Lr(float):
            def __float__(self):
                group["added"] = len(group)
                return 0.01

        group["lr"] = Lr(0.01)
        opt.step()
        results.append(p.detach().clone())
    torch.testing.assert_close(results[1], results[0])


# Containers and tensors of the caller's whose reads run code: each frees (or shrinks) a
# param's memory from inside a read that rsoptim made after that param's addresses were
# checked, before its kernel ran. Each case crashed (a write to freed memory) before it was
# fixed; torch.optim steps all of them without crashing. Any error must be the storage check's.

CONTAINER_PRELUDE = """
N = 1 << 22  # 16 MB of float32: glibc maps it apart, so freed memory is unmapped
OPTIONS = {"SGD": dict(momentum=0.9), "Adam": {}, "AdamW": {}, "RMSprop": {}, "Adam8bit": {}}


def free(t, keep=0):
    t.untyped_storage().resize_(keep)


def two_groups(name):
    # Group 0: a big param (a); group 1: a small one (b).
    a, b = torch.nn.Parameter(torch.zeros(N)), torch.nn.Parameter(torch.zeros(8))
    a.grad, b.grad = torch.ones(N), torch.ones(8)
    return a, b, getattr(rsoptim, name)([{"params": [a]}, {"params": [b]}], lr=0.1, **OPTIONS[name])


def step_surviving(opt, steps):
    # Steps `steps` times; a refusal by the storage check is fine, anything else is not.
    for _ in range(steps):
        try:
            opt.step()
        except RuntimeError as e:
            assert "past the end of its storage" in str(e), e
    [torch.randn(1000) for _ in range(200)]  # heap activity: a corrupted heap aborts here
"""

CONTAINER_OPTIMIZERS = ["SGD", "Adam", "AdamW", "RMSprop", "Adam8bit"]


def run_attack(body: str, *preludes: str) -> None:
    run_child(CONTAINER_PRELUDE + "".join(preludes) + textwrap.dedent(body))


@pytest.mark.parametrize("name", CONTAINER_OPTIMIZERS)
@pytest.mark.parametrize("iteration", [1, 2, 3, 4])
def test_param_groups_whose_iteration_runs_code_are_read_once_before_the_checks(name, iteration):
    # A list subclass as optimizer.param_groups: its iterator frees the param at the end of
    # its `iteration`-th pass in a step (a step that iterated the groups again after the
    # checks ran the kernel on freed memory).
    run_attack(
        f"""
        name, iteration = {name!r}, {iteration!r}
        a = torch.nn.Parameter(torch.zeros(N))
        a.grad = torch.ones(N)
        passes = [None]  # None: disarmed; else the passes made since arming

        class Groups(list):
            def __iter__(self):
                yield from list.__iter__(self)
                if passes[0] is not None:
                    passes[0] += 1
                    if passes[0] == iteration:
                        passes[0] = None
                        free(a)

        opt = getattr(rsoptim, name)([a], lr=0.1, **OPTIONS[name])
        opt.param_groups = Groups(opt.param_groups)
        opt.step()
        opt.step()
        passes[0] = 0
        step_surviving(opt, 4)
        """
    )


@pytest.mark.parametrize("name", CONTAINER_OPTIMIZERS)
def test_a_later_groups_params_whose_iteration_runs_code_cannot_free_a_checked_param(name):
    run_attack(
        f"""
        a, b, opt = two_groups({name!r})
        armed = [False]

        class Params(list):
            def __iter__(self):
                if armed[0]:
                    armed[0] = False
                    free(a)
                    a.untyped_storage().resize_(N * 4)  # new memory, as a valid tensor's
                return super().__iter__()

        opt.param_groups[1]["params"] = Params(opt.param_groups[1]["params"])
        opt.step()
        opt.step()
        for _ in range(3):
            armed[0] = True
            step_surviving(opt, 1)
        """
    )


@pytest.mark.parametrize("name", CONTAINER_OPTIMIZERS)
def test_a_later_params_state_dict_whose_reads_run_code_cannot_free_a_checked_param(name):
    run_attack(
        f"""
        a, b, opt = two_groups({name!r})
        armed = [False]

        class State(dict):
            def __getitem__(self, key):
                if armed[0]:
                    armed[0] = False
                    free(a)
                return dict.__getitem__(self, key)

            def get(self, key, default=None):
                return self[key] if key in self else default

        opt.step()
        opt.state[b] = State(opt.state[b])
        opt.step()
        armed[0] = True
        step_surviving(opt, 2)
        """
    )


@pytest.mark.parametrize("name", CONTAINER_OPTIMIZERS)
@pytest.mark.parametrize("keep", [0, 64])
def test_stochastic_rounding_streams_are_read_before_the_checks(name, keep):
    # Each param's rounding stream is its index in its group: reading the group's params for
    # it ran the caller's code after the buffers were checked.
    run_attack(
        f"""
        import traceback
        name, keep = {name!r}, {keep!r}
        a = torch.nn.Parameter(torch.zeros(2 * N, dtype=torch.bfloat16))
        a.grad = torch.ones(2 * N, dtype=torch.bfloat16)
        armed = [True]

        class Params(list):
            def __iter__(self):
                if armed[0] and any(f.name == "_streams" for f in traceback.extract_stack()[-4:-1]):
                    armed[0] = False
                    free(a, keep)
                return list.__iter__(self)

        opt = getattr(rsoptim, name)([a], lr=0.1, stochastic_rounding=True, stochastic_rounding_seed=1, **OPTIONS[name])
        opt.param_groups[0]["params"] = Params(opt.param_groups[0]["params"])
        step_surviving(opt, 3)
        """
    )


DISPATCH_PRELUDE = """
from torch.utils._pytree import tree_map

victims = []


class FreesOnItem(torch.Tensor):
    # A wrapper subclass whose .item() frees the victims' memory.
    @staticmethod
    def __new__(cls, elem):
        return torch.Tensor._make_wrapper_subclass(cls, elem.shape, dtype=elem.dtype, device=elem.device)

    def __init__(self, elem):
        self.elem = elem

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            for v in victims:
                v.untyped_storage().resize_(0)
            victims.clear()
        unwrap = lambda x: x.elem if isinstance(x, FreesOnItem) else x
        out = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs or {}))
        return tree_map(lambda x: FreesOnItem(x) if type(x) is torch.Tensor else x, out)
"""


@pytest.mark.parametrize("name", CONTAINER_OPTIMIZERS)
def test_a_tensor_option_whose_item_runs_code_is_read_before_the_checks(name):
    # (torch's for-loop crashes here: it reads the lr after it has started to write.)
    run_attack(
        f"""
        name = {name!r}
        a = torch.nn.Parameter(torch.zeros(N))
        a.grad = torch.ones(N)
        opt = getattr(rsoptim, name)([a], lr=0.01, **OPTIONS[name])
        opt.step()
        opt.step()
        opt.param_groups[0]["lr"] = FreesOnItem(torch.tensor(0.01))
        victims.append(a)
        step_surviving(opt, 2)
        """,
        DISPATCH_PRELUDE,
    )


def test_clip_grads_with_norm_reads_the_total_before_the_grads():
    run_attack(
        """
        p = torch.nn.Parameter(torch.zeros(N))
        p.grad = torch.ones(N)
        victims.append(p.grad)
        try:
            rsoptim.clip_grads_with_norm_([p], 1.0, FreesOnItem(torch.tensor(100.0)))
        except RuntimeError as e:
            assert "past the end of its storage" in str(e), e
        [torch.randn(1000) for _ in range(200)]
        """,
        DISPATCH_PRELUDE,
    )


def test_an_8bit_first_step_rechecks_params_after_making_their_state():
    # The state is made as the caller would make it (a mode sees its ops), after the params
    # were checked: a mode that shrinks a param there must meet the check again.
    run_attack(
        """
        from torch.utils._python_dispatch import TorchDispatchMode
        a = torch.nn.Parameter(torch.zeros(N))
        a.grad = torch.ones(N)

        class Shrink(TorchDispatchMode):
            fired = False

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                if not Shrink.fired and func in (torch.ops.aten.zeros.default, torch.ops.aten.zeros_like.default):
                    Shrink.fired = True
                    free(a, 64)
                return out

        opt = rsoptim.Adam8bit([a], lr=0.1)
        with Shrink():
            step_surviving(opt, 1)
        """
    )


# Keys whose hash equals an option's, a state entry's or a param's: a dict lookup compares the
# key it looks for with them, which runs their __eq__ (a third review found these after the
# type checks above).

COLLIDING_KEY_PRELUDE = """
armed = [False]


def move(t):
    # New memory for t's storage, a page larger (allocated before the old is freed and
    # unmapped, so at another address): a check before this passes, a write after it through
    # an address read before it crashes.
    storage = t.untyped_storage()
    storage.resize_(storage.nbytes() + 4096)


class CollidingKey:
    def __init__(self, like, victim):
        self.like, self.victim = like, victim

    def __hash__(self):
        return hash(self.like)

    def __eq__(self, other):
        if armed[0]:
            move(self.victim)  # (at every comparison: one may come between a check and a kernel)
        return False
"""


@pytest.mark.parametrize("name", CONTAINER_OPTIMIZERS)
@pytest.mark.parametrize("planned", [False, True])
def test_a_group_key_colliding_with_an_options_name_cannot_free_a_checked_param(name, planned):
    run_attack(
        f"""
        name, planned = {name!r}, {planned!r}
        a = torch.nn.Parameter(torch.zeros(N))
        a.grad = torch.ones(N)
        option = {{"SGD": "momentum", "RMSprop": "alpha"}}.get(name, "betas")  # (one its kernel call reads)
        opt = getattr(rsoptim, name)([{{CollidingKey(option, a): None, "params": [a]}}], lr=0.1, **OPTIONS[name])
        if planned:
            opt.step()
            opt.step()
        armed[0] = True
        step_surviving(opt, 2)
        """,
        COLLIDING_KEY_PRELUDE,
    )


@pytest.mark.parametrize("name", CONTAINER_OPTIMIZERS)
def test_a_later_groups_state_key_colliding_with_a_state_entry_cannot_free_a_checked_param(name):
    run_attack(
        f"""
        a, b, opt = two_groups({name!r})
        for _ in range(3):
            opt.step()
        state = opt.state[b]  # (the same dict: a plan stays valid)
        key = next(k for k in state if k != "step")
        value = state.pop(key)
        state[CollidingKey(key, a)] = None
        state[key] = value
        armed[0] = True
        step_surviving(opt, 2)
        """,
        COLLIDING_KEY_PRELUDE,
    )


@pytest.mark.parametrize("name", CONTAINER_OPTIMIZERS)
def test_a_state_map_key_colliding_with_a_later_param_cannot_free_a_checked_param(name):
    run_attack(
        f"""
        a, b, opt = two_groups({name!r})
        for _ in range(3):
            opt.step()
        state = opt.state.pop(b)
        opt.state[CollidingKey(b, a)] = {{}}
        opt.state[b] = state
        armed[0] = True
        step_surviving(opt, 2)
        """,
        COLLIDING_KEY_PRELUDE,
    )


@pytest.mark.parametrize("name", ["Adam", "AdamW", "RMSprop"])
@pytest.mark.parametrize("state_map", [False, True])
def test_a_step_count_is_checked_again_after_later_params_state_is_read(name, state_map):
    # The general path checked each step count as it read it, and later params' state reads
    # (a dict subclass's get, a state map subclass's __getitem__) ran before the kernel.
    run_attack(
        f"""
        from collections import defaultdict
        name, state_map = {name!r}, {state_map!r}
        p0, p1 = torch.nn.Parameter(torch.zeros(1000)), torch.nn.Parameter(torch.zeros(1000))
        p0.grad, p1.grad = torch.ones(1000), torch.ones(1000)
        import sys
        big = torch.zeros(N)
        armed, fired = [False], [False]

        def maybe_free(key):
            # (at the read of p1's state that makes its kernel buffers, after p0's were checked;
            # earlier reads, which the check would catch, are left alone)
            if armed[0] and key is p1 and sys._getframe(2).f_code.co_name == "_kernel_buffers":
                armed[0], fired[0] = False, True
                free(big)

        class StateDict(dict):
            owner = None

            def get(self, *args):
                maybe_free(self.owner)
                return dict.get(self, *args)

            def __getitem__(self, key):
                maybe_free(self.owner)
                return dict.__getitem__(self, key)

        class StateMap(defaultdict):
            def __getitem__(self, key):
                maybe_free(key)
                return defaultdict.__getitem__(self, key)

        opt = getattr(rsoptim, name)([p0, p1], lr=1e-3)
        if state_map:
            opt.state = StateMap(dict)
        else:
            for p in (p0, p1):
                opt.state[p] = StateDict()
                opt.state[p].owner = p
        opt.step()
        big[N - 1] = opt.state[p0]["step"]
        opt.state[p0]["step"] = big[N - 1 :].view(())  # (the count at the end of a big buffer)
        armed[0] = True
        step_surviving(opt, 2)
        assert fired[0]  # (the read it acts at is still there)
        """,
    )


@pytest.mark.parametrize("name", ["Adam", "SGD", "RMSprop"])
def test_a_dict_subclass_group_with_stochastic_rounding_reads_its_seed_before_any_address(name):
    # Such a group is torch's to step, on float32 copies that rsoptim then rounds into the
    # bfloat16 params: the seed was read after the addresses of its own temporaries.
    run_attack(
        f"""
        import gc
        import sys
        name = {name!r}
        p = torch.nn.Parameter(torch.zeros(2 * N, dtype=torch.bfloat16))
        p.grad = torch.ones(2 * N, dtype=torch.bfloat16)
        armed = [False]

        class Group(dict):
            def __getitem__(self, key):
                if armed[0] and key == "stochastic_rounding_seed" and sys._getframe(1).f_code.co_name == "_write_params":
                    armed[0] = False
                    for t in gc.get_objects():
                        # (rsoptim's bfloat16 outputs, whose addresses it hands the rounding kernel)
                        bf16 = type(t) is torch.Tensor and t.dtype == torch.bfloat16 and t.numel() == 2 * N
                        if bf16 and t is not p.grad and t.untyped_storage().nbytes():
                            free(t)
                return dict.__getitem__(self, key)

        opt = getattr(rsoptim, name)([p], lr=1e-3, stochastic_rounding=True, **OPTIONS[name])
        opt.param_groups[0] = Group(opt.param_groups[0])
        armed[0] = True
        step_surviving(opt, 1)
        """
    )


# Objects that pass for a bool or an int (a __class__ property that lies to isinstance), and a
# caller's mode that edits a group in the middle of a step: a fourth review found the kernel
# path reading such options from the group after the checks.

LIAR_PRELUDE = """
from torch.overrides import TorchFunctionMode

armed = [False]


def move(t):
    storage = t.untyped_storage()
    storage.resize_(storage.nbytes() + 4096)  # (new memory, at another address)


def liar(kind, value, victim):
    class Liar:
        __class__ = property(lambda self: kind)  # isinstance(Liar(), kind) is True

        def __bool__(self):
            if armed[0]:
                move(victim)
            return bool(value)

        def __index__(self):
            if armed[0]:
                move(victim)
            return value

        __int__ = __index__

        def __float__(self):
            if armed[0]:
                move(victim)
            return float(value)

    return Liar()
"""


@pytest.mark.parametrize("name", CONTAINER_OPTIMIZERS)
@pytest.mark.parametrize("key", ["master_weights", "stochastic_rounding", "stochastic_rounding_seed"])
def test_an_extension_option_that_passes_for_a_bool_or_an_int_is_refused(name, key):
    run_attack(
        f"""
        name, key = {name!r}, {key!r}
        a = torch.nn.Parameter(torch.zeros(N))
        a.grad = torch.ones(N)
        opt = getattr(rsoptim, name)([a], lr=0.1, **OPTIONS[name])
        opt.step()
        value = liar(int, 1234, a) if key == "stochastic_rounding_seed" else liar(bool, False, a)
        opt.param_groups[0][key] = value
        armed[0] = True
        try:
            opt.step()
        except (TypeError, ValueError) as e:
            assert key in str(e), e
        else:
            raise AssertionError("not refused")
        """,
        LIAR_PRELUDE,
    )


@pytest.mark.parametrize("name", CONTAINER_OPTIMIZERS)
@pytest.mark.parametrize("when", ["making state", "clipping", "clipping, planned"])
@pytest.mark.parametrize("key", ["lr", "stochastic_rounding"])
def test_a_mode_that_edits_a_group_during_a_step_cannot_free_a_checked_param(name, when, key):
    # The mode runs where a step runs the caller's code: making a param's state (as torch.optim
    # makes it), and the norm of max_grad_norm (as clip_grad_norm_ computes it). The kernels
    # read the group's options as they were before the checks.
    run_attack(
        f"""
        name, when, key = {name!r}, {when!r}, {key!r}
        a = torch.nn.Parameter(torch.zeros(N))
        a.grad = torch.ones(N)
        clipping = dict(max_grad_norm=1e9) if when.startswith("clipping") else {{}}
        opt = getattr(rsoptim, name)([a], lr=0.1, **OPTIONS[name], **clipping)
        group = opt.param_groups[0]
        if when != "making state":
            opt.step()
        if when == "clipping, planned":
            opt.step()

        class Mode(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                if armed[0]:
                    group[key] = liar(float, 0.1, a) if key == "lr" else liar(bool, False, a)
                return func(*args, **(kwargs or {{}}))

        armed[0] = True
        with Mode():
            step_surviving(opt, 1)  # (the next would refuse a stochastic_rounding that is no bool)
        """,
        LIAR_PRELUDE,
    )


@pytest.mark.parametrize("name", CONTAINER_OPTIMIZERS)
def test_a_mode_that_edits_a_later_group_cannot_free_an_earlier_groups_checked_param(name):
    # The option moves the first group's param and reverts to a plain value when read: where
    # it is read after that param was checked, the step must still see that reading the
    # groups ran code, and check the first group again before its kernel.
    run_attack(
        f"""
        a, b = torch.nn.Parameter(torch.zeros(N)), torch.nn.Parameter(torch.zeros(8))
        a.grad, b.grad = torch.ones(N), torch.ones(8)
        groups = [{{"params": [a]}}, {{"params": [b]}}]
        opt = getattr(rsoptim, {name!r})(groups, lr=0.1, max_grad_norm=1e9, **OPTIONS[{name!r}])
        for _ in range(3):
            opt.step()
        later = opt.param_groups[1]

        class Reverting:
            def __bool__(self):
                move(a)
                later["stochastic_rounding"] = False
                return False

        class Mode(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                if armed[0]:
                    armed[0] = False
                    later["stochastic_rounding"] = Reverting()
                return func(*args, **(kwargs or {{}}))

        armed[0] = True
        with Mode():
            step_surviving(opt, 2)
        """,
        LIAR_PRELUDE,
    )
