"""The coupling network m (paper §5.1): a ReLU MLP with linear output units, from a coupling layer's kept
features to its updated ones.

Its backward can take the weight gradients off the critical path. Per layer, the backward is three GEMMs:
the input gradient g W, which the next layer down waits for, and the weight and bias gradients g^T h and
sum(g), which only the optimizer reads. At the paper's batch size of 200 each GEMM occupies a few of a
GPU's multiprocessors, so a step is a chain of small GEMMs that leaves most of the GPU idle. With
``overlap_weight_grads`` the network's backward computes the weight and bias gradients on a second CUDA
stream, beside the chain of input gradients, and joins the two streams before it returns. The numbers are
those of the plain backward (the same operators on the same operands); captured in a CUDA graph
(``train --cuda-graph``), the two streams become two branches of the graph. On a CPU it is the same
computation on one stream.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from . import ops


class CouplingMLP(nn.Sequential):
    """``num_hidden_layers`` × (Linear, ReLU) and a Linear output layer that starts at zero, so that every
    coupling layer starts as the identity. The modules (and so the parameter names) are those of the
    equivalent ``nn.Sequential``.

    ``overlap_weight_grads``: compute the weight and bias gradients on a second CUDA stream (see the module
    docstring). Used when gradients are recorded, outside torch.compile, autocast, torch.func transforms,
    forward-mode AD and ``input_grads_only()``; elsewhere the network runs as a plain ``nn.Sequential``.
    A backward with ``create_graph=True`` runs the network's forward a second time, so that its gradients
    can be differentiated again."""

    def __init__(self, in_features: int, out_features: int, hidden_dim: int, num_hidden_layers: int,
                 overlap_weight_grads: bool = False):
        layers: List[nn.Module] = []
        width = in_features
        for _ in range(num_hidden_layers):
            layers += [nn.Linear(width, hidden_dim), nn.ReLU()]
            width = hidden_dim
        out = nn.Linear(width, out_features)
        nn.init.zeros_(out.weight)
        nn.init.zeros_(out.bias)
        layers.append(out)
        super().__init__(*layers)
        self.overlap_weight_grads = overlap_weight_grads

    def linears(self) -> List[nn.Linear]:
        return [module for module in self if isinstance(module, nn.Linear)]

    def _overlap_applies(self, x: Tensor) -> bool:
        return (self.overlap_weight_grads and torch.is_grad_enabled() and not _local.input_grads_only
                and not torch.compiler.is_compiling()
                and not torch.is_autocast_enabled(x.device.type) and not ops.functorch_transform_active()
                and not ops.forward_ad_active()
                and (x.requires_grad or any(p.requires_grad for p in self.parameters())))

    def forward(self, x: Tensor) -> Tensor:
        if not self._overlap_applies(x):
            return super().forward(x)
        params = [p for linear in self.linears() for p in (linear.weight, linear.bias)]
        return _ReluMLPOverlappedBackward.apply(x, *params)

    def extra_repr(self) -> str:
        return "overlap_weight_grads=True" if self.overlap_weight_grads else ""


class _Local(threading.local):
    input_grads_only = False


_local = _Local()


@contextlib.contextmanager
def input_grads_only():
    """For a backward that asks for the input's gradient alone (``torch.autograd.grad(log_p, x)``, as
    inpainting does): within the block the coupling networks run as plain ``nn.Sequential`` even with
    ``overlap_weight_grads``, so that autograd leaves out the weight gradients, which the overlapped
    backward would compute whatever was asked. Per thread."""
    before, _local.input_grads_only = _local.input_grads_only, True
    try:
        yield
    finally:
        _local.input_grads_only = before


_side_streams: Dict[torch.device, "torch.cuda.Stream"] = {}


def _weight_grad_streams(device: torch.device):
    """(main, side): the stream the backward runs on and the one for the weight gradients, or (None, None)
    off CUDA. The side stream is made once per device, so that a CUDA graph's warm-up steps and its capture
    use the same one (and the cuBLAS workspace made for it on its first use)."""
    if device.type != "cuda":
        return None, None
    if device not in _side_streams:
        _side_streams[device] = torch.cuda.Stream(device)
    return torch.cuda.current_stream(device), _side_streams[device]


def _on_stream(stream):
    """Launches in the ``with`` block go to ``stream`` (None: where they would go anyway)."""
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


def _relu_mlp(x: Tensor, params: Sequence[Tensor], activations: Optional[List[Tensor]] = None) -> Tensor:
    """h_0 = x, h_{l+1} = relu(h_l W_l^T + b_l), the output h_L W_L^T + b_L (params: W_0, b_0, W_1, b_1, ...);
    appends h_1 .. h_L to ``activations`` when given."""
    weights, biases = params[0::2], params[1::2]
    h = x
    for i, (weight, bias) in enumerate(zip(weights, biases)):
        h = torch.nn.functional.linear(h, weight, bias)
        if i + 1 < len(weights):
            h = torch.relu_(h)  # (linear's output: nothing else reads it)
            if activations is not None:
                activations.append(h)
    return h


class _ReluMLPOverlappedBackward(torch.autograd.Function):
    """The coupling network (``_relu_mlp``) whose backward computes W_l's and b_l's gradients on a side
    stream (CUDA) while the main stream goes on down the chain of input gradients."""

    @staticmethod
    def forward(ctx, x: Tensor, *params: Tensor) -> Tensor:
        activations: List[Tensor] = []
        out = _relu_mlp(x, params, activations)
        ctx.layers = len(params) // 2
        ctx.save_for_backward(x, *params, *activations)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        saved = ctx.saved_tensors
        count = ctx.layers
        x, params, activations = saved[0], saved[1:1 + 2 * count], saved[1 + 2 * count:]
        needs = ctx.needs_input_grad  # (x, W_0, b_0, W_1, b_1, ...)
        if torch.is_grad_enabled():  # create_graph=True
            return _differentiable_backward(x, params, grad_out, needs)
        inputs, weights = (x, *activations), params[0::2]  # the input of each linear layer, and its weight
        main, side = _weight_grad_streams(grad_out.device)
        grads: List[Optional[Tensor]] = [None] * (2 * count)
        # Tensors the side stream reads, held until the streams join: freed earlier, the main stream could
        # reuse their memory while the side stream still reads it.
        side_reads: List[Tensor] = []
        g = grad_out
        for i in reversed(range(count)):
            if i + 1 < count:  # back through the ReLU that made inputs[i + 1], as autograd does it
                g = torch.ops.aten.threshold_backward(g, inputs[i + 1], 0)
            need_weight, need_bias = needs[1 + 2 * i], needs[2 + 2 * i]
            if need_weight or need_bias:
                # Allocated on the main stream, written on the side stream, read after the join.
                grad_weight = torch.empty_like(weights[i]) if need_weight else None
                grad_bias = weights[i].new_empty(weights[i].shape[0]) if need_bias else None
                if side is not None:
                    side.wait_stream(main)
                    side_reads += [g, inputs[i]]
                with _on_stream(side):
                    if need_weight:  # as autograd's mm backward computes it: g^T h, row-major
                        torch.mm(g.t(), inputs[i], out=grad_weight)
                    if need_bias:
                        torch.sum(g, 0, out=grad_bias)
                grads[2 * i], grads[2 * i + 1] = grad_weight, grad_bias
            if i > 0 or needs[0]:
                g = g.mm(weights[i])
        if side is not None:
            main.wait_stream(side)
        del side_reads
        return (g if needs[0] else None, *grads)


def _differentiable_backward(x: Tensor, params: Sequence[Tensor], grad_out: Tensor, needs: Sequence[bool]):
    """The gradients as a graph that can be differentiated again (create_graph=True), as the fused ops'
    backwards give them. The activations the forward saved carry no history, so the network is run again
    from its input and parameters (saved inputs, which do) and autograd differentiates that: a second
    forward, only for higher-order gradients."""
    with torch.enable_grad():
        out = _relu_mlp(x, params)
        wanted = [t for t, need in zip((x, *params), needs) if need]
        found = iter(torch.autograd.grad(out, wanted, grad_out, create_graph=True))
    return tuple(next(found) if need else None for need in needs)

