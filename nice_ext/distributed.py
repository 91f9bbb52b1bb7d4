"""Data-parallel training on PyTorch's own engine: ``torchrun --nproc_per_node=N -m nice_ext.train ...``.

Every rank draws the same global batch (the same permutation and the same dequantization noise, from a
generator seeded identically on all ranks) and trains on its own slice of it; the loss is scaled so that
DistributedDataParallel's gradient average equals the gradient of the global batch's mean loss. A step
on N processes therefore matches a single-process step on the same global batch. NCCL on GPUs, gloo on
CPUs; logging, checkpoints and evaluation happen on rank 0.
"""

from __future__ import annotations

import gc
import os
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn


class LogProb(nn.Module):
    """The model's log_prob as a module's forward, which is what DistributedDataParallel wraps."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model.log_prob(x)


# How long the other ranks may wait at the end while rank 0 evaluates the test set and writes its outputs.
# The training collectives keep the process group's timeout (NCCL's default is 10 minutes), which is
# right for a step that hangs but too short for an evaluation of a larger dataset than MNIST.
LEAVE_TIMEOUT = timedelta(hours=24)


class Context:
    """Rank, world size and device of this process; a single-process context outside torchrun.

    ``timeout`` is the training collectives' (None: torch's default for the backend)."""

    def __init__(self, device_choice: str, timeout: Optional[timedelta] = None):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.enabled = self.world_size > 1
        self.rank = int(os.environ.get("RANK", "0"))
        self.device: Optional[torch.device] = None
        if not self.enabled:
            return
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = device_choice == "cuda" or (device_choice == "auto" and torch.cuda.is_available())
        if use_cuda:
            torch.cuda.set_device(local_rank)
            self.device = torch.device("cuda", local_rank)
        else:
            self.device = torch.device("cpu")
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=timeout)
        # The wait at the end goes through a gloo group of its own: a host-side barrier with its own
        # timeout, which no NCCL watchdog aborts.
        self._leave_group = dist.new_group(backend="gloo", timeout=LEAVE_TIMEOUT)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module whose forward gives log p(x): DDP-wrapped across processes, else plain."""
        module = LogProb(model)
        if not self.enabled:
            return module
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=device_ids)

    def local_slice(self, x: Tensor) -> Tensor:
        """This rank's part of a global batch (near-equal contiguous parts)."""
        return torch.tensor_split(x, self.world_size)[self.rank] if self.enabled else x

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank when ``flag`` is true on any rank (so all ranks stop together)."""
        if not self.enabled:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def sum(self, value: Tensor) -> Tensor:
        if self.enabled:
            value = value.clone()
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value

    def leave_together(self) -> None:
        """Wait, up to LEAVE_TIMEOUT, until every rank is here (rank 0 may still be evaluating)."""
        if self.enabled:
            dist.barrier(group=self._leave_group)

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            # Free what still holds the process group first (DistributedDataParallel's reducer can sit in a
            # reference cycle), so that its gloo threads stop here rather than during interpreter shutdown,
            # where a rank once aborted ("terminate called without an active exception").
            gc.collect()
            dist.destroy_process_group()
