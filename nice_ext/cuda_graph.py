"""A whole training step (forward, backward, gradient clipping, optimizer update) captured once in a CUDA
graph and replayed.

At the paper's batch size of 200 a NICE step is a few hundred small kernels; launched one by one from
Python, the host is the bottleneck, not the GPU. Replaying a captured graph is one launch per step.

The first ``warmup_steps`` calls run eagerly (real steps on real batches, on a side stream, as capture
requires) so that lazily created state (the optimizer's moments, cuBLAS workspaces) exists before the
capture; the next call captures the step and replays it. A batch of another shape (the last, smaller
batch of an epoch) runs eagerly. Requirements: a CUDA model, an optimizer built with ``capturable=True``,
and no host synchronisation inside ``loss_fn``.
"""
from typing import Callable, Iterable, List, Optional

import torch
from torch import Tensor


def optimizer_step(loss_fn: Callable[[Tensor], Tensor], optimizer: torch.optim.Optimizer, parameters: List[Tensor],
                   clip_grad: Optional[float], x: Tensor) -> Tensor:
    """One eager training step on the batch x (the step a graph captures); returns the detached loss."""
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(x)
    loss.backward()
    if clip_grad is not None:
        torch.nn.utils.clip_grad_norm_(parameters, clip_grad)
    optimizer.step()
    return loss.detach()


class GraphedTrainStep:
    def __init__(self, loss_fn: Callable[[Tensor], Tensor], optimizer: torch.optim.Optimizer,
                 parameters: Iterable[torch.nn.Parameter], clip_grad: Optional[float] = None, warmup_steps: int = 3):
        for group in optimizer.param_groups:
            if not group.get("capturable", False):
                raise ValueError("GraphedTrainStep needs an optimizer created with capturable=True")
        if warmup_steps < 1:
            raise ValueError(f"warmup_steps must be at least 1, got {warmup_steps}")
        self.loss_fn, self.optimizer, self.clip_grad = loss_fn, optimizer, clip_grad
        self.parameters = list(parameters)
        self.warmup_left = warmup_steps
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.static_input: Optional[Tensor] = None
        self.static_loss: Optional[Tensor] = None

    def _step(self, x: Tensor) -> Tensor:
        return optimizer_step(self.loss_fn, self.optimizer, self.parameters, self.clip_grad, x)

    def __call__(self, x: Tensor) -> Tensor:
        """One optimizer step on the batch x; returns the loss (a tensor valid until the next call)."""
        if x.device.type != "cuda":
            raise ValueError(f"GraphedTrainStep runs on CUDA tensors, got a batch on {x.device}")
        if self.graph is not None:
            if x.shape != self.static_input.shape:
                return self._step(x)
            self.static_input.copy_(x)
            self.graph.replay()
            return self.static_loss
        if self.warmup_left > 0:
            self.warmup_left -= 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                loss = self._step(x)
            torch.cuda.current_stream().wait_stream(side)
            return loss
        self.static_input = x.detach().clone()
        self.graph = torch.cuda.CUDAGraph()
        # Records the step; nothing runs until replay. "thread_local": what other threads do meanwhile (training's
        # file writer, see files.BackgroundWriter) cannot invalidate the capture.
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.static_loss = self._step(self.static_input)
        self.graph.replay()
        return self.static_loss
