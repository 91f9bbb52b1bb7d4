"""Build nice_ext with its CUDA kernels compiled for the host (cuda_emulation.h), for machines without a GPU.

    python tests/cuda_emulation/build.py OUT_DIR

writes OUT_DIR/nice_ext, a copy of the Python package whose ``_C`` runs the kernels of ``csrc/cuda`` for
CPU tensors in place of the CPU kernels, OUT_DIR/benchmarks, a copy of the benchmark scripts, and
OUT_DIR/tests, a copy of the tests that imports it:

    python -m pytest OUT_DIR/tests/test_op_coupling.py

(tests/test_cuda_emulation.py does this). Its operators have the real library's names, so the copy must
not be imported into a process that has imported the real ``nice_ext``.
"""

from __future__ import annotations

import glob
import os
import re
import runpy
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def host_source(cuda_source: str, path: str) -> str:
    """A .cu file's text as C++ for cuda_emulation.h. Line numbers are kept, so errors point at the .cu."""
    # extern __shared__ T name[];  ->  the launch's dynamic shared memory
    text = re.sub(r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?([\w:\s]+?)\s+(\w+)\s*\[\s*\]\s*;",
                  r"\1* \2 = reinterpret_cast<\1*>(::cuda_emulation::dynamic_shared_memory());", cuda_source)
    # kernel<<<config>>>(args)  ->  kernel % LaunchConfig(config) % kernel_arguments(args)
    text = re.sub(r"<<<(.*?)>>>\s*\(",
                             r" % ::cuda_emulation::LaunchConfig(\1) % ::cuda_emulation::kernel_arguments(",
                             text, flags=re.S)
    if "<<<" in text or ">>>" in text:
        raise ValueError(f"{path}: a kernel launch this script cannot rewrite")
    # __shared__ T name[N];  ->  the same, then filled with 0xff bytes once per block (its first thread there)
    text, declarations = re.subn(r"(__shared__[^;={}\n]*?\b(\w+)\s*(?:\[[^\]]*\]\s*)*;)",
                                 r"\1 ::cuda_emulation::poison_static_shared(&\2, sizeof(\2));", text)
    if text.count("__shared__") != declarations:
        raise ValueError(f"{path}: a __shared__ declaration this script cannot rewrite")
    return f'#line 1 "{path}"\n' + text


def write_host_headers(out_dir: str) -> None:
    """The CUDA headers (csrc/cuda/*.cuh) rewritten like the sources, where the rewritten sources'
    `#include "cuda/..."` finds them first (a quoted include looks in the including file's folder first)."""
    header_dir = os.path.join(out_dir, "host_sources", "cuda")
    os.makedirs(header_dir, exist_ok=True)
    for header in sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cuh"))):
        write_host_source(header, os.path.join(header_dir, os.path.basename(header)))


def write_host_source(source: str, target: str) -> str:
    with open(source) as f:
        text = host_source(f.read(), os.path.relpath(source, ROOT))
    # Rewrite only on change, so that ninja rebuilds only what changed.
    if not os.path.exists(target) or open(target).read() != text:
        with open(target, "w") as f:
            f.write(text)
    return target


def build_selftest(out_dir: str) -> str:
    """Compiles selftest.cpp (checks of the emulation itself, no torch needed); returns the program's path."""
    out_dir = os.path.abspath(out_dir)
    write_host_headers(out_dir)
    source = write_host_source(os.path.join(HERE, "selftest.cpp"),
                               os.path.join(out_dir, "host_sources", "selftest_host.cpp"))
    program = os.path.join(out_dir, "selftest")
    subprocess.run([os.environ.get("CXX", "c++"), "-std=c++17", "-O1", "-Wno-unknown-pragmas",
                    "-I", os.path.join(HERE, "include"), "-I", os.path.join(ROOT, "csrc"),
                    source, os.path.join(HERE, "cuda_emulation.cpp"), "-o", program], check=True)
    return program


def build(out_dir: str, verbose: bool = False) -> str:
    """Compiles the emulated extension and lays out OUT_DIR/nice_ext; returns OUT_DIR."""
    from torch.utils.cpp_extension import load

    out_dir = os.path.abspath(out_dir)
    source_dir = os.path.join(out_dir, "host_sources")
    build_dir = os.path.join(out_dir, "build")
    os.makedirs(source_dir, exist_ok=True)
    os.makedirs(build_dir, exist_ok=True)
    write_host_headers(out_dir)
    sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cpp"))) + [os.path.join(HERE, "cuda_emulation.cpp")]
    for cu in sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))):
        sources.append(write_host_source(cu, os.path.join(source_dir, os.path.basename(cu)[:-3] + "_host.cpp")))
    # Linked as setup.py links the real library: against the shared libstdc++ (nice_ext/build_support.py).
    build_support = runpy.run_path(os.path.join(ROOT, "nice_ext", "build_support.py"))
    # The shim's include folder comes first: its ATen/cuda/CUDAContext.h replaces ATen's.
    load(name="_C", sources=sources, build_directory=build_dir, is_python_module=False, with_cuda=False,
         extra_include_paths=[os.path.join(HERE, "include"), os.path.join(ROOT, "csrc")],
         extra_cflags=["-O2", "-DNICE_EXT_WITH_CUDA", "-DNICE_EXT_EMULATED_CUDA", "-Wno-unknown-pragmas"],
         extra_ldflags=build_support["shared_cxx_runtime_link_args"](), verbose=verbose)
    package = os.path.join(out_dir, "nice_ext")
    shutil.rmtree(package, ignore_errors=True)
    shutil.copytree(os.path.join(ROOT, "nice_ext"), package,
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    shutil.copy2(os.path.join(build_dir, "_C.so"), os.path.join(package, "_C.so"))
    with open(os.path.join(package, "CUDA_EMULATION"), "w") as f:  # tests/conftest.py reads it
        f.write("This copy of nice_ext runs the CUDA kernels, compiled for the host, for CPU tensors.\n")
    tests = os.path.join(out_dir, "tests")
    shutil.rmtree(tests, ignore_errors=True)
    shutil.copytree(os.path.join(ROOT, "tests"), tests,
                    ignore=shutil.ignore_patterns("cuda_emulation", "test_cuda_emulation.py", "__pycache__"))
    benchmarks = os.path.join(out_dir, "benchmarks")  # the scripts (compare_kernel_versions.py), not the results
    shutil.rmtree(benchmarks, ignore_errors=True)
    shutil.copytree(os.path.join(ROOT, "benchmarks"), benchmarks,
                    ignore=shutil.ignore_patterns("results", "__pycache__"))
    return out_dir


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    print(build(sys.argv[1], verbose=True))
