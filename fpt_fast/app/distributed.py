"""Several processes started by torchrun: the process group, each process's device, and the few
collectives that training and preloading need.

torchrun starts one process per GPU and tells each where it stands through environment variables
(WORLD_SIZE, RANK, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT). ``process_group``
reads them, picks the process's device (cuda:LOCAL_RANK, or the CPU) and the backend that goes
with it (nccl on CUDA, gloo on the CPU), and initialises torch.distributed from them (env://).
Without those variables, or with WORLD_SIZE=1, nothing is initialised and everything below is the
single-process case: rank 0 of 1, collectives return their input.

``Group`` is what training and preloading use: rank, world size, a sum/max all-reduce of a few
numbers, all_gather_object, and two ways for rank 0 to go first while the others wait:
``broadcast_result`` (rank 0 alone does a step, e.g. writing a checkpoint, and hands over its
result) and ``main_first`` (rank 0 does it first, e.g. creating a file, then the others). An
error on rank 0 is raised on every process instead of leaving the others waiting.
"""
from __future__ import annotations

import gc
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Sequence, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")
TORCHRUN_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK")
# Errors that main_first and broadcast_result carry from rank 0 to the others as the same type.
CARRIED_ERRORS = {e.__name__: e for e in (ValueError, TypeError, FileNotFoundError)}


@dataclass(frozen=True)
class TorchrunEnv:
    """The place of this process among those torchrun started."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int


def _int_variable(name: str, default: Optional[int] = None) -> Optional[int]:
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"environment variable {name}={text!r} must be an integer (torchrun sets it)") from None


def torchrun_env() -> Optional[TorchrunEnv]:
    """This process's torchrun variables; None when not started by torchrun or when WORLD_SIZE is 1."""
    world_size = _int_variable("WORLD_SIZE")
    if world_size is None or world_size == 1:
        return None
    missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
    if missing:
        raise ValueError(f"WORLD_SIZE={world_size} is set but {', '.join(missing)} not: start several "
                         f"processes with torchrun (see README, 'Several GPUs and nodes')")
    rank, local_rank = _int_variable("RANK"), _int_variable("LOCAL_RANK")
    local_world_size = _int_variable("LOCAL_WORLD_SIZE", world_size)
    if world_size < 1 or not 0 <= rank < world_size or not 0 <= local_rank < local_world_size:
        raise ValueError(f"inconsistent torchrun variables: WORLD_SIZE={world_size}, RANK={rank}, "
                         f"LOCAL_RANK={local_rank}, LOCAL_WORLD_SIZE={local_world_size}")
    return TorchrunEnv(rank, world_size, local_rank, local_world_size)


def local_device(name: str) -> torch.device:
    """The device setting ``name`` ("auto", "cpu", "cuda", "cuda:1", ...) for this process.

    Under torchrun "auto" and "cuda" mean cuda:LOCAL_RANK (one GPU per process); a device with an
    explicit index is refused when several processes share the node, as they would share the GPU.
    In a process group set up without torchrun, they mean the current CUDA device.
    """
    env = torchrun_env()
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        name = "cuda"
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"device {name!r} is not a valid torch device: {e}") from None
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for but CUDA is not available")
    if env is None:
        if device.index is None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return torch.device("cuda", torch.cuda.current_device())  # a group set up by the caller
        return device
    if device.index is not None:
        if env.local_world_size > 1:
            raise ValueError(f"device {name!r} names one GPU, but torchrun started {env.local_world_size} "
                             f"processes on this node: use 'auto' or 'cuda' (process LOCAL_RANK gets "
                             f"cuda:LOCAL_RANK), and CUDA_VISIBLE_DEVICES to choose the GPUs")
        return device
    if env.local_rank >= torch.cuda.device_count():
        raise ValueError(f"LOCAL_RANK {env.local_rank} has no GPU of its own: {torch.cuda.device_count()} "
                         f"visible; --nproc_per_node must not exceed the GPUs of a node")
    return torch.device("cuda", env.local_rank)


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


@contextmanager
def process_group(device_name: str) -> Iterator[Optional[TorchrunEnv]]:
    """Initialises torch.distributed from torchrun's variables (backend by the device of
    ``device_name``) for the duration of the block, and tears it down afterwards. Does nothing
    (yields None) without torchrun, with one process, or when a group already exists."""
    env = torchrun_env()
    if env is None or dist.is_initialized():
        yield env
        return
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise ValueError(f"{', '.join(missing)} not set: start several processes with torchrun")
    device = local_device(device_name)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # nccl and all_gather_object use the current device
    dist.init_process_group(backend_for(device), init_method="env://")
    try:
        yield env
    finally:
        # A DistributedDataParallel kept alive by a reference cycle (a caught exception's traceback
        # holds the frames of the step that raised it) must go while its group still exists, not
        # at interpreter exit, where tearing it down after the group can abort the process.
        gc.collect()
        dist.destroy_process_group()


class Group:
    """The processes of a run: all of torch.distributed's default group, or just this one."""

    def __init__(self):
        self.active = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.rank = dist.get_rank() if self.active else 0
        self.world_size = dist.get_world_size() if self.active else 1
        # Small collectives go through the device the backend works on.
        self.device = torch.device("cpu")
        if self.active and dist.get_backend() == "nccl":
            self.device = torch.device("cuda", torch.cuda.current_device())

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, values: Sequence[float], op: str = "sum") -> List[float]:
        """values summed (op "sum") or maximised ("max") over the processes, in float64."""
        if not self.active:
            return [float(v) for v in values]
        tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
        return tensor.tolist()

    def all_gather_object(self, obj: T) -> List[T]:
        """[obj of rank 0, obj of rank 1, ...] on every process (any picklable object)."""
        if not self.active:
            return [obj]
        gathered: List[T] = [None] * self.world_size  # type: ignore[list-item]
        dist.all_gather_object(gathered, obj)
        return gathered

    def broadcast_result(self, fn: Callable[[], T]) -> T:
        """fn() run on rank 0 only; its result (or its error) handed to every process. The others
        wait meanwhile (e.g. while rank 0 writes a checkpoint)."""
        return self._main_then_others(fn, hand_over_result=True)

    def main_first(self, fn: Callable[[], T]) -> T:
        """fn() on rank 0 and, once it succeeded there, on every other process (e.g. rank 0
        creates a file the others then open); an error on rank 0 is raised on every process."""
        return self._main_then_others(fn, hand_over_result=False)

    def _main_then_others(self, fn: Callable[[], T], hand_over_result: bool) -> T:
        if not self.active:
            return fn()
        if self.is_main:
            try:
                result = fn()
            except BaseException as e:
                dist.broadcast_object_list([_error_message(e)], src=0)
                raise
            dist.broadcast_object_list([("ok", result if hand_over_result else None)], src=0)
            return result
        box = [None]
        dist.broadcast_object_list(box, src=0)
        if box[0][0] == "error":
            raise CARRIED_ERRORS.get(box[0][1], RuntimeError)(box[0][2])
        return box[0][1] if hand_over_result else fn()


def _error_message(e: BaseException) -> tuple:
    for name, cls in CARRIED_ERRORS.items():
        if isinstance(e, cls):
            return ("error", name, str(e))
    return ("error", "RuntimeError", f"process 0 stopped: {type(e).__name__}: {e}")
