"""Where a measured number comes from: the device, the software, the commit, the date and the command. The
benchmark's results and a training run's ``result.json`` carry these fields."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from typing import Dict, Optional

import torch

from . import ops

SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def device_name(device: torch.device) -> str:
    """The GPU's name, or "CPU (N cores)"."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({os.cpu_count()} cores)"


def cpu_model() -> str:
    """The host CPU's model name and the widest vector instructions PyTorch uses on it (e.g. "AMD EPYC,
    AVX2"): CPU timings and bf16 speed depend on both."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return f"{name}, {torch.backends.cpu.get_cpu_capability()}"


def _git(*args: str) -> str:
    try:
        done = subprocess.run(["git", *args], cwd=SOURCE_ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def source_commit() -> str:
    """The commit of the nice_ext checkout this package runs from, with "-dirty" when tracked files differ
    from it. Installed elsewhere (site-packages, perhaps inside another project's repository) or in a copy
    of the tree without git metadata: $NICE_EXT_COMMIT, else "unknown"."""
    top = _git("rev-parse", "--show-toplevel")
    if top and os.path.realpath(top) == os.path.realpath(SOURCE_ROOT):
        commit = _git("describe", "--always", "--dirty", "--abbrev=7")
        if commit:
            return commit
    return os.environ.get("NICE_EXT_COMMIT", "unknown")


def record(device: torch.device, command: str, date: Optional[str] = None, commit: Optional[str] = None
           ) -> Dict[str, object]:
    """device, host cpu, torch, cuda, commit, date and command, as results files record them, and on a GPU
    each op's generation of CUDA row kernels (``cuda_kernels``; they time differently and sum a row's
    log-density in different orders). ``commit``: the source_commit() read when the measurement began
    (the checkout may move on while a run goes)."""
    fields = dict(device=device_name(device), cpu=cpu_model(), torch=torch.__version__, cuda=torch.version.cuda,
                  commit=commit or source_commit(), date=date or datetime.date.today().isoformat(), command=command)
    if device.type == "cuda":
        fields["cuda_kernels"] = ops.cuda_kernel_versions()
    return fields
