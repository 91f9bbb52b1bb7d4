"""Coupling masks (paper §3.2, §5.1) and the index maps the fused coupling op reads.

A mask is a bool tensor of length D: True marks the kept features I1 (the coupling network's input),
False the updated features I2. Masks are structure, not data: they are checked once here, with clear
errors, and turned into int32 index maps, so that no call of the op has to read or check them again
(which on a GPU would mean a device synchronisation).
"""

from __future__ import annotations

import math
import operator
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor


def odd_even_mask(num_features: int, keep_odd: bool = True) -> Tensor:
    """The paper's partition: odd features (1-based, i.e. x[0::2]) kept when ``keep_odd``, else even."""
    if num_features < 2:
        raise ValueError(f"a coupling mask needs at least 2 features, got {num_features}")
    mask = torch.zeros(num_features, dtype=torch.bool)
    mask[0 if keep_odd else 1::2] = True
    return mask


def check_image_shape(image_shape: Sequence[int], num_features: Optional[int] = None) -> Tuple[int, int, int]:
    """``image_shape`` as a (C, H, W) tuple of positive ints holding ``num_features`` values (when given), or
    a clear error: a size of 2.5 is not read as 2, nor a shape that does not fit the features accepted
    (the tools draw the model's images in it)."""
    try:
        shape = tuple(operator.index(s) for s in image_shape)
    except TypeError:
        raise TypeError(f"image_shape must be (C, H, W) of ints, got {image_shape!r}") from None
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"image_shape must be (C, H, W) with positive sizes, got {shape}")
    if num_features is not None and math.prod(shape) != num_features:
        raise ValueError(f"image_shape {shape} has {math.prod(shape)} values, but data_dim is {num_features}")
    return shape


def checkerboard_mask(image_shape: Sequence[int], keep_black: bool = True) -> Tensor:
    """A checkerboard over (C, H, W) images flattened row-major: pixel (h, w) is kept when h + w is even
    (``keep_black``) or odd, in every channel."""
    channels, height, width = check_image_shape(image_shape)
    if height * width < 2:
        raise ValueError(f"a checkerboard needs at least 2 pixels, got image_shape {tuple(image_shape)}")
    rows = torch.arange(height).view(height, 1)
    cols = torch.arange(width).view(1, width)
    board = ((rows + cols) % 2 == (0 if keep_black else 1))
    return board.expand(channels, height, width).reshape(-1).clone()


def check_mask_layout(mask, num_features: int, name: str = "mask") -> Tensor:
    """The type, dtype and shape checks of ``check_mask`` (not its contents): the mask as a CPU bool tensor."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a bool tensor of length {num_features}, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor (True = kept features), got dtype {mask.dtype}")
    if mask.dim() != 1 or mask.numel() != num_features:
        raise ValueError(f"{name} must have shape ({num_features},), got {tuple(mask.shape)}")
    return mask.detach().cpu()


def check_mask(mask, num_features: int, name: str = "mask") -> Tensor:
    """Validate a user's mask and return it as a CPU bool tensor of length ``num_features``."""
    mask = check_mask_layout(mask, num_features, name)
    kept = int(mask.sum())
    if kept == 0 or kept == num_features:
        raise ValueError(f"{name} must keep some features and update others; it keeps {kept} of {num_features}")
    return mask


def coupling_maps(mask: Tensor, next_mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Index maps for ``torch.ops.nice_ext.coupling_update``.

    Returns ``shift_col`` (int32, D): for each updated feature its column in the network output, -1 for
    kept features; and ``gather_index`` (int32): the kept features of ``next_mask`` (the next layer's
    network input, gathered in the same pass), empty when there is no next layer.
    """
    updated = ~mask
    shift_col = torch.full(mask.shape, -1, dtype=torch.int32)
    shift_col[updated] = torch.arange(int(updated.sum()), dtype=torch.int32)
    if next_mask is None:
        gather_index = torch.zeros(0, dtype=torch.int32)
    else:
        gather_index = next_mask.nonzero().flatten().to(torch.int32)
    return shift_col, gather_index


def kept_index(mask: Tensor) -> Tensor:
    """The kept features of ``mask`` as an int64 index (the coupling network's input columns)."""
    return mask.nonzero().flatten()


def image_side(num_features: int) -> Optional[int]:
    side = math.isqrt(num_features)
    return side if side * side == num_features else None
