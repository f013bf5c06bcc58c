"""Side-by-side benchmark of rsoptim against torch.optim on this machine.

    python -m rsoptim.bench                      # the default table
    python -m rsoptim.bench --json               # the same, as JSON on stdout
    python -m rsoptim.bench --plot adam.png      # also GB/s against size, with the roofline
    python -m rsoptim.bench --quick              # fewer repeats, no GPT-2 workload

Every row times one optimizer step (or one ``clip_grad_norm_``) of rsoptim and of each torch
implementation on the same tensors, in one process, interleaved (A B C A B C ...) after a warm-up,
and reports medians. "GB/s" is the bytes a step must move (params, grads and state read and
written once) over its time; "roofline" is a plain streaming loop moving the same bytes per
element on the same tensors and threads, measured in the same run, so "% roofline" is a
measured fraction of what this machine's memory system delivers.

Where ``deepspeed`` is installed and its CPU Adam op builds (a C++ extension compiled with ninja on
first use), the Adam and AdamW rows get a DeepSpeedCPUAdam column, stepped on the same tensors with
the same hyperparameters and threads; otherwise one line says why the column is left out.

The Adam8bit and AdamW8bit rows step rsoptim's block-wise 8-bit optimizers (one byte per element
per moment and a float32 scale per 256 elements, for tensors of at least 4096 elements; float32
moments below) against torch's Adam/AdamW (state in the param's dtype), rsoptim's Adam/AdamW with
float32 state, and, where ``bitsandbytes`` is installed and its CPU 8-bit step runs, its
Adam8bit/AdamW8bit (a column like DeepSpeed's: optional, one line says why it is left out). Their
bytes are counted tensor by tensor, and each row reports the optimizer state each column keeps, in
bytes per param element.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Sequence

import torch

import rsoptim
from rsoptim import _rsoptim
from rsoptim._columns import pack
from rsoptim.adam8bit import QUANT_BLOCK

# ---------------------------------------------------------------------------------------------
# Workloads: named lists of parameter shapes.


def gpt2_small_shapes() -> list[tuple[int, ...]]:
    """The parameter list of GPT-2 small: 148 tensors, 124,439,808 elements."""
    d, vocab, ctx, layers = 768, 50257, 1024, 12
    shapes: list[tuple[int, ...]] = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,)]  # ln_1
        shapes += [(d, 3 * d), (3 * d,), (d, d), (d,)]  # attention: c_attn, c_proj
        shapes += [(d,), (d,)]  # ln_2
        shapes += [(d, 4 * d), (4 * d,), (4 * d, d), (d,)]  # MLP: c_fc, c_proj
    shapes += [(d,), (d,)]  # ln_f
    return shapes


WORKLOADS: dict[str, Callable[[], list[tuple[int, ...]]]] = {
    "gpt2-small": gpt2_small_shapes,
    "seed-mlp": lambda: [(128, 784), (128,), (10, 128), (10,)],
    "400x1000": lambda: [(1000,)] * 400,
    "flat-64m": lambda: [(64 * 2**20,)],
}


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def make_params(shapes: list[tuple[int, ...]], seed: int = 0, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        p = (torch.randn(shape, generator=gen) * 0.02).to(dtype).requires_grad_()
        p.grad = (torch.randn(shape, generator=gen) * 1e-3).to(dtype)
        params.append(p)
    return params


# ---------------------------------------------------------------------------------------------
# DeepSpeed's CPU Adam: a column where deepspeed is installed and its op builds on this machine.

DEEPSPEED = "DeepSpeedCPUAdam"
#: The cases with a DeepSpeedCPUAdam column.
DEEPSPEED_CASES = ("Adam", "AdamW", "AdamW fp32 state")


@dataclass
class DeepSpeedColumn:
    #: DeepSpeedCPUAdam once its cpu_adam op has built and loaded, else None.
    optimizer: type | None = None
    version: str | None = None
    #: Why the column is left out (one line), when it is.
    note: str | None = None


@contextlib.contextmanager
def stdout_to_stderr():
    """Sends what is printed meanwhile, by Python or by a compiler or C++ code on file
    descriptor 1, to stderr: deepspeed logs to stdout, and stdout carries only the report
    (``--json`` must stay parseable)."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _one_line(error: BaseException) -> str:
    """An error as one line: its first line and, for a failed build (whose first line is a
    compiler command), the first line further down that says what went wrong."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = f"{type(error).__name__}: {_shorten(lines[0], 160) if lines else ''}"
    cause = next((line for line in lines[1:] if re.search(r"error|not found", line, re.IGNORECASE) and len(line) < 300), None)
    return text + (f" ... {_shorten(cause, 200)}" if cause else "")


def load_deepspeed(progress: Progress | None = None) -> DeepSpeedColumn:
    """Imports deepspeed and builds (or loads the cached build of) its cpu_adam op. Never raises:
    whatever goes wrong becomes the column's one-line note."""
    try:
        with stdout_to_stderr():  # deepspeed's logger binds to stdout when it is imported
            import deepspeed
    except ModuleNotFoundError as e:
        if e.name != "deepspeed":
            return DeepSpeedColumn(note=f"{DEEPSPEED} column left out: import deepspeed failed: {_one_line(e)}")
        return DeepSpeedColumn(note=f"{DEEPSPEED} column left out: deepspeed is not installed (scripts/bench.sh installs it)")
    except Exception as e:  # a deepspeed that does not import with this torch: say so, go on
        return DeepSpeedColumn(note=f"{DEEPSPEED} column left out: import deepspeed failed: {_one_line(e)}")
    version = getattr(deepspeed, "__version__", None)
    # The op is compiled by ninja, which pip installs beside this Python.
    bin_dir = os.path.dirname(sys.executable)
    if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    if progress is not None:
        progress.note(f"loading {DEEPSPEED}'s op (its first build compiles C++ with ninja and can take minutes)")
    try:
        with stdout_to_stderr():
            from deepspeed.ops.adam import DeepSpeedCPUAdam
            from deepspeed.ops.op_builder import CPUAdamBuilder

            CPUAdamBuilder().load()
    except Exception as e:
        return DeepSpeedColumn(version=version, note=f"{DEEPSPEED} column left out: deepspeed {version}'s cpu_adam op did not build: {_one_line(e)}")
    return DeepSpeedColumn(optimizer=DeepSpeedCPUAdam, version=version)


# ---------------------------------------------------------------------------------------------
# bitsandbytes' 8-bit Adam: a column of the 8-bit rows where bitsandbytes is installed and its CPU
# 8-bit step runs here (0.50.2 has one: its dequantize/quantize in C, the update in torch ops).

BITSANDBYTES = "bitsandbytes"
#: The cases with a bitsandbytes column: the 8-bit rows. bitsandbytes' Adam8bit decays weights
#: decoupled (as AdamW8bit), which is Adam's update only without weight decay: the Adam8bit row's
#: hyperparameters have none (checked in ``cases``).
BITSANDBYTES_CASES = ("Adam8bit", "AdamW8bit")
#: The 8-bit rows' column of rsoptim's Adam/AdamW with float32 moments.
RSOPTIM_FP32_STATE = "rsoptim fp32 state"
#: Tensors of at least this many elements get 8-bit moments (rsoptim's and bitsandbytes' default
#: min_8bit_size, passed to both explicitly); smaller ones keep float32 moments.
MIN_8BIT_SIZE = 4096


@dataclass
class BitsAndBytesColumn:
    #: ``bitsandbytes.optim`` once an 8-bit step has run on a CPU tensor, else None.
    optim: Any = None
    version: str | None = None
    #: Why the column is left out (one line), when it is.
    note: str | None = None


def load_bitsandbytes() -> BitsAndBytesColumn:
    """Imports bitsandbytes and runs one AdamW8bit step on a CPU tensor of 8-bit size (versions
    without a CPU 8-bit path fail there). Never raises: whatever goes wrong becomes the column's
    one-line note."""
    what = f"{BITSANDBYTES} column left out"
    try:
        with stdout_to_stderr():  # it may print about the libraries it finds at import
            import bitsandbytes
    except ModuleNotFoundError as e:
        if e.name != "bitsandbytes":
            return BitsAndBytesColumn(note=f"{what}: import bitsandbytes failed: {_one_line(e)}")
        return BitsAndBytesColumn(note=f"{what}: bitsandbytes is not installed (scripts/bench.sh installs it)")
    except Exception as e:
        return BitsAndBytesColumn(note=f"{what}: import bitsandbytes failed: {_one_line(e)}")
    version = getattr(bitsandbytes, "__version__", None)
    try:
        with stdout_to_stderr():
            param = torch.zeros(MIN_8BIT_SIZE, requires_grad=True)
            param.grad = torch.ones(MIN_8BIT_SIZE)
            optimizer = bitsandbytes.optim.AdamW8bit([param], min_8bit_size=MIN_8BIT_SIZE)
            optimizer.step()
        if optimizer.state[param]["state1"].dtype != torch.uint8:
            raise RuntimeError(f"its state is {optimizer.state[param]['state1'].dtype}, not 8-bit")
    except Exception as e:
        return BitsAndBytesColumn(version=version, note=f"{what}: bitsandbytes {version}'s 8-bit step failed on a CPU tensor: {_one_line(e)}")
    return BitsAndBytesColumn(optim=bitsandbytes.optim, version=version)


# ---------------------------------------------------------------------------------------------
# Cases: what one row runs.


