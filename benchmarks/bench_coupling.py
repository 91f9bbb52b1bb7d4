"""Fused nice_ext ops vs the pure-PyTorch reference vs torch.compile of it, per op and per training step.

    python benchmarks/bench_coupling.py [--device cpu|cuda] [--quick] [--out DIR] [--cuda-kernels VERSIONS]
                                        [--dtypes float32,bfloat16,...]

Every entry is checked against the reference before it is timed. Times are medians (with p20/p80) from
torch.utils.benchmark, which synchronises CUDA. Achieved bandwidth counts the bytes an op must read and
write once, and is compared with a device copy measured in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import sys
import time

import numpy as np
import torch
from torch.utils import benchmark

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from nice_ext import NICE, ops, provenance, reference  # noqa: E402
from nice_ext.cli_common import run_script  # noqa: E402
from nice_ext.cuda_graph import GraphedTrainStep  # noqa: E402
from nice_ext.masks import coupling_maps, odd_even_mask  # noqa: E402
from nice_ext.seed_model import SeedMaskedNICE  # noqa: E402


def timeit(fn, min_run_time):
    # Timer runs single-threaded unless told otherwise; time with the threads a user's program gets.
    m = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=min_run_time)
    times = np.array(m.times) * 1e3
    return float(np.median(times)), float(np.percentile(times, 20)), float(np.percentile(times, 80))


def op_sizes(quick):
    """(batch, dim) of the per-op entries."""
    return [(256, 784), (4096, 784)] if quick else [(b, d) for b in (256, 4096, 65536) for d in (784, 3072)]


def copy_bandwidth(device, min_run_time, n):
    """GB/s (read + write) of a float32 copy of n elements: the size of the largest op's input, so that the
    ops and the copy meet the same level of the memory hierarchy (on a CPU, 12.8 MB may sit in cache)."""
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    median, _, _ = timeit(lambda: dst.copy_(src), min_run_time)
    return 2 * n * 4 / (median * 1e-3) / 1e9  # bytes read + written


def rel_error(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def op_cases(op, batch, dim, dtype, device):
    """(fused fn, reference fn, inputs, bytes per pass) for one op at one size."""
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, dim, device=device, dtype=dtype, generator=g)
    if op == "coupling":
        mask = odd_even_mask(dim, True)
        shift_col, gather = (t.to(device) for t in coupling_maps(mask, ~mask))
        shift = torch.randn(batch, int((~mask).sum()), device=device, dtype=dtype, generator=g)
        fused = lambda a, b: ops.coupling_update_indexed(a, b, shift_col, gather, False)  # noqa: E731
        ref = lambda a, b: reference.coupling_update(a, b, shift_col, gather, False)  # noqa: E731
        elements = x.numel() + shift.numel() + x.numel() + gather.numel() * batch  # read x, shift; write y, gathered
        return fused, ref, (x, shift), {"fwd": elements, "bwd": elements}
    if op == "affine_coupling":
        mask = odd_even_mask(dim, True)
        shift_col, gather = (t.to(device) for t in coupling_maps(mask, ~mask))
        updated = int((~mask).sum())
        raw, shift = torch.randn(batch, 2 * updated, device=device, dtype=dtype, generator=g).chunk(2, dim=1)
        fused = lambda a, r, b: ops.affine_coupling_update_indexed(a, r, b, shift_col, gather)  # noqa: E731
        ref = lambda a, r, b: reference.affine_coupling_update(a, r, b, shift_col, gather, "tanh", False)  # noqa: E731
        gathered = gather.numel() * batch
        # fwd: read x, raw, shift; write y, gathered. bwd: read grad_y, grad_gathered, x, raw, shift; write
        # grad_x, grad_raw, grad_shift (the per-row log_det and its gradient are negligible).
        return fused, ref, (x, raw, shift), {"fwd": 2 * x.numel() + 2 * raw.numel() + gathered,
                                             "bwd": 3 * x.numel() + 4 * raw.numel() + gathered}
    log_scale = torch.randn(dim, device=device, dtype=dtype, generator=g) * 0.1
    fused = lambda a, s: ops.scale_prior(a, s, "logistic", compute_z=False)[1]  # noqa: E731
    ref = lambda a, s: reference.scale_prior(a, s, "logistic", False)[1]  # noqa: E731
    return fused, ref, (x, log_scale), {"fwd": x.numel(), "bwd": 2 * x.numel()}  # read h; bwd also writes grad_h


def check_against_reference(case, label):
    """Correctness first: the fused op's values and gradients against the reference in float64. Returns the
    inputs as leaves that need a gradient and the output gradients the timings use."""
    fused, ref, inputs, _ = case
    dtype = inputs[0].dtype
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    ref64 = [t.detach().double().requires_grad_(True) for t in inputs]
    out_ref = as_tuple(ref(*ref64))
    out_fused = as_tuple(fused(*leaves))
    grads = [torch.randn_like(o) for o in out_fused]
    tol = 1e-5 if dtype in (torch.float32, torch.float64) else 2e-2
    for a, b in zip(out_fused, out_ref):
        assert rel_error(a, b) < tol, (*label, rel_error(a, b))
    g_fused = torch.autograd.grad(out_fused, leaves, grads)
    g_ref = torch.autograd.grad(out_ref, ref64, [g.double() for g in grads])
    for a, b in zip(g_fused, g_ref):
        assert rel_error(a, b) < tol * 10, (*label, "grad", rel_error(a, b))
    return leaves, grads


def as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def pass_calls(fn, leaves, grads):
    """What each pass times: the forward (a call), the backward (of one graph, kept) and both."""
    kept = as_tuple(fn(*leaves))  # also warms up torch.compile
    return {"fwd": lambda: fn(*leaves),
            "bwd": lambda: torch.autograd.grad(kept, leaves, grads, retain_graph=True),
            "fwd+bwd": lambda: torch.autograd.grad(as_tuple(fn(*leaves)), leaves, grads)}


def pass_gbps(case, pass_name, ms):
    """Achieved GB/s of a pass that took ``ms``, counting the bytes it must read and write once."""
    _, _, inputs, elements = case
    n = elements["fwd"] + elements["bwd"] if pass_name == "fwd+bwd" else elements[pass_name]
    return n * inputs[0].element_size() / (ms * 1e-3) / 1e9


def bench_ops(device, quick, dtypes, min_run_time):
    rows = []
    sizes = op_sizes(quick)
    for op in ("coupling", "affine_coupling", "scale_prior"):
        for dtype in dtypes:
            for batch, dim in sizes:
                case = op_cases(op, batch, dim, dtype, device)
                fused, ref, _, _ = case
                leaves, grads = check_against_reference(case, (op, dtype, batch, dim))
                # A compilation of its own for each entry: dynamo compiles the reference's code once per
                # shape and dtype, and past its recompile limit (8) runs it eagerly, which had made the
                # "compiled" column of every later entry (the bfloat16 ones at the full sizes) the eager time.
                torch._dynamo.reset()
                compiled = torch.compile(ref, dynamic=False)
                entry_rows = []  # one per pass
                for impl_name, fn in (("fused", fused), ("reference", ref), ("compiled", compiled)):
                    for pass_name, call in pass_calls(fn, leaves, grads).items():
                        median, p20, p80 = timeit(call, min_run_time)
                        key = dict(op=op, dtype=str(dtype).replace("torch.", ""), batch=batch, dim=dim)
                        key["pass"] = pass_name
                        row = next((r for r in entry_rows if all(r[k] == v for k, v in key.items())), None)
                        if row is None:
                            row = dict(key)
                            entry_rows.append(row)
                        row[f"{impl_name}_ms"] = median
                        row[f"{impl_name}_p20_ms"] = p20
                        row[f"{impl_name}_p80_ms"] = p80
                        if impl_name == "fused":
                            row["fused_gbps"] = pass_gbps(case, pass_name, median)
                # each entry's times as soon as it is done, for a run that a time limit stops short
                times = "; ".join(f"{r['pass']} {r['fused_ms']:.4f} / {r['reference_ms']:.4f} / {r['compiled_ms']:.4f} ms"
                                  for r in entry_rows)
                print(f"  {op} {str(dtype).replace('torch.', '')} {batch}x{dim} (fused / reference / compiled): {times}",
                      file=sys.stderr, flush=True)
                rows += entry_rows
    return rows


PAPER_MNIST = (784, 4, 5, 1000)  # data_dim, coupling layers, hidden layers, hidden units (paper §5.1)
TRAIN_STEP_VARIANT = re.compile(r"(seed-masked|reference|fused)-(eager|compiled|graphed)(-tf32|-bf16)?(-cublaslt)?"
                                r"(-affine)?(-overlap)?(-fuse-bias-relu)?(-default-adam)?")


@contextlib.contextmanager
def matmul_settings(variant: str):
    """torch's global matmul settings that a training-step variant names, restored afterwards: TF32
    (``-tf32``) and cuBLASLt for every GEMM (``-cublaslt``: its heuristics choose the kernels, which for GEMMs
    of a few hundred rows may differ from cuBLAS's)."""
    tf32, blas = torch.backends.cuda.matmul.allow_tf32, torch.backends.cuda.preferred_blas_library()
    torch.backends.cuda.matmul.allow_tf32 = "-tf32" in variant
    if "-cublaslt" in variant:
        torch.backends.cuda.preferred_blas_library("cublaslt")
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cuda.preferred_blas_library(blas)


def make_train_step(variant: str, pixels: torch.Tensor):
    """One optimizer step of the paper's MNIST model (4 couplings, 5 x 1000) on ``pixels``, as ``variant``
    names it: the model (``seed-masked``, ``reference``: pure-PyTorch ops, ``fused``; ``-affine``), how it
    runs (``-eager``, ``-compiled``, ``-graphed``: one CUDA graph), its precision (``-tf32``, ``-bf16``), the
    GEMM library (``-cublaslt``), the coupling networks' speed settings (``-overlap``, ``-fuse-bias-relu``)
    and ``-default-adam``. Returns a callable that takes the step, to be built and called within
    ``matmul_settings(variant)`` (TF32 and the GEMM library are torch's global settings)."""
    if not TRAIN_STEP_VARIANT.fullmatch(variant):
        raise ValueError(f"unknown training-step variant {variant!r} (the pattern: {TRAIN_STEP_VARIANT.pattern})")
    device = pixels.device
    torch.manual_seed(0)
    if variant.startswith("seed-masked"):
        model = SeedMaskedNICE(*PAPER_MNIST).to(device)
    else:
        model = NICE(*PAPER_MNIST, coupling="affine" if "affine" in variant else "additive",
                     fused=not variant.startswith("reference"), overlap_weight_grads="-overlap" in variant,
                     fuse_bias_relu="-fuse-bias-relu" in variant).to(device)
    graphed = "graphed" in variant
    # Every variant steps with fused Adam, as training does, except the one that shows what torch's
    # default Adam (a loop over parameters on a CPU, foreach on a GPU) costs.
    adam_flags = dict() if variant.endswith("default-adam") else dict(fused=True, capturable=graphed)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.99), eps=1e-4, **adam_flags)
    if "bf16" in variant:  # the coupling networks under bf16 autocast; the likelihood sums stay float32
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=not graphed)

        def loss_fn(x):
            with autocast:
                return -model.log_prob(x).float().mean()
    else:
        loss_fn = lambda x: -model.log_prob(x).mean()  # noqa: E731
    if "compiled" in variant:
        loss_fn = torch.compile(loss_fn)
    if graphed:  # forward, backward and Adam replayed as one CUDA graph
        graphed_step = GraphedTrainStep(loss_fn, optimizer, model.parameters())
        return lambda: graphed_step(pixels)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss_fn(pixels).backward()
        optimizer.step()

    return step


