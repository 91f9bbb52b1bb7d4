"""Pure-PyTorch reference of every nice_ext operator, with the same signatures as ``torch.ops.nice_ext``.

Tests compare the fused kernels with these, and the benchmarks time them (eager and under
torch.compile): one definition, so the two can never drift apart. They are written the way a user
would write them without fused kernels: static shapes, no data-dependent indexing.

The backward ops' references (``*_backward``) are also what a higher-order gradient differentiates:
``nice_ext/ops.py`` registers them as the ``*_backward_composite`` ops, which the backward ops' autograd
runs when a backward is itself recorded (``create_graph=True``).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

_LOG_2PI = math.log(2 * math.pi)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the ops compute in: float32 for half inputs (as the kernels accumulate), else the input's."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _affine_log_scale(log_scale_raw: Tensor, log_scale_law: str) -> Tensor:
    """The affine coupling's log-scale a from its network's output r: tanh(r), or r itself ('unbounded')."""
    if log_scale_law == "tanh":
        return torch.tanh(log_scale_raw)
    if log_scale_law == "unbounded":
        return log_scale_raw
    raise ValueError(f"log_scale_law must be 'tanh' or 'unbounded', got {log_scale_law!r}")


def coupling_update(x: Tensor, shift: Tensor, shift_col: Tensor, gather_index: Tensor,
                    inverse: bool) -> Tuple[Tensor, Tensor]:
    """y = x with y[:, I2] (+/-)= shift; gathered = y[:, gather_index]."""
    # Column -1 (kept features) picks the zero column appended to shift.
    full_shift = F.pad(shift, (0, 1)).index_select(1, torch.where(shift_col < 0, shift.shape[1], shift_col).long())
    y = x - full_shift if inverse else x + full_shift
    return y, y.index_select(1, gather_index.long())


def _features_by_column(shift_col: Tensor, updated: int) -> Tensor:
    """The updated features in the order of shift's columns (shift_col inverted), with no sync to the host:
    the kept features (-1) sort last."""
    return torch.argsort(torch.where(shift_col < 0, shift_col.shape[0], shift_col))[:updated]


def coupling_update_backward(grad_y: Tensor, grad_gathered: Optional[Tensor], shift_col: Tensor, gather_index: Tensor,
                             updated: int, inverse: bool) -> Tuple[Tensor, Tensor]:
    """grad_x = grad_y plus grad_gathered added back at gather_index; grad_shift = +/- grad_x[:, I2]."""
    grad_x = grad_y.clone() if grad_gathered is None else grad_y.index_add(1, gather_index.long(), grad_gathered)
    grad_shift = grad_x.index_select(1, _features_by_column(shift_col, updated))
    return grad_x, -grad_shift if inverse else grad_shift


def affine_coupling_update(x: Tensor, log_scale_raw: Tensor, shift: Tensor, shift_col: Tensor, gather_index: Tensor,
                           log_scale_law: str, inverse: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """y = x with y[:, I2] = x[:, I2] * exp(a) + shift (inverse: (x[:, I2] - shift) * exp(-a)),
    a = tanh(log_scale_raw) or log_scale_raw; gathered = y[:, gather_index]; log_det = +/- sum a."""
    compute_dtype = _compute_dtype(x.dtype)
    log_scale = _affine_log_scale(log_scale_raw.to(compute_dtype), log_scale_law)
    # Column -1 (kept features) picks the zero column appended to log_scale and shift: y = x * 1 + 0 there.
    columns = torch.where(shift_col < 0, shift.shape[1], shift_col).long()
    full_log_scale = F.pad(log_scale, (0, 1)).index_select(1, columns)
    full_shift = F.pad(shift.to(compute_dtype), (0, 1)).index_select(1, columns)
    x = x.to(compute_dtype)
    if inverse:
        y = (x - full_shift) * torch.exp(-full_log_scale)
    else:
        y = x * torch.exp(full_log_scale) + full_shift
    y = y.to(shift.dtype)
    log_det = log_scale.sum(dim=1)
    return y, y.index_select(1, gather_index.long()), -log_det if inverse else log_det


def affine_coupling_update_backward(grad_y: Tensor, grad_gathered: Optional[Tensor], grad_log_det: Optional[Tensor],
                                    x: Tensor, log_scale_raw: Tensor, shift: Tensor, shift_col: Tensor,
                                    gather_index: Tensor, log_scale_law: str, inverse: bool
                                    ) -> Tuple[Tensor, Tensor, Tensor]:
    """The gradients of x, log_scale_raw and shift from those of y, gathered and log_det (each may be None).

    With g the gradient of y (gathered's added back) on an updated feature:
      forward  y = x e^a + b:        grad_x = g e^a,   grad_b = g,         grad_a = g x e^a + grad_log_det
      inverse  y = (x - b) e^-a:     grad_x = g e^-a,  grad_b = -g e^-a,   grad_a = -g y - grad_log_det
    and grad_raw = grad_a (1 - a^2) under the tanh law; kept features pass g to grad_x."""
    compute_dtype = _compute_dtype(x.dtype)
    log_scale = _affine_log_scale(log_scale_raw.to(compute_dtype), log_scale_law)
    grad = grad_y.to(compute_dtype)
    if grad_gathered is not None:
        grad = grad.index_add(1, gather_index.long(), grad_gathered.to(compute_dtype))
    features = _features_by_column(shift_col, shift.shape[1])
    grad_updated = grad.index_select(1, features)
    x_updated = x.to(compute_dtype).index_select(1, features)
    if inverse:
        grad_x_updated = grad_updated * torch.exp(-log_scale)
        grad_shift = -grad_x_updated
        grad_log_scale = -grad_x_updated * (x_updated - shift.to(compute_dtype))
    else:
        grad_x_updated = grad_updated * torch.exp(log_scale)
        grad_shift = grad_updated
        grad_log_scale = grad_x_updated * x_updated
    if grad_log_det is not None:
        grad_log_det = grad_log_det.to(compute_dtype)[:, None]
        grad_log_scale = grad_log_scale - grad_log_det if inverse else grad_log_scale + grad_log_det
    grad_raw = grad_log_scale * (1 - log_scale * log_scale) if log_scale_law == "tanh" else grad_log_scale
    grad_x = grad.index_copy(1, features, grad_x_updated)
    return grad_x.to(x.dtype), grad_raw.to(shift.dtype), grad_shift.to(shift.dtype)


def logistic_log_density(z: Tensor) -> Tensor:
    return -(F.softplus(z) + F.softplus(-z))


def gaussian_log_density(z: Tensor) -> Tensor:
    return -0.5 * (z * z + _LOG_2PI)


def prior_score(z: Tensor, prior: str) -> Tensor:
    """d log p_H(z) / dz: -tanh(z / 2) for the logistic prior, -z for the gaussian."""
    if prior == "logistic":
        return -torch.tanh(z / 2)
    if prior == "gaussian":
        return -z
    raise ValueError(f"prior must be 'logistic' or 'gaussian', got {prior!r}")


def prior_log_density(z: Tensor, prior: str) -> Tensor:
    if prior == "logistic":
        return logistic_log_density(z)
    if prior == "gaussian":
        return gaussian_log_density(z)
    raise ValueError(f"prior must be 'logistic' or 'gaussian', got {prior!r}")


def scale_prior(h: Tensor, log_scale: Tensor, prior: str, compute_z: bool) -> Tuple[Tensor, Tensor]:
    """z = exp(s) * h; log_prob = sum_d log p(z_d) + sum_d s_d (in float32 for half inputs)."""
    compute_dtype = _compute_dtype(h.dtype)
    z = h.to(compute_dtype) * torch.exp(log_scale.to(compute_dtype))
    log_prob = prior_log_density(z, prior).sum(dim=1) + log_scale.to(compute_dtype).sum()
    return (z.to(h.dtype) if compute_z else h.new_empty(0)), log_prob


def scale_prior_backward(grad_log_prob: Tensor, grad_z: Optional[Tensor], h: Tensor, log_scale: Tensor,
                         prior: str) -> Tuple[Tensor, Tensor]:
    """With z = e^s h and u = grad_log_prob * d log p_H(z)/dz (+ grad_z):
    grad_h = e^s u and grad_s = sum_b z u + sum_b grad_log_prob."""
    compute_dtype = _compute_dtype(h.dtype)
    scale = torch.exp(log_scale.to(compute_dtype))
    z = h.to(compute_dtype) * scale
    grad_log_prob = grad_log_prob.to(compute_dtype)
    grad_scaled = grad_log_prob[:, None] * prior_score(z, prior)
    if grad_z is not None:
        grad_scaled = grad_scaled + grad_z.to(compute_dtype)
    grad_log_scale = (z * grad_scaled).sum(dim=0) + grad_log_prob.sum()
    return (grad_scaled * scale).to(h.dtype), grad_log_scale.to(log_scale.dtype)


def scale_inverse(z: Tensor, log_scale: Tensor) -> Tensor:
    """h = exp(-s) * z."""
    return z * torch.exp(-log_scale)
