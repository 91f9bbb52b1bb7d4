"""The fused masked additive coupling update against its reference, its gradients, and its checks."""
import pytest
import torch

from conftest import (CUDA_KERNELS_EMULATED, DEVICES, MASK_KINDS, column_offset, coupling_masks, rel_error,
                      sliced)
from nice_ext import cuda_kernels_built, ops, reference
from nice_ext.masks import checkerboard_mask, coupling_maps, odd_even_mask

# dtype -> worst relative error allowed against a float64 result
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def make_case(batch, features, mask_kind, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask, next_mask = coupling_masks(features, mask_kind, g)
    updated = int((~mask).sum())
    x = torch.randn(batch, features, generator=g, dtype=torch.float64)
    shift = torch.randn(batch, updated, generator=g, dtype=torch.float64)
    shift_col, gather_index = coupling_maps(mask, next_mask)
    return (x.to(device, dtype), shift.to(device, dtype), shift_col.to(device), gather_index.to(device),
            x, shift)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch", [1, 3, 257])
@pytest.mark.parametrize("features", [2, 3, 784, 3072])
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("inverse", [False, True])
def test_matches_reference_on_sliced_inputs(device, batch, features, mask_kind, inverse):
    x, shift, shift_col, gather_index, x64, shift64 = make_case(batch, features, mask_kind, device, torch.float32)
    y, gathered = ops.coupling_update_indexed(sliced(x), sliced(shift), shift_col, gather_index, inverse)
    y_ref, gathered_ref = reference.coupling_update(x64, shift64, shift_col.cpu(), gather_index.cpu(), inverse)
    assert y.shape == (batch, features) and y.is_contiguous() and y.device.type == device
    assert rel_error(y, y_ref) < TOLERANCE[torch.float32]
    assert rel_error(gathered, gathered_ref) < TOLERANCE[torch.float32]
    # the kept features are copied bit for bit
    kept = shift_col.cpu() < 0
    assert torch.equal(y.cpu()[:, kept], x.cpu()[:, kept])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mask_kind", ["odd-even", "odd-even-last", "random"])
def test_dtypes_with_wide_accumulation(device, dtype, mask_kind):
    x, shift, shift_col, gather_index, x64, shift64 = make_case(257, 784, mask_kind, device, dtype)
    y, gathered = ops.coupling_update_indexed(x, shift, shift_col, gather_index)
    assert y.dtype == dtype and gathered.dtype == dtype
    y_ref, _ = reference.coupling_update(x.double().cpu(), shift.double().cpu(), shift_col.cpu(),
                                         gather_index.cpu(), False)
    assert rel_error(y, y_ref) < TOLERANCE[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("check", [torch.autograd.gradcheck, torch.autograd.gradgradcheck])
def test_gradcheck_float64(device, mask_kind, inverse, check):
    # gradgradcheck: a backward recorded with create_graph=True runs the composite twin (csrc/autograd.h);
    # before it, the fused backward cut the graph and second derivatives came out wrong, with a warning.
    x, shift, shift_col, gather_index, _, _ = make_case(3, 11, mask_kind, device, torch.float64)
    assert check(lambda a, b: ops.coupling_update_indexed(a, b, shift_col, gather_index, inverse),
                 (x.requires_grad_(True), shift.requires_grad_(True)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("features", [2, 3, 784])
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("inverse", [False, True])
def test_backward_op_matches_its_reference(device, features, mask_kind, inverse):
    x, shift, shift_col, gather_index, _, _ = make_case(5, features, mask_kind, device, torch.float64)
    grad_y = torch.randn_like(x)
    grad_gathered = torch.randn(5, gather_index.numel(), dtype=x.dtype, device=device)
    for gathered in (sliced(grad_gathered), None):
        args = (sliced(grad_y), gathered, shift_col, gather_index, shift.shape[1], inverse)
        fused = torch.ops.nice_ext.coupling_update_backward(*args)
        for name, got, expected in zip(("grad_x", "grad_shift"), fused, reference.coupling_update_backward(*args)):
            assert rel_error(got, expected) < 1e-12, name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch", [1, 257])
@pytest.mark.parametrize("features", [2, 8, 784])
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
def test_aligned_rows_match_reference_bit_for_bit(device, dtype, batch, features, mask_kind):
    # The layouts that choose how CUDA's version 2 walks a row: contiguous rows are read in 16-byte packs of
    # x, and for the paper's odd/even maps (find_odd_even_maps in csrc/cuda/coupling_rows.cuh) shift and
    # the next layer's input in half packs, with no index maps; a shift (or, backward, a gradient of the
    # next layer's input) one column into its buffer keeps the packs of x and takes the general loop
    # (except in float64, whose half pack is one element). Either way each element is one rounding of
    # x +/- shift, as in the reference in the same dtype.
    x, shift, shift_col, gather_index, _, _ = make_case(batch, features, mask_kind, device, dtype)
    grad_y, grad_gathered = torch.randn_like(x), torch.randn(batch, gather_index.numel(), device=device).to(dtype)
    for inverse in (False, True):
        expected = reference.coupling_update(x.cpu(), shift.cpu(), shift_col.cpu(), gather_index.cpu(), inverse)
        for layout in (lambda t: t, column_offset):
            got = ops.coupling_update_indexed(x, layout(shift), shift_col, gather_index, inverse)
            for name, a, b in zip(("y", "gathered"), got, expected):
                assert torch.equal(a.cpu(), b), (name, inverse)
        for gathered in (grad_gathered, column_offset(grad_gathered), None):
            args = (grad_y, gathered, shift_col, gather_index, shift.shape[1], inverse)
            on_cpu = (a.cpu() if isinstance(a, torch.Tensor) else a for a in args)
            expected = reference.coupling_update_backward(*on_cpu)
            got = torch.ops.nice_ext.coupling_update_backward(*args)
            for name, a, b in zip(("grad_x", "grad_shift"), got, expected):
                assert torch.equal(a.cpu(), b), (name, inverse, gathered is None)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
def test_gradients_match_reference(device, mask_kind):
    x, shift, shift_col, gather_index, x64, shift64 = make_case(257, 784, mask_kind, device, torch.float32)
    gy, gg = torch.randn_like(x), torch.randn(x.shape[0], gather_index.numel(), device=device)
    a, b = x.clone().requires_grad_(), shift.clone().requires_grad_()
    y, gathered = ops.coupling_update_indexed(a, b, shift_col, gather_index, True)
    torch.autograd.backward((y, gathered), (gy, gg))
    a64, b64 = x64.clone().requires_grad_(), shift64.clone().requires_grad_()
    y64, g64 = reference.coupling_update(a64, b64, shift_col.cpu(), gather_index.cpu(), True)
    torch.autograd.backward((y64, g64), (gy.double().cpu(), gg.double().cpu()))
    assert rel_error(a.grad, a64.grad) < 1e-6
    assert rel_error(b.grad, b64.grad) < 1e-6


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for mask_kind, batch, features in (("odd-even", 5, 8), ("random", 3, 13)):
        x, shift, shift_col, gather_index, _, _ = make_case(batch, features, mask_kind, device, torch.float32)
        x.requires_grad_(True)
        shift.requires_grad_(True)
        for inverse in (False, True):
            torch.library.opcheck(torch.ops.nice_ext.coupling_update, (x, shift, shift_col, gather_index, inverse))
        gy, gg = torch.randn_like(x), torch.randn(batch, gather_index.numel(), device=device)
        torch.library.opcheck(torch.ops.nice_ext.coupling_update_backward,
                              (gy, gg, shift_col, gather_index, shift.shape[1], False))
        torch.library.opcheck(torch.ops.nice_ext.coupling_update_backward,
                              (gy, None, shift_col, gather_index, shift.shape[1], True))
        for op in (torch.ops.nice_ext.coupling_update_backward, torch.ops.nice_ext.coupling_update_backward_composite):
            torch.library.opcheck(op, (gy.requires_grad_(True), gg, shift_col, gather_index, shift.shape[1], False))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    x, shift, shift_col, gather_index, _, _ = make_case(7, 30, "odd-even", device, torch.float32)

    def step(a, b):
        y, gathered = ops.coupling_update_indexed(a, b, shift_col, gather_index)
        return (y.square().sum() + gathered.sum())

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    a, b = x.clone().requires_grad_(), shift.clone().requires_grad_()
    compiled(a, b).backward()
    a2, b2 = x.clone().requires_grad_(), shift.clone().requires_grad_()
    step(a2, b2).backward()
    assert torch.allclose(a.grad, a2.grad) and torch.allclose(b.grad, b2.grad)


def test_mask_wrapper_and_checkerboard():
    mask = checkerboard_mask((1, 4, 5))
    x, shift = torch.randn(3, 20), torch.randn(3, 10)
    y, gathered = ops.coupling_update(x, shift, mask, next_mask=~mask)
    assert torch.equal(y[:, mask], x[:, mask])
    assert torch.allclose(y[:, ~mask], x[:, ~mask] + shift)
    assert torch.equal(gathered, y[:, ~mask])
    assert torch.allclose(ops.coupling_update(y, shift, mask, inverse=True), x, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_mask_wrapper_builds_index_maps_once_per_mask_and_follows_edits(device):
    """The mask-level API caches the index maps by the mask's contents and device: equal masks share them,
    a mask edited in place takes effect at once, and a bad mask raises on every call."""
    x, shift = torch.randn(3, 10, device=device), torch.randn(3, 5, device=device)
    mask = odd_even_mask(10)
    ops._device_index_maps.cache_clear()
    y = ops.coupling_update(x, shift, mask)
    assert torch.equal(ops.coupling_update(x, shift, mask.clone()), y)
    assert ops._device_index_maps.cache_info().misses == 1 and ops._device_index_maps.cache_info().hits == 1
    mask[:2] = torch.tensor([False, True])  # swap the roles of features 0 and 1
    y_edited = ops.coupling_update(x, shift, mask)
    assert torch.equal(y_edited[:, 1], x[:, 1]) and torch.allclose(y_edited[:, 0], x[:, 0] + shift[:, 0])
    assert ops._device_index_maps.cache_info().misses == 2
    for _ in range(2):
        with pytest.raises(ValueError, match="keep some features and update others"):
            ops.coupling_update(x, torch.randn(3, 0, device=device), torch.ones(10, dtype=torch.bool))
    with pytest.raises(ValueError, match="it keeps 0 of 0"):
        ops.coupling_update(x[:, :0], shift[:, :0], torch.zeros(0, dtype=torch.bool))


def test_empty_batch():
    x, shift, shift_col, gather_index, _, _ = make_case(0, 6, "odd-even", "cpu", torch.float32)
    y, gathered = ops.coupling_update_indexed(x, shift, shift_col, gather_index)
    assert y.shape == (0, 6) and gathered.shape == (0, 3)


@pytest.mark.parametrize("device", ["cpu"])  # CUDA: test_bad_cuda_inputs_raise, below
def test_bad_inputs_raise_clear_errors(device):
    x, shift, shift_col, gather_index, _, _ = make_case(4, 10, "odd-even", device, torch.float32)
    op = ops.coupling_update_indexed
    with pytest.raises(RuntimeError, match="batch size"):
        op(x, shift[:3], shift_col, gather_index)
    with pytest.raises(RuntimeError, match="one entry per feature"):
        op(x[:, :8], shift, shift_col, gather_index)
    with pytest.raises(RuntimeError, match="shift must have one column per updated feature"):
        op(x, torch.randn(4, 10, device=device), shift_col, gather_index)
    with pytest.raises(RuntimeError, match="floating-point"):
        op(x.long(), shift.long(), shift_col, gather_index)
    with pytest.raises(RuntimeError, match="same dtype"):
        op(x, shift.double(), shift_col, gather_index)
    with pytest.raises(RuntimeError, match="int32"):
        op(x, shift, shift_col.long(), gather_index)
    with pytest.raises(RuntimeError, match="2-D"):
        op(x[0], shift, shift_col, gather_index)
    mask = odd_even_mask(10)
    with pytest.raises(ValueError, match=r"shape \(10,\)"):
        ops.coupling_update(x, shift, mask[:9])
    with pytest.raises(ValueError, match="keep some features and update others"):
        ops.coupling_update(x, shift, torch.ones(10, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        ops.coupling_update(x, shift, mask.float())
    with pytest.raises(ValueError, match=r"shift must have shape \(4, 5\): one column per updated feature"):
        ops.coupling_update(x, shift[:, :4], mask)
    # Bad index map values: the CPU kernels check every entry; where CUDA kernels read the maps (here: the
    # CUDA emulation), the wrapper checks them first, with the same words (a CUDA kernel could only assert).
    bad_col = shift_col.clone()
    bad_col[1] = bad_col[3]  # two features onto one shift column
    with pytest.raises(RuntimeError, match="one-to-one onto the 5 columns of shift .*; entry 3 is 1"):
        op(x, shift, bad_col, gather_index)
    with pytest.raises(RuntimeError, match=r"distinct features in \[0, 10\); entry 1 is 1"):
        op(x, shift, shift_col, torch.tensor([1, 1], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="the coupling mask updates 4 features but shift has 5 columns"):
        op(x, shift, torch.tensor([-1, 0, -1, 1, -1, 2, -1, 3, -1, -1], dtype=torch.int32), gather_index)


@pytest.mark.parametrize("device", DEVICES)
def test_index_maps_are_checked_once_and_again_after_a_change(device, monkeypatch):
    """The wrappers' check of the index maps (run where CUDA kernels read them, tested here on every
    device): a map is read once, and again after it changes in place."""
    x, shift, shift_col, gather_index, _, _ = make_case(4, 10, "odd-even", device, torch.float32)
    reads = []
    real_problem = ops._shift_col_problem
    monkeypatch.setattr(ops, "_shift_col_problem", lambda col, updated: reads.append(1) or real_problem(col, updated))
    for _ in range(3):
        ops._check_index_maps(x, shift, shift_col, gather_index)
    assert len(reads) == 1  # read once, then a lookup per call
    shift_col[[1, 3]] = shift_col[[3, 1]]  # still one-to-one: another valid map, checked again
    ops._check_index_maps(x, shift, shift_col, gather_index)
    assert len(reads) == 2
    shift_col[1] = shift_col[3]  # changed in place after its check: no longer one-to-one
    with pytest.raises(RuntimeError, match="one-to-one"):
        ops._check_index_maps(x, shift, shift_col, gather_index)
    with pytest.raises(RuntimeError, match="one-to-one"):  # a map that failed is not remembered as checked
        ops._check_index_maps(x, shift, shift_col, gather_index)
    assert len(reads) == 4
    with torch.inference_mode():  # inference tensors have no version counter
        maps = [m.to(device) for m in coupling_maps(odd_even_mask(10), ~odd_even_mask(10))]
        for _ in range(2):
            ops._check_index_maps(x, shift, *maps)
    assert len(reads) == 5
    with pytest.raises(RuntimeError, match="distinct features"):
        ops._check_index_maps(x, shift, maps[0], torch.tensor([3, 3], dtype=torch.int32, device=device))
    key = (id(maps[0]), id(maps[1]))
    assert key in ops._checked_index_maps
    del maps  # a map that is freed is forgotten
    assert key not in ops._checked_index_maps


@pytest.mark.skipif(CUDA_KERNELS_EMULATED, reason="runs scripts/repro_bad_input.py on the real build")
def test_bad_cuda_inputs_raise():
    """scripts/repro_bad_input.py runs each bad call in its own child process: on one CUDA machine a bad
    input crashed the process instead of raising (a libstdc++ linked into the extension), and a crash must
    fail this test, not end the run. Without a GPU only its CPU cases run."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, os.path.join(root, "scripts", "repro_bad_input.py")], cwd=root,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"exit {result.returncode}:\n{result.stdout}\n{result.stderr[-2000:]}"
    # The whole message, numbers included: a libstdc++ linked into the extension truncated it at the first
    # number where it did not crash.
    assert "cpu-coupling: raised OK: nice_ext: shift must have the batch size of x (4 rows), got 3" in result.stdout
    expected = 1 + cuda_kernels_built() + (9 if torch.cuda.is_available() else 0)
    assert result.stdout.count("raised OK") == expected, result.stdout




@pytest.mark.skipif(CUDA_KERNELS_EMULATED, reason="the emulated copy of the package has no scripts/")
@pytest.mark.parametrize("device", DEVICES)
def test_sanitizer_workload_runs_and_matches_the_cpu_kernels(device):
    """scripts/sanitize_kernels.py, what check_cuda.sh runs under compute-sanitizer: every op and path,
    each result compared with the CPU kernels (on a GPU, a real comparison; on the CPU, it keeps the
    script working)."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, os.path.join(root, "scripts", "sanitize_kernels.py"), "--quick",
                             "--device", device], cwd=root, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"exit {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-2000:]}"
    # on a GPU, a gather_index with repeats per coupling op and version
    calls = 3888 + (4 if device == "cuda" else 0)
    assert f"{calls} calls on {device}" in result.stdout and ", 0 mismatches" in result.stdout


@pytest.mark.skipif(CUDA_KERNELS_EMULATED, reason="the emulated copy of the package has no scripts/")
def test_sanitizer_workload_takes_one_version_at_a_time():
    """--versions 2 launches version 2's kernels alone (half the calls), so that a slow sanitizer can run
    as one process per version; a version that does not exist is refused."""
    import os
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "sanitize_kernels.py")
    result = subprocess.run([sys.executable, script, "--quick", "--device", "cpu", "--versions", "2"],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "1944 calls on cpu" in result.stdout and "version 1," not in result.stdout
    assert "version 2, 5 x 9000: done" in result.stdout
    refused = subprocess.run([sys.executable, script, "--device", "cpu", "--versions", "1,3"],
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "the versions are 1, 2 or 1,2, got '1,3'" in refused.stderr