def train_step_variants(device, batch, quick, min_run_time, failures):
    """ms per optimizer step of the paper's MNIST model (4 couplings, 5 x 1000) in several variants. A variant
    that fails is appended to ``failures`` (variant, batch, error) and the others still run."""
    rows = []
    pixels = torch.rand(batch, 784, device=device)

    # Ablation: default -> fused Adam; seed -> odd/even model (halved first/last GEMMs) -> fused ops -> TF32 or
    # bf16 -> one CUDA graph -> weight gradients on a second stream (a second branch of the graph) and/or the
    # hidden layers' bias and ReLU in the GEMMs' epilogues (one kernel fewer per hidden layer); and every GEMM
    # through cuBLASLt, whose heuristics may choose other kernels than cuBLAS's for GEMMs of 200 rows.
    # The affine variants: the same model with affine couplings (paper §3.2.2), reference ops vs fused.
    # fused-eager-overlap: the coupling networks' own backward (weight gradients on a second stream on a GPU,
    # the same work on one on a CPU), eagerly: what it costs where it cannot overlap anything.
    variants = ["seed-masked-eager-default-adam", "seed-masked-eager", "reference-eager", "fused-eager",
                "fused-eager-overlap", "fused-eager-bf16", "reference-eager-affine", "fused-eager-affine"]
    if device.type == "cuda":
        variants += ["fused-eager-tf32", "fused-compiled-tf32", "seed-masked-graphed-tf32", "reference-graphed-tf32",
                     "fused-graphed", "fused-graphed-tf32", "fused-graphed-bf16", "fused-graphed-tf32-overlap",
                     "fused-graphed-tf32-fuse-bias-relu", "fused-graphed-tf32-overlap-fuse-bias-relu",
                     "fused-graphed-tf32-cublaslt"]
    elif not quick:
        variants += ["fused-compiled"]
    # A CPU step takes a few hundred ms: time several, so that p20 and p80 mean something.
    step_run_time = max(min_run_time, 2.0) if device.type == "cpu" else min_run_time
    for variant in variants:
        try:
            with matmul_settings(variant):
                median, p20, p80 = time_train_step(variant, pixels, step_run_time)
        except Exception as error:  # noqa: BLE001 (one variant's failure is a result, not the end of the run)
            failures.append(dict(variant=variant, batch=batch, error=f"{type(error).__name__}: {error}"))
            print(f"  train step {variant} batch {batch}: FAILED ({failures[-1]['error']})", file=sys.stderr,
                  flush=True)
            continue
        peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
        rows.append(dict(variant=variant, batch=batch, ms_per_step=median, p20_ms=p20, p80_ms=p80,
                         samples_per_s=batch / (median * 1e-3), peak_mem_mb=peak))
        print(f"  train step {variant} batch {batch}: {median:.2f} ms", file=sys.stderr, flush=True)
    return rows


