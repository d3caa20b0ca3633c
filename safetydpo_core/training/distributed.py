"""Data-parallel training across processes: the small interface the trainer needs, and its accelerate glue.

The trainer stays backend-neutral: it sees a :class:`ProcessGroup` (``world_size``, ``rank``, ``is_main``,
in-place ``all_reduce_sum_`` and ``broadcast_``). :class:`SingleProcess` is the default; :class:`TorchGroup`
wraps the default ``torch.distributed`` process group. :func:`from_environment` detects a run started by
``accelerate launch`` (or ``torchrun``), lets accelerate's :class:`~accelerate.PartialState` set up the
process group (NCCL on GPUs, gloo on CPUs) and the per-process device, and reads accelerate's mixed
precision setting.

How a step is split: with ``world_size`` processes and ``grad_accum`` micro-steps per process, one optimiser
step has ``G = grad_accum * world_size`` micro-steps; process ``rank`` runs the global micro-steps
``local * world_size + rank``. Every random draw of a micro-step is keyed on its global index, so two
processes with accumulation 1 see exactly the data and noise of one process with accumulation 2. Each
process divides its losses by ``G``; summing the gradients across processes then gives the single-process
gradient, and every process takes the same optimiser step.
"""

from __future__ import annotations

import logging
import os
from typing import Protocol

import torch

from ..errors import ConfigError

log = logging.getLogger(__name__)

_LAUNCH_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


class ProcessGroup(Protocol):
    world_size: int
    rank: int

    @property
    def is_main(self) -> bool: ...

    def all_reduce_sum_(self, tensor: torch.Tensor) -> torch.Tensor: ...

    def broadcast_(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor: ...

    def barrier(self) -> None: ...


class SingleProcess:
    """One process: reductions are the identity."""

    world_size = 1
    rank = 0
    is_main = True

    def all_reduce_sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def broadcast_(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        return tensor

    def barrier(self) -> None:
        return None

    def __repr__(self) -> str:
        return "SingleProcess()"


class TorchGroup:
    """The default ``torch.distributed`` process group (set up by accelerate, torchrun or the caller)."""

    def __init__(self, device: torch.device | None = None):
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise ConfigError("torch.distributed is not initialised; start the run with `accelerate launch` or torchrun.")
        self._dist = dist
        self.world_size = dist.get_world_size()
        self.rank = dist.get_rank()
        backend = dist.get_backend()
        # NCCL reduces CUDA tensors only; gloo reduces CPU tensors
        self.device = torch.device(device) if device is not None and "nccl" in str(backend) else torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        buf = tensor.to(self.device)
        self._dist.all_reduce(buf, op=self._dist.ReduceOp.SUM)
        if buf is not tensor:
            tensor.copy_(buf)
        return tensor

    def broadcast_(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        buf = tensor.to(self.device)
        self._dist.broadcast(buf, src=src)
        if buf is not tensor:
            tensor.copy_(buf)
        return tensor

    def barrier(self) -> None:
        if self.world_size > 1:
            self._dist.barrier()

    def __repr__(self) -> str:
        return f"TorchGroup(rank={self.rank}, world_size={self.world_size}, backend={self._dist.get_backend()})"


def launched_distributed() -> bool:
    """True when this process was started as one of several (accelerate launch, torchrun, mpirun)."""
    for var in _LAUNCH_VARS:
        try:
            if int(os.environ.get(var, "1")) > 1:
                return True
        except ValueError:
            continue
    return False


def accelerate_mixed_precision() -> str | None:
    """The mixed precision that ``accelerate launch --mixed_precision`` or its config file chose, if any."""
    mp = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if mp in ("no", "fp16", "bf16"):
        return mp
    if mp:
        log.warning("accelerate's mixed precision %r is not supported here; using the --mixed-precision setting.", mp)
    return None


class Environment:
    """What a training process needs to know about its place in a run."""

    def __init__(self, group: ProcessGroup, device: torch.device | None, mixed_precision: str | None,
                 description: str):
        self.group = group
        self.device = device
        self.mixed_precision = mixed_precision
        self.description = description

    @property
    def is_main(self) -> bool:
        return self.group.is_main

    def close(self) -> None:
        """Wait for every process, then take the process group down (after a successful run)."""
        if self.group.world_size > 1:
            import torch.distributed as dist

            self.group.barrier()
            if dist.is_initialized():
                dist.destroy_process_group()


def from_environment(device: str = "auto") -> Environment:
    """Single process, or the process group of an ``accelerate launch`` / ``torchrun`` run.

    ``device`` "auto" takes accelerate's per-process device (``cuda:LOCAL_RANK`` on GPUs, ``cpu`` without).
    """
    mp = accelerate_mixed_precision()
    if not launched_distributed():
        return Environment(SingleProcess(), None, mp, "single process")
    try:
        from accelerate import PartialState
    except ImportError as e:  # pragma: no cover - accelerate is installed wherever `accelerate launch` is
        raise ConfigError("This run was started as several processes, but accelerate is not installed: "
                          "pip install accelerate.") from e
    want_cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    state = PartialState(cpu=want_cpu)
    if state.num_processes <= 1:
        return Environment(SingleProcess(), None, mp, "single process")
    dev = torch.device(state.device) if device == "auto" else torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", state.local_process_index)
    group = TorchGroup(dev)
    desc = (f"process {state.process_index} of {state.num_processes} ({state.distributed_type.value.lower()}, "
            f"backend {state.backend}, device {dev})")
    return Environment(group, dev, mp, desc)
