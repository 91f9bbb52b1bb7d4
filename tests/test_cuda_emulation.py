"""The CUDA kernels of csrc/cuda, run without a GPU.

tests/cuda_emulation compiles them for the host against an emulation of the CUDA they use (each block's
threads as fibers, barriers, warp shuffles, launch limits; see cuda_emulation.h), into a copy of the
package whose CPU tensors go through them. The op tests then run against that copy with each generation
of the kernels: the reference comparisons at awkward sizes and layouts, gradcheck, opcheck,
torch.compile, and version 2 against version 1; and so do the model's tests, which put the kernels
together as training and sampling do. What the emulation cannot show is the GPU's own
behaviour: timing, real concurrency and memory ordering between threads, device arithmetic; those are
for compute-sanitizer and the CUDA tests on a GPU (scripts/check_cuda.sh).
"""
import importlib.util
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT, needed_shared_libraries, run_python

BUILD_SCRIPT = os.path.join(ROOT, "tests", "cuda_emulation", "build.py")
_spec = importlib.util.spec_from_file_location("cuda_emulation_build", BUILD_SCRIPT)
cuda_emulation_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cuda_emulation_build)

OUT_DIR = os.path.join(ROOT, "build", "cuda-emulation")  # kept between runs: ninja rebuilds what changed
# The op tests, and the model's (fused against pure PyTorch, inverse, inpainting, torch.compile and
# torch.export of a fused model): about 15 seconds of the latter. The training tools' tests are left
# out; on the emulated kernels they take over 10 minutes.
EMULATED_TESTS = ["test_op_coupling.py", "test_op_affine_coupling.py", "test_op_scale_prior.py", "test_model.py"]
# The comparisons of version 2 with version 1 pick each op's version themselves, so they run once, with
# version 2 as the process's default (about 4 minutes on the emulated kernels).
VERSION_COMPARISONS = "test_cuda_kernel_versions.py"


@pytest.fixture(scope="module")
def selftest():
    return cuda_emulation_build.build_selftest(OUT_DIR)


@pytest.fixture(scope="module")
def emulated_tree():
    result = subprocess.run([sys.executable, BUILD_SCRIPT, OUT_DIR],
                            capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return OUT_DIR


@pytest.mark.parametrize("case", ["sums", "missing-barrier", "launch-errors", "shared-poisoned",
                                  "static-shared-poisoned"])
def test_emulation_computes_as_cuda_does(selftest, case):
    result = subprocess.run([selftest, case], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("case, message", [("divergent-shuffle", "the lanes of a warp diverge"),
                                           ("shuffle-returned", "reads a lane that has returned")])
def test_emulation_stops_at_what_cuda_leaves_undefined(selftest, case, message):
    result = subprocess.run([selftest, case], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "ran to the end" not in result.stdout
    assert message in result.stderr


def test_emulated_tree_loads_the_emulated_library(emulated_tree):
    code = ("import nice_ext, torch; print(nice_ext._C.__file__); print(nice_ext.cuda_kernels_built()); "
            "print(torch._C._dispatch_has_kernel_for_dispatch_key('nice_ext::scale_inverse', 'CUDA')); "
            "torch.ops.nice_ext.scale_inverse(torch.ones(2, 3), torch.zeros(3))")
    result = run_python(code, cwd=emulated_tree, pythonpath=emulated_tree)
    assert result.returncode == 0, result.stderr[-3000:]
    library, built, cuda_key = result.stdout.split()
    assert os.path.dirname(library) == os.path.join(emulated_tree, "nice_ext") and built == "True"
    # Its kernels read host memory, so CUDA tensors must not reach them: no kernel for the CUDA key.
    assert cuda_key == "False"
    needed = needed_shared_libraries(library)
    assert needed is None or "libstdc++.so.6" in needed, f"the emulated library does not load libstdc++: {needed}"


@pytest.mark.parametrize("version", [1, 2])
def test_op_and_model_tests_pass_on_the_emulated_cuda_kernels(emulated_tree, version):
    names = EMULATED_TESTS + ([VERSION_COMPARISONS] if version == 2 else [])
    tests = [os.path.join(emulated_tree, "tests", name) for name in names]
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *tests],
                            cwd=emulated_tree, capture_output=True, text=True, timeout=3600,
                            env=dict(os.environ, NICE_EXT_CUDA_KERNELS=str(version)))
    assert result.returncode == 0, f"{result.stdout[-8000:]}\n{result.stderr[-3000:]}"
    # No test that needs CUDA kernels skipped for want of them: they all ran on the emulated ones.
    assert "needs a CUDA GPU (or the CUDA emulation)" not in result.stdout
    passed = int(re.search(r"(\d+) passed", result.stdout).group(1))
    # The op and model tests number over 700 (737 when this was written), the comparisons over 2000 more.
    assert passed > 700 + (2000 if version == 2 else 0), result.stdout[-2000:]
