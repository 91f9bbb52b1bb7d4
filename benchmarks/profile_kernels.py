"""The fused ops' CUDA kernels at the benchmark's largest batch, for Nsight Compute.

    ncu --profile-from-start off --clock-control none --metrics M1,M2,... --csv --log-file ncu.csv \\
        python benchmarks/profile_kernels.py            (scripts/check_cuda.sh's ncu stage does this)
    python benchmarks/profile_kernels.py --summarize ncu.csv     (a markdown table of ncu's numbers)

Each call below runs once outside the profile (loading its kernels, warming the caches the way a
training step does) and once between cudaProfilerStart and cudaProfilerStop, so that ncu profiles exactly
these launches, in the order printed. The calls are the ones benchmarks/NOTES.md asks questions of:
both generations of the row kernels, the coupling, affine coupling and scaling + prior ops forward and
backward and the scaling inverse, at 784 and 3072 features.
"""
import argparse
import csv
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from nice_ext import ops  # noqa: E402
from nice_ext.cli_common import run_script  # noqa: E402
from nice_ext.masks import coupling_maps, odd_even_mask  # noqa: E402

BATCH = 65536
FEATURES = (784, 3072)
# What each question needs: time and DRAM traffic against the bytes the op must move; the L1 and L2 hit
# rates (the second pass of the coupling kernels, NOTES.md); achieved occupancy and what limits it.
METRICS = ["gpu__time_duration.sum", "dram__bytes_read.sum", "dram__bytes_write.sum",
           "dram__throughput.avg.pct_of_peak_sustained_elapsed", "l1tex__t_sector_hit_rate.pct",
           "lts__t_sector_hit_rate.pct", "sm__warps_active.avg.pct_of_peak_sustained_active",
           "launch__registers_per_thread", "launch__occupancy_limit_registers",
           "launch__occupancy_limit_shared_mem", "launch__grid_size", "launch__block_size"]
SUMMARY_COLUMNS = [("gpu__time_duration.sum", "time"), ("dram__bytes_read.sum", "DRAM read"),
                   ("dram__bytes_write.sum", "DRAM write"),
                   ("dram__throughput.avg.pct_of_peak_sustained_elapsed", "DRAM % of peak"),
                   ("l1tex__t_sector_hit_rate.pct", "L1 hit %"), ("lts__t_sector_hit_rate.pct", "L2 hit %"),
                   ("sm__warps_active.avg.pct_of_peak_sustained_active", "occupancy %"),
                   ("launch__registers_per_thread", "registers"), ("launch__grid_size", "grid"),
                   ("launch__block_size", "block")]


def calls(dtype, batch=BATCH, device="cuda"):
    """(name, kernel version, function) for every profiled call (other batches and devices: for tests)."""
    return [call for features in FEATURES for call in calls_at(features, dtype, batch, device)]


def calls_at(features, dtype, batch, device):
    """The calls at one width; their inputs are made here, outside the profile."""
    g = torch.Generator(device=device).manual_seed(features)
    mask = odd_even_mask(features, True)
    shift_col, gather_index = (m.to(device) for m in coupling_maps(mask, ~mask))
    updated = int((~mask).sum())
    x, grad_y = (torch.randn(batch, features, generator=g, device=device, dtype=dtype) for _ in range(2))
    shift, raw, grad_gathered = (torch.randn(batch, updated, generator=g, device=device, dtype=dtype)
                                 for _ in range(3))
    log_scale = torch.randn(features, generator=g, device=device, dtype=dtype) * 0.5
    _, log_prob = ops.scale_prior(x, log_scale)
    grad_log_prob = torch.randn_like(log_prob)
    _, _, log_det = torch.ops.nice_ext.affine_coupling_update(x, raw, shift, shift_col, gather_index, "tanh", False)
    grad_log_det = torch.randn_like(log_det)
    nice = torch.ops.nice_ext
    size = f"{batch} x {features} {str(dtype).removeprefix('torch.')}"
    result = []
    for version in ops.CUDA_KERNEL_VERSIONS:
        result += [
            (f"v{version} coupling fwd {size}", version,
             lambda: nice.coupling_update(x, shift, shift_col, gather_index, False)),
            (f"v{version} coupling bwd {size}", version,
             lambda: nice.coupling_update_backward(grad_y, grad_gathered, shift_col, gather_index, updated, False)),
            (f"v{version} scale_prior fwd {size}", version, lambda: nice.scale_prior(x, log_scale, "logistic", True)),
            (f"v{version} scale_prior bwd {size}", version,
             lambda: nice.scale_prior_backward(grad_log_prob, grad_y, x, log_scale, "logistic")),
            (f"v{version} scale_inverse {size}", version, lambda: nice.scale_inverse(x, log_scale)),
            (f"v{version} affine_coupling fwd {size}", version,
             lambda: nice.affine_coupling_update(x, raw, shift, shift_col, gather_index, "tanh", False)),
            (f"v{version} affine_coupling bwd {size}", version,
             lambda: nice.affine_coupling_update_backward(grad_y, grad_gathered, grad_log_det, x, raw, shift,
                                                          shift_col, gather_index, "tanh", False)),
        ]
    return result


