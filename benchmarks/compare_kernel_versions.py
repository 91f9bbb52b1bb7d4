"""Version 1 against version 2 of each op's CUDA row kernels, timed in turns in one process.

    python benchmarks/compare_kernel_versions.py [--quick] [--ops coupling,...] [--dtypes float32,bfloat16]
                                                 [--sizes 65536x784,...] [--rounds 4] [--min-run-time 0.2]
                                                 [--out DIR]

It takes bench_coupling.py's per-op entries (the same inputs, sizes and byte counts), fused ops only.
Each entry is checked against the reference under both versions. Then its forward and its backward are
timed with version 1 and version 2 in turns, a slice of the time each (1 2, 2 1, 1 2, ...), so that a
drift of the clocks or a neighbour's load falls on both alike. An entry's time is the median of its
slices' medians. Per op, the geometric mean of the speed-ups of version 2 over its entries names the
faster version: the evidence for each op's default (``kDefaultCudaKernelVersion``, csrc/nice_ext.h).
Two bench_coupling.py runs, one per version, measure the same kernels in minutes each and with the drift
between them. Its 36 entries take about 3.5 minutes on an H200 (19 of them in 110 s, 2026-12-04), more
than its settings suggest: checking each entry against the reference and the timer's own warm-ups add
to the 0.8 s of timed slices per entry. --ops, --dtypes or --sizes take a part of it.

The versions exist only in the CUDA kernels: --device cpu works only in the tests' emulated build,
where CPU tensors go through them (tests/cuda_emulation).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_coupling import (check_against_reference, copy_bandwidth, dtypes_argument, op_cases, op_sizes,  # noqa: E402
                            pass_calls, pass_gbps, results_stem, timeit)

from nice_ext import ops, provenance  # noqa: E402  (bench_coupling put the checkout first on sys.path)
from nice_ext.cli_common import run_script  # noqa: E402

PASSES = ("fwd", "bwd")
VERSIONS = (1, 2)


def compare_entry(case, op, label, rounds, min_run_time):
    """{pass: {version: [median ms of each slice]}} for one checked entry: the versions in turns."""
    fused, _, _, _ = case
    slices = {pass_name: {v: [] for v in VERSIONS} for pass_name in PASSES}
    for version in VERSIONS:  # each version's correctness (and its kernels loaded) before any timing
        with ops.use_cuda_kernels(**{op: version}):
            leaves, grads = check_against_reference(case, (*label, f"version {version}"))
    calls = pass_calls(fused, leaves, grads)
    for pass_name in PASSES:
        for r in range(rounds):
            for version in VERSIONS if r % 2 == 0 else VERSIONS[::-1]:
                with ops.use_cuda_kernels(**{op: version}):
                    slices[pass_name][version].append(timeit(calls[pass_name], min_run_time / rounds)[0])
    return slices


def compare(device, op_names, dtypes, sizes, rounds, min_run_time, log=None):
    """One row per (op, pass, dtype, batch, dim): each version's ms (the median of its slices, with their
    lowest and highest), GB/s, and version 2's speed-up. Each entry's times are logged as soon as it is
    done, so that a run stopped short (a time limit on a lent GPU) still tells what it measured."""
    log = sys.stderr if log is None else log
    rows = []
    for op in op_names:
        for dtype in dtypes:
            for batch, dim in sizes:
                case = op_cases(op, batch, dim, dtype, device)
                slices = compare_entry(case, op, (op, dtype, batch, dim), rounds, min_run_time)
                for pass_name in PASSES:
                    row = dict(op=op, dtype=str(dtype).replace("torch.", ""), batch=batch, dim=dim)
                    row["pass"] = pass_name
                    for version in VERSIONS:
                        times = slices[pass_name][version]
                        median = float(np.median(times))
                        row.update({f"v{version}_ms": median, f"v{version}_low_ms": min(times),
                                    f"v{version}_high_ms": max(times),
                                    f"v{version}_gbps": pass_gbps(case, pass_name, median)})
                    row["v2_speedup"] = row["v1_ms"] / row["v2_ms"]
                    rows.append(row)
                times = "; ".join(f"{r['pass']} v1 {r['v1_ms']:.4f} ms, v2 {r['v2_ms']:.4f} ms ({r['v2_speedup']:.2f}x)"
                                  for r in rows[-len(PASSES):])
                print(f"  {op} {row['dtype']} {batch}x{dim}: {times}", file=log, flush=True)
    return rows


def geometric_mean(values):
    return math.exp(sum(math.log(v) for v in values) / len(values))


def summarize(rows):
    """Per op: the geometric mean of version 2's speed-ups over all its entries and over those at the
    largest batch, the faster version by the former, and the default this build runs."""
    largest = max(r["batch"] for r in rows)
    defaults = ops.default_cuda_kernel_versions()
    summary = {}
    for op in dict.fromkeys(r["op"] for r in rows):
        mine = [r["v2_speedup"] for r in rows if r["op"] == op]
        at_largest = [r["v2_speedup"] for r in rows if r["op"] == op and r["batch"] == largest]
        overall = geometric_mean(mine)
        summary[op] = dict(v2_speedup_geomean=overall, v2_speedup_geomean_largest_batch=geometric_mean(at_largest),
                           largest_batch=largest, faster_version=2 if overall > 1 else 1, default_version=defaults[op])
    return summary


def markdown(result):
    lines = [f"# nice_ext CUDA row kernels, version 1 against version 2: {result['device']}", "",
             f"torch {result['torch']}, CUDA {result['cuda']}, commit {result['commit']}, {result['date']}  ",
             f"command: `{result['command']}`  ",
             f"{result['rounds']} turns per version and pass, {result['min_run_time']} s per entry and version; "
             f"copy bandwidth (read + write): {result['copy_gbps']:.1f} GB/s", "",
             "| op | pass | dtype | batch | dim | v1 ms (low-high) | v2 ms (low-high) | v1 % of copy | v2 % of copy "
             "| v2 speed-up |", "|" + "---|" * 10]
    for r in result["rows"]:
        spans = [f"{r[f'v{v}_ms']:.4f} ({r[f'v{v}_low_ms']:.4f}-{r[f'v{v}_high_ms']:.4f})" for v in VERSIONS]
        shares = [f"{100 * r[f'v{v}_gbps'] / result['copy_gbps']:.0f}%" for v in VERSIONS]
        lines.append(f"| {r['op']} | {r['pass']} | {r['dtype']} | {r['batch']} | {r['dim']} | {spans[0]} | {spans[1]} "
                     f"| {shares[0]} | {shares[1]} | {r['v2_speedup']:.2f}x |")
    lines += ["", "| op | v2 speed-up, geometric mean | at the largest batch | faster | default now |",
              "|---|---|---|---|---|"]
    for op, s in result["summary"].items():
        lines.append(f"| {op} | {s['v2_speedup_geomean']:.2f}x | {s['v2_speedup_geomean_largest_batch']:.2f}x "
                     f"({s['largest_batch']} rows) | version {s['faster_version']} | version {s['default_version']} |")
    return "\n".join(lines) + "\n"


def sizes_argument(text):
    """'65536x784,256x3072' -> [(65536, 784), (256, 3072)]."""
    try:
        sizes = [tuple(int(n) for n in item.strip().split("x")) for item in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or any(len(s) != 2 or min(s) < 1 for s in sizes):
        raise argparse.ArgumentTypeError(f"sizes are BATCHxFEATURES, comma-separated (e.g. 65536x784), got {text!r}")
    if any(features < 2 for _, features in sizes):
        raise argparse.ArgumentTypeError(f"a coupling needs at least 2 features, got {text!r}")
    return list(dict.fromkeys(sizes))


def ops_argument(text):
    names = [name.strip() for name in text.split(",")]
    unknown = [name for name in names if name not in ops.CUDA_KERNEL_OPS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown op {', '.join(repr(n) for n in unknown)}: choose from {', '.join(ops.CUDA_KERNEL_OPS)}")
    return list(dict.fromkeys(names))


def positive(kind):
    def parse(text):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value
    return parse


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cpu: only in the tests' emulated build of the CUDA kernels")
    p.add_argument("--quick", action="store_true", help="bench_coupling.py's --quick sizes")
    p.add_argument("--sizes", type=sizes_argument, default=None, metavar="BxD,...",
                   help="the (batch, features) entries (default: bench_coupling.py's)")
    p.add_argument("--ops", type=ops_argument, default=list(ops.CUDA_KERNEL_OPS), metavar="OPS",
                   help="comma-separated, from " + ", ".join(ops.CUDA_KERNEL_OPS) + " (default: all)")
    p.add_argument("--dtypes", type=dtypes_argument, default=[torch.float32, torch.bfloat16], metavar="DTYPES",
                   help="comma-separated (default: float32,bfloat16)")
    p.add_argument("--rounds", type=positive(int), default=4, help="turns per version and pass (default 4)")
    p.add_argument("--min-run-time", type=positive(float), default=0.2,
                   help="seconds of timing per entry, pass and version, over all its turns (default 0.2)")
    p.add_argument("--out", default=None, help="folder for <device>_kernel_versions.json / .md")
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not (torch.cuda.is_available() and ops.cuda_kernels_built()):
        p.error("--device cuda needs a CUDA GPU and a build of nice_ext with its CUDA kernels "
                f"(GPU: {torch.cuda.is_available()}, CUDA kernels built: {ops.cuda_kernels_built()})")
    if device.type == "cpu" and not ops.cuda_kernels_run_on_cpu_tensors():
        p.error("--device cpu: the CPU kernels have one version; the two versions are CUDA kernels (this "
                "runs on CPU tensors only in the tests' emulated build of them)")
    sizes = args.sizes or op_sizes(args.quick)
    started = time.time()
    result = provenance.record(device, "python benchmarks/compare_kernel_versions.py " + shlex.join(argv))
    result.pop("cuda_kernels", None)  # the process's setting: each entry here picks its op's version itself
    result.update(rounds=args.rounds, min_run_time=args.min_run_time,
                  copy_gbps=copy_bandwidth(device, args.min_run_time, max(b * d for b, d in sizes)))
    result["rows"] = compare(device, args.ops, args.dtypes, sizes, args.rounds, args.min_run_time)
    result["summary"] = summarize(result["rows"])
    result["seconds"] = time.time() - started
    table = markdown(result)
    print(table)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        stem = results_stem(args.out, result) + "_kernel_versions"
        with open(stem + ".json", "w") as f:
            json.dump(result, f, indent=1)
        with open(stem + ".md", "w") as f:
            f.write(table)
        print(f"wrote {stem}.json, .md")
    return result


if __name__ == "__main__":
    sys.exit(run_script(main))
