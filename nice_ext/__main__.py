"""``python -m nice_ext``: what this installation holds, and a check that its fused kernels give the
pure-PyTorch reference's results on this machine's CPU and on each visible GPU. The output is what a bug
report needs; the exit status is 1 when a check fails.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from typing import List, Optional

import torch

from . import __version__, ops, provenance
from .cli_common import run_tool
from .model import NICE

# Small models that between them run every fused op, forward and backward: the additive and the affine
# coupling, both priors, the paper's odd/even masks and a checkerboard over a 4 x 4 image.
SETUPS = {
    "additive coupling, logistic prior, odd/even masks": dict(coupling="additive", prior="logistic"),
    "affine coupling, gaussian prior, checkerboard masks": dict(coupling="affine", prior="gaussian",
                                                                mask="checkerboard", image_shape=(1, 4, 4)),
}


def kernel_problem(device: torch.device, setup: dict) -> Optional[str]:
    """What differs between a model on the fused ops and the same model on the reference ops: the
    log-likelihood of 7 rows, its gradient for every parameter, a second derivative (the gradient of
    |d log p / dx|^2, through the backward ops' composite twins), and the inverse of the encoding. None when
    they agree (float32, to 1e-4)."""
    generator = torch.Generator().manual_seed(0)
    models = [NICE(16, num_coupling_layers=3, num_hidden_layers=1, hidden_dim=12, fused=fused, **setup)
              for fused in (True, False)]
    with torch.no_grad():  # random weights throughout: a new model's last layers are zero, an identity
        for parameter in models[0].parameters():
            parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
    models[1].load_state_dict(models[0].state_dict())
    x = torch.rand(7, 16, generator=generator).to(device)
    results = []
    for model in models:
        model.to(device)
        log_px = model.log_prob(x)
        gradients = torch.autograd.grad(log_px.sum(), list(model.parameters()))
        inputs = x.clone().requires_grad_(True)
        score, = torch.autograd.grad(model.log_prob(inputs).sum(), inputs, create_graph=True)
        second, = torch.autograd.grad(score.square().sum(), inputs)
        with torch.no_grad():
            results.append([log_px, *gradients, second, model.inverse(model(x)[0])])
    names = ["log_prob", *[f"the gradient of {name}" for name, _ in models[0].named_parameters()],
             "the second derivative", "inverse"]
    for name, fused, reference in zip(names, *results):
        if not torch.allclose(fused, reference, rtol=1e-4, atol=1e-4):
            return f"{name} differs from the reference by up to {(fused - reference).abs().max().item():.3g}"
    if not torch.allclose(results[0][-1], x, atol=1e-4):
        return "the inverse does not give the input back"
    return None


def check(device: torch.device) -> List[str]:
    """The check of every setup on ``device``: one line per problem (an error counts as one)."""
    problems = []
    for name, setup in SETUPS.items():
        try:
            problem = kernel_problem(device, setup)
        except Exception as error:  # a kernel missing for this device, an image not built for this GPU, ...
            problem = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:200]}"
        if problem:
            problems.append(f"{name}: {problem}")
    return problems


TOOLS = """the tools:
  python -m nice_ext.train      train a model (--preset paper-mnist: the paper's MNIST run)
  python -m nice_ext.evaluate   a checkpoint's log-likelihood on a split, in nats and bits/dim
  python -m nice_ext.sample     a grid of samples from a checkpoint
  python -m nice_ext.inpaint    a checkpoint's inpainting of test images (paper section 5.2)
each with --help."""


def main(argv: Optional[List[str]] = None) -> int:
    argparse.ArgumentParser(prog="python -m nice_ext", description=__doc__, epilog=TOOLS,
                            formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    print(f"nice_ext {__version__} (commit {provenance.source_commit()})")
    print(f"torch {torch.__version__}" + (f" (CUDA {torch.version.cuda})" if torch.version.cuda else " (CPU build)")
          + f", Python {platform.python_version()}, {platform.platform()}")
    print(f"CPU: {provenance.cpu_model()} ({os.cpu_count()} cores)")
    print(f"CUDA kernels built: {'yes' if ops.cuda_kernels_built() else 'no'}")
    stale = ops.stale_kernel_sources()
    if stale:
        print(f"kernels built from other sources ({', '.join(stale)} changed since the build): rebuild with "
              "pip install --no-build-isolation -e .")
    devices = [torch.device("cpu")]
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for index in range(gpus):
        major, minor = torch.cuda.get_device_capability(index)
        print(f"GPU {index}: {torch.cuda.get_device_name(index)} (sm_{major}{minor})")
        devices.append(torch.device("cuda", index))
    if gpus:
        print("CUDA row kernels: " + ", ".join(f"{op} version {v}" for op, v in ops.cuda_kernel_versions().items()))
    else:
        print("GPUs: none visible")
    failed = False
    for device in devices:
        problems = check(device)
        failed |= bool(problems)
        print(f"kernel check on {device}: " + ("FAILED" if problems else
              "ok (the fused ops give the reference's log-likelihoods, gradients, second derivatives and "
              "inverses)"))
        for problem in problems:
            print(f"  {problem}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
