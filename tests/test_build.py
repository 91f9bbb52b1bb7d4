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


NICE_EXT_OPS = ("coupling_update", "coupling_update_backward", "affine_coupling_update",
                "affine_coupling_update_backward", "scale_prior", "scale_prior_backward", "scale_inverse")


def test_every_op_has_a_kernel_per_backend():
    registered = sorted(n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("nice_ext::"))
    assert registered == sorted(NICE_EXT_OPS), "an op was added or removed: update NICE_EXT_OPS and its tests"
    for op in NICE_EXT_OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"nice_ext::{op}", "CPU")
        if nice_ext.cuda_kernels_built():
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"nice_ext::{op}", "CUDA")


def test_every_forward_op_has_a_public_wrapper():
    for op in NICE_EXT_OPS:
        if not op.endswith("_backward"):
            assert op in nice_ext.__all__ and callable(getattr(nice_ext, op)), f"nice_ext.{op} is not exported"