@dataclass
class Case:
    name: str
    #: rsoptim's implementation and the others', by label; each builds a step function.
    impls: dict[str, Callable[[list[torch.Tensor]], Callable[[], object]]]
    #: Elements moved per param element (reads + writes) in the param's dtype, and how many of
    #: those buffers are written (for the roofline; None: no roofline for this case).
    elements_moved: int
    roofline_written: int | None
    #: State buffers kept in float32 whatever the param's dtype (``state_dtype=torch.float32``),
    #: each read and written once per step.
    float32_state_buffers: int = 0
    #: Runs only on bfloat16/float16 params (with float32 params it would repeat another row).
    half_only: bool = False
    #: A float32 master copy of each param (``master_weights=True``), read and written per step.
    master_copy: bool = False
    #: Untimed work before every timed call of every implementation: built once per row from the
    #: params, before any implementation has run (``restore_grads``: the clipping rows put back
    #: the same over-norm grads before each call, so each call clips as the first one did).
    prepare: Callable[[list[torch.Tensor]], Callable[[], object]] | None = None
    #: Called (untimed) with each call's result; raises if the call did not run the case's work.
    check: Callable[[object], None] | None = None
    #: Columns that ``check`` does not apply to (a reference that does not do the case's work:
    #: the clipping row's step without clipping).
    unchecked: frozenset[str] = frozenset()
    #: State buffers kept as 8-bit codes (one byte per element) and a float32 scale per
    #: QUANT_BLOCK elements, in tensors of at least MIN_8BIT_SIZE elements; smaller tensors keep
    #: them in float32. Each code and scale is read and written once per step.
    byte_state_buffers: int = 0
    #: The columns that move other bytes than rsoptim's (another kind of state), by label: the
    #: fields above that differ for them (their GB/s, and the state dtypes they are checked for).
    column_traffic: dict[str, dict[str, Any]] = field(default_factory=dict)

    def bytes_per_element(self, itemsize: int) -> int:
        """Bytes a step moves per element (cases whose bytes do not depend on the tensor's size)."""
        assert not self.byte_state_buffers, "8-bit state: count the bytes tensor by tensor (tensor_bytes)"
        return self.elements_moved * itemsize + 2 * 4 * (self.float32_state_buffers + self.master_copy)

    def bytes_written_per_element(self, itemsize: int) -> int:
        assert self.roofline_written is not None and not self.byte_state_buffers
        return self.roofline_written * itemsize + 4 * (self.float32_state_buffers + self.master_copy)

    def tensor_bytes(self, numel: int, itemsize: int) -> tuple[int, int | None]:
        """(Bytes moved, bytes written) by a step of one tensor of ``numel`` elements (written:
        None where the case has no roofline). A tensor with 8-bit state moves its codes, one byte
        per element each way, and its scales, 4 bytes per block each way (16 bytes per 256
        elements for two moments: 0.06 bytes per element)."""
        float32_buffers = self.float32_state_buffers + self.master_copy
        code_buffers = blocks = 0
        if self.byte_state_buffers and numel >= MIN_8BIT_SIZE:
            code_buffers, blocks = self.byte_state_buffers, -(-numel // QUANT_BLOCK)
        else:
            float32_buffers += self.byte_state_buffers
        moved = numel * (self.elements_moved * itemsize + 2 * 4 * float32_buffers + 2 * code_buffers) + 2 * 4 * code_buffers * blocks
        if self.roofline_written is None:
            return moved, None
        written = numel * (self.roofline_written * itemsize + 4 * float32_buffers + code_buffers) + 4 * code_buffers * blocks
        return moved, written

    def traffic(self, params: list[torch.Tensor]) -> list[tuple[int, int | None]]:
        """``tensor_bytes`` of each param."""
        return [self.tensor_bytes(p.numel(), p.element_size()) for p in params]

    def column(self, label: str) -> Case:
        """The case as one column moves its bytes (rsoptim's, unless ``column_traffic`` differs)."""
        overrides = self.column_traffic.get(label)
        return replace(self, column_traffic={}, **overrides) if overrides else self

    def state_dtype(self, p: torch.Tensor) -> torch.dtype:
        """The dtype of ``p``'s param-sized state buffers (codes: uint8)."""
        if self.byte_state_buffers:
            return torch.uint8 if p.numel() >= MIN_8BIT_SIZE else torch.float32
        return torch.float32 if self.float32_state_buffers else p.dtype


# The same hyperparameters for every implementation of a row (torch's defaults, spelled out so
# that DeepSpeedCPUAdam, whose AdamW default weight decay is 0, steps the same update).
ADAM_HYPERPARAMETERS: dict[str, object] = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}
ADAMW_HYPERPARAMETERS: dict[str, object] = {**ADAM_HYPERPARAMETERS, "weight_decay": 1e-2}


def _optimizer_step(cls, **kwargs) -> Callable[[list[torch.Tensor]], Callable[[], object]]:
    def build(params: list[torch.Tensor]) -> Callable[[], object]:
        return cls(params, **kwargs).step

    return build


def _deepspeed_step(cls, adamw_mode: bool, fp32_optimizer_states: bool, **kwargs) -> Callable[[list[torch.Tensor]], Callable[[], object]]:
    def build(params: list[torch.Tensor]) -> Callable[[], object]:
        with stdout_to_stderr():  # its C++ side may print when the optimizer is created
            optimizer = cls(params, adamw_mode=adamw_mode, fp32_optimizer_states=fp32_optimizer_states, **kwargs)
        return optimizer.step

    return build


def _clip_step(fn, max_norm: float, **kwargs) -> Callable[[list[torch.Tensor]], Callable[[], object]]:
    def build(params: list[torch.Tensor]) -> Callable[[], object]:
        return lambda: fn(params, max_norm, **kwargs)

    return build


def restore_grads(params: list[torch.Tensor]) -> Callable[[], object]:
    """Saves the grads of ``params`` as they are now; the function returned copies them back
    (into each param's grad as it is then: in training-loop mode a backward has made new ones)."""
    saved = [p.grad.clone() for p in params]

    def restore() -> None:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.grad.copy_(s)

    restore.saved = saved  # type: ignore[attr-defined]
    return restore


def clip_factor(max_norm: float, total_norm: object) -> float:
    """The factor clip_grad_norm_ scales the grads by (torch's rule, before the clamp to 1)."""
    return max_norm / (float(total_norm) + 1e-6)  # type: ignore[arg-type]


def clips_check(max_norm: float) -> Callable[[object], None]:
    """For a clipping row: every call must scale the grads, by a factor clearly under 1 (< 0.99;
    repeated calls on the same grads converge to a factor within 1e-7 of 1, which is 1.0 in
    float32). Otherwise the row would time the no-clip case (rsoptim skips the scale pass at a
    factor of 1, torch does not)."""

    def check(total_norm: object) -> None:
        factor = clip_factor(max_norm, total_norm)
        if not factor < CLIPS_BELOW:
            raise AssertionError(f"clip_grad_norm_ did not clip: clip factor {factor:g} (total norm {float(total_norm):g}, max_norm {max_norm:g})")  # type: ignore[arg-type]

    return check


def no_clip_check(max_norm: float) -> Callable[[object], None]:
    """For the no-clip row: no call may scale the grads (clip factor >= 1)."""

    def check(total_norm: object) -> None:
        factor = clip_factor(max_norm, total_norm)
        if not factor >= 1:
            raise AssertionError(f"clip_grad_norm_ clipped in the no-clip row: clip factor {factor:g}")

    return check


# max_norm of the clipping row: far under the norm of make_params' grads (about 11 on gpt2-small,
# 0.3 on seed-mlp), so every call scales every grad.
CLIP_MAX_NORM = 1e-2
#: The clipping row's column of rsoptim's Adam without clipping (same grads, same row).
UNCLIPPED = "rsoptim without clipping"
CLIPS_BELOW = 0.99
NO_CLIP_MAX_NORM = 1e9


def _clip_then_step(clip, cls, max_norm: float, **kwargs) -> Callable[[list[torch.Tensor]], Callable[[], object]]:
    """``clip(params, max_norm)`` then a step of ``cls``: a user's loop with clipping; the call
    returns the total norm (for the row's check)."""

    def build(params: list[torch.Tensor]) -> Callable[[], object]:
        step = cls(params, **kwargs).step

        def run() -> object:
            total = clip(params, max_norm)
            step()
            return total

        return run

    return build


def _clipping_step(cls, max_norm: float, **kwargs) -> Callable[[list[torch.Tensor]], Callable[[], object]]:
    """A step of ``cls`` with ``max_grad_norm`` (clipping folded into the step); the call returns
    the total norm it clipped by."""

    def build(params: list[torch.Tensor]) -> Callable[[], object]:
        optimizer = cls(params, max_grad_norm=max_norm, **kwargs)

        def run() -> object:
            optimizer.step()
            return optimizer.last_grad_norm

        return run

    return build


def _torch_variants(cls, fused: bool, **kwargs) -> dict[str, Callable]:
    variants = {
        "torch for-loop": _optimizer_step(cls, foreach=False, **kwargs),
        "torch foreach": _optimizer_step(cls, foreach=True, **kwargs),
    }
    if fused:
        variants["torch fused"] = _optimizer_step(cls, fused=True, **kwargs)
    return variants


