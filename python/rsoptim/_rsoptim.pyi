"""Type stubs of the extension module rsoptim._rsoptim (the PyO3 binding of rsoptim-core).

Buffer arguments are packed columns (native 64-bit words, `array('Q', ...).tobytes()`) of
addresses, one per tensor, of CPU buffers that the caller keeps alive for the call; `numels`
gives each tensor's element count. Every buffer is checked (null,
alignment, overlap with a written buffer) before anything is written; problems raise ValueError
(BufferOverlapError when a written buffer shares memory with another buffer of the call). With
`guard_tensors` (the tensors those addresses were read from), `guard_addresses` (the addresses
read, packed alike) and `guard_numels` (their element counts), a kernel first checks that each
tensor's data is still at its address with that many elements inside its storage, and raises
MemoryMovedError, writing nothing, if not.
Calls from different threads that share memory (a write on either side) run one after the other.
"""

from collections.abc import Callable
from typing import Any

CHUNK: int
QUANT_BLOCK: int

class BufferOverlapError(ValueError): ...
class MemoryMovedError(RuntimeError): ...

def adam_step(
    dtype: str,
    step_dtype: str,
    numels: bytes,
    params: bytes,
    grads: bytes,
    exp_avgs: bytes,
    exp_avg_sqs: bytes,
    max_exp_avg_sqs: bytes | None,
    steps: bytes,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    maximize: bool,
    decoupled_weight_decay: bool,
    lr_in_f32: bool = False,
    state_dtype: str | None = None,
    master_params: bytes | None = None,
    stochastic_rounding_seed: int | None = None,
    streams: bytes | None = None,
    grad_scale: float = 1.0,
    guard_tensors: list[Any] | None = None,
    guard_addresses: bytes | None = None,
    guard_numels: bytes | None = None,
) -> None: ...
def adam8bit_step(
    dtype: str,
    step_dtype: str,
    numels: bytes,
    params: bytes,
    grads: bytes,
    exp_avg_codes: bytes,
    exp_avg_sq_codes: bytes,
    exp_avg_scales: bytes,
    exp_avg_sq_scales: bytes,
    steps: bytes,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
    decoupled_weight_decay: bool,
    lr_in_f32: bool = False,
    master_params: bytes | None = None,
    stochastic_rounding_seed: int | None = None,
    streams: bytes | None = None,
    grad_scale: float = 1.0,
    guard_tensors: list[Any] | None = None,
    guard_addresses: bytes | None = None,
    guard_numels: bytes | None = None,
) -> None: ...
def sgd_step(
    dtype: str,
    numels: bytes,
    params: bytes,
    grads: bytes,
    momentum_buffers: bytes | None,
    momentum_buffers_are_new: list[bool],
    *,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    state_dtype: str | None = None,
    master_params: bytes | None = None,
    stochastic_rounding_seed: int | None = None,
    streams: bytes | None = None,
    step_dtype: str | None = None,
    steps: bytes | None = None,
    grad_scale: float = 1.0,
    guard_tensors: list[Any] | None = None,
    guard_addresses: bytes | None = None,
    guard_numels: bytes | None = None,
) -> None: ...
def rmsprop_step(
    dtype: str,
    step_dtype: str,
    numels: bytes,
    params: bytes,
    grads: bytes,
    square_avgs: bytes,
    momentum_buffers: bytes | None,
    grad_avgs: bytes | None,
    steps: bytes,
    *,
    lr: float,
    alpha: float,
    eps: float,
    weight_decay: float,
    momentum: float,
    centered: bool,
    maximize: bool,
    state_dtype: str | None = None,
    master_params: bytes | None = None,
    stochastic_rounding_seed: int | None = None,
    streams: bytes | None = None,
    grad_scale: float = 1.0,
    guard_tensors: list[Any] | None = None,
    guard_addresses: bytes | None = None,
    guard_numels: bytes | None = None,
) -> None: ...
def round_params(
    dtype: str,
    numels: bytes,
    sources: bytes,
    params: bytes,
    steps: list[float],
    *,
    stochastic_rounding_seed: int | None = None,
    streams: bytes | None = None,
    guard_tensors: list[Any] | None = None,
    guard_addresses: bytes | None = None,
    guard_numels: bytes | None = None,
) -> None: ...
def tensor_norms(
    dtype: str, numels: bytes, tensors: bytes, norm_type: float, *, guard_tensors: list[Any] | None = None, guard_addresses: bytes | None = None,
    guard_numels: bytes | None = None,
) -> list[float]: ...
def scale_(
    dtype: str, numels: bytes, tensors: bytes, factor: float, *, guard_tensors: list[Any] | None = None, guard_addresses: bytes | None = None,
    guard_numels: bytes | None = None,
) -> None: ...
def set_num_threads(threads: int) -> None: ...
def get_num_threads() -> int: ...
def simd_level() -> str: ...
def available_simd_levels() -> list[str]: ...
def set_simd_level(name: str) -> None: ...
def stream_probe(dtype: str, numels: bytes, read: bytes, written: list[bytes]) -> None: ...
def allocation_counters() -> tuple[int, int]: ...
def use_openmp(path: str | None) -> bool: ...
def use_torch_abi(path: str | None, read_neg_bit: bool = True) -> bool: ...
def torch_abi_reads_neg_bit() -> bool: ...
def tensor_addresses(impls: bytes, numels: bytes, dtypes: bytes, shape_of: bytes) -> bytes | None: ...
def use_tensor_readers(
    plain_types: list[type],
    cdata: object,
    is_neg: object,
    torch_function_off: object,
    untyped_storage: object,
    samples: list[object] = ...,
) -> bool: ...
def plan_addresses(
    tensors: list[object],
    numels: bytes,
    dtypes: bytes,
    shape_of: bytes,
    holder: list[object] | None = None,
    hold_from: int = 0,
    hold_to: int = ...,
) -> bytes | None: ...
def gather_plan_tensors(params: list[object], state_dicts: list[object], keys: tuple[str, ...]) -> list[object] | None: ...
def parallel_backend() -> str: ...
def reset_after_fork() -> None: ...
def pause_collector() -> None: ...
def resume_collector(*_exc: object) -> None: ...
def at_resume(undo: Callable[..., object], *args: object) -> None: ...
def collector_pauses() -> int: ...
