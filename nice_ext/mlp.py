"""The coupling network m (paper §5.1): a ReLU MLP with linear output units, from a coupling layer's kept
features to its updated ones.

Two speed settings give it a forward and backward of its own; both compute what the plain network computes.

``overlap_weight_grads`` takes the weight gradients off the critical path. Per layer, the backward is three
GEMMs: the input gradient g W, which the next layer down waits for, and the weight and bias gradients
g^T h and sum(g), which only the optimizer reads. At the paper's batch size of 200 each GEMM occupies a few
of a GPU's multiprocessors, so a step is a chain of small GEMMs that leaves most of the GPU idle. With the
setting on, the network's backward computes the weight and bias gradients on a second CUDA stream, beside
the chain of input gradients, and joins the two streams before it returns. The numbers are those of the
plain backward (the same operators on the same operands); captured in a CUDA graph (``train
--cuda-graph``), the two streams become two branches of the graph. On a CPU it is the same computation on
one stream.

``fuse_bias_relu`` computes each hidden layer as one GEMM whose epilogue adds the bias and applies the ReLU
(``torch._addmm_activation``: cuBLASLt's RELU_BIAS epilogue on CUDA), so the chain loses one elementwise
kernel per hidden layer. That operator has no autograd formula, which is why it needs the network's own
backward. On a CPU it is addmm followed by an in-place ReLU: the plain network's bits.
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

    ``overlap_weight_grads``: compute the weight and bias gradients on a second CUDA stream;
    ``fuse_bias_relu``: each hidden layer as one GEMM with the bias and ReLU in its epilogue (see the module
    docstring). Speed settings, used on 2-D inputs outside torch.compile, autocast, torch.func transforms
    and forward-mode AD; elsewhere the network runs as a plain ``nn.Sequential``. When gradients are
    recorded they also need ``input_grads_only()`` to be off. A backward with ``create_graph=True`` runs the
    network's forward a second time, so that its gradients can be differentiated again."""

    def __init__(self, in_features: int, out_features: int, hidden_dim: int, num_hidden_layers: int,
                 overlap_weight_grads: bool = False, fuse_bias_relu: bool = False):
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
        self.fuse_bias_relu = fuse_bias_relu

    def linears(self) -> List[nn.Linear]:
        return [module for module in self if isinstance(module, nn.Linear)]

    def _own_path_applies(self, x: Tensor) -> bool:
        return ((self.overlap_weight_grads or self.fuse_bias_relu) and x.dim() == 2
                and not torch.compiler.is_compiling()
                and not torch.is_autocast_enabled(x.device.type) and not ops.functorch_transform_active()
                and not ops.forward_ad_active())

    def forward(self, x: Tensor) -> Tensor:
        if not self._own_path_applies(x):
            return super().forward(x)
        params = [p for linear in self.linears() for p in (linear.weight, linear.bias)]
        records_grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))
        if not records_grad:  # nothing to differentiate: the forward alone, with the epilogues where asked for
            return _relu_mlp(x, params, fuse_bias_relu=self.fuse_bias_relu)
        if _local.input_grads_only:
            return super().forward(x)
        return _ReluMLP.apply(x, self.overlap_weight_grads, self.fuse_bias_relu, *params)

    def extra_repr(self) -> str:
        return ", ".join(f"{name}=True" for name in ("overlap_weight_grads", "fuse_bias_relu") if getattr(self, name))


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


def _relu_mlp(x: Tensor, params: Sequence[Tensor], activations: Optional[List[Tensor]] = None,
              fuse_bias_relu: bool = False) -> Tensor:
    """h_0 = x, h_{l+1} = relu(h_l W_l^T + b_l), the output h_L W_L^T + b_L (params: W_0, b_0, W_1, b_1, ...);
    appends h_1 .. h_L to ``activations`` when given. ``fuse_bias_relu``: each hidden layer as one GEMM with
    the bias and ReLU in its epilogue (no autograd formula: for forwards that record no gradients)."""
    weights, biases = params[0::2], params[1::2]
    h = x
    for i, (weight, bias) in enumerate(zip(weights, biases)):
        if i + 1 == len(weights):
            h = torch.nn.functional.linear(h, weight, bias)
        elif fuse_bias_relu:
            h = torch._addmm_activation(bias, h, weight.t())  # relu(b + h W^T), as linear's addmm, then relu
        else:
            h = torch.relu_(torch.nn.functional.linear(h, weight, bias))  # (linear's output: nothing else reads it)
        if activations is not None and i + 1 < len(weights):
            activations.append(h)
    return h


class _ReluMLP(torch.autograd.Function):
    """The coupling network (``_relu_mlp``) with a backward of its own: for ``overlap``, W_l's and b_l's
    gradients on a side stream (CUDA) while the main stream goes on down the chain of input gradients; for
    ``fuse_bias_relu``, the forward's GEMMs with their epilogues, which autograd cannot differentiate."""

    @staticmethod
    def forward(ctx, x: Tensor, overlap: bool, fuse_bias_relu: bool, *params: Tensor) -> Tensor:
        activations: List[Tensor] = []
        out = _relu_mlp(x, params, activations, fuse_bias_relu)
        ctx.layers, ctx.overlap = len(params) // 2, overlap
        ctx.save_for_backward(x, *params, *activations)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        saved = ctx.saved_tensors
        count = ctx.layers
        x, params, activations = saved[0], saved[1:1 + 2 * count], saved[1 + 2 * count:]
        needs = (ctx.needs_input_grad[0], *ctx.needs_input_grad[3:])  # (x, W_0, b_0, W_1, b_1, ...)
        if torch.is_grad_enabled():  # create_graph=True
            grads = _differentiable_backward(x, params, grad_out, needs)
        else:
            streams = _weight_grad_streams(grad_out.device) if ctx.overlap else (None, None)
            grads = _backward(x, params, activations, grad_out, needs, *streams)
        return (grads[0], None, None, *grads[1:])


def _backward(x: Tensor, params: Sequence[Tensor], activations: Sequence[Tensor], grad_out: Tensor,
              needs: Sequence[bool], main, side) -> tuple:
    """The gradients for (x, W_0, b_0, W_1, ...) that ``needs`` asks for, with the operators autograd's
    backward of the plain network uses. With a side stream, each layer's weight and bias gradients run
    there, after a wait for the main stream (where that layer's g was made)."""
    count = len(params) // 2
    inputs, weights = (x, *activations), params[0::2]  # the input of each linear layer, and its weight
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

