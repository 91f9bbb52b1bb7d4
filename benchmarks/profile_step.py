"""Where a training step's time goes: the paper's MNIST model (4 couplings, 5 x 1000) under torch.profiler,
in the variants of bench_coupling.py's training step.

    python benchmarks/profile_step.py [--device cuda|cpu] [--batch 200] [--steps 20] [--top 12]
        [--variants fused-graphed-tf32,fused-graphed-tf32-overlap,...] [--out FILE.md]

For each variant, first the wall time per step (the mean of ``--steps`` steps after warm-up, synchronised,
without the profiler), then a profile of as many steps:
- on a GPU, the device's work: what ran per step (kernels, copies and fills), the sum of their durations,
  and the time at least one of them ran (their union: with two streams the sum can exceed it). Wall time
  minus busy time is the time the GPU waited: on launches, on the host, on dependencies.
- on a CPU, the ATen operators per step (every level: aten::linear and the aten::addmm inside it both
  count) and their self time.
Then the names that take the most time, with count and microseconds per step. A graphed variant's kernels
appear only where the profiler (CUPTI) traces inside CUDA graphs; the table says when it saw none.
"""
import argparse
import collections
import os
import sys
import time
from typing import Dict, List

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from bench_coupling import TRAIN_STEP_VARIANT, make_train_step, matmul_settings  # noqa: E402
from nice_ext import files, provenance  # noqa: E402
from nice_ext.cli_common import UsageError, run_script  # noqa: E402