def time_train_step(variant, pixels, run_time):
    """(median, p20, p80) ms of ``variant``'s step, after five steps of warm-up (and, for a graphed variant,
    the capture); on a GPU the peak memory statistics start after them."""
    step = make_train_step(variant, pixels)
    for _ in range(5):
        step()
    if pixels.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    return timeit(step, run_time)


def bench_call_cost(device, min_run_time):
    """Time of one call at batch 1 (784 features, float32), with inputs that need a gradient as in training:
    the kernels' work vanishes and what is left is each op's host cost (argument checks, dispatch, autograd
    bookkeeping), which an eager step pays per op on a GPU or with a small model."""
    rows = []
    for op in ("coupling", "affine_coupling", "scale_prior"):
        fused, ref, inputs, _ = op_cases(op, 1, 784, torch.float32, device)
        leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
        row = dict(op=op, batch=1, dim=784)
        for impl_name, fn in (("fused", fused), ("reference", ref)):
            def outputs():
                return as_tuple(fn(*leaves))

            grads = [torch.ones_like(o) for o in outputs()]
            row[f"{impl_name}_fwd_us"] = timeit(outputs, min_run_time)[0] * 1e3
            row[f"{impl_name}_fwd_bwd_us"] = timeit(lambda: torch.autograd.grad(outputs(), leaves, grads),
                                                    min_run_time)[0] * 1e3
        rows.append(row)
    return rows


