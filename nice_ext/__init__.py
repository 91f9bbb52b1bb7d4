"""nice_ext: NICE (Dinh, Krueger & Bengio, arXiv 1410.8516) with fused CPU and CUDA kernels."""

from . import ops, reference
from .checkpoint import CheckpointError, load_model, save_model
from .masks import checkerboard_mask, odd_even_mask
from .model import NICE
from .ops import affine_coupling_update, coupling_update, cuda_kernels_built, scale_inverse, scale_prior

__version__ = "0.1.0"

__all__ = ["NICE", "load_model", "save_model", "CheckpointError", "ops", "reference", "coupling_update",
           "affine_coupling_update", "scale_prior",
           "scale_inverse", "cuda_kernels_built", "odd_even_mask", "checkerboard_mask", "__version__"]
