"""The two generations of CUDA row kernels (``nice_ext.ops.use_cuda_kernels``): the per-op switch, and
version 2 against version 1 on every layout that picks a different path in version 2 (16-byte packs on
contiguous rows and on strided rows that stay aligned, one element per access otherwise, version 1 for
rows too wide for the shared-memory scales). The other CUDA tests run under the defaults (version 2) and
under ``NICE_EXT_CUDA_KERNELS=1`` (scripts/check_cuda.sh), and on the emulated kernels under ``=1`` and ``=2``;
this file runs there once, under ``=2`` (tests/test_cuda_emulation.py)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import CUDA_KERNEL_DEVICE as DEVICE
from conftest import CUDA_KERNELS_EMULATED, ROOT, coupling_masks, needs_cuda_kernels, rel_error, run_python, sliced
from nice_ext import ops, reference
from nice_ext.masks import coupling_maps

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# How each test lays its (batch, features) inputs out, and the path version 2 takes for it:
#   contiguous      16-byte packs when 16 bytes of elements divide the features
#   aligned-slice   rows strided by features + 16, starting 8 elements in: packs on strided rows
#   odd-slice       the tests' usual slice (offset and stride by 3): one element per access (the scaling
#                   + prior forward still gives each lane the packs it takes on the other layouts)
LAYOUTS = ["contiguous", "aligned-slice", "odd-slice"]
FEATURES = [2, 3, 784, 3072, 9000]  # 9000: float32 scales over 32 KiB, so scaling + prior keep version 1
# 20000 rows: more than the grid holds (132 multiprocessors x 8 blocks x 8 rows on an H100), so the
# grid-stride loop over rows runs too. The CUDA emulation's grid (2 multiprocessors) is full at 257.
SIZES = [(batch, features) for batch in (1, 257) for features in FEATURES]
SIZES += [] if CUDA_KERNELS_EMULATED else [(20000, 3), (20000, 784)]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def laid_out(t, layout):
    if layout == "contiguous":
        return t.contiguous()
    if layout == "aligned-slice":
        return sliced(t, pad_rows=1, pad_cols=8)
    return sliced(t)


def with_version(version, fn, *args):
    with ops.use_cuda_kernels(version):
        out = fn(*args)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
    return out


def versions_at_import(value):
    return run_python("from nice_ext import ops; print(ops.cuda_kernel_versions())",
                      env=dict(NICE_EXT_CUDA_KERNELS=value), timeout=120)


# What this process started with: the defaults, changed by what scripts/check_cuda.sh may have asked for.
_ASKED = os.environ.get("NICE_EXT_CUDA_KERNELS", "").strip()
STARTED_WITH = {**ops.default_cuda_kernel_versions(), **(ops.parse_cuda_kernel_versions(_ASKED) if _ASKED else {})}


def test_defaults_are_each_ops_faster_version():
    # benchmarks/results/NVIDIA_H100_80GB_HBM3_kernels_v*.md: version 2's scaling + prior forward is
    # 1.6-2.2x faster at 65536 rows; benchmarks/results/NVIDIA_H200_kernel_versions.md: version 2 of the
    # coupling and of the affine coupling, 1.25x and 1.38x (geometric means over their entries).
    assert ops.default_cuda_kernel_versions() == {"coupling": 2, "scale_prior": 2, "affine_coupling": 2}
    assert ops.cuda_kernel_versions() == STARTED_WITH


def test_switch_for_every_op_and_for_one():
    with ops.use_cuda_kernels(2):
        assert ops.cuda_kernel_versions() == {"coupling": 2, "scale_prior": 2, "affine_coupling": 2}
        with ops.use_cuda_kernels(scale_prior=1):
            assert ops.cuda_kernel_versions() == {"coupling": 2, "scale_prior": 1, "affine_coupling": 2}
            with ops.use_cuda_kernels(1, coupling=2):  # a per-op version wins over the version for all
                assert ops.cuda_kernel_versions() == {"coupling": 2, "scale_prior": 1, "affine_coupling": 1}
                assert ops.cuda_kernel_version("coupling") == 2 and ops.cuda_kernel_version("scale_prior") == 1
            with ops.use_cuda_kernels(affine_coupling=1):
                assert ops.cuda_kernel_versions() == {"coupling": 2, "scale_prior": 1, "affine_coupling": 1}
        assert ops.cuda_kernel_versions() == {"coupling": 2, "scale_prior": 2, "affine_coupling": 2}
    assert ops.cuda_kernel_versions() == STARTED_WITH
    with pytest.raises(RuntimeError, match="inside"):
        with ops.use_cuda_kernels(coupling=2, scale_prior=1):
            raise RuntimeError("inside")
    assert ops.cuda_kernel_versions() == STARTED_WITH  # restored after an exception too


@pytest.mark.parametrize("kwargs", [dict(version=0), dict(version=3), dict(version=-1), dict(version="2"),
                                    dict(version=2.0), dict(version=True), dict(coupling=3),
                                    dict(version=2, scale_prior=0), dict(scale_prior="1"),
                                    dict(affine_coupling=0)])
def test_bad_version_raises_and_changes_nothing(kwargs):
    with pytest.raises(ValueError, match="CUDA kernel version must be one of"):
        with ops.use_cuda_kernels(**kwargs):
            pass
    assert ops.cuda_kernel_versions() == STARTED_WITH


def test_a_switch_must_name_a_version():
    with pytest.raises(ValueError, match="needs a version"):
        with ops.use_cuda_kernels():
            pass
    with pytest.raises(TypeError):
        with ops.use_cuda_kernels(affine=2):
            pass
    with pytest.raises(ValueError, match="ops with two generations"):
        ops.cuda_kernel_version("affine")


@pytest.mark.parametrize("value, expected", [  # the defaults: version 2 for every op
    ("2", (2, 2, 2)), ("1", (1, 1, 1)), (" 1 ", (1, 1, 1)), ("", (2, 2, 2)),
    ("coupling=1", (1, 2, 2)), ("scale_prior=1", (2, 1, 2)), ("scale_prior=1, coupling=1", (1, 1, 2)),
    ("affine_coupling=1", (2, 2, 1))])
def test_environment_variable_sets_the_versions_at_import(value, expected):
    out = versions_at_import(value)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(dict(zip(("coupling", "scale_prior", "affine_coupling"), expected)))


@pytest.mark.parametrize("value", ["v2", "3", "coupling", "coupling=3", "affine=2", "affine_coupling=0",
                                   "coupling=1,coupling=2", "coupling=1,"])
def test_bad_environment_variable_is_a_clear_error(value):
    out = versions_at_import(value)
    assert out.returncode != 0
    assert "NICE_EXT_CUDA_KERNELS: CUDA kernel versions are '1', '2' or per op" in out.stderr
    assert repr(value) in out.stderr


def test_the_compiled_switch_checks_its_arguments():
    from nice_ext import _C

    with pytest.raises(ValueError, match="has the index 3"):
        _C.cuda_kernel_version(3)
    with pytest.raises(ValueError, match="has the index -1"):
        _C.set_cuda_kernel_version(-1, 1)
    with pytest.raises(ValueError, match="must be 1 or 2, got 5"):
        _C.set_cuda_kernel_version(0, 5)
    with pytest.raises(TypeError):
        _C.set_cuda_kernel_version(0)
    assert ops.cuda_kernel_versions() == STARTED_WITH


@needs_gpu
@pytest.mark.parametrize("op, version_2_kernel", [("scale_prior", "scale_prior_rows_kernel"),
                                                  ("coupling", "coupling_update_rows_kernel"),
                                                  ("affine_coupling", "affine_coupling_update_rows_kernel")])
def test_each_switch_launches_its_own_ops_kernels(op, version_2_kernel):
    x = torch.randn(64, 784, device="cuda")
    log_scale = torch.randn(784, device="cuda")
    mask = torch.arange(784) % 2 == 0
    shift_col, gather_index = (m.cuda() for m in coupling_maps(mask, ~mask))
    shift = torch.randn(64, 392, device="cuda")

    def every_op():
        ops.scale_prior(x, log_scale)
        torch.ops.nice_ext.coupling_update(x, shift, shift_col, gather_index, False)
        torch.ops.nice_ext.affine_coupling_update(x, shift, shift, shift_col, gather_index, "tanh", False)

    names = {}
    for version in (1, 2):
        with ops.use_cuda_kernels(3 - version, **{op: version}):  # the other ops run the other version
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                every_op()
                torch.cuda.synchronize()
        names[version] = " ".join(e.name for e in prof.events())
    # "::name<": coupling_update_rows_kernel is also the end of affine_coupling_update_rows_kernel's name.
    assert f"::{version_2_kernel}<" in names[2] and f"::{version_2_kernel}<" not in names[1]


def test_the_package_says_whether_its_cuda_kernels_run_on_cpu_tensors():
    assert ops.cuda_kernels_run_on_cpu_tensors() is CUDA_KERNELS_EMULATED


@needs_cuda_kernels
def test_kernel_version_comparison_runs_where_the_cuda_kernels_run(tmp_path):
    """benchmarks/compare_kernel_versions.py end to end, at small sizes (its logic: tests/test_benchmark.py)."""
    result = subprocess.run([sys.executable, "benchmarks/compare_kernel_versions.py", "--device", DEVICE,
                             "--sizes", "3x10,5x64", "--dtypes", "float32", "--rounds", "2", "--min-run-time", "0.01",
                             "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    written = list(tmp_path.glob("*_kernel_versions.json"))
    assert len(written) == 1
    rows = json.loads(written[0].read_text())["rows"]
    assert len(rows) == 3 * 2 * 2 and all(r["v1_ms"] > 0 and r["v2_ms"] > 0 for r in rows)
    assert "| affine_coupling | bwd | float32 | 5 | 64 |" in result.stdout


@needs_cuda_kernels
@pytest.mark.parametrize("batch, features", SIZES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_kind", ["odd-even", "odd-even-last", "random"])
@pytest.mark.parametrize("inverse", [False, True])
def test_coupling_versions_agree_bit_for_bit(batch, features, layout, dtype, mask_kind, inverse):
    g = torch.Generator().manual_seed(features * 7 + batch)
    mask, next_mask = coupling_masks(features, mask_kind, g)
    shift_col, gather_index = (m.to(DEVICE) for m in coupling_maps(mask, next_mask))
    x = laid_out(torch.randn(batch, features, generator=g).to(DEVICE, dtype), layout)
    shift = laid_out(torch.randn(batch, int((~mask).sum()), generator=g).to(DEVICE, dtype), layout)
    grad_y = laid_out(torch.randn(batch, features, generator=g).to(DEVICE, dtype), layout)
    grad_gathered = laid_out(torch.randn(batch, gather_index.numel(), generator=g).to(DEVICE, dtype), layout)
    forward = torch.ops.nice_ext.coupling_update
    backward = torch.ops.nice_ext.coupling_update_backward
    updated = shift.shape[1]
    for fn, args in ((forward, (x, shift, shift_col, gather_index, inverse)),
                     (backward, (grad_y, grad_gathered, shift_col, gather_index, updated, inverse))):
        for v1, v2 in zip(with_version(1, fn, *args), with_version(2, fn, *args)):
            assert torch.equal(v1, v2)


@needs_cuda_kernels
@pytest.mark.parametrize("dtype", DTYPES)
def test_coupling_index_maps_at_unaligned_addresses(dtype):
    """Index maps that start 4 bytes into their buffer cannot be read in packs: version 2 must see it."""
    g = torch.Generator().manual_seed(0)
    mask, next_mask = coupling_masks(784, "odd-even", g)
    maps = []
    for m in coupling_maps(mask, next_mask):
        buffer = torch.zeros(m.numel() + 1, dtype=torch.int32, device=DEVICE)
        buffer[1:] = m.to(DEVICE)
        maps.append(buffer[1:])
    x = torch.randn(257, 784, generator=g).to(DEVICE, dtype)
    shift = torch.randn(257, 392, generator=g).to(DEVICE, dtype)
    grad_y, grad_gathered = torch.randn_like(x), torch.randn(257, 392, device=DEVICE, dtype=dtype)
    expected = with_version(1, torch.ops.nice_ext.coupling_update, x, shift, *maps, False)
    actual = with_version(2, torch.ops.nice_ext.coupling_update, x, shift, *maps, False)
    expected += with_version(1, torch.ops.nice_ext.coupling_update_backward, grad_y, grad_gathered, *maps, 392, False)
    actual += with_version(2, torch.ops.nice_ext.coupling_update_backward, grad_y, grad_gathered, *maps, 392, False)
    for a, b in zip(expected, actual):
        assert torch.equal(a, b)


@needs_cuda_kernels
@pytest.mark.parametrize("batch, features", SIZES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_kind", ["odd-even", "random"])
@pytest.mark.parametrize("law, inverse", [("tanh", False), ("tanh", True), ("unbounded", False)])
def test_affine_coupling_versions_agree(batch, features, layout, dtype, mask_kind, law, inverse):
    g = torch.Generator().manual_seed(features * 5 + batch)
    mask, next_mask = coupling_masks(features, mask_kind, g)
    shift_col, gather_index = (m.to(DEVICE) for m in coupling_maps(mask, next_mask))
    updated = int((~mask).sum())

    def data(*shape):
        return laid_out(torch.randn(*shape, generator=g).to(DEVICE, dtype), layout)

    x, raw, shift = data(batch, features), data(batch, updated), data(batch, updated)
    grad_y, grad_gathered = data(batch, features), data(batch, gather_index.numel())
    grad_log_det = torch.randn(batch, generator=g).to(DEVICE)
    forward = torch.ops.nice_ext.affine_coupling_update
    y1, gathered1, log_det1 = with_version(1, forward, x, raw, shift, shift_col, gather_index, law, inverse)
    y2, gathered2, log_det2 = with_version(2, forward, x, raw, shift, shift_col, gather_index, law, inverse)
    assert torch.equal(y1, y2) and torch.equal(gathered1, gathered2)  # the same operations per element
    # log|det| is summed over the row in another order: version 2 must be as close to float64 as version 1
    # is, up to rounding, deterministic, and the same for every layout of the inputs. Rounding is judged
    # against the sum of |a| over the row, not |log_det|: with the tanh law the terms nearly cancel (one
    # row of 392 sums to -2.3 while its |a| sum to about 230), and there any order of a float32 sum can
    # be 100 times further from float64, relative to |log_det|, than a few roundings.
    *_, log_det64 = reference.affine_coupling_update(x.double().cpu(), raw.double().cpu(), shift.double().cpu(),
                                                     shift_col.cpu(), gather_index.cpu(), law, inverse)
    log_scale64 = raw.double().cpu().tanh() if law == "tanh" else raw.double().cpu()
    rounding = (1e-15 if dtype == torch.float64 else 5e-7) * float(log_scale64.abs().sum(dim=1).norm())

    def error(log_det):
        return float((log_det.double().cpu() - log_det64).norm())

    assert error(log_det2) <= max(2 * error(log_det1), rounding)
    contiguous = [t.contiguous() for t in (x, raw, shift)]
    for args in ((x, raw, shift), contiguous):
        assert torch.equal(with_version(2, forward, *args, shift_col, gather_index, law, inverse)[2], log_det2)
    # The backward has no sums over a row: bit for bit, with every gradient given and with grad_y alone.
    backward = torch.ops.nice_ext.affine_coupling_update_backward
    for grads in ((grad_y, grad_gathered, grad_log_det), (grad_y, None, None)):
        args = (*grads, x, raw, shift, shift_col, gather_index, law, inverse)
        for v1, v2 in zip(with_version(1, backward, *args), with_version(2, backward, *args)):
            assert torch.equal(v1, v2)


@needs_cuda_kernels
@pytest.mark.parametrize("batch, features", SIZES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("prior", ["logistic", "gaussian"])
def test_scaling_versions_agree(batch, features, layout, dtype, prior):
    g = torch.Generator().manual_seed(features + batch)
    h = laid_out((torch.randn(batch, features, generator=g) * 2).to(DEVICE, dtype), layout)
    log_scale = (torch.randn(features, generator=g) * 0.5).to(DEVICE, dtype)
    z1, lp1 = with_version(1, ops.scale_prior, h, log_scale, prior)
    z2, lp2 = with_version(2, ops.scale_prior, h, log_scale, prior)
    assert torch.equal(z1, z2)  # the same exp(log_scale) times the same h
    # The row sums run in another order (and add sum(log_scale) once instead of per feature): version 2
    # must be as close to the float64 result as version 1 is, up to rounding.
    _, lp64 = reference.scale_prior(h.double().cpu(), log_scale.double().cpu(), prior, False)
    floor = 1e-12 if dtype == torch.float64 else 1e-6
    assert rel_error(lp2, lp64) <= max(2 * rel_error(lp1, lp64), floor)
    _, lp_only = with_version(2, lambda: ops.scale_prior(h, log_scale, prior, compute_z=False))
    assert torch.equal(lp_only, lp2)
    # Every layout of h is summed in the same order (packs read one element at a time where unaligned).
    _, lp_contiguous = with_version(2, ops.scale_prior, h.contiguous(), log_scale, prior)
    assert torch.equal(lp_contiguous, lp2)
    assert torch.equal(with_version(1, ops.scale_inverse, z1, log_scale),
                       with_version(2, ops.scale_inverse, laid_out(z1, layout), log_scale))


# 4099 rows: 17 per reduction chunk, so every row lane of version 2's backward (16 per chunk) has rows.
@needs_cuda_kernels
@pytest.mark.parametrize("batch, features", SIZES + [(4099, 3), (4099, 24)])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("prior", ["logistic", "gaussian"])
@pytest.mark.parametrize("with_grad_z", [True, False])
def test_scaling_backward_versions_agree(batch, features, layout, dtype, prior, with_grad_z):
    g = torch.Generator().manual_seed(features + batch + 1)
    h = laid_out((torch.randn(batch, features, generator=g) * 2).to(DEVICE, dtype), layout)
    log_scale = (torch.randn(features, generator=g) * 0.5).to(DEVICE, dtype)
    grad_log_prob = torch.randn(batch, generator=g).to(DEVICE)
    # grad_z laid out unlike h where it can be, so that either one can keep version 2 from reading packs.
    grad_z_layout = {"contiguous": "odd-slice", "odd-slice": "aligned-slice"}.get(layout, layout)
    grad_z = laid_out(torch.randn(batch, features, generator=g).to(DEVICE, dtype), grad_z_layout) if with_grad_z else None
    backward = torch.ops.nice_ext.scale_prior_backward
    gh1, gs1 = with_version(1, backward, grad_log_prob, grad_z, h, log_scale, prior)
    gh2, gs2 = with_version(2, backward, grad_log_prob, grad_z, h, log_scale, prior)
    assert torch.equal(gh1, gh2)  # the same operations per element
    # grad(log_scale) is summed over the rows in another order: version 2 must be as close to float64 as
    # version 1 is, up to rounding, deterministic, and the same for every layout of h and grad_z.
    # Copies: in the host build h may already be a float64 CPU tensor, and marking it would send the calls
    # below, made with gradient mode on, to the backward op's composite twin (csrc/autograd.h).
    h64, s64 = (t.to("cpu", torch.float64, copy=True).requires_grad_() for t in (h, log_scale))
    z64, lp64 = reference.scale_prior(h64, s64, prior, True)
    outputs, grads = ((lp64,), (grad_log_prob.double().cpu(),)) if grad_z is None else \
        ((lp64, z64), (grad_log_prob.double().cpu(), grad_z.double().cpu()))
    gs64 = torch.autograd.grad(outputs, s64, grads)[0]
    floor = 1e-12 if dtype == torch.float64 else 1e-6
    assert rel_error(gs2, gs64) <= max(2 * rel_error(gs1, gs64), floor)
    contiguous = with_version(2, backward, grad_log_prob, None if grad_z is None else grad_z.contiguous(),
                              h.contiguous(), log_scale, prior)
    again = with_version(2, backward, grad_log_prob, grad_z, h, log_scale, prior)
    for a, b, c in zip((gh2, gs2), contiguous, again):
        assert torch.equal(a, b) and torch.equal(a, c)


@needs_cuda_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "odd-slice"])
@pytest.mark.parametrize("op", ["coupling", "affine_coupling"])
def test_coupling_forward_with_a_feature_gathered_twice(dtype, layout, op):
    """The CPU kernels refuse a gather_index that names a feature twice; the CUDA forward still computes
    gathered = y[:, gather_index] with it, in both versions (version 2's one pass over the row then
    recomputes the gathered copy in a second)."""
    g = torch.Generator().manual_seed(3)
    mask, next_mask = coupling_masks(784, "odd-even", g)
    shift_col, _ = (m.to(DEVICE) for m in coupling_maps(mask, next_mask))
    gather_index = torch.tensor([0, 5, 5, 783, 0, 2, 401], dtype=torch.int32, device=DEVICE)
    x = laid_out(torch.randn(257, 784, generator=g).to(DEVICE, dtype), layout)
    shift = laid_out(torch.randn(257, 392, generator=g).to(DEVICE, dtype), layout)
    if op == "coupling":
        args = (torch.ops.nice_ext.coupling_update, x, shift, shift_col, gather_index, False)
    else:
        raw = laid_out(torch.randn(257, 392, generator=g).to(DEVICE, dtype), layout)
        args = (torch.ops.nice_ext.affine_coupling_update, x, raw, shift, shift_col, gather_index, "tanh", False)
    outputs = [with_version(version, *args) for version in (1, 2)]
    for y, gathered, *_ in outputs:
        assert torch.equal(gathered, y[:, gather_index.long()])
    assert all(torch.equal(a, b) for a, b in zip(outputs[0][:2], outputs[1][:2]))  # log_det: another order
