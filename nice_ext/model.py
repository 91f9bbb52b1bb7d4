"""The NICE model (Dinh, Krueger & Bengio, 2014): coupling layers, diagonal scaling, factorised prior.

    h^(0) = x
    h^(l) = coupling_l(h^(l-1))          l = 1..L, kept / updated parts alternating (paper §3.2.3)
    z     = exp(s) * h^(L)               (§3.3)
    log p_X(x) = sum_d log p_H(z_d) + sum_d s_d (+ sum of the affine couplings' log-scales)

Coupling layers (additive and affine) and the scaling + prior run on the fused ops (``fused=True``, the
default) or on their pure-PyTorch reference (``fused=False``): the same mathematics and parameters, for
cross-checks and benchmarks. Inside torch.func transforms (``grad``, ``vmap``, ...) and forward-mode AD
(``torch.autograd.forward_ad``), which cannot go through the fused ops, a fused model runs the reference
path.
"""

from __future__ import annotations

import math
import operator
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from . import ops, reference
from .data import check_data_range, check_generator
from .masks import check_image_shape, check_mask, checkerboard_mask, coupling_maps, kept_index, odd_even_mask
from .mlp import CouplingMLP, input_grads_only

COUPLINGS = ("additive", "affine")
# How an affine coupling turns its network's output r into the log-scale a of y_I2 = x_I2 * exp(a) + b.
# "tanh": a = tanh(r), in (-1, 1). "unbounded": a = r, the law as the paper writes it, which the paper set
# aside for numerical stability (§3.2.2): with the MNIST setup (5 x 1000 ReLU layers, Adam at 1e-3) its
# scales compound through the layers and overflow to NaN within five steps.
AFFINE_LOG_SCALES = ops.AFFINE_LOG_SCALE_LAWS
PRIORS = ops.PRIORS


def use_fused(module: nn.Module) -> bool:
    """Whether a layer built with ``fused=True`` runs the fused ops now: everywhere but inside torch.func
    transforms and forward-mode AD, which cannot go through them (the reference computes the same
    function)."""
    return module.fused and not ops.functorch_transform_active() and not ops.forward_ad_active()


def count_argument(value, name: str) -> int:
    """A non-negative count given as any integer (Python, NumPy or a 0-d integer tensor), never a bool."""
    try:
        count = operator.index(value) if not isinstance(value, bool) else None
    except TypeError:
        count = None
    if count is None or count < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return count


def temperature_argument(value) -> float:
    """A finite temperature >= 0 given as any real number (a 0-d tensor too)."""
    try:
        temperature = float(value) if not isinstance(value, (bool, str, complex)) else math.nan
    except (TypeError, ValueError, RuntimeError):  # RuntimeError: a tensor of more than one element
        temperature = math.nan
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0, got {value!r}")
    return temperature


