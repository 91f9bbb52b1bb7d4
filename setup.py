"""Build nice_ext and its compiled extension ``nice_ext._C``.

The C++ (CPU) kernels are always compiled. The CUDA kernels are compiled whenever they *can* be:
torch is a CUDA build and a CUDA toolkit is found, whether or not a GPU is visible. Environment:

- ``NICE_EXT_CPU_ONLY=1``  build the CPU kernels only.
- ``CUDA_HOME``            the CUDA toolkit root (found from ``nvcc`` when unset, see ``find_cuda_home``).
- ``TORCH_CUDA_ARCH_LIST`` the GPU architectures to compile for (default: the visible GPU's, or
                           ``DEFAULT_ARCH_LIST`` when no GPU is visible).
- ``MAX_JOBS``             parallel compile jobs for ninja.
"""

import glob
import os
import re
import runpy
import shutil
import subprocess

from setuptools import find_packages, setup

DEFAULT_ARCH_LIST = "8.0;9.0+PTX"


def find_cuda_home():
    """The real CUDA toolkit root, or None.

    ``CUDA_HOME``/``CUDA_PATH`` win when set. Otherwise ask ``nvcc`` itself: ``nvcc --dryrun`` prints
    ``TOP=<root>``, which stays right when the ``nvcc`` on PATH is a wrapper script living outside the
    toolkit (guessing the root from the wrapper's folder would then be wrong).
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        out = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
        match = re.search(r"TOP=(\S+)", out.stdout + out.stderr)
        if match:
            return os.path.realpath(match.group(1))
    except (OSError, subprocess.SubprocessError):
        pass
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def cuda_build_wanted():
    if os.environ.get("NICE_EXT_CPU_ONLY", "0") not in ("", "0"):
        print("nice_ext: NICE_EXT_CPU_ONLY set, building the CPU kernels only")
        return False
    import torch

    if torch.version.cuda is None:
        print("nice_ext: torch is not a CUDA build, building the CPU kernels only")
        return False
    cuda_home = find_cuda_home()
    if cuda_home is None or not os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        print("nice_ext: no CUDA toolkit found (set CUDA_HOME), building the CPU kernels only")
        return False
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported: set it before that import.
    os.environ["CUDA_HOME"] = cuda_home
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
    print(f"nice_ext: building the CUDA kernels with the toolkit at {cuda_home} "
          f"for TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '(visible GPU)')}")
    return True


def cuda_library_include_dirs(cuda_home):
    """Header folders of the CUDA math libraries that ATen's CUDA headers include (cusparse.h, ...).

    A slim toolkit may not ship them; torch's pip wheels do (site-packages/nvidia/*/include).
    """
    if os.path.exists(os.path.join(cuda_home, "include", "cusparse.h")):
        return []
    import torch

    site = os.path.dirname(os.path.dirname(os.path.abspath(torch.__file__)))
    found = sorted(os.path.dirname(p) for p in glob.glob(os.path.join(site, "nvidia", "*", "include", "cusparse.h")))
    return found


def build_support():
    """nice_ext/build_support.py's names, run by its path: importing the package would need the extension."""
    return runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "nice_ext",
                                       "build_support.py"))


def require_torch():
    """The kernels are compiled against the torch they will run with, so it must be installed first; pip's
    default isolated build environment has none (hence --no-build-isolation)."""
    try:
        import torch  # noqa: F401
    except ImportError:
        raise SystemExit("nice_ext: building needs torch installed first (pip install -r requirements.txt), and "
                         "pip's --no-build-isolation so that the build sees it: "
                         "pip install --no-build-isolation -e .") from None


def generated_include_dir(root):
    """build/generated, holding the header of the kernel sources' digests (see build_support) for
    csrc/ops.cpp. It is rewritten only when a digest changed, so that ninja recompiles ops.cpp alone then."""
    support = build_support()
    folder = os.path.join(root, "build", "generated")
    os.makedirs(folder, exist_ok=True)
    header = os.path.join(folder, support["SOURCE_DIGESTS_HEADER"])
    text = support["source_digests_header"](os.path.join(root, "csrc"))
    if not os.path.exists(header) or open(header).read() != text:
        with open(header, "w") as f:
            f.write(text)
    return folder


def extensions():
    require_torch()
    with_cuda = cuda_build_wanted()
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    root = os.path.dirname(os.path.abspath(__file__))
    include_dirs = [os.path.join(root, "csrc"), generated_include_dir(root)]
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    # -fopenmp: ATen's at::parallel_for is an inline header that runs serially unless _OPENMP is defined
    #   (the extension then shares the libgomp that libtorch already loaded).
    # -fno-trapping-math: lets the compiler vectorise the prior's branch-free exp/log1p loops; nothing here
    #   reads floating-point exception flags. The C++ standard is the one torch's BuildExtension picks.
    cxx_flags = ["-O3", "-fopenmp", "-fno-trapping-math"]
    link_flags = ["-fopenmp"] + build_support()["shared_cxx_runtime_link_args"]()
    define_macros = []
    if with_cuda:
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        define_macros.append(("NICE_EXT_WITH_CUDA", "1"))
        return [CUDAExtension(
            "nice_ext._C", sources,
            include_dirs=include_dirs + cuda_library_include_dirs(os.environ["CUDA_HOME"]),
            define_macros=define_macros, extra_link_args=link_flags,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]})]
    return [CppExtension("nice_ext._C", sources, include_dirs=include_dirs,
                         define_macros=define_macros, extra_link_args=link_flags, extra_compile_args={"cxx": cxx_flags})]


def cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=True)}


setup(
    name="nice_ext",
    version="0.1.0",
    description="NICE (Dinh, Krueger & Bengio, 2014) with fused CPU and CUDA kernels",
    packages=find_packages(include=["nice_ext", "nice_ext.*"]),
    python_requires=">=3.9",
    install_requires=["torch", "torchvision", "numpy", "tqdm", "matplotlib"],
    ext_modules=extensions(),
    cmdclass=cmdclass(),
)
