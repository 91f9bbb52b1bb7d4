"""Every path of every CUDA kernel, launched a few times each: the workload for compute-sanitizer.

    compute-sanitizer --tool memcheck python scripts/sanitize_kernels.py [--quick] [--versions 1,2]
    (scripts/check_cuda.sh runs it for the memcheck, racecheck, initcheck and synccheck stages)

The op tests check values, but under a sanitizer they take too long for a limited call on a GPU machine
(655 CUDA op tests, many of them gradchecks of hundreds of launches each). This script instead launches,
for each generation of the row kernels (``nice_ext.ops.use_cuda_kernels``), each op's forward, inverse and
backward (with and without the optional gradients) over:
  - every dtype (float32, float64, bfloat16, float16);
  - each layout that picks its own path: contiguous rows (16-byte packs), strided rows that stay aligned
    (packs on strided rows), and rows at odd offsets and strides (one element per access);
  - widths below and above a warp and a block, and past the 32 KiB of shared-memory scales (9000);
  - one row, a few hundred, and more rows than the grid holds (the grid-stride loop);
  - index maps of each kind (odd/even with and without a next layer, which version 2 walks without the
    maps where the rows allow half packs, and random masks), index maps that start 4 bytes into their
    buffer (no packs), and (on a GPU) a gather_index that repeats a feature.
Each result is compared loosely with the op's CPU kernel, so that a launch that does nothing, or reads
garbage, fails here too; values in detail are the tests' job. Tensors are allocated without PyTorch's
caching allocator where the caller sets PYTORCH_NO_CUDA_MEMORY_CACHING=1 (check_cuda.sh does), so that
memcheck sees an out-of-bounds access past one tensor rather than into its neighbour in a cached block.

With ``--device cpu`` the same calls run on the CPU kernels, which keeps this script tested without a GPU
(tests/test_op_coupling.py); the comparisons are then of the CPU kernels with themselves.
Exit status: 0 when every call ran and matched; 1 with a list of mismatches otherwise.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # an in-place build works too
from nice_ext import ops  # noqa: E402
from nice_ext.masks import coupling_maps, odd_even_mask  # noqa: E402

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
LAYOUTS = ["contiguous", "aligned-slice", "odd-slice"]
# (batch, features). 20000 rows are more than the grid holds on an H100 (132 multiprocessors x 8 blocks x
# 8 rows); 9000 float32 scales are over 32 KiB, so the scaling + prior op's version 2 falls back to 1.
SIZES = [(1, 2), (257, 3), (257, 33), (1, 784), (257, 784), (33, 3072), (5, 9000), (20000, 33)]
QUICK_SIZES = [(1, 2), (257, 33), (33, 784), (5, 9000)]
MASK_KINDS = ["odd-even", "odd-even-last", "random"]
# Loose bounds on ||cuda - cpu|| / ||cpu||: the kernels sum in other orders, and half types round.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def laid_out(t, layout):
    """``t`` contiguous, or the same values in a larger buffer: rows strided by features + 16 starting 8
    elements in (16-byte aligned for every dtype), or at an offset and stride of 3 (unaligned)."""
    if layout == "contiguous":
        return t.contiguous()
    pad = 8 if layout == "aligned-slice" else 3
    big = torch.zeros(t.shape[0] + 2, t.shape[1] + 2 * pad, dtype=t.dtype, device=t.device)
    view = big[1:1 + t.shape[0], pad:pad + t.shape[1]]
    view.copy_(t)
    return view


def masks(features, kind, generator):
    if kind == "odd-even":
        return odd_even_mask(features, True), odd_even_mask(features, False)
    if kind == "odd-even-last":
        return odd_even_mask(features, True), None
    while True:
        mask, next_mask = (torch.rand(2, features, generator=generator) < 0.4).unbind()
        if 0 < int(mask.sum()) < features and 0 < int(next_mask.sum()) < features:
            return mask, next_mask


def unaligned(index_map):
    """The same int32 map, starting 4 bytes into its buffer."""
    buffer = torch.zeros(index_map.numel() + 1, dtype=index_map.dtype, device=index_map.device)
    buffer[1:] = index_map
    return buffer[1:]


class Checker:
    def __init__(self, device):
        self.device = device
        self.calls = 0
        self.mismatches = []

    def __call__(self, name, op, *args):
        """Runs ``op`` on the device and on the CPU; records a mismatch between them."""
        outputs = op(*args)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.calls += 1
        on_cpu = op(*(a.cpu() if isinstance(a, torch.Tensor) else a for a in args))
        outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
        on_cpu = on_cpu if isinstance(on_cpu, (tuple, list)) else (on_cpu,)
        for i, (actual, expected) in enumerate(zip(outputs, on_cpu)):
            if actual.numel() == 0 and expected.numel() == 0:
                continue
            actual, expected = actual.detach().cpu().double(), expected.detach().double()
            error = float((actual - expected).norm() / expected.norm().clamp_min(1e-300))
            if not (actual.shape == expected.shape and torch.isfinite(actual).all() and error <= TOLERANCE[args[0].dtype]):
                self.mismatches.append(f"{name}, output {i}: relative error {error:.3g}")
        return outputs


def additive_coupling(check, tag, x, maps, layout, inverse):
    g = torch.Generator().manual_seed(x.shape[1])
    shift_col, gather_index = maps
    updated = int((shift_col >= 0).sum())
    shift = laid_out(torch.randn(x.shape[0], updated, generator=g).to(x), layout)
    y, gathered = check(f"coupling_update {tag}", torch.ops.nice_ext.coupling_update, x, shift, shift_col,
                        gather_index, inverse)
    grad_y = laid_out(torch.randn(y.shape, generator=g).to(x), layout)
    grad_gathered = laid_out(torch.randn(gathered.shape, generator=g).to(x), layout)
    for with_gathered in (True, False):
        check(f"coupling_update_backward {tag} grad_gathered={with_gathered}",
              torch.ops.nice_ext.coupling_update_backward, grad_y, grad_gathered if with_gathered else None,
              shift_col, gather_index, updated, inverse)


def affine_coupling(check, tag, x, maps, layout, inverse):
    g = torch.Generator().manual_seed(x.shape[1] + 1)
    shift_col, gather_index = maps
    updated = int((shift_col >= 0).sum())
    raw, shift = (laid_out(torch.randn(x.shape[0], updated, generator=g).to(x), layout) for _ in range(2))
    for law in ops.AFFINE_LOG_SCALE_LAWS:
        y, gathered, log_det = check(f"affine_coupling_update {tag} {law}", torch.ops.nice_ext.affine_coupling_update,
                                     x, raw, shift, shift_col, gather_index, law, inverse)
        grad_y = laid_out(torch.randn(y.shape, generator=g).to(x), layout)
        grad_gathered = torch.randn(gathered.shape, generator=g).to(x)
        grad_log_det = torch.randn(log_det.shape, generator=g).to(log_det)
        for present in ((True, True), (False, False)):
            check(f"affine_coupling_update_backward {tag} {law} optional gradients {present}",
                  torch.ops.nice_ext.affine_coupling_update_backward, grad_y,
                  grad_gathered if present[0] else None, grad_log_det if present[1] else None, x, raw, shift,
                  shift_col, gather_index, law, inverse)


def scaling_and_prior(check, tag, h, layout):
    g = torch.Generator().manual_seed(h.shape[1] + 2)
    log_scale = (torch.randn(h.shape[1], generator=g) * 0.5).to(h)
    for prior in ops.PRIORS:
        for compute_z in (True, False):
            z, log_prob = check(f"scale_prior {tag} {prior} compute_z={compute_z}", torch.ops.nice_ext.scale_prior,
                                h, log_scale, prior, compute_z)
        grad_log_prob = torch.randn(log_prob.shape, generator=g).to(log_prob)
        grad_z = laid_out(torch.randn(h.shape, generator=g).to(h), layout)
        for with_z in (True, False):
            check(f"scale_prior_backward {tag} {prior} grad_z={with_z}", torch.ops.nice_ext.scale_prior_backward,
                  grad_log_prob, grad_z if with_z else None, h, log_scale, prior)
    check(f"scale_inverse {tag}", torch.ops.nice_ext.scale_inverse, laid_out(h.clone(), layout), log_scale)


def gather_with_repeats(check, device, tag):
    """A raw forward call whose gather_index names features twice, which the CPU kernels refuse and the
    CUDA forward computes (version 2 by a second pass): checked against y[:, gather_index] itself."""
    if device.type != "cuda":
        return
    g = torch.Generator().manual_seed(5)
    mask = odd_even_mask(784, True)
    shift_col = coupling_maps(mask, ~mask)[0].to(device)
    gather_index = torch.tensor([0, 5, 5, 783, 0, 2, 401], dtype=torch.int32, device=device)
    x, shift = torch.randn(257, 784, generator=g).to(device), torch.randn(257, 392, generator=g).to(device)
    outputs = {"coupling_update": torch.ops.nice_ext.coupling_update(x, shift, shift_col, gather_index, False),
               "affine_coupling_update": torch.ops.nice_ext.affine_coupling_update(x, shift, shift, shift_col,
                                                                                   gather_index, "tanh", False)}
    for name, (y, gathered, *_) in outputs.items():
        check.calls += 1
        if not torch.equal(gathered, y[:, gather_index.long()]):
            check.mismatches.append(f"{name} {tag} with a repeated gather_index: gathered is not y[:, gather_index]")


def run(device, sizes, dtypes, layouts, started, versions=ops.CUDA_KERNEL_VERSIONS):
    check = Checker(device)
    for version in versions:
        with ops.use_cuda_kernels(version):
            gather_with_repeats(check, device, f"v{version}")
            for batch, features in sizes:
                g = torch.Generator().manual_seed(batch * 31 + features)
                # index maps for every mask kind, and one pair starting 4 bytes into its buffers
                maps = {kind: tuple(m.to(device) for m in coupling_maps(*masks(features, kind, g)))
                        for kind in MASK_KINDS}
                maps["odd-even, unaligned maps"] = tuple(unaligned(m) for m in maps["odd-even"])
                for dtype in dtypes:
                    for layout in layouts:
                        x = laid_out((torch.randn(batch, features, generator=g) * 2).to(device, dtype), layout)
                        tag = f"v{version} {tuple(x.shape)} {dtype} {layout}"
                        scaling_and_prior(check, tag, x, layout)
                        for kind, kind_maps in maps.items():
                            for inverse in (False, True):
                                additive_coupling(check, f"{tag} {kind} inverse={inverse}", x, kind_maps, layout,
                                                  inverse)
                                affine_coupling(check, f"{tag} {kind} inverse={inverse}", x, kind_maps, layout,
                                                inverse)
                # progress, for a run that a time limit stops
                print(f"version {version}, {batch} x {features}: done at {time.time() - started:.0f} s, "
                      f"{check.calls} calls", flush=True)
    return check


def versions_argument(text):
    versions = tuple(dict.fromkeys(item.strip() for item in text.split(",")))
    if not versions or any(v not in {str(k) for k in ops.CUDA_KERNEL_VERSIONS} for v in versions):
        raise argparse.ArgumentTypeError(f"the versions are 1, 2 or 1,2, got {text!r}")
    return tuple(int(v) for v in versions)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--quick", action="store_true", help="fewer sizes, float32 and bfloat16 only")
    # A slow tool (racecheck) can then run as one process per version, side by side.
    p.add_argument("--versions", type=versions_argument, default=ops.CUDA_KERNEL_VERSIONS, metavar="1,2",
                   help="the generations of row kernels to launch (default: 1,2)")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not (torch.cuda.is_available() and ops.cuda_kernels_built()):
        sys.exit("error: --device cuda needs a CUDA GPU and a build of nice_ext with its CUDA kernels")
    started = time.time()
    check = run(device, QUICK_SIZES if args.quick else SIZES,
                [torch.float32, torch.bfloat16] if args.quick else DTYPES, LAYOUTS, started, args.versions)
    print(f"{check.calls} calls on {args.device} in {time.time() - started:.1f} s, "
          f"{len(check.mismatches)} mismatches with the CPU kernels")
    for line in check.mismatches[:50]:
        print("  " + line)
    sys.exit(1 if check.mismatches else 0)


if __name__ == "__main__":
    main()