def markdown(result):
    lines = [f"# nice_ext benchmark: {result['device']}", "",
             f"torch {result['torch']}, CUDA {result['cuda']}, commit {result['commit']}, {result['date']}, "
             f"{result.get('cpu_threads', 1)} CPU threads ({result.get('cpu', 'CPU model not recorded')})  ",
             f"command: `{result['command']}`  ",
             *([f"CUDA row kernels: {kernel_versions_text(result['cuda_kernels'])}  "]
               if "cuda_kernels" in result else []),
             f"copy bandwidth (read + write): {result['copy_gbps']:.1f} GB/s", "",
             "| op | pass | dtype | batch | dim | fused ms | reference ms | compiled ms | fused GB/s | % of copy "
             "| vs reference | vs compiled |", "|" + "---|" * 12]
    for r in result["ops"]:
        lines.append(f"| {r['op']} | {r['pass']} | {r['dtype']} | {r['batch']} | {r['dim']} | {r['fused_ms']:.4f} "
                     f"| {r['reference_ms']:.4f} | {r['compiled_ms']:.4f} | {r['fused_gbps']:.1f} "
                     f"| {100 * r['fused_gbps'] / result['copy_gbps']:.0f}% | {r['reference_ms'] / r['fused_ms']:.2f}x "
                     f"| {r['compiled_ms'] / r['fused_ms']:.2f}x |")
    lines += ["", "| train step variant | batch | ms/step (p20-p80) | samples/s | peak MB | speed-up vs seed |",
              "|---|---|---|---|---|---|"]
    for r in result["train_step"]:
        seed = next((s for s in result["train_step"]  # (None where that variant failed)
                     if s["variant"] == "seed-masked-eager" and s["batch"] == r["batch"]), None)
        speedup = f"{seed['ms_per_step'] / r['ms_per_step']:.2f}x" if seed else "-"
        lines.append(f"| {r['variant']} | {r['batch']} | {r['ms_per_step']:.2f} ({r['p20_ms']:.2f}-{r['p80_ms']:.2f}) "
                     f"| {r['samples_per_s']:.0f} | {r['peak_mem_mb']:.0f} | {speedup} |")
    for r in result.get("train_step_failures", []):
        lines.append(f"| {r['variant']} | {r['batch']} | failed: {r['error'][:200]} | | | |")
    lines += ["", "| one call at batch 1 (host cost) | fused fwd us | fused fwd+bwd us | reference fwd us "
              "| reference fwd+bwd us |", "|---|---|---|---|---|"]
    for r in result.get("call_cost", []):
        lines.append(f"| {r['op']} | {r['fused_fwd_us']:.1f} | {r['fused_fwd_bwd_us']:.1f} "
                     f"| {r['reference_fwd_us']:.1f} | {r['reference_fwd_bwd_us']:.1f} |")
    summary = result["summary"]
    lines += ["", f"Median over entries: fused vs reference {summary['median_speedup_vs_reference']:.2f}x, "
              f"fused vs torch.compile {summary['median_speedup_vs_compiled']:.2f}x; largest batch: median "
              f"{summary['largest_batch_median_pct_of_copy']:.0f}% of copy bandwidth."]
    return "\n".join(lines) + "\n"


