"""The build must never silently fall back to CPU-only where the CUDA kernels can be compiled."""
import os
import shutil

import pytest
import torch

import nice_ext


def test_cuda_kernels_are_compiled_whenever_they_can_be():
    if os.environ.get("NICE_EXT_CPU_ONLY", "0") not in ("", "0"):
        pytest.skip("a CPU-only build was asked for")
    can_build = torch.version.cuda is not None and (shutil.which("nvcc") is not None or bool(os.environ.get("CUDA_HOME")))
    if not can_build:
        pytest.skip("torch is not a CUDA build or no CUDA toolkit is installed")
    assert nice_ext.cuda_kernels_built(), "a CUDA torch and nvcc are present, but the CUDA kernels were not compiled"


def test_every_op_has_a_kernel_per_backend():
    for op in ("coupling_update", "coupling_update_backward", "scale_prior", "scale_prior_backward", "scale_inverse"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"nice_ext::{op}", "CPU")
        if nice_ext.cuda_kernels_built():
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"nice_ext::{op}", "CUDA")
