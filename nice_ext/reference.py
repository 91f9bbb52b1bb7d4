"""Pure-PyTorch reference of every nice_ext operator, with the same signatures as ``torch.ops.nice_ext``.

Tests compare the fused kernels with these, and the benchmarks time them (eager and under
torch.compile): one definition, so the two can never drift apart. They are written the way a user
would write them without fused kernels: static shapes, no data-dependent indexing.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

_LOG_2PI = math.log(2 * math.pi)


def coupling_update(x: Tensor, shift: Tensor, shift_col: Tensor, gather_index: Tensor,
                    inverse: bool) -> Tuple[Tensor, Tensor]:
    """y = x with y[:, I2] (+/-)= shift; gathered = y[:, gather_index]."""
    # Column -1 (kept features) picks the zero column appended to shift.
    full_shift = F.pad(shift, (0, 1)).index_select(1, torch.where(shift_col < 0, shift.shape[1], shift_col).long())
    y = x - full_shift if inverse else x + full_shift
    return y, y.index_select(1, gather_index.long())


def affine_coupling_update(x: Tensor, log_scale_raw: Tensor, shift: Tensor, shift_col: Tensor, gather_index: Tensor,
                           log_scale_law: str, inverse: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """y = x with y[:, I2] = x[:, I2] * exp(a) + shift (inverse: (x[:, I2] - shift) * exp(-a)),
    a = tanh(log_scale_raw) or log_scale_raw; gathered = y[:, gather_index]; log_det = +/- sum a."""
    if log_scale_law not in ("tanh", "unbounded"):
        raise ValueError(f"log_scale_law must be 'tanh' or 'unbounded', got {log_scale_law!r}")
    compute_dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    log_scale = log_scale_raw.to(compute_dtype)
    if log_scale_law == "tanh":
        log_scale = torch.tanh(log_scale)
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


def logistic_log_density(z: Tensor) -> Tensor:
    return -(F.softplus(z) + F.softplus(-z))


def gaussian_log_density(z: Tensor) -> Tensor:
    return -0.5 * (z * z + _LOG_2PI)


def prior_log_density(z: Tensor, prior: str) -> Tensor:
    if prior == "logistic":
        return logistic_log_density(z)
    if prior == "gaussian":
        return gaussian_log_density(z)
    raise ValueError(f"prior must be 'logistic' or 'gaussian', got {prior!r}")


def scale_prior(h: Tensor, log_scale: Tensor, prior: str, compute_z: bool) -> Tuple[Tensor, Tensor]:
    """z = exp(s) * h; log_prob = sum_d log p(z_d) + sum_d s_d (in float32 for half inputs)."""
    compute_dtype = torch.float32 if h.dtype in (torch.float16, torch.bfloat16) else h.dtype
    z = h.to(compute_dtype) * torch.exp(log_scale.to(compute_dtype))
    log_prob = prior_log_density(z, prior).sum(dim=1) + log_scale.to(compute_dtype).sum()
    return (z.to(h.dtype) if compute_z else h.new_empty(0)), log_prob


def scale_inverse(z: Tensor, log_scale: Tensor) -> Tensor:
    """h = exp(-s) * z."""
    return z * torch.exp(-log_scale)