def cases(deepspeed_adam: type | None = None, bitsandbytes_optim: Any = None) -> list[Case]:
    """Every case; ``deepspeed_adam`` (DeepSpeedCPUAdam, once its op has built) adds its column to
    the Adam and AdamW rows, ``bitsandbytes_optim`` (``bitsandbytes.optim``, once its CPU 8-bit
    step has run) its column to the 8-bit rows."""
    clip_torch = torch.nn.utils.clip_grad_norm_

    def deepspeed(case: str, adamw_mode: bool, fp32_optimizer_states: bool, hyperparameters: dict[str, object]) -> dict[str, Callable]:
        assert case in DEEPSPEED_CASES  # main loads deepspeed only for those
        if deepspeed_adam is None:
            return {}
        return {DEEPSPEED: _deepspeed_step(deepspeed_adam, adamw_mode, fp32_optimizer_states, **hyperparameters)}

    def bitsandbytes(case: str, name: str, hyperparameters: dict[str, object]) -> dict[str, Callable]:
        assert case in BITSANDBYTES_CASES
        if bitsandbytes_optim is None:
            return {}
        return {BITSANDBYTES: _optimizer_step(getattr(bitsandbytes_optim, name), min_8bit_size=MIN_8BIT_SIZE, **hyperparameters)}

    adam, adamw = ADAM_HYPERPARAMETERS, ADAMW_HYPERPARAMETERS
    # bitsandbytes' Adam8bit decays weights decoupled: it steps Adam's update only without decay.
    assert adam["weight_decay"] == 0, "the Adam8bit row's bitsandbytes column would step another update"
    # The 8-bit rows' other columns and the bytes they move: torch's state in the param's dtype
    # (Adam's 7 buffers), rsoptim's fp32-state column float32 moments.
    in_param_dtype = {"elements_moved": 7, "roofline_written": 3, "byte_state_buffers": 0}
    in_float32 = {"float32_state_buffers": 2, "byte_state_buffers": 0}
    eight_bit_traffic = {label: in_param_dtype for label in ("torch fused", "torch foreach", "torch for-loop")}
    eight_bit_traffic[RSOPTIM_FP32_STATE] = in_float32
    return [
        Case(
            "Adam",
            {
                "rsoptim": _optimizer_step(rsoptim.Adam, **adam),
                **_torch_variants(torch.optim.Adam, True, **adam),
                # State in the param's dtype, as rsoptim's and torch's.
                **deepspeed("Adam", False, False, adam),
            },
            7,
            3,
        ),
        Case(
            "AdamW",
            {
                "rsoptim": _optimizer_step(rsoptim.AdamW, **adamw),
                **_torch_variants(torch.optim.AdamW, True, **adamw),
                **deepspeed("AdamW", True, False, adamw),
            },
            7,
            3,
        ),
        Case(
            # DeepSpeed's layout for half-precision params: float32 moments, 22 bytes per
            # bfloat16 element. torch.optim has no such option, so no torch column.
            "AdamW fp32 state",
            {
                "rsoptim": _optimizer_step(rsoptim.AdamW, state_dtype=torch.float32, **adamw),
                **deepspeed("AdamW fp32 state", True, True, adamw),
            },
            3,  # grad read, param read and written
            1,
            float32_state_buffers=2,  # exp_avg, exp_avg_sq
            half_only=True,
        ),
        Case(
            # rsoptim's extensions for half-precision params (torch.optim has neither): a float32
            # master copy read and written instead of reading the param, which is only written
            # (20 bytes per bfloat16 element; the roofline probe reads every buffer it writes,
            # so there is none for this row), or stochastic rounding of the param (the bytes of
            # plain AdamW, plus the random bits' arithmetic).
            "AdamW master weights",
            {"rsoptim": _optimizer_step(rsoptim.AdamW, master_weights=True, **adamw)},
            6,
            None,
            half_only=True,
            master_copy=True,
        ),
        Case(
            "AdamW stochastic rounding",
            {"rsoptim": _optimizer_step(rsoptim.AdamW, stochastic_rounding=True, **adamw)},
            7,
            3,
            half_only=True,
        ),
        Case(
            # Block-wise 8-bit moments (tensors of >= MIN_8BIT_SIZE elements): param read and
            # written, grad read, each moment's codes read and written and its scales (16 bytes
            # for float32 params, 10 for bfloat16, and 0.06 for the scales). The torch columns keep
            # state in the param's dtype (the comparison the issue asks for is torch fused).
            "Adam8bit",
            {
                "rsoptim": _optimizer_step(rsoptim.Adam8bit, min_8bit_size=MIN_8BIT_SIZE, **adam),
                **_torch_variants(torch.optim.Adam, True, **adam),
                RSOPTIM_FP32_STATE: _optimizer_step(rsoptim.Adam, state_dtype=torch.float32, **adam),
                **bitsandbytes("Adam8bit", "Adam8bit", adam),
            },
            3,  # grad read, param read and written
            1,
            byte_state_buffers=2,
            column_traffic=eight_bit_traffic,
        ),
        Case(
            "AdamW8bit",
            {
                "rsoptim": _optimizer_step(rsoptim.AdamW8bit, min_8bit_size=MIN_8BIT_SIZE, **adamw),
                **_torch_variants(torch.optim.AdamW, True, **adamw),
                RSOPTIM_FP32_STATE: _optimizer_step(rsoptim.AdamW, state_dtype=torch.float32, **adamw),
                **bitsandbytes("AdamW8bit", "AdamW8bit", adamw),
            },
            3,
            1,
            byte_state_buffers=2,
            column_traffic=eight_bit_traffic,
        ),
        Case(
            "SGD momentum",
            {
                "rsoptim": _optimizer_step(rsoptim.SGD, lr=0.01, momentum=0.9),
                **_torch_variants(torch.optim.SGD, True, lr=0.01, momentum=0.9),
            },
            5,
            2,
        ),
        Case(
            "RMSprop",
            {"rsoptim": _optimizer_step(rsoptim.RMSprop), **_torch_variants(torch.optim.RMSprop, False)},
            5,
            2,
        ),
        Case(
            "RMSprop centered+momentum",
            {
                "rsoptim": _optimizer_step(rsoptim.RMSprop, centered=True, momentum=0.9),
                **_torch_variants(torch.optim.RMSprop, False, centered=True, momentum=0.9),
            },
            9,
            4,
        ),
        Case(
            # A step with clipping that clips, as a user's loop has it: rsoptim's Adam with
            # max_grad_norm (the norm pass, then the step with the clip factor folded in; the
            # grads are not written) against clip_grad_norm_ (foreach) then each torch Adam,
            # rsoptim's clip_grad_norm_ then its Adam, and rsoptim's Adam without clipping (what
            # the clipping costs, measured in the same row).
            "Adam max_grad_norm (clips)",
            {
                "rsoptim": _clipping_step(rsoptim.Adam, CLIP_MAX_NORM, **adam),
                "rsoptim clip_grad_norm_ + step": _clip_then_step(rsoptim.clip_grad_norm_, rsoptim.Adam, CLIP_MAX_NORM, **adam),
                UNCLIPPED: _optimizer_step(rsoptim.Adam, **adam),
                # (Each torch column: torch's clip_grad_norm_, then that implementation's step.)
                **{
                    name: _clip_then_step(clip_torch, torch.optim.Adam, CLIP_MAX_NORM, **variant, **adam)
                    for name, variant in (("torch for-loop", {"foreach": False}), ("torch foreach", {"foreach": True}), ("torch fused", {"fused": True}))
                },
            },
            8,  # Adam's 7, and the norm pass's read of the grads
            # No roofline: the grads are read twice (norm, then step), which the probe's streams
            # do not model.
            None,
            prepare=restore_grads,
            check=clips_check(CLIP_MAX_NORM),
            unchecked=frozenset({UNCLIPPED}),
            column_traffic={UNCLIPPED: {"elements_moved": 7}},  # Adam's bytes, no norm pass
        ),
        Case(
            "clip_grad_norm_ (no clip)",
            {
                "rsoptim": _clip_step(rsoptim.clip_grad_norm_, NO_CLIP_MAX_NORM),
                "torch foreach": _clip_step(clip_torch, NO_CLIP_MAX_NORM, foreach=True),
                "torch for-loop": _clip_step(clip_torch, NO_CLIP_MAX_NORM, foreach=False),
            },
            1,
            None,
            check=no_clip_check(NO_CLIP_MAX_NORM),
        ),
        Case(
            "clip_grad_norm_ (clips)",
            {
                "rsoptim": _clip_step(rsoptim.clip_grad_norm_, CLIP_MAX_NORM),
                "torch foreach": _clip_step(clip_torch, CLIP_MAX_NORM, foreach=True),
                "torch for-loop": _clip_step(clip_torch, CLIP_MAX_NORM, foreach=False),
            },
            3,
            # No roofline: the probe's streams (read r, read and write w) are not the clip's (read
            # g, then read and write g), and reads alone run faster than mixed streams.
            None,
            # Repeated calls on the same grads converge to a clip factor of exactly 1 (nothing
            # left to clip): the same over-norm grads are copied back, untimed, before each call.
            prepare=restore_grads,
            check=clips_check(CLIP_MAX_NORM),
        ),
    ]


# Which cases run on which workload by default (every row of the performance issue's table).
DEFAULT_PLAN: dict[str, list[str]] = {
    "gpt2-small": [c.name for c in cases()],
    "seed-mlp": ["Adam"],
    "400x1000": ["Adam"],
    "flat-64m": ["Adam"],
}


# ---------------------------------------------------------------------------------------------
# Training-loop mode: each timed step right after a forward/backward, as in a training loop.
#
# Back to back, a small step finds its buffers in cache and the threads as the previous step left
# them. In a training loop it follows a forward/backward: torch's OpenMP threads have just run
# matmuls (and are still spinning), the grads were just written by the backward (new tensors, as
# zero_grad's default set_to_none leaves them), and the optimizer state was evicted by the
# activations. `--training-loop` runs the same untimed forward/backward on the row's params
# before every timed step of every implementation (so each starts from the same state), and
# times the step alone.

#: The batch of the untimed forward/backward.
TRAINING_LOOP_BATCH = 64


def mlp_forward_backward(params: list[torch.Tensor]) -> Callable[[], object]:
    """seed-mlp's forward/backward: its params are an MLP (Linear 784-128, ReLU, Linear 128-10);
    cross-entropy on a fixed batch, grads set to None before each backward (zero_grad's
    default), so the backward leaves new grads."""
    w1, b1, w2, b2 = params
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(TRAINING_LOOP_BATCH, w1.shape[1], generator=gen).to(w1.dtype)
    y = torch.randint(0, w2.shape[0], (TRAINING_LOOP_BATCH,), generator=gen)
    functional = torch.nn.functional

    def run() -> None:
        for p in params:
            p.grad = None
        hidden = functional.linear(x, w1, b1).relu()
        functional.cross_entropy(functional.linear(hidden, w2, b2), y).backward()

    return run