DEFAULT_VARIANTS = {
    "cuda": ["fused-graphed-tf32", "fused-graphed-tf32-overlap", "fused-graphed-tf32-fuse-bias-relu",
             "fused-graphed-tf32-overlap-fuse-bias-relu", "fused-graphed-tf32-cublaslt", "fused-eager-tf32",
             "fused-eager-tf32-cublaslt"],
    "cpu": ["fused-eager", "fused-eager-fuse-bias-relu"],
}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def union_length(intervals) -> float:
    """The length of the union of (start, end) intervals."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def profile_variant(variant: str, device: torch.device, batch: int, steps: int, warmup: int = 5) -> Dict:
    """Wall time per step, then one profile of ``steps`` steps: per name, how often it ran and its time
    (device events on a GPU, ATen operators' self time on a CPU), and on a GPU the union of the device
    events' intervals. Times in microseconds per step."""
    with matmul_settings(variant):
        pixels = torch.rand(batch, 784, device=device, generator=torch.Generator(device).manual_seed(0))
        step = make_train_step(variant, pixels)
        for _ in range(warmup):  # (a graphed variant: three eager steps, then the capture, as in the benchmark)
            step()
        synchronize(device)
        started = time.perf_counter()
        for _ in range(steps):
            step()
        synchronize(device)
        wall_us = (time.perf_counter() - started) / steps * 1e6
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(steps):
                step()
            synchronize(device)
    summary = summarize(prof.events(), steps, on_device=device.type == "cuda")
    return dict(variant=variant, batch=batch, steps=steps, wall_us=wall_us, **summary)


def summarize(events, steps: int, on_device: bool) -> Dict:
    """Per step, from a profile's events: how many ran and their summed time (``events_per_step``,
    ``event_us``), per name (``names``), and on a GPU the time at least one ran (``busy_us``, the union of
    their intervals; None on a CPU). On a GPU the events are what ran on the device (kernels, copies,
    fills), each timed by its own interval; on a CPU the ATen operators, by their self time (not the
    Python-side record_function ranges)."""
    if on_device:
        events = [e for e in events if e.device_type == DeviceType.CUDA]
    else:
        events = [e for e in events if e.device_type == DeviceType.CPU and e.name.startswith("aten::")]
    counts: Dict[str, int] = collections.Counter()
    times: Dict[str, float] = collections.defaultdict(float)
    for event in events:
        counts[event.name] += 1
        times[event.name] += event.time_range.elapsed_us() if on_device else event.self_cpu_time_total
    busy = union_length((e.time_range.start, e.time_range.end) for e in events) if on_device else None
    return dict(events_per_step=sum(counts.values()) / steps, event_us=sum(times.values()) / steps,
                busy_us=busy / steps if busy is not None else None,
                names={name: dict(count=counts[name] / steps, us=times[name] / steps) for name in counts})


def short(name: str, width: int = 90) -> str:
    name = name.replace("|", "\\|")
    return name if len(name) <= width else name[:width - 3] + "..."


def markdown(results: List[Dict], device: torch.device, top: int, header: Dict) -> str:
    unit = "device events (kernels, copies, fills)" if device.type == "cuda" else "ATen operators"
    lines = [f"# A training step, profiled: {header['device']}", "",
             f"torch {header['torch']}, CUDA {header['cuda']}, commit {header['commit']}, {header['date']}  ",
             f"command: `{header['command']}`  ",
             f"the paper's MNIST model (4 couplings, 5 x 1000), batch {results[0]['batch']}, "
             f"{results[0]['steps']} steps; per step: {unit}", ""]
    if device.type == "cuda":
        lines += ["| variant | wall us | events | sum of their us | busy us (union) | wall - busy us |",
                  "|---|---|---|---|---|---|"]
        for r in results:
            seen = r["events_per_step"] > 0
            lines.append(f"| {r['variant']} | {r['wall_us']:.0f} | {r['events_per_step']:.1f} | "
                         + (f"{r['event_us']:.0f} | {r['busy_us']:.0f} | {r['wall_us'] - r['busy_us']:.0f} |" if seen
                            else "none seen (inside a CUDA graph) | - | - |"))
    else:
        lines += ["| variant | wall us | operators | self us |", "|---|---|---|---|"]
        lines += [f"| {r['variant']} | {r['wall_us']:.0f} | {r['events_per_step']:.1f} | {r['event_us']:.0f} |"
                  for r in results]
    for r in results:
        ranked = sorted(r["names"].items(), key=lambda item: -item[1]["us"])[:top]
        lines += ["", f"## {r['variant']}: the {len(ranked)} that take the most", "",
                  "| name | per step | us per step |", "|---|---|---|"]
        lines += [f"| {short(name)} | {entry['count']:g} | {entry['us']:.1f} |" for name, entry in ranked]
    return "\n".join(lines) + "\n"


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=positive_int, default=200)
    p.add_argument("--steps", type=positive_int, default=20, help="steps timed, and steps profiled")
    p.add_argument("--top", type=positive_int, default=12, help="names listed per variant")
    p.add_argument("--variants", default=None,
                   help="comma-separated variant names, as bench_coupling.py's training step spells them "
                        "(default: " + "; ".join(f"{k}: {','.join(v)}" for k, v in DEFAULT_VARIANTS.items()) + ")")
    p.add_argument("--out", default=None, help="also write the tables to this markdown file")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but no CUDA GPU is available")
    variants = args.variants.split(",") if args.variants else DEFAULT_VARIANTS[device.type]
    unknown = [v for v in variants if not TRAIN_STEP_VARIANT.fullmatch(v)]
    if unknown:
        raise UsageError(f"unknown variant(s) {', '.join(unknown)}: names as bench_coupling.py's training step "
                         f"spells them ({TRAIN_STEP_VARIANT.pattern})")
    if device.type != "cuda" and any(part in v for v in variants for part in ("graphed", "tf32", "cublaslt")):
        raise UsageError("graphed, tf32 and cublaslt variants need --device cuda")
    if args.out:  # a folder that cannot take the file fails now, not after the profiles
        folder = os.path.dirname(os.path.abspath(args.out))
        os.makedirs(folder, exist_ok=True)
        files.check_can_write_in(folder, args.out)
    header = provenance.record(device, "python benchmarks/profile_step.py " + " ".join(sys.argv[1:]))
    results = []
    for variant in variants:
        results.append(profile_variant(variant, device, args.batch, args.steps))
        print(f"  {variant}: {results[-1]['wall_us']:.0f} us per step", file=sys.stderr, flush=True)
    table = markdown(results, device, args.top, header)
    print(table)
    if args.out:
        files.write_bytes(table.encode(), args.out)
    return results


if __name__ == "__main__":
    sys.exit(run_script(main))