class CouplingLayer(nn.Module):
    """One coupling layer: y_I1 = x_I1, y_I2 = g(x_I2; m(x_I1)) with the kept part I1 given by ``mask``.

    ``forward(x, net_input)`` takes the layer input and its kept features x_I1 (contiguous) and returns
    (y, the next layer's kept features of y, log|det J| per row or None). Handing over the next layer's
    input lets the fused op write it in the same pass as y.
    """

    def __init__(self, mask: Tensor, prev_mask: Optional[Tensor], next_mask: Optional[Tensor], hidden_dim: int,
                 num_hidden_layers: int, coupling: str, fused: bool, affine_log_scale: str):
        super().__init__()
        self.coupling = coupling
        self.affine_log_scale = affine_log_scale
        self.fused = fused
        kept = int(mask.sum())
        updated = mask.numel() - kept
        out_features = updated if coupling == "additive" else 2 * updated
        self.net = CouplingMLP(kept, out_features, hidden_dim, num_hidden_layers)
        shift_col, next_gather = coupling_maps(mask, next_mask)
        _, prev_gather = coupling_maps(mask, prev_mask)
        self.register_buffer("mask", mask.clone(), persistent=False)
        self.register_buffer("shift_col", shift_col, persistent=False)
        self.register_buffer("next_gather", next_gather, persistent=False)  # forward: next layer's input
        self.register_buffer("prev_gather", prev_gather, persistent=False)  # inverse: previous layer's
        self.register_buffer("kept_index", kept_index(mask), persistent=False)

    def _additive(self, x: Tensor, shift: Tensor, gather: Tensor, inverse: bool) -> Tuple[Tensor, Tensor]:
        update = ops.coupling_update_indexed if use_fused(self) else reference.coupling_update
        return update(x, shift.to(x.dtype), self.shift_col, gather, inverse)

    def _affine(self, x: Tensor, params: Tensor, gather: Tensor, inverse: bool) -> Tuple[Tensor, Tensor, Tensor]:
        # Affine law (paper §3.2.2): y_I2 = x_I2 * exp(a) + b with a = law(r), log|det J| = sum a.
        raw, shift = params.to(x.dtype).chunk(2, dim=1)
        update = ops.affine_coupling_update_indexed if use_fused(self) else reference.affine_coupling_update
        return update(x, raw, shift, self.shift_col, gather, self.affine_log_scale, inverse)

    def forward(self, x: Tensor, net_input: Tensor) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        params = self.net(net_input)
        if self.coupling == "additive":
            y, next_input = self._additive(x, params, self.next_gather, inverse=False)
            return y, next_input, None
        return self._affine(x, params, self.next_gather, inverse=False)

    def inverse(self, y: Tensor, net_input: Tensor) -> Tuple[Tensor, Tensor]:
        params = self.net(net_input)
        if self.coupling == "additive":
            return self._additive(y, params, self.prev_gather, inverse=True)
        x, prev_input, _ = self._affine(y, params, self.prev_gather, inverse=True)
        return x, prev_input


def _build_masks(data_dim: int, num_layers: int, mask: Union[str, Tensor],
                 image_shape: Optional[Sequence[int]]) -> List[Tensor]:
    """Masks of the layers: layer 1 keeps I1 and updates I2, layer 2 the other way round, and so on."""
    if isinstance(mask, str):
        if mask == "odd-even":
            first = odd_even_mask(data_dim, keep_odd=True)
        elif mask == "checkerboard":
            if image_shape is None:
                raise ValueError("mask='checkerboard' needs image_shape=(C, H, W)")
            first = checkerboard_mask(image_shape, keep_black=True)
        else:
            raise ValueError(f"mask must be 'odd-even', 'checkerboard' or a bool tensor of length {data_dim}, "
                             f"got {mask!r}")
    else:
        first = check_mask(mask, data_dim)
    return [first if layer % 2 == 0 else ~first for layer in range(num_layers)]


def coupling_network_setting(name: str, doc: str) -> property:
    """A model-wide speed setting of the coupling networks (a bool attribute of each ``CouplingMLP``): true
    when every network has it; setting it sets it in all of them."""

    def get(model: "NICE") -> bool:
        return all(getattr(layer.net, name) for layer in model.layers)

    def set_(model: "NICE", enabled: bool) -> None:
        if not isinstance(enabled, bool):
            raise TypeError(f"{name} must be a bool, got {type(enabled).__name__}")
        for layer in model.layers:
            setattr(layer.net, name, enabled)

    return property(get, set_, doc=doc)