def stacked_forward_backward(params: list[torch.Tensor]) -> Callable[[], object]:
    """400x1000's forward/backward: the tensors stacked into one (400, 1000) weight, a batch of
    64 through it and tanh, backward (one matmul each way over the params' memory; the grads,
    new each time, land in one buffer, each param's a slice of it, as a bucketed backward leaves
    them)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(TRAINING_LOOP_BATCH, len(params), generator=gen).to(params[0].dtype)

    def run() -> None:
        for p in params:
            p.grad = None
        (torch.tanh(x @ torch.stack(params)).square().sum() / TRAINING_LOOP_BATCH).backward()

    return run


#: The small workloads' untimed forward/backward in training-loop mode.
TRAINING_LOOP_WORK: dict[str, Callable[[list[torch.Tensor]], Callable[[], object]]] = {
    "seed-mlp": mlp_forward_backward,
    "400x1000": stacked_forward_backward,
}


def _then(first: Callable[[], object], second: Callable[[], object]) -> Callable[[], object]:
    def run() -> None:
        first()
        second()

    return run


# End to end: the seed's training loop (examples/train_digits.py), iterations per second.

#: The seed loop's clip_grad_norm_ max_norm and batch size.
E2E_MAX_NORM = 1.0
E2E_BATCH = 64


def digits_data() -> tuple[torch.Tensor, torch.Tensor, str]:
    """scikit-learn's digits (1,797 images of 8x8, scaled to [0, 1]) as examples/train_digits.py
    loads them, or random data of the same shape where scikit-learn is not installed."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        gen = torch.Generator().manual_seed(0)
        x, y = torch.rand(1797, 64, generator=gen), torch.randint(0, 10, (1797,), generator=gen)
        return x, y, "random data of the digits' shape (scikit-learn is not installed)"
    digits = load_digits()
    return torch.tensor(digits.data, dtype=torch.float32) / 16.0, torch.tensor(digits.target, dtype=torch.long), "scikit-learn digits"