def kernel_versions_text(versions):
    """'version 1' (results before the per-op switch recorded one number), or each op's version."""
    if isinstance(versions, int):
        return f"version {versions}"
    return ", ".join(f"{op} version {v}" for op, v in versions.items())


def results_stem(out_dir, result):
    """<device>, with _kernels_v1 / _kernels_v2 / _kernels_coupling_v2_scale_prior_v1 (say) appended when
    the CUDA row kernels timed are not the defaults."""
    stem = os.path.join(out_dir, result["device"].replace(" ", "_").replace("(", "").replace(")", ""))
    versions = result.get("cuda_kernels")
    if versions is None or versions == ops.default_cuda_kernel_versions():
        return stem
    if len(set(versions.values())) == 1:
        return stem + f"_kernels_v{next(iter(versions.values()))}"
    return stem + "_kernels_" + "_".join(f"{op}_v{v}" for op, v in versions.items())


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    entries = [r for r in result["ops"] if r["pass"] == "fwd+bwd" and r["dtype"] == "float32"]
    panels = sorted({(r["op"], r["dim"]) for r in entries})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, (op, dim) in zip(axes[0], panels):
        rs = sorted((r for r in entries if r["op"] == op and r["dim"] == dim), key=lambda r: r["batch"])
        for impl in ("fused", "reference", "compiled"):
            ax.plot([r["batch"] for r in rs], [r[f"{impl}_ms"] for r in rs], marker="o", label=impl)
        ax.set(xscale="log", yscale="log", xlabel="batch", ylabel="ms (fwd+bwd)", title=f"{op}, D={dim}, float32")
        # plain labels: the measured batches, and 1-2-5 steps in ms (log-axis minor labels collide)
        ax.set_xticks([r["batch"] for r in rs], [str(r["batch"]) for r in rs])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(result["device"])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cuda_kernels_argument(text):
    try:
        return ops.parse_cuda_kernel_versions(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


OP_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
             "float16": torch.float16}


