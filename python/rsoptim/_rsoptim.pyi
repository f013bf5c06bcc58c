"""Type stubs of the extension module rsoptim._rsoptim (the PyO3 binding of rsoptim-core).

Buffer arguments are lists of addresses, one per tensor, of CPU buffers that the caller keeps
alive for the call; `numels` gives each tensor's element count. Every buffer is checked (null,
alignment, overlap with a written buffer) before anything is written; problems raise ValueError.
"""

CHUNK: int

def adam_step(
    dtype: str,
    step_dtype: str,
    numels: list[int],
    params: list[int],
    grads: list[int],
    exp_avgs: list[int],
    exp_avg_sqs: list[int],
    max_exp_avg_sqs: list[int] | None,
    steps: list[int],
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
) -> None: ...
def sgd_step(
    dtype: str,
    numels: list[int],
    params: list[int],
    grads: list[int],
    momentum_buffers: list[int] | None,
    momentum_buffers_are_new: list[bool],
    *,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
) -> None: ...
def rmsprop_step(
    dtype: str,
    step_dtype: str,
    numels: list[int],
    params: list[int],
    grads: list[int],
    square_avgs: list[int],
    momentum_buffers: list[int] | None,
    grad_avgs: list[int] | None,
    steps: list[int],
    *,
    lr: float,
    alpha: float,
    eps: float,
    weight_decay: float,
    momentum: float,
    centered: bool,
    maximize: bool,
) -> None: ...
def tensor_norms(dtype: str, numels: list[int], tensors: list[int], norm_type: float) -> list[float]: ...
def scale_(dtype: str, numels: list[int], tensors: list[int], factor: float) -> None: ...
def set_num_threads(threads: int) -> None: ...
def get_num_threads() -> int: ...
def simd_level() -> str: ...
def available_simd_levels() -> list[str]: ...
def set_simd_level(name: str) -> None: ...
def stream_probe(dtype: str, numels: list[int], read: list[int], written: list[list[int]]) -> None: ...
def allocation_counters() -> tuple[int, int]: ...
