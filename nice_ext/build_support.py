"""Build helpers shared by setup.py and the host build of the CUDA kernels (tests/cuda_emulation/build.py).

Nothing here imports nice_ext: setup.py loads this file by its path before the extension exists.
"""
import os
import shlex
import subprocess
import sys
from typing import List


def shared_cxx_runtime_link_args() -> List[str]:
    """Link arguments that make the extension load the C++ runtime (libstdc++) that torch already loaded.

    A compiler driver with no shared libstdc++ in its own library folders (a toolchain set up to link the
    C++ runtime statically) puts a private copy of libstdc++.a inside the extension. That copy's stream
    code then runs on the process's locale data, and TORCH_CHECK crashed (SIGSEGV) formatting an integer
    into its message instead of raising. Such a driver is given the libstdc++.so.6 of this process to link
    against; a driver that finds a shared libstdc++ itself gets nothing.
    """
    if not sys.platform.startswith("linux"):
        return []
    compiler = shlex.split(os.environ.get("CXX", "c++"))
    try:
        found = subprocess.run(compiler + ["-print-file-name=libstdc++.so"], capture_output=True, text=True,
                               timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return []
    if not found or os.path.isabs(found):
        return []  # the driver links the shared runtime (or is no GCC-style driver)
    import torch  # noqa: F401  (loads the libstdc++ that the extension must share)

    with open("/proc/self/maps") as maps:
        loaded = {line.split()[-1] for line in maps if "/libstdc++.so" in line}
    if not loaded:
        return []
    print(f"nice_ext: {compiler[0]} finds no shared libstdc++; linking against {min(loaded)}")
    return [min(loaded)]


def kernel_sources_newer_than(library: str, csrc: str) -> List[str]:
    """The files of the kernel source tree ``csrc`` modified after ``library`` (the compiled extension) was
    written: a source tree whose extension was not rebuilt after a change or a ``git pull`` holds some.
    Empty where there is no source tree (an installed package)."""
    if not os.path.isdir(csrc) or not os.path.exists(library):
        return []
    built = os.path.getmtime(library)
    changed = []
    for folder, _, names in os.walk(csrc):
        for name in names:
            path = os.path.join(folder, name)
            if name.endswith((".cpp", ".cu", ".h", ".cuh")) and os.path.getmtime(path) > built:
                changed.append(os.path.relpath(path, os.path.dirname(csrc)))
    return sorted(changed)