def digits_model() -> torch.nn.Module:
    """examples/train_digits.py's MLP, with its initial weights (seed 0; torch's global RNG is left
    as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))


def end_to_end_impls(deepspeed_adam: type | None = None) -> dict[str, tuple[Callable[[list[torch.Tensor]], torch.optim.Optimizer], Callable | None]]:
    """Each column of the end-to-end row: (optimizer from params, clip function or None)."""
    adam = ADAM_HYPERPARAMETERS
    clip_torch = torch.nn.utils.clip_grad_norm_
    impls: dict[str, tuple[Callable[[list[torch.Tensor]], torch.optim.Optimizer], Callable | None]] = {
        "rsoptim": (lambda ps: rsoptim.Adam(ps, **adam), rsoptim.clip_grad_norm_),
        "rsoptim max_grad_norm": (lambda ps: rsoptim.Adam(ps, max_grad_norm=E2E_MAX_NORM, **adam), None),
        "torch fused": (lambda ps: torch.optim.Adam(ps, fused=True, **adam), clip_torch),
        "torch foreach": (lambda ps: torch.optim.Adam(ps, foreach=True, **adam), clip_torch),
        "torch for-loop": (lambda ps: torch.optim.Adam(ps, foreach=False, **adam), clip_torch),
    }
    if deepspeed_adam is not None:

        def deepspeed(ps: list[torch.Tensor]) -> torch.optim.Optimizer:
            with stdout_to_stderr():
                return deepspeed_adam(ps, adamw_mode=False, fp32_optimizer_states=False, **adam)

        impls[DEEPSPEED] = (deepspeed, clip_torch)
    return impls


def training_iteration(model: torch.nn.Module, optimizer: torch.optim.Optimizer, clip: Callable | None, data, batches) -> Callable[[], object]:
    """One iteration of the seed's loop per call: zero_grad, forward, cross-entropy, backward,
    clip_grad_norm_ (unless the optimizer clips inside its step), step; the batches in turn."""
    x, y = data
    loss_fn = torch.nn.CrossEntropyLoss()
    turn = iter(())

    def run() -> object:
        nonlocal turn
        idx = next(turn, None)
        if idx is None:
            turn = iter(batches)
            idx = next(turn)
        optimizer.zero_grad()
        loss = loss_fn(model(x[idx]), y[idx])
        loss.backward()
        if clip is not None:
            clip(model.parameters(), max_norm=E2E_MAX_NORM)
        optimizer.step()
        return loss

    return run


@dataclass
class EndToEnd:
    threads: int
    data: str
    #: Median seconds per iteration, by column.
    seconds: dict[str, float]
    notes: list[str] = field(default_factory=list)

    @property
    def iterations_per_second(self) -> dict[str, float]:
        return {label: 1 / s for label, s in self.seconds.items()}

    @property
    def ratios(self) -> dict[str, float]:
        """Each other column's time per iteration over rsoptim's (its iterations/s under rsoptim's)."""
        return {label: s / self.seconds["rsoptim"] for label, s in self.seconds.items() if label != "rsoptim"}


def end_to_end(threads: int, repeats: int, deepspeed_adam: type | None = None, warmup: int = 20) -> EndToEnd:
    """The seed's training loop with each optimizer, from the same initial weights and batch
    order, timed interleaved in short samples of consecutive iterations
    (``TRAINING_LOOP_SAMPLES_PER_REPEAT * repeats`` each; medians of seconds per iteration)."""
    import copy

    torch.set_num_threads(threads)
    rsoptim.set_num_threads(threads)
    x, y, source = digits_data()
    batches = list(torch.randperm(len(x), generator=torch.Generator().manual_seed(1)).split(E2E_BATCH))
    initial = digits_model()
    fns: dict[str, Callable[[], object]] = {}
    notes: list[str] = []
    for label, (make_optimizer, clip) in end_to_end_impls(deepspeed_adam).items():
        model = copy.deepcopy(initial)
        try:
            fns[label] = training_iteration(model, make_optimizer(list(model.parameters())), clip, (x, y), batches)
            fns[label]()  # the first step creates the state
        except Exception as e:
            if label not in OPTIONAL_IMPLS:
                raise
            notes.append(f"{label} left out of the end-to-end row: {_one_line(e)}")
            fns.pop(label, None)
    seconds = time_interleaved(fns, TRAINING_LOOP_SAMPLES_PER_REPEAT * repeats, warmup, target_s=TRAINING_LOOP_TARGET_S, same_calls=True)
    return EndToEnd(threads=threads, data=source, seconds=seconds, notes=notes)


def format_end_to_end(results: list[EndToEnd]) -> str:
    lines = [
        "End to end: the seed's training loop (examples/train_digits.py: MLP 64-128-10, batch "
        f"{E2E_BATCH}; zero_grad, forward, cross-entropy, backward, clip_grad_norm_(max_norm={E2E_MAX_NORM:g}), Adam step), "
        f"on {results[0].data}:"
    ]
    lines.append(f"  {'thr':>3} {'optimizer (clipping)':<44} {'it/s':>9} {'ms/it':>8} {'rsoptim x':>10}")
    described = {
        "rsoptim": "rsoptim.Adam (rsoptim.clip_grad_norm_)",
        "rsoptim max_grad_norm": "rsoptim.Adam(max_grad_norm=1) (in the step)",
        "torch fused": "torch Adam fused (torch clip_grad_norm_)",
        "torch foreach": "torch Adam foreach (torch clip_grad_norm_)",
        "torch for-loop": "torch Adam for-loop (torch clip_grad_norm_)",
        DEEPSPEED: f"{DEEPSPEED} (torch clip_grad_norm_)",
    }
    for r in results:
        for label, s in r.seconds.items():
            ratio = f"{r.ratios[label]:>9.2f}x" if label in r.ratios else f"{'':>10}"
            lines.append(f"  {r.threads:>3} {described.get(label, label):<44} {1 / s:>9.0f} {1e3 * s:>8.3f} {ratio}")
    lines.append("  rsoptim x: the column's time per iteration over rsoptim's (rsoptim.Adam with rsoptim.clip_grad_norm_).")
    lines.append(
        f"  Samples of consecutive iterations, the same number for every optimizer (at least ~{1e3 * TRAINING_LOOP_TARGET_S:g} ms), "
        f"interleaved ({TRAINING_LOOP_SAMPLES_PER_REPEAT} x --repeats samples each, at least 5 repeats), medians; it/s = 1 / median."
    )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Timing.


class Progress:
    def __init__(self, total: int, enabled: bool):
        self.total, self.done, self.enabled = total, 0, enabled
        self.start = time.perf_counter()

    def update(self, label: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        line = f"[{self.done}/{self.total}] {elapsed:6.1f}s  {label}"
        end = "\r" if sys.stderr.isatty() else "\n"
        print(f"{line:<100}", end=end, file=sys.stderr, flush=True)

    def note(self, text: str) -> None:
        """A line that stays on screen (progress lines overwrite each other on a terminal)."""
        if self.enabled:
            print(f"{text:<100}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled and sys.stderr.isatty():
            print(" " * 100, end="\r", file=sys.stderr, flush=True)


def timed_calls(
    fn: Callable[[], object], n: int, prepare: Callable[[], object] | None = None, check: Callable[[object], None] | None = None
) -> float:
    """Seconds spent in ``n`` calls of ``fn``. With ``prepare`` or ``check``, each call is timed
    on its own: ``prepare()`` runs before it and ``check(result)`` after it, both untimed."""
    if prepare is None and check is None:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        return time.perf_counter() - t0
    total = 0.0
    for _ in range(n):
        if prepare is not None:
            prepare()
        t0 = time.perf_counter()
        result = fn()
        total += time.perf_counter() - t0
        if check is not None:
            check(result)
    return total


def _batch_size(
    fn: Callable[[], object], target_s: float, prepare: Callable[[], object] | None = None, check: Callable[[object], None] | None = None
) -> int:
    """How many calls make one sample of at least ``target_s`` seconds (of timed calls)."""
    once = max(timed_calls(fn, 1, prepare, check), 1e-7)
    return max(1, min(10_000, math.ceil(target_s / once)))


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int,
    target_s: float,
    prepare: dict[str, Callable[[], object]] | None = None,
    check: dict[str, Callable[[object], None]] | None = None,
    limits: dict[str, int] | None = None,
    same_calls: bool = False,
) -> dict[str, float]:
    """Median seconds per call of each function, timed in turn (A B C A B C ...). ``prepare`` and
    ``check`` (by label) run untimed before and after every call, warm-up calls included.
    ``limits`` (by label): at most that many samples, in the first rounds, and no warm-up calls
    (a slow column; the call that sizes its samples warms it). ``same_calls``: every sample of
    every function but the roofline probe and the ``limits`` columns is the same number of calls
    (the most any of them needs for ``target_s``), so that the k-th samples of stateful steps are
    taken at the same step counts."""
    prepare, check, limits = prepare or {}, check or {}, limits or {}
    for _ in range(warmup):
        for label, fn in fns.items():
            if label not in limits:
                timed_calls(fn, 1, prepare.get(label), check.get(label))
    batches = {label: _batch_size(fn, target_s, prepare.get(label), check.get(label)) for label, fn in fns.items()}
    if same_calls:
        # (The probe keeps no state; a column sampled fewer times, without warm-up calls, is not
        # at the others' step counts anyway, and at their call counts its samples would take
        # seconds.)
        steps = [label for label in batches if label != "roofline" and label not in limits]
        most = max((batches[label] for label in steps), default=1)
        batches.update(dict.fromkeys(steps, most))
    samples: dict[str, list[float]] = {label: [] for label in fns}
    for _ in range(repeats):
        for label, fn in fns.items():
            if len(samples[label]) >= limits.get(label, repeats):
                continue
            n = batches[label]
            samples[label].append(timed_calls(fn, n, prepare.get(label), check.get(label)) / n)
    return {label: statistics.median(s) for label, s in samples.items()}


#: Columns timed with fewer samples (at most this many, no warm-up calls): bitsandbytes' CPU step
#: takes seconds on gpt2-small (its update in torch ops between a dequantize and a quantize in C).
SAMPLE_LIMITS = {BITSANDBYTES: 3}


#: Training-loop rows and the end-to-end row: samples of about this many seconds of timed calls
#: (each call after its untimed forward/backward), this many samples per --repeats. A sample is
#: consecutive iterations of one implementation, as in its own training loop (call-by-call
#: turns would leave each step's state evicted by the other implementations' steps); many short
#: samples, interleaved, keep a busy machine's slow stretches from landing on one column.
TRAINING_LOOP_TARGET_S = 0.01
TRAINING_LOOP_SAMPLES_PER_REPEAT = 3


# The binding's stream_probe takes 1 to 4 written buffers per read buffer.
STREAM_PROBE_MAX_WRITTEN = 4


def probe_layouts(bytes_moved: float, bytes_written: float) -> list[tuple[float, int]]:
    """The roofline probe for a step that moves ``bytes_moved`` bytes per param element, of which
    ``bytes_written`` are written: a list of (bytes per param element in each float32 probe
    buffer, written buffers), one probe call per entry. A call with ``w`` written buffers moves
    ``1 + 2 * w`` buffers' bytes, ``w`` of them written. Where the step's split of reads and
    writes is one call's (28 B float32 and 14 B half Adam: 3 written buffers), that call; where it
    lies between two calls' (8-bit Adam: 16.06 B with 6.03 written, between 1 and 2 written
    buffers per read one), both, their read-only buffers splitting the step's read-only bytes so
    that together they move the same bytes with the same bytes written; beyond what a call can
    make (22 B for half params with float32 state: 12 read, 10 written, 5 written buffers per read
    one) the nearest, with the same bytes (at most 4 written buffers: 4/9 of the bytes written
    instead of 10/22)."""
    read_only = bytes_moved - 2 * bytes_written  # bytes read and not written back
    if read_only <= 0:
        raise ValueError(f"the probe needs a read-only stream: {bytes_moved} bytes moved, {bytes_written} written")
    ratio = bytes_written / read_only
    if ratio <= 1 or ratio >= STREAM_PROBE_MAX_WRITTEN or ratio == int(ratio):
        written = max(1, min(STREAM_PROBE_MAX_WRITTEN, round(ratio)))
        return [(bytes_moved / (1 + 2 * written), written)]
    low = int(ratio)
    # Read-only bytes x_low + x_high = read_only, written x_low * low + x_high * (low + 1) = bytes_written.
    high_bytes = bytes_written - read_only * low
    return [(read_only - high_bytes, low), (high_bytes, low + 1)]


def roofline_probe(
    params: list[torch.Tensor], bytes_moved: float | Sequence[float], bytes_written: float | Sequence[float]
) -> Callable[[], object]:
    """A streaming loop over float32 buffers sized from ``params``: one buffer read, and some
    read and written, per element (see ``rsoptim_core::roofline``), moving ``bytes_moved`` bytes
    per param element, ``bytes_written`` of them written, or, given sequences, ``bytes_moved[i]``
    bytes for param ``i`` (``bytes_written[i]`` written): ``probe_layouts`` of each param's bytes
    per element, one probe call per number of written buffers, over every param that has buffers
    in it. The probe moves bytes; their type does not matter."""
    if not isinstance(bytes_moved, Sequence):  # per element, the same for every param
        bytes_moved = [bytes_moved * p.numel() for p in params]
        bytes_written = [bytes_written * p.numel() for p in params]  # type: ignore[operator]
    calls: dict[int, list[list[torch.Tensor]]] = {}  # written buffers -> per tensor [read, *written]
    for p, moved, written in zip(params, bytes_moved, bytes_written):
        n = p.numel()
        if n == 0:
            continue
        for buffer_bytes, w in probe_layouts(moved / n, written / n):
            numel = max(1, round(n * buffer_bytes / 4))
            calls.setdefault(w, []).append([torch.zeros(numel) for _ in range(1 + w)])
    packed = []
    for w, tensors in sorted(calls.items()):
        numels = pack(t[0].numel() for t in tensors)
        read_addrs = pack(t[0].data_ptr() for t in tensors)
        out_addrs = [pack(t[1 + k].data_ptr() for t in tensors) for k in range(w)]
        packed.append((numels, read_addrs, out_addrs))

    def run() -> None:
        for numels, read_addrs, out_addrs in packed:
            _rsoptim.stream_probe("float32", numels, read_addrs, out_addrs)

    run.buffers = calls  # type: ignore[attr-defined]  # keep the buffers alive
    return run


@dataclass
class Row:
    case: str
    workload: str
    dtype: str
    threads: int
    tensors: int
    elements: int
    bytes_per_step: int
    seconds: dict[str, float]
    roofline_seconds: float | None = None
    ratios: dict[str, float] = field(default_factory=dict)
    #: Columns left out of this row, and why (one line each).
    notes: list[str] = field(default_factory=list)
    #: Training-loop mode: every timed step (and roofline probe) followed an untimed
    #: forward/backward on the row's params (see TRAINING_LOOP_WORK).
    training_loop: bool = False
    #: Bytes per step of the columns that move other bytes than rsoptim's (``bytes_per_step``):
    #: the 8-bit rows' columns with float32 state or state in the param's dtype.
    column_bytes: dict[str, int] = field(default_factory=dict)
    #: The optimizer state each column keeps after its first step (``state_memory``), by label;
    #: None where the row's implementations keep none (clip_grad_norm_).
    state_memory: dict[str, dict[str, float | int | None]] | None = None

    @property
    def label(self) -> str:
        """The case as the table names the row."""
        return f"{self.case} (training loop)" if self.training_loop else self.case

    def gbps(self, label: str) -> float:
        return self.column_bytes.get(label, self.bytes_per_step) / self.seconds[label] / 1e9

    @property
    def roofline_share(self) -> float | None:
        """rsoptim's speed as a share of the roofline probe's (None: no probe for this row)."""
        return self.roofline_seconds / self.seconds["rsoptim"] if self.roofline_seconds else None

    @property
    def measurement_error(self) -> bool:
        """Faster than the probe moving the same bytes: the step skipped work, or the row counts
        bytes the step does not move; either way its figures are not a speed."""
        share = self.roofline_share
        return share is not None and share > ROOFLINE_LIMIT


#: A share of the roofline above this is flagged as a measurement error (the probe is a plain
#: streaming loop; a step moving the same bytes can match it, within noise, not beat it).
ROOFLINE_LIMIT = 1.05


def roofline_cell(row: Row) -> str:
    """The table's %roof cell: "  97% ", or " 163%!" for a measurement error, or "     - "."""
    share = row.roofline_share
    if share is None:
        return "     - "
    return f"{100 * share:5.0f}%" + ("!" if row.measurement_error else " ")


def roofline_error_note(row: Row) -> str:
    return (
        f"{row.case} / {row.workload} / {row.dtype} / {row.threads} thr: rsoptim at {100 * row.roofline_share:.0f}% of the roofline "  # type: ignore[operator]
        f"(above {100 * ROOFLINE_LIMIT:.0f}%) is a measurement error, not a speed: the step skipped work, the row counts bytes it does not move, "
        "or the probe's samples ran slower than the step's (where the memory's speed changes during a run); rerun it"
    )


def row_json(row: Row) -> dict[str, object]:
    """A row as the JSON output has it."""
    return {
        **asdict(row),
        "gbps": {k: row.gbps(k) for k in row.seconds},
        "roofline_share": row.roofline_share,
        "measurement_error": row.measurement_error,
    }


# Implementations whose failure on a row leaves their column out with a note instead of stopping
# the run (DeepSpeed's op refuses some dtypes on some CPUs, e.g. bfloat16 without AVX-512;
# bitsandbytes' CPU path may refuse a dtype).
OPTIONAL_IMPLS = {DEEPSPEED, BITSANDBYTES}


def _optimizer_of(step: Callable[[], object]) -> torch.optim.Optimizer | None:
    optimizer = getattr(step, "__self__", None)
    return optimizer if isinstance(optimizer, torch.optim.Optimizer) else None


def check_state_dtypes(label: str, step: Callable[[], object], expected: torch.dtype | Callable[[torch.Tensor], torch.dtype]) -> None:
    """The bytes a row counts assume every param-sized state buffer has the case's state dtype
    (``expected``, or ``expected(param)``: the 8-bit rows' codes are uint8 in large tensors,
    their small tensors' moments float32): check it, after the first step has created the state."""
    optimizer = _optimizer_of(step)
    if optimizer is None:
        return  # clip_grad_norm_ keeps no state
    for p, state in optimizer.state.items():
        for key, value in state.items():
            wanted = torch.float32 if key == "master_param" else expected if isinstance(expected, torch.dtype) else expected(p)
            if key != "step" and isinstance(value, torch.Tensor) and value.numel() == p.numel() and value.dtype != wanted:
                raise RuntimeError(f"{label} keeps {key} in {value.dtype}, not {wanted}: its bytes per step would differ from the row's")


def state_memory(step: Callable[[], object], params: list[torch.Tensor]) -> dict[str, float | int | None] | None:
    """The optimizer state a step function's optimizer keeps for ``params`` (None: no optimizer):
    the bytes of every tensor in its ``state``, each storage counted once (the 8-bit optimizers'
    code tables, ``qmap1``/``qmap2``, are shared by their params; a view counts its whole
    storage), per param element, over all params and over those of at least MIN_8BIT_SIZE
    elements (the tensors that get 8-bit state; a shared tensor counts with the first param that
    holds it). A step count kept as a Python int (bitsandbytes) is no tensor and counts 0 bytes."""
    optimizer = _optimizer_of(step)
    if optimizer is None:
        return None
    seen: set[tuple[int, str]] = set()
    total = large = 0
    for p in params:
        for value in optimizer.state.get(p, {}).values():
            if not isinstance(value, torch.Tensor):
                continue
            storage = value.untyped_storage()
            key = (storage.data_ptr(), str(value.device))
            if storage.nbytes() == 0 or key in seen:
                continue
            seen.add(key)
            total += storage.nbytes()
            large += storage.nbytes() if p.numel() >= MIN_8BIT_SIZE else 0
    elements = sum(p.numel() for p in params)
    large_elements = sum(p.numel() for p in params if p.numel() >= MIN_8BIT_SIZE)
    return {
        "bytes": total,
        "bytes_per_param": total / elements if elements else None,
        "bytes_per_param_8bit_size": large / large_elements if large_elements else None,
    }


def build_steps(
    case: Case,
    params: dict[str, list[torch.Tensor]],
    where: str,
    prepare: dict[str, Callable[[], object] | None] | None = None,
) -> tuple[dict[str, Callable[[], object]], list[str]]:
    """Each implementation's step function on its ``params[label]``, each stepped once (after
    ``prepare[label]()``, the untimed preparation built on those params, if any, and checked by
    ``case.check``), and a note for each optional implementation left out (``where`` names the
    row in it)."""
    prepare = prepare or {}
    fns: dict[str, Callable[[], object]] = {}
    notes = []
    for label, build in case.impls.items():
        try:
            fn = build(params[label])
            # The first step creates the state (and shows a dtype the implementation refuses).
            timed_calls(fn, 1, prepare.get(label), None if label in case.unchecked else case.check)
            check_state_dtypes(label, fn, case.column(label).state_dtype)
        except Exception as e:
            if label not in OPTIONAL_IMPLS:
                raise
            notes.append(f"{label} left out of {case.name} / {where}: {_one_line(e)}")
            continue
        fns[label] = fn
    return fns, notes


def run_row(
    case: Case, workload: str, threads: int, repeats: int, warmup: int, dtype: torch.dtype = torch.float32, training_loop: bool = False
) -> Row:
    """One row. ``training_loop``: the workload's forward/backward (``TRAINING_LOOP_WORK``) runs,
    untimed, before every call of every implementation and of the roofline probe (then the
    case's own preparation, if any)."""
    # One thread count for every implementation: torch's intra-op pool, rsoptim's, and
    # DeepSpeed's OpenMP regions (they run on torch's libgomp, which torch.set_num_threads sets).
    torch.set_num_threads(threads)
    rsoptim.set_num_threads(threads)
    shapes = WORKLOADS[workload]()
    params = make_params(shapes, dtype=dtype)
    # In a training loop each implementation steps params of its own, equal to start with, through
    # the same forward/backward. On shared params the ReLUs that die in the first steps would
    # leave every implementation built after them first moments of exactly 0 for their weights,
    # while the first one's decay into subnormal numbers, which slow a step down on some CPUs
    # (rsoptim's and DeepSpeedCPUAdam's seed-MLP step both took about 2x as long on a Xeon).
    own = {label: make_params(shapes, dtype=dtype) if training_loop else params for label in case.impls}
    forward_backward = TRAINING_LOOP_WORK[workload](params) if training_loop else None

    def untimed_work(ps: list[torch.Tensor]) -> Callable[[], object] | None:
        """What runs before each call on ``ps``: the forward/backward, then the case's own
        preparation (built now, before any implementation runs, from the grads as make_params
        leaves them)."""
        own_prepare = case.prepare(ps) if case.prepare is not None else None
        if not training_loop:
            return own_prepare
        work = TRAINING_LOOP_WORK[workload](ps)
        return work if own_prepare is None else _then(work, own_prepare)

    # Once per row where the params are shared (a clipping case's copy of GPT-2's grads is 0.5 GB).
    prepare = {label: untimed_work(own[label]) for label in case.impls} if training_loop else dict.fromkeys(case.impls, untimed_work(params))
    fns, notes = build_steps(case, own, f"{workload} / {str(dtype).removeprefix('torch.')}", prepare)
    impls = list(fns)
    memory = {label: state_memory(fn, own[label]) for label, fn in fns.items()}
    traffic = case.traffic(params)
    if case.roofline_written is not None:
        fns["roofline"] = roofline_probe(params, [moved for moved, _ in traffic], [written for _, written in traffic])  # type: ignore[misc]
    elements = sum(p.numel() for p in params)
    bytes_per_step = sum(moved for moved, _ in traffic)
    column_bytes = {label: sum(moved for moved, _ in case.column(label).traffic(params)) for label in impls if label in case.column_traffic}
    prepares = {label: prepare[label] for label in impls if prepare[label] is not None}
    checks = {label: case.check for label in impls if label not in case.unchecked} if case.check is not None else None
    if forward_backward is not None:
        if "roofline" in fns:
            prepares["roofline"] = forward_backward  # the probe, too, right after the forward/backward
        seconds = time_interleaved(
            fns,
            TRAINING_LOOP_SAMPLES_PER_REPEAT * repeats,
            warmup,
            target_s=TRAINING_LOOP_TARGET_S,
            prepare=prepares,
            check=checks,
            limits=SAMPLE_LIMITS,
            # The state, hence a step's speed, changes as training goes on (see `own` above).
            same_calls=True,
        )
    else:
        seconds = time_interleaved(fns, repeats, warmup, target_s=0.02, prepare=prepares or None, check=checks, limits=SAMPLE_LIMITS)
    roofline = seconds.pop("roofline", None)
    row = Row(
        case=case.name,
        workload=workload,
        dtype=str(dtype).removeprefix("torch."),
        threads=threads,
        tensors=len(params),
        elements=elements,
        bytes_per_step=bytes_per_step,
        seconds=seconds,
        roofline_seconds=roofline,
        notes=notes,
        training_loop=training_loop,
        column_bytes=column_bytes,
        state_memory=memory if any(m is not None for m in memory.values()) else None,
    )
    row.ratios = {label: s / seconds["rsoptim"] for label, s in seconds.items() if label != "rsoptim"}
    if row.measurement_error:
        row.notes.append(roofline_error_note(row))
    del fns, params, prepare
    return row


# ---------------------------------------------------------------------------------------------
# Memory a step allocates.


def step_allocations(build: Callable[[list[torch.Tensor]], Callable[[], object]], workload: str) -> dict[str, int]:
    """Bytes allocated during one (steady-state) step: by torch ops (profiler) and by rsoptim's
    Rust code (its allocation counters)."""
    from torch.profiler import ProfilerActivity, profile

    params = make_params(WORKLOADS[workload]())
    step = build(params)
    step()  # creates the state
    rust_before = _rsoptim.allocation_counters()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    rust_after = _rsoptim.allocation_counters()
    torch_bytes = sum(e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0)
    return {
        "torch_bytes": int(torch_bytes),
        "rust_bytes": rust_after[0] - rust_before[0],
        "rust_allocations": rust_after[1] - rust_before[1],
        "tensors": len(params),
        "param_bytes": sum(p.numel() * p.element_size() for p in params),
    }


# ---------------------------------------------------------------------------------------------
# Plot: GB/s against size.


PLOT_SIZES = [2**k for k in range(10, 28, 2)] + [2**27]
# The bfloat16 curves: rsoptim and the other kernels that compute in float32 and round once
# (torch's for-loop and foreach would double the sweep's time and crowd the plot).
PLOT_BFLOAT16_IMPLS = ("rsoptim", "torch fused", DEEPSPEED)


def size_sweep(
    repeats: int, threads: int, progress: Progress, deepspeed_adam: type | None = None, max_elements: int = PLOT_SIZES[-1]
) -> tuple[list[dict[str, object]], list[str]]:
    """Adam on one tensor of each size, float32 and bfloat16: GB/s of each implementation and of
    the roofline probe moving the same bytes; and the notes of columns left out."""
    torch.set_num_threads(threads)
    rsoptim.set_num_threads(threads)
    adam = next(c for c in cases(deepspeed_adam) if c.name == "Adam")
    points: list[dict[str, object]] = []
    notes: list[str] = []
    for dtype in (torch.float32, torch.bfloat16):
        dtype_name = str(dtype).removeprefix("torch.")
        impls = {k: v for k, v in adam.impls.items() if dtype == torch.float32 or k in PLOT_BFLOAT16_IMPLS}
        case = Case(adam.name, impls, adam.elements_moved, adam.roofline_written)
        for n in [n for n in PLOT_SIZES if n <= max_elements]:
            progress.update(f"size sweep: Adam on {n} {dtype_name} elements")
            params = make_params([(n,)], dtype=dtype)
            fns, left_out = build_steps(case, dict.fromkeys(impls, params), f"size sweep / {n} {dtype_name}")
            notes += left_out
            for label in [k for k in impls if k not in fns]:
                del impls[label]  # left out for the rest of this dtype: one note, not one per size
            ((bytes_moved, bytes_written),) = case.traffic(params)
            fns["roofline"] = roofline_probe(params, [bytes_moved], [bytes_written])  # type: ignore[list-item]
            seconds = time_interleaved(fns, repeats, 1, target_s=0.01)
            gbps = {label: bytes_moved / s / 1e9 for label, s in seconds.items()}
            points.append({"dtype": dtype_name, "elements": n, "bytes_per_element": case.bytes_per_element(params[0].element_size()), **gbps})
            del fns, params
    return points, notes


def plot(points: list[dict[str, object]], path: str, machine: dict[str, object], threads: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    colors = {"rsoptim": "C0", "torch fused": "C1", "torch foreach": "C2", "torch for-loop": "C3", DEEPSPEED: "C4"}
    markers = {"rsoptim": "o", "torch fused": "s", "torch foreach": "^", "torch for-loop": "v", DEEPSPEED: "D"}
    bytes_per_element = {}
    for dtype, linestyle, fill in (("float32", "-", "full"), ("bfloat16", "--", "none")):
        curve = [p for p in points if p["dtype"] == dtype]
        if not curve:
            continue
        sizes = [p["elements"] for p in curve]
        bytes_per_element[dtype] = curve[0]["bytes_per_element"]
        for label in colors:
            measured = [p for p in curve if label in p]  # an optional column may be left out
            if measured:
                ax.plot(
                    [p["elements"] for p in measured],
                    [p[label] for p in measured],
                    color=colors[label],
                    marker=markers[label],
                    fillstyle=fill,
                    linestyle=linestyle,
                    label=f"{label}, {dtype}",
                )
        roof_style = {"color": "k", "linestyle": ":"} if dtype == "float32" else {"color": "0.5", "linestyle": "-."}
        ax.plot(sizes, [p["roofline"] for p in curve], linewidth=2, label=f"roofline probe, {dtype} bytes (measured)", **roof_style)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("elements in one tensor")
    ax.set_ylabel("GB/s moved (" + ", ".join(f"{d}: {b} B/element" for d, b in bytes_per_element.items()) + ")")
    ax.set_title(
        f"Adam step throughput (float32 solid, bfloat16 dashed: params, grads and state), {threads} threads, "
        f"{machine['simd']} path\n{machine['cpu']}",
        fontsize=10,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ---------------------------------------------------------------------------------------------
# Output.


def machine_info(threads: list[int]) -> dict[str, object]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": ",".join(map(str, threads)),
        "simd": rsoptim.simd_level(),
        "backend": rsoptim.parallel_backend().split("/")[-1],
        "torch": torch.__version__,
        "rsoptim": rsoptim.__version__,
        "python": platform.python_version(),
    }


#: Column names in the table's header.
SHORT_LABELS = {DEEPSPEED: "DeepSpeed", RSOPTIM_FP32_STATE: "rs fp32", BITSANDBYTES: "bnb"}


def format_table(rows: list[Row]) -> str:
    others = ["torch fused", "torch foreach", "torch for-loop"]
    others += [label for label in (DEEPSPEED, RSOPTIM_FP32_STATE, BITSANDBYTES) if any(label in r.ratios for r in rows)]
    width = max([27, *(len(r.label) for r in rows)])
    head = f"{'case':<{width}} {'workload':<11} {'thr':>3} {'rsoptim ms':>10} {'GB/s':>6} {'%roof':>6} "
    head += "".join(f" {'x ' + SHORT_LABELS.get(label, label.replace('torch ', '')):>11}" for label in others)
    lines = [head, "-" * len(head)]
    for r in rows:
        line = f"{r.label:<{width}} {r.workload:<11} {r.threads:>3} {1e3 * r.seconds['rsoptim']:>10.3f} {r.gbps('rsoptim'):>6.1f} {roofline_cell(r)}"
        for label in others:
            line += f" {r.ratios[label]:>10.2f}x" if label in r.ratios else f" {'-':>11}"
        lines.append(line)
    lines.append("")
    lines.append(
        " / ".join("x " + SHORT_LABELS.get(label, label.replace("torch ", "")) for label in others)
        + ": the other implementation's time over rsoptim's (higher is better for rsoptim)."
    )
    lines.append("%roof: rsoptim's speed as a share of the roofline probe's (same bytes, tensors and threads).")
    if any(r.measurement_error for r in rows):
        lines.append(
            f"!: MEASUREMENT ERROR: above {100 * ROOFLINE_LIMIT:.0f}% of the roofline, faster than a plain loop moving the same bytes; "
            "the step skipped work, the row counts bytes it does not move, or the probe ran slower than the step during the row "
            "(a machine whose memory speed changes), so the row's figures are not a speed until a rerun stays under."
        )
    if any(r.case == "clip_grad_norm_ (clips)" for r in rows):
        lines.append(
            "clip_grad_norm_ (clips): the same over-norm grads are copied back, untimed, before every timed call of every "
            f"implementation (max_norm {CLIP_MAX_NORM:g}; each call checked to scale the grads by a factor < {CLIPS_BELOW:g})."
        )
    if any(r.case == "Adam max_grad_norm (clips)" for r in rows):
        lines.append(
            f"Adam max_grad_norm (clips): rsoptim.Adam(max_grad_norm={CLIP_MAX_NORM:g}) against torch's clip_grad_norm_ then each "
            "torch Adam (grads copied back untimed before every call, as above); the medians below also give rsoptim's "
            "clip_grad_norm_ then its step, and its Adam step without clipping. The clipping step's time over that one's: "
            + ", ".join(
                f"{r.workload} / {r.threads} thr{' (training loop)' if r.training_loop else ''} {r.seconds['rsoptim'] / r.seconds[UNCLIPPED]:.2f}x"
                for r in rows
                if r.case == "Adam max_grad_norm (clips)" and UNCLIPPED in r.seconds
            )
            + "."
        )
    if any(r.case == "AdamW fp32 state" for r in rows):
        lines.append(
            "AdamW fp32 state: rsoptim.AdamW(state_dtype=torch.float32) and DeepSpeedCPUAdam(adamw_mode=True, "
            "fp32_optimizer_states=True): half params, float32 moments."
        )
    if any(r.case in BITSANDBYTES_CASES for r in rows):
        lines.append(
            f"8-bit rows: rsoptim.Adam8bit/AdamW8bit (8-bit moments in tensors of >= {MIN_8BIT_SIZE} elements, float32 "
            "below; GB/s and %roof on their bytes, counted tensor by tensor) against torch's Adam/AdamW (state in the param's dtype), "
            "rsoptim.Adam/AdamW(state_dtype=torch.float32) (x rs fp32)"
            + (
                f" and bitsandbytes' CPU Adam8bit/AdamW8bit (x bnb; at most {SAMPLE_LIMITS[BITSANDBYTES]} samples, no warm-up calls)"
                if BITSANDBYTES in others
                else ""
            )
            + ", same hyperparameters; the state each keeps is listed below the table."
        )
    if any(r.training_loop for r in rows):
        lines.append(
            "(training loop): before every timed step of every implementation (and every roofline probe), the same untimed "
            f"forward/backward, batch {TRAINING_LOOP_BATCH} (seed-mlp: its MLP 784-128-10 with "
            "cross-entropy; 400x1000: the tensors stacked into a 400x1000 weight, a matmul and tanh), grads set to None first, "
            "each implementation on params of its own (equal at the start); samples of consecutive (forward/backward, step) "
            f"iterations of one implementation, the same number for all (at least ~{1e3 * TRAINING_LOOP_TARGET_S:g} ms of steps), "
            f"interleaved, {TRAINING_LOOP_SAMPLES_PER_REPEAT} x --repeats samples each, medians."
        )
    return "\n".join(lines)


def format_state_memory(rows: list[Row]) -> str:
    """The optimizer state of each column of the 8-bit rows, in bytes per param element."""
    rows = [r for r in rows if r.case in BITSANDBYTES_CASES and r.state_memory]
    if not rows:
        return ""
    measured = {label for r in rows for label in r.state_memory or {}}
    labels = [label for label in ("rsoptim", "torch fused", "torch foreach", "torch for-loop", RSOPTIM_FP32_STATE, BITSANDBYTES) if label in measured]
    lines = [
        f"Optimizer state, bytes per param element: all params / params of >= {MIN_8BIT_SIZE} elements (every tensor in "
        "optimizer.state after the first step, a tensor shared by params counted once):"
    ]
    width = max(len(r.label) for r in rows)
    lines.append(f"  {'case':<{width}} {'workload':<11} {'dtype':<9}" + "".join(f" {SHORT_LABELS.get(label, label):>15}" for label in labels))
    for r in rows:
        cells = []
        for label in labels:
            m = (r.state_memory or {}).get(label)
            if m is None or m["bytes_per_param"] is None:
                cells.append(f" {'-':>15}")
                continue
            large = m["bytes_per_param_8bit_size"]
            cells.append(f" {m['bytes_per_param']:>7.3f} / " + (f"{large:<5.3f}" if large is not None else f"{'-':<5}"))
        lines.append(f"  {r.label:<{width}} {r.workload:<11} {r.dtype:<9}" + "".join(cells))
    return "\n".join(lines)


def format_torch_times(rows: list[Row]) -> str:
    lines = ["Medians in ms (and GB/s):"]
    for r in rows:
        parts = [f"{label} {1e3 * s:.3f} ({r.gbps(label):.1f})" for label, s in r.seconds.items()]
        if r.roofline_seconds:
            parts.append(f"roofline {1e3 * r.roofline_seconds:.3f} ({r.bytes_per_step / r.roofline_seconds / 1e9:.1f})")
        lines.append(f"  {r.label} / {r.workload} / {r.threads} thr ({r.bytes_per_step / r.elements:g} B/element): " + ", ".join(parts))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--distributed" in argv:  # FSDP2 DTensors on spawned ranks: its own options (--distributed --help)
        from rsoptim import bench_distributed

        return bench_distributed.main([a for a in argv if a != "--distributed"])
    parser = argparse.ArgumentParser(prog="python -m rsoptim.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--distributed",
        action="store_true",
        help="benchmark on FSDP2 DTensors, 2 spawned ranks x 1 thread (gloo); see --distributed --help for its options",
    )
    parser.add_argument("--workloads", default=",".join(DEFAULT_PLAN), help="comma-separated: " + ", ".join(WORKLOADS))
    parser.add_argument("--cases", default=None, help="comma-separated case names (default: the issue's table)")
    parser.add_argument(
        "--threads",
        default=None,
        help="comma-separated thread counts (default: 1 and torch's count for Adam on gpt2-small and flat-64m, torch's count elsewhere)",
    )
    parser.add_argument("--repeats", type=int, default=7, help="timed samples per implementation (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="3 repeats, no gpt2-small")
    parser.add_argument("--json", action="store_true", help="print JSON on stdout instead of the table")
    parser.add_argument("--plot", metavar="FILE.png", help="also sweep Adam (float32 and bfloat16) over sizes 1K..128M and plot GB/s")
    parser.add_argument(
        "--plot-max-elements", type=int, default=PLOT_SIZES[-1], metavar="N", help="the size sweep's largest tensor (default: %(default)s)"
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the allocation measurement")
    parser.add_argument("--no-deepspeed", action="store_true", help=f"leave out the {DEEPSPEED} column (deepspeed is not imported)")
    parser.add_argument(
        "--no-bitsandbytes", action="store_true", help=f"leave out the {BITSANDBYTES} column of the 8-bit rows (bitsandbytes is not imported)"
    )
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=list(DTYPES),
        help="the params' (and grads' and state's) dtype; half types are stepped with torch's fused-kernel numerics "
        "(note: torch 2.13's fused SGD does not update half-precision params, so its times are not a comparison)",
    )
    parser.add_argument(
        "--training-loop",
        action="store_true",
        help="also time the small workloads' rows (" + ", ".join(TRAINING_LOOP_WORK) + ") with an untimed forward/backward "
        "before every step, as in a training loop, and add the end-to-end row: the seed's digits training loop in iterations/s",
    )
    args = parser.parse_args(argv)
    dtype = DTYPES[args.dtype]

    max_threads = torch.get_num_threads()
    workloads = [w for w in args.workloads.split(",") if w]
    for w in workloads:
        if w not in WORKLOADS:
            parser.error(f"unknown workload {w!r}; choose from {', '.join(WORKLOADS)}")
    if args.quick:
        args.repeats = min(args.repeats, 3)
        workloads = [w for w in workloads if w != "gpt2-small"]
    case_names = {c.name: c for c in cases()}
    chosen = None if args.cases is None else [c.strip() for c in args.cases.split(",")]
    for name in chosen or []:
        if name not in case_names:
            parser.error(f"unknown case {name!r}; choose from {', '.join(case_names)}")
        if case_names[name].half_only and dtype == torch.float32:
            parser.error(f"case {name!r} runs on half-precision params: add --dtype bfloat16 or --dtype float16")

    named_plan: list[tuple[str, str, int]] = []
    for w in workloads:
        names = chosen or [n for n in DEFAULT_PLAN.get(w, ["Adam"]) if not (case_names[n].half_only and dtype == torch.float32)]
        for name in names:
            if args.threads is not None:
                thread_counts = [int(t) for t in args.threads.split(",")]
            elif name == "Adam" and w in ("gpt2-small", "flat-64m") and max_threads > 1:
                thread_counts = [1, max_threads]
            else:
                thread_counts = [max_threads]
            named_plan += [(name, w, t) for t in thread_counts]
    used_threads = sorted({t for _, _, t in named_plan})
    # --training-loop: each small workload's row again in training-loop mode, and the end-to-end
    # row at each thread count.
    loop_plan = [(name, w, t) for name, w, t in named_plan if w in TRAINING_LOOP_WORK] if args.training_loop else []
    e2e_threads = (used_threads or [max_threads]) if args.training_loop else []
    used_threads = sorted({*used_threads, *e2e_threads})
    machine = machine_info(used_threads)
    sweep_sizes = [n for n in PLOT_SIZES if n <= args.plot_max_elements]
    progress = Progress(len(named_plan) + len(loop_plan) + len(e2e_threads) + (2 * len(sweep_sizes) if args.plot else 0), enabled=True)
    print(
        f"rsoptim {machine['rsoptim']} vs torch {machine['torch']} | {machine['cpu']} | "
        f"{machine['cores']} cores | threads {machine['threads']} | SIMD {machine['simd']}",
        file=sys.stderr,
    )

    if args.no_deepspeed:
        deepspeed = DeepSpeedColumn(note=f"{DEEPSPEED} column left out: --no-deepspeed")
    elif args.plot or args.training_loop or any(name in DEEPSPEED_CASES for name, _, _ in named_plan):
        deepspeed = load_deepspeed(progress)
    else:
        deepspeed = DeepSpeedColumn()  # no row would have the column
    if deepspeed.note:
        progress.note(deepspeed.note)
    machine["deepspeed"] = deepspeed.version if deepspeed.optimizer is not None else None
    if args.no_bitsandbytes:
        bnb = BitsAndBytesColumn(note=f"{BITSANDBYTES} column left out: --no-bitsandbytes")
    elif any(name in BITSANDBYTES_CASES for name, _, _ in named_plan):
        bnb = load_bitsandbytes()
    else:
        bnb = BitsAndBytesColumn()  # no row would have the column
    if bnb.note:
        progress.note(bnb.note)
    machine["bitsandbytes"] = bnb.version if bnb.optim is not None else None
    all_cases = {c.name: c for c in cases(deepspeed.optimizer, bnb.optim)}

    rows = []
    for name, workload, threads in named_plan:
        progress.update(f"{name} / {workload} / {threads} threads")
        rows.append(run_row(all_cases[name], workload, threads, args.repeats, args.warmup, dtype))
        for note in rows[-1].notes:
            progress.note(note)
    for name, workload, threads in loop_plan:
        progress.update(f"{name} / {workload} / {threads} threads (training loop)")
        rows.append(run_row(all_cases[name], workload, threads, args.repeats, args.warmup, dtype, training_loop=True))
        for note in rows[-1].notes:
            progress.note(note)
    e2e = []
    for threads in e2e_threads:
        progress.update(f"end to end: the digits training loop / {threads} threads")
        e2e.append(end_to_end(threads, max(args.repeats, 5), deepspeed.optimizer))
        for note in e2e[-1].notes:
            progress.note(note)

    memory = None
    if not args.no_memory and "gpt2-small" in workloads:
        torch.set_num_threads(max_threads)
        rsoptim.set_num_threads(max_threads)
        memory = {
            "rsoptim Adam": step_allocations(_optimizer_step(rsoptim.Adam), "gpt2-small"),
            "torch Adam for-loop": step_allocations(_optimizer_step(torch.optim.Adam, foreach=False), "gpt2-small"),
        }

    points, sweep_notes = None, []
    if args.plot:
        points, sweep_notes = size_sweep(max(3, args.repeats // 2), max_threads, progress, deepspeed.optimizer, args.plot_max_elements)
        for note in sweep_notes:
            progress.note(note)
        plot(points, args.plot, machine, max_threads)
    progress.close()
    notes = [c.note for c in (deepspeed, bnb) if c.note] + [n for r in rows for n in r.notes] + [n for r in e2e for n in r.notes] + sweep_notes

    if args.json:
        out = {
            "machine": machine,
            "dtype": args.dtype,
            "rows": [row_json(r) for r in rows],
            "memory": memory,
            "size_sweep": points,
            "notes": notes,
        }
        if e2e:
            out["end_to_end"] = [
                {**asdict(r), "iterations_per_second": r.iterations_per_second, "ratios": r.ratios} for r in e2e
            ]
        json.dump(out, sys.stdout, indent=2)
        print()
        return 0
    versions = f", deepspeed {deepspeed.version}" if deepspeed.optimizer is not None else ""
    versions += f", bitsandbytes {bnb.version}" if bnb.optim is not None else ""
    print(
        f"rsoptim {machine['rsoptim']} vs torch {machine['torch']}{versions} on {machine['cpu']} "
        f"({machine['cores']} cores), threads {machine['threads']}, SIMD path {machine['simd']}, "
        f"parallel regions on {machine['backend']}, Python {machine['python']}, params {args.dtype}\n"
    )
    print(format_table(rows))
    for note in notes:
        print(f"Note: {note}")
    state_table = format_state_memory(rows)
    if state_table:
        print()
        print(state_table)
    print()
    print(format_torch_times(rows))
    if e2e:
        print()
        print(format_end_to_end(e2e))
    if memory is not None:
        print("\nMemory allocated by one steady-state Adam step on gpt2-small:")
        for label, m in memory.items():
            print(
                f"  {label:<20} torch ops {m['torch_bytes'] / 2**20:10.2f} MiB, rsoptim Rust "
                f"{m['rust_bytes'] / 2**10:8.1f} KiB in {m['rust_allocations']} allocations "
                f"({m['tensors']} tensors, params {m['param_bytes'] / 2**20:.0f} MiB)"
            )
    if points is not None:
        print(f"\nSize sweep (Adam, one tensor, GB/s), plotted to {args.plot}:")
        for dtype_name in dict.fromkeys(str(p["dtype"]) for p in points):
            curve = [p for p in points if p["dtype"] == dtype_name]
            labels = list(dict.fromkeys(k for p in curve for k in p if k not in ("dtype", "elements", "bytes_per_element")))
            print(f"  {dtype_name} ({curve[0]['bytes_per_element']} B/element):")
            print(f"  {'elements':>10} " + " ".join(f"{label:>16}" for label in labels))
            for p in curve:
                print(f"  {int(p['elements']):>10} " + " ".join(f"{p[label]:>16.1f}" if label in p else f"{'-':>16}" for label in labels))
    return 0


if __name__ == "__main__":
    sys.exit(main())