class NICE(nn.Module):
    """NICE: a stack of coupling layers, a diagonal scaling and a factorised prior.

    >>> model = NICE(data_dim=784, num_coupling_layers=4, num_hidden_layers=5, hidden_dim=1000)
    >>> z, log_det = model(x)          # the encoder f and log|det df/dx|, per row
    >>> log_px = model.log_prob(x)     # nats
    >>> x_back = model.inverse(z)      # the decoder f^-1

    ``coupling="affine"`` uses the law y_I2 = x_I2 * exp(a) + b with a = tanh(r) by default
    (``affine_log_scale="tanh"``); ``"unbounded"`` takes a = r (see ``AFFINE_LOG_SCALES``).
    ``overlap_weight_grads=True`` computes the coupling networks' weight gradients on a second CUDA stream,
    ``fuse_bias_relu=True`` their hidden layers as GEMMs with the bias and ReLU in the epilogue (see
    ``nice_ext.mlp``): speed settings that can also be changed later, never saved with the model.
    """

    def __init__(self, data_dim: int, num_coupling_layers: int = 4, num_hidden_layers: int = 5,
                 hidden_dim: int = 1000, prior: str = "logistic", coupling: str = "additive",
                 mask: Union[str, Tensor] = "odd-even", image_shape: Optional[Sequence[int]] = None,
                 data_range: Tuple[float, float] = (0.0, 1.0), fused: bool = True,
                 affine_log_scale: str = "tanh", overlap_weight_grads: bool = False,
                 fuse_bias_relu: bool = False):
        super().__init__()
        for name, value in (("data_dim", data_dim), ("num_coupling_layers", num_coupling_layers),
                            ("num_hidden_layers", num_hidden_layers), ("hidden_dim", hidden_dim)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if data_dim < 2:
            raise ValueError(f"data_dim must be at least 2 (a coupling splits the features), got {data_dim}")
        if num_coupling_layers < 1:
            raise ValueError(f"num_coupling_layers must be at least 1, got {num_coupling_layers}")
        if num_hidden_layers < 0 or hidden_dim < 1:
            raise ValueError(f"num_hidden_layers must be >= 0 and hidden_dim >= 1, got {num_hidden_layers}, "
                             f"{hidden_dim}")
        if prior not in PRIORS:
            raise ValueError(f"prior must be one of {PRIORS}, got {prior!r}")
        if coupling not in COUPLINGS:
            raise ValueError(f"coupling must be one of {COUPLINGS}, got {coupling!r}")
        if affine_log_scale not in AFFINE_LOG_SCALES:
            raise ValueError(f"affine_log_scale must be one of {AFFINE_LOG_SCALES}, got {affine_log_scale!r}")
        low, high = check_data_range(data_range)
        self.data_dim = data_dim
        self.prior = prior
        self.coupling = coupling
        self.affine_log_scale = affine_log_scale
        self.image_shape = check_image_shape(image_shape, data_dim) if image_shape is not None else None
        self.data_range = (low, high)
        self.fused = fused
        masks = _build_masks(data_dim, num_coupling_layers, mask, self.image_shape)
        self.layers = nn.ModuleList(
            CouplingLayer(masks[i], masks[i - 1] if i > 0 else None,
                          masks[i + 1] if i + 1 < len(masks) else None, hidden_dim, num_hidden_layers, coupling,
                          fused, affine_log_scale)
            for i in range(num_coupling_layers))
        self.overlap_weight_grads = overlap_weight_grads
        self.fuse_bias_relu = fuse_bias_relu
        # s of the scaling layer h = exp(s) * h^(L) (paper §3.3); exp(s) starts at 1.
        self.log_scale = nn.Parameter(torch.zeros(data_dim))
        self.config = dict(data_dim=data_dim, num_coupling_layers=num_coupling_layers,
                           num_hidden_layers=num_hidden_layers, hidden_dim=hidden_dim, prior=prior,
                           coupling=coupling, mask=mask if isinstance(mask, str) else mask.tolist(),
                           image_shape=self.image_shape, data_range=self.data_range,
                           affine_log_scale=affine_log_scale)

    overlap_weight_grads = coupling_network_setting(
        "overlap_weight_grads",
        """Whether the coupling networks compute their weight gradients on a second CUDA stream, beside the
        chain of input gradients (see ``nice_ext.mlp``): the same gradients, a shorter critical path at small
        batch sizes. A speed setting, not part of the model: it is not saved with it.""")
    fuse_bias_relu = coupling_network_setting(
        "fuse_bias_relu",
        """Whether the coupling networks compute each hidden layer as one GEMM whose epilogue adds the bias and
        applies the ReLU (see ``nice_ext.mlp``): the same values, one kernel fewer per hidden layer on CUDA. A
        speed setting, not part of the model: it is not saved with it.""")

    @torch.no_grad()
    def init_uniform_(self, weight_range: float) -> "NICE":
        """Re-initialise as the authors' released configurations do (pylearn2 ``irange``): every weight of
        every coupling network drawn from U(-weight_range, weight_range), every bias and the log-scales s
        zero. (The default initialisation is PyTorch's, with each network's last layer at zero so that the
        model starts as the identity.) Returns the model."""
        weight_range = float(weight_range)
        if not (math.isfinite(weight_range) and weight_range >= 0):
            raise ValueError(f"weight_range must be a finite number >= 0, got {weight_range}")
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.uniform_(module.weight, -weight_range, weight_range)
                nn.init.zeros_(module.bias)
        nn.init.zeros_(self.log_scale)
        return self

    # ---------------------------------------------------------------------------------------------
    def _check_input(self, x: Tensor, name: str = "x") -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
        if x.dim() != 2 or x.shape[1] != self.data_dim:
            raise ValueError(f"{name} must have shape (batch, {self.data_dim}), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
        if x.device != self.log_scale.device:
            raise ValueError(f"{name} is on {x.device} but the model is on {self.log_scale.device}")
        if x.dtype != self.log_scale.dtype:
            raise TypeError(f"{name} has dtype {x.dtype} but the model's parameters are {self.log_scale.dtype}")

    def _couplings(self, x: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        """h^(L) and the couplings' log|det J| (None for additive layers, whose determinant is 1)."""
        net_input = x.index_select(1, self.layers[0].kept_index)
        log_det = None
        for layer in self.layers:
            x, net_input, layer_log_det = layer(x, net_input)
            if layer_log_det is not None:
                log_det = layer_log_det if log_det is None else log_det + layer_log_det
        return x, log_det

    def _scale_prior(self, h: Tensor, compute_z: bool) -> Tuple[Tensor, Tensor]:
        if use_fused(self):
            return ops.scale_prior(h, self.log_scale, self.prior, compute_z=compute_z)
        return reference.scale_prior(h, self.log_scale, self.prior, compute_z)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """The encoder: z = f(x) and log|det df/dx| per row."""
        self._check_input(x)
        h, log_det = self._couplings(x)
        z = h * torch.exp(self.log_scale)
        scale_log_det = self.log_scale.sum().expand(x.shape[0])
        return z, scale_log_det if log_det is None else log_det + scale_log_det

    def log_prob(self, x: Tensor) -> Tensor:
        """log p_X(x) in nats, per row: sum_d log p_H(f_d(x)) + log|det df/dx| (paper eq. 2)."""
        self._check_input(x)
        h, log_det = self._couplings(x)
        _, log_prob = self._scale_prior(h, compute_z=False)  # includes sum_d s_d
        return log_prob if log_det is None else log_prob + log_det

    def inverse(self, z: Tensor) -> Tensor:
        """The decoder f^-1: exact inverse of ``forward``'s z."""
        self._check_input(z, "z")
        h = ops.scale_inverse(z, self.log_scale) if use_fused(self) else reference.scale_inverse(z, self.log_scale)
        net_input = h.index_select(1, self.layers[-1].kept_index)
        for layer in reversed(self.layers):
            h, net_input = layer.inverse(h, net_input)
        return h

    def sample_prior(self, n: int, temperature: float = 1.0, generator: Optional[torch.Generator] = None) -> Tensor:
        """n draws of the factorised prior, scaled by ``temperature``."""
        device, dtype = self.log_scale.device, self.log_scale.dtype
        check_generator(generator, device, "the model")
        if self.prior == "logistic":
            # Inverse CDF of the standard logistic: z = log u - log(1 - u), u ~ U(0, 1). torch.rand's u lies in
            # [0, 1 - eps/2] (1 - eps/2 is the last number below 1), so the upper tail ends at log(2/eps - 1),
            # 16.6 in float32; u is kept >= eps/2 so that the lower tail ends at its mirror image. (Kept off 0
            # by the dtype's smallest number instead, u = 0 gave z = -87: 2^-24 of the draws in float32 on a
            # CPU, 2^-8 in bfloat16.) Half dtypes draw in float32, whose grid is finer than their rounding.
            draw_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
            step = torch.finfo(draw_dtype).eps / 2
            u = torch.rand(n, self.data_dim, device=device, dtype=draw_dtype, generator=generator)
            u = u.clamp(step, 1 - step)
            z = (torch.log(u) - torch.log1p(-u)).to(dtype)
        else:
            z = torch.randn(n, self.data_dim, device=device, dtype=dtype, generator=generator)
        return z * temperature

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, generator: Optional[torch.Generator] = None) -> Tensor:
        """n samples x = f^-1(z), z ~ p_H (times ``temperature``), on the model's device and dtype. Samples
        beyond the dtype's range (a temperature of 1e38 in float32) are an OverflowError, not NaN."""
        n, temperature = count_argument(n, "n"), temperature_argument(temperature)
        x = self.inverse(self.sample_prior(n, temperature, generator))
        finite = torch.isfinite(x).all(dim=1)
        if not bool(finite.all()):  # one synchronisation per call: sampling is not a training step
            weights_finite = all(bool(torch.isfinite(p).all()) for p in self.parameters())
            why = (f"temperature {temperature} takes the prior's draws beyond what the decoder can map in {x.dtype}; "
                   "use a smaller one") if weights_finite else "the model's weights are not all finite"
            raise OverflowError(f"{n - int(finite.sum())} of the {n} samples are not finite: {why}")
        return x

    def inpaint(self, x: Tensor, observed: Tensor, steps: int = 10000, generator: Optional[torch.Generator] = None
                ) -> Tensor:
        """Fill the unobserved features of x (paper §5.2): projected noisy gradient ascent on log p,

            x_H <- clamp(x_H + a_i (d log p(x_O, x_H) / d x_H + eps)),  eps ~ N(0, I),  a_i = 10 / (100 + i),

        starting from uniform noise over the data range; the observed features stay fixed. As a_i falls as 1/i,
        the ascent needs many steps: 1,000 left MNIST fills further from the truth than mid-grey, 10,000 nearer
        (README, "Inpainting: how many steps").
        ``observed`` is a bool tensor of shape (D,) or (B, D). The unobserved features' values in x are not
        read (NaN may mark them); the observed ones must be finite.
        """
        self._check_input(x)
        if not isinstance(observed, Tensor) or observed.dtype != torch.bool:
            raise TypeError("observed must be a bool tensor of shape (D,) or (B, D)")
        if observed.shape not in ((self.data_dim,), tuple(x.shape)):
            raise ValueError(f"observed must have shape ({self.data_dim},) or {tuple(x.shape)}, "
                             f"got {tuple(observed.shape)}")
        steps = count_argument(steps, "steps")
        check_generator(generator, x.device, "x")
        low, high = self.data_range
        observed = observed.to(x.device).expand_as(x)
        if not torch.isfinite(x[observed]).all():
            raise ValueError("x has NaN or infinite values at observed features; only the unobserved ones may be "
                             "NaN")
        noise_init = torch.rand(x.shape, device=x.device, dtype=x.dtype, generator=generator) * (high - low) + low
        current = torch.where(observed, x, noise_init).detach()
        for i in range(steps):
            current.requires_grad_(True)
            with torch.enable_grad(), input_grads_only():
                grad, = torch.autograd.grad(self.log_prob(current).sum(), current)
            step = 10.0 / (100.0 + i)
            eps = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
            with torch.no_grad():
                proposal = (current + step * (grad + eps)).clamp(low, high)
                current = torch.where(observed, x, proposal)
        return current.detach()

    def extra_repr(self) -> str:
        affine = f", affine_log_scale={self.affine_log_scale!r}" if self.coupling == "affine" else ""
        return f"data_dim={self.data_dim}, prior={self.prior!r}, coupling={self.coupling!r}{affine}, fused={self.fused}"