def profile(dtype):
    for i, (name, version, fn) in enumerate(calls(dtype)):
        with ops.use_cuda_kernels(version):
            fn()  # outside the profile: module loading, allocator, caches
            torch.cuda.synchronize()
            torch.cuda.profiler.start()
            torch.cuda.nvtx.range_push(name)
            fn()
            torch.cuda.nvtx.range_pop()
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()
        print(f"profiled call {i}: {name}", flush=True)


def read_ncu_csv(path):
    """ncu's --csv details page: one row per (kernel launch, metric). Lines ncu writes around the table
    (==PROF==, warnings) are skipped. Returns [(id, kernel name, {metric: (value, unit)})] in launch order."""
    with open(path, newline="") as f:
        lines = [line for line in f if line.startswith('"')]
    launches = {}
    for row in csv.DictReader(lines):
        launch = launches.setdefault(row["ID"], (row["Kernel Name"], {}))
        launch[1][row["Metric Name"]] = (row["Metric Value"], row["Metric Unit"])
    return [(launch_id, name, metrics) for launch_id, (name, metrics) in
            sorted(launches.items(), key=lambda item: int(item[0]))]


def short_kernel_name(name):
    """'void nice_ext::(anonymous namespace)::coupling_update_rows_kernel<c10::BFloat16, 8>(const ...)'
    -> 'coupling_update_rows_kernel<c10::BFloat16, 8>'."""
    name = name.removeprefix("void ").replace("(anonymous namespace)::", "").split("(", 1)[0]
    base, bracket, template_arguments = name.partition("<")
    return base.rsplit("::", 1)[-1] + bracket + template_arguments


def summarize(path):
    launches = read_ncu_csv(path)
    if not launches:
        raise SystemExit(f"error: no profiled kernels in {path} (was ncu given --csv?)")
    header = ["ID", "kernel"] + [title for _, title in SUMMARY_COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for launch_id, name, metrics in launches:
        cells = [f"{metrics[m][0]} {metrics[m][1]}".strip() if m in metrics else "-" for m, _ in SUMMARY_COLUMNS]
        lines.append("| " + " | ".join([launch_id, short_kernel_name(name)] + cells) + " |")
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--summarize", metavar="NCU_CSV", help="print a markdown table of an ncu --csv log instead")
    p.add_argument("--metrics", action="store_true", help="print the metrics to give ncu (comma-separated)")
    args = p.parse_args()
    if args.metrics:
        print(",".join(METRICS))
        return
    if args.summarize:
        print(summarize(args.summarize), end="")
        return
    if not (torch.cuda.is_available() and ops.cuda_kernels_built()):
        sys.exit("error: profiling needs a CUDA GPU and a build of nice_ext with its CUDA kernels")
    profile(getattr(torch, args.dtype))


if __name__ == "__main__":
    sys.exit(run_script(main))