def dtypes_argument(text):
    """'float32,float64' -> [torch.float32, torch.float64]: the dtypes of the per-op entries."""
    names = [name.strip() for name in text.split(",")]
    unknown = [name for name in names if name not in OP_DTYPES]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown dtype {', '.join(repr(name) for name in unknown)}: choose from {', '.join(OP_DTYPES)}")
    return [OP_DTYPES[name] for name in dict.fromkeys(names)]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="a small subset (well under a minute on a 2-core CPU)")
    p.add_argument("--out", default=None, help="folder for <device>.json / .md / .png")
    p.add_argument("--no-train-step", action="store_true")
    p.add_argument("--min-run-time", type=float, default=None, help="seconds of timing per entry")
    p.add_argument("--cuda-kernels", type=cuda_kernels_argument, default=None, metavar="VERSIONS",
                   help="generations of CUDA row kernels to time: 1 or 2 for every op, or per op, e.g. "
                        "coupling=2,scale_prior=1 (ops: " + ", ".join(ops.CUDA_KERNEL_OPS) + "; default: the defaults, or NICE_EXT_CUDA_KERNELS); results "
                        "of other versions than the defaults go to <device>_kernels_v1.* and so on")
    p.add_argument("--dtypes", type=dtypes_argument, default=None, metavar="DTYPES",
                   help="comma-separated dtypes of the per-op entries, from " + ", ".join(OP_DTYPES) +
                        " (default: float32, and bfloat16 on cuda)")
    args = p.parse_args()
    if args.cuda_kernels is not None:
        with ops.use_cuda_kernels(**args.cuda_kernels):
            return run(args)
    return run(args)


def run(args):
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda, but no CUDA GPU is available")
    min_run_time = args.min_run_time or (0.05 if args.quick else 0.3)
    dtypes = args.dtypes or [torch.float32] + ([torch.bfloat16] if device.type == "cuda" else [])
    started = time.time()
    result = provenance.record(device, "python benchmarks/bench_coupling.py " + shlex.join(sys.argv[1:]))
    result.update(cpu_threads=torch.get_num_threads(),
                  copy_gbps=copy_bandwidth(device, min_run_time, max(b * d for b, d in op_sizes(args.quick))))
    result["ops"] = bench_ops(device, args.quick, dtypes, min_run_time)
    result["call_cost"] = bench_call_cost(device, min_run_time)
    result["train_step_failures"] = []
    result["train_step"] = [] if args.no_train_step else [
        row for batch in ((200,) if args.quick else (200, 2048))
        for row in train_step_variants(device, batch, args.quick, min_run_time, result["train_step_failures"])]
    largest = max(r["batch"] for r in result["ops"])
    result["summary"] = dict(
        median_speedup_vs_reference=float(np.median([r["reference_ms"] / r["fused_ms"] for r in result["ops"]])),
        median_speedup_vs_compiled=float(np.median([r["compiled_ms"] / r["fused_ms"] for r in result["ops"]])),
        largest_batch_median_pct_of_copy=float(np.median(
            [100 * r["fused_gbps"] / result["copy_gbps"] for r in result["ops"] if r["batch"] == largest])),
        seconds=time.time() - started)
    table = markdown(result)
    print(table)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        stem = results_stem(args.out, result)
        with open(stem + ".json", "w") as f:
            json.dump(result, f, indent=1)
        with open(stem + ".md", "w") as f:
            f.write(table)
        plot(result, stem + ".png")
        print(f"wrote {stem}.json, .md, .png")


if __name__ == "__main__":
    sys.exit(run_script(main))
