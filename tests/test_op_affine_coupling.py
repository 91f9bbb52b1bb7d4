"""The fused masked affine coupling update against its reference, its gradients, its math, and its checks."""
import math

import pytest
import torch

from conftest import DEVICES, MASK_KINDS, column_offset, coupling_masks, rel_error, sliced
from nice_ext import ops, reference
from nice_ext.masks import checkerboard_mask, coupling_maps, odd_even_mask

# dtype -> worst relative error allowed against a float64 result
TOLERANCE = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}
LAWS = ["tanh", "unbounded"]


def make_case(batch, features, mask_kind, device, dtype, seed=0):
    """x, log_scale_raw and shift (as the two halves of one network output, like the model's) and the index
    maps on ``device`` in ``dtype``, plus float64 CPU copies of the three tensors."""
    g = torch.Generator().manual_seed(seed)
    mask, next_mask = coupling_masks(features, mask_kind, g)
    updated = int((~mask).sum())
    x = torch.randn(batch, features, generator=g, dtype=torch.float64)
    params = torch.randn(batch, 2 * updated, generator=g, dtype=torch.float64)
    raw, shift = params.to(device, dtype).chunk(2, dim=1)
    shift_col, gather_index = coupling_maps(mask, next_mask)
    raw64, shift64 = params.chunk(2, dim=1)
    return x.to(device, dtype), raw, shift, shift_col.to(device), gather_index.to(device), (x, raw64, shift64)


def reference_of(case, law, inverse):
    _, _, _, shift_col, gather_index, (x64, raw64, shift64) = case
    return reference.affine_coupling_update(x64, raw64, shift64, shift_col.cpu(), gather_index.cpu(), law, inverse)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch", [1, 3, 257])
@pytest.mark.parametrize("features", [2, 3, 784, 3072])
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("law", LAWS)
@pytest.mark.parametrize("inverse", [False, True])
def test_matches_reference_on_sliced_inputs(device, batch, features, mask_kind, law, inverse):
    case = make_case(batch, features, mask_kind, device, torch.float32)
    x, raw, shift, shift_col, gather_index, _ = case
    # raw and shift are column slices of one buffer (the network output's two halves), x a slice of another
    y, gathered, log_det = ops.affine_coupling_update_indexed(sliced(x), raw, shift, shift_col, gather_index, law,
                                                              inverse)
    y_ref, gathered_ref, log_det_ref = reference_of(case, law, inverse)
    assert y.shape == (batch, features) and y.is_contiguous() and y.device.type == device
    assert log_det.shape == (batch,) and log_det.dtype == torch.float32
    assert rel_error(y, y_ref) < TOLERANCE[torch.float32]
    assert rel_error(gathered, gathered_ref) < TOLERANCE[torch.float32]
    assert rel_error(log_det, log_det_ref) < TOLERANCE[torch.float32]
    kept = shift_col.cpu() < 0  # copied bit for bit
    assert torch.equal(y.cpu()[:, kept], x.cpu()[:, kept])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("law", LAWS)
def test_dtypes_with_wide_accumulation(device, dtype, law):
    case = make_case(257, 784, "odd-even", device, dtype)
    x, raw, shift, shift_col, gather_index, _ = case
    y, gathered, log_det = ops.affine_coupling_update_indexed(x, raw, shift, shift_col, gather_index, law)
    assert y.dtype == gathered.dtype == dtype
    assert log_det.dtype == (torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype)
    # the reference on the same (rounded) inputs, in float64
    y_ref, _, log_det_ref = reference.affine_coupling_update(x.double().cpu(), raw.double().cpu(),
                                                             shift.double().cpu(), shift_col.cpu(),
                                                             gather_index.cpu(), law, False)
    assert rel_error(y, y_ref) < TOLERANCE[dtype]
    # a sum of 392 log-scales accumulated in float32 or wider, whatever the input dtype
    assert rel_error(log_det, log_det_ref) < (1e-12 if dtype == torch.float64 else 1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_log_scale_math_elementwise(device, dtype):
    """With one updated feature, x = 1 and shift = 0, a row's outputs are a = law(r) itself (log_det) and
    e^{+/-a} (y): the kernels' tanh and exp checked value by value against float64, over the whole range
    of arguments: tiny, moderate, and where exp overflows to inf or underflows through the denormals to 0."""
    finfo = torch.finfo(dtype)
    top = math.log(finfo.max)  # about 88.7 (float32) or 709.8 (float64)
    bottom = math.log(finfo.smallest_normal * finfo.eps)  # the smallest denormal
    raw64 = torch.cat([torch.linspace(-1.5 * top, 1.5 * top, 20001, dtype=torch.float64),
                       torch.linspace(-1, 1, 20001, dtype=torch.float64),  # tanh's polynomial and its edge
                       torch.logspace(-30, 0, 301, dtype=torch.float64), -torch.logspace(-30, 0, 301, dtype=torch.float64),
                       torch.tensor([0.0, 0.624, 0.625, 0.626, -0.625, 20.0, -20.0, top - 0.01, top + 0.01, bottom,
                                     bottom - 1.0], dtype=torch.float64)])
    raw = raw64.to(dtype)
    batch = raw.numel()
    mask = torch.tensor([True, False])
    shift_col, gather_index = (t.to(device) for t in coupling_maps(mask, None))
    x = torch.ones(batch, 2, dtype=dtype, device=device)
    zeros = torch.zeros(batch, 1, dtype=dtype, device=device)
    for law in LAWS:
        expected_a = torch.tanh(raw.double()) if law == "tanh" else raw.double()
        for inverse in (False, True):
            y, _, log_det = ops.affine_coupling_update_indexed(x, raw.to(device)[:, None], zeros, shift_col,
                                                               gather_index, law, inverse)
            sign = -1.0 if inverse else 1.0
            a = (sign * log_det).double().cpu()
            tiny = finfo.smallest_normal
            assert ((a - expected_a).abs() <= 4 * finfo.eps * expected_a.abs().clamp_min(tiny)).all(), (law, inverse)
            expected_e = torch.exp(sign * expected_a).to(dtype).double()  # rounded as the dtype must
            e = y[:, 1].double().cpu()
            assert torch.equal(torch.isinf(e), torch.isinf(expected_e)), (law, inverse)
            finite = torch.isfinite(expected_e)
            error = (e - expected_e)[finite].abs()
            # a few ulp where the result is normal; denormals carry fewer bits, so an absolute bound there
            bound = 8 * finfo.eps * expected_e[finite].abs() + 2 * tiny * finfo.eps
            assert (error <= bound).all(), (law, inverse, float((error / bound).max()))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("law", LAWS)
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("check", [torch.autograd.gradcheck, torch.autograd.gradgradcheck])
def test_gradcheck_float64(device, mask_kind, law, inverse, check):
    # gradgradcheck: a backward recorded with create_graph=True runs the composite twin (csrc/autograd.h).
    x, raw, shift, shift_col, gather_index, _ = make_case(3, 11, mask_kind, device, torch.float64)
    inputs = tuple(t.detach().clone().requires_grad_(True) for t in (x, raw, shift))
    assert check(lambda a, r, b: ops.affine_coupling_update_indexed(a, r, b, shift_col, gather_index, law, inverse),
                 inputs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("features", [2, 8, 784])
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("law", LAWS)
def test_layouts_of_log_scales_and_shifts_give_the_same_bits(device, dtype, features, mask_kind, law):
    # For the paper's odd/even maps CUDA's version 2 reads the log-scales and shifts (and writes their
    # gradients) in half packs where their rows allow it, and takes the general loop where they start one
    # column into their buffers (find_odd_even_maps in csrc/cuda/coupling_rows.cuh; float64's half pack is
    # one element, which any row allows). Both compute each element alike and sum a row's log|det| in one
    # order, so every output is the same to the bit.
    x, raw, shift, shift_col, gather_index, _ = make_case(257, features, mask_kind, device, dtype)
    g = torch.Generator().manual_seed(2)
    grad_y = torch.randn(x.shape, generator=g).to(device, dtype)
    grad_gathered = torch.randn(x.shape[0], gather_index.numel(), generator=g).to(device, dtype)
    log_det_dtype = torch.float64 if dtype == torch.float64 else torch.float32  # the kernels' accumulation
    grad_log_det = torch.randn(x.shape[0], generator=g).to(device, log_det_dtype)
    for inverse in (False, True):
        outputs = []
        for layout in (lambda t: t, column_offset):
            forward = torch.ops.nice_ext.affine_coupling_update(x, layout(raw), layout(shift), shift_col,
                                                                gather_index, law, inverse)
            backward = torch.ops.nice_ext.affine_coupling_update_backward(
                grad_y, layout(grad_gathered), grad_log_det, x, layout(raw), layout(shift), shift_col, gather_index,
                law, inverse)
            outputs.append((*forward, *backward))
        names = ("y", "gathered", "log_det", "grad_x", "grad_log_scale_raw", "grad_shift")
        for name, a, b in zip(names, *outputs):
            assert torch.equal(a, b), (name, inverse)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("features", [2, 3, 784])
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("law", LAWS)
@pytest.mark.parametrize("inverse", [False, True])
def test_backward_op_matches_its_reference(device, features, mask_kind, law, inverse):
    x, raw, shift, shift_col, gather_index, _ = make_case(5, features, mask_kind, device, torch.float64)
    g = torch.Generator().manual_seed(1)
    grad_y = torch.randn(x.shape, generator=g, dtype=x.dtype).to(device)
    grad_gathered = torch.randn(5, gather_index.numel(), generator=g, dtype=x.dtype).to(device)
    grad_log_det = torch.randn(5, generator=g, dtype=x.dtype).to(device)
    for gathered, log_det in ((sliced(grad_gathered), grad_log_det), (None, None)):
        args = (sliced(grad_y), gathered, log_det, sliced(x), raw, shift, shift_col, gather_index, law, inverse)
        fused = torch.ops.nice_ext.affine_coupling_update_backward(*args)
        expected = reference.affine_coupling_update_backward(*args)
        for name, got, want in zip(("grad_x", "grad_log_scale_raw", "grad_shift"), fused, expected):
            assert rel_error(got, want) < 1e-12, name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("law", LAWS)
@pytest.mark.parametrize("inverse", [False, True])
def test_gradients_match_reference(device, mask_kind, law, inverse):
    case = make_case(257, 784, mask_kind, device, torch.float32)
    x, raw, shift, shift_col, gather_index, (x64, raw64, shift64) = case
    g = torch.Generator().manual_seed(1)
    gy = torch.randn(x.shape, generator=g).to(device)
    gg = torch.randn(x.shape[0], gather_index.numel(), generator=g).to(device)
    gld = torch.randn(x.shape[0], generator=g).to(device)
    leaves = [t.detach().clone().requires_grad_() for t in (x, raw, shift)]
    outputs = ops.affine_coupling_update_indexed(*leaves, shift_col, gather_index, law, inverse)
    torch.autograd.backward(outputs, (gy, gg, gld))
    leaves64 = [t.clone().requires_grad_() for t in (x64, raw64, shift64)]
    outputs64 = reference.affine_coupling_update(*leaves64, shift_col.cpu(), gather_index.cpu(), law, inverse)
    torch.autograd.backward(outputs64, (gy.double().cpu(), gg.double().cpu(), gld.double().cpu()))
    for leaf, leaf64 in zip(leaves, leaves64):
        assert rel_error(leaf.grad, leaf64.grad) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for mask_kind, batch, features in (("odd-even", 5, 8), ("random", 3, 13)):
        x, raw, shift, shift_col, gather_index, _ = make_case(batch, features, mask_kind, device, torch.float32)
        x, raw, shift = (t.detach().clone().requires_grad_(True) for t in (x, raw, shift))
        for law in LAWS:
            for inverse in (False, True):
                torch.library.opcheck(torch.ops.nice_ext.affine_coupling_update,
                                      (x, raw, shift, shift_col, gather_index, law, inverse))
        gy, gg, gld = torch.randn_like(x), torch.randn(batch, gather_index.numel(), device=device), torch.randn(
            batch, device=device)
        backward = torch.ops.nice_ext.affine_coupling_update_backward
        args = (x.detach(), raw.detach(), shift.detach(), shift_col, gather_index)
        torch.library.opcheck(backward, (gy, gg, gld, *args, "tanh", False))
        torch.library.opcheck(backward, (gy, None, None, *args, "unbounded", True))
        recorded = (x.detach().clone().requires_grad_(True), *args[1:])
        for op in (backward, torch.ops.nice_ext.affine_coupling_update_backward_composite):
            torch.library.opcheck(op, (gy, gg, gld, *recorded, "tanh", True))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    x, raw, shift, shift_col, gather_index, _ = make_case(7, 30, "odd-even", device, torch.float32)

    def step(a, r, b):
        y, gathered, log_det = ops.affine_coupling_update_indexed(a, r, b, shift_col, gather_index)
        return y.square().sum() + gathered.sum() + log_det.sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    leaves = [t.detach().clone().requires_grad_() for t in (x, raw, shift)]
    compiled(*leaves).backward()
    leaves_eager = [t.detach().clone().requires_grad_() for t in (x, raw, shift)]
    step(*leaves_eager).backward()
    for leaf, leaf_eager in zip(leaves, leaves_eager):
        assert torch.allclose(leaf.grad, leaf_eager.grad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("law", LAWS)
def test_inverse_undoes_forward(device, law):
    x, raw, shift, shift_col, gather_index, _ = make_case(64, 784, "random", device, torch.float64)
    y, _, log_det = ops.affine_coupling_update_indexed(x, raw, shift, shift_col, gather_index, law)
    x_back, _, inverse_log_det = ops.affine_coupling_update_indexed(y, raw, shift, shift_col, gather_index, law,
                                                                    inverse=True)
    assert rel_error(x_back, x) < 1e-14
    torch.testing.assert_close(inverse_log_det, -log_det, rtol=1e-14, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_extreme_log_scales_and_nan_rows(device):
    """Huge network outputs stay finite under tanh and overflow to inf (as the reference does) without it;
    a NaN in one row leaves the other rows untouched."""
    x, raw, shift, shift_col, gather_index, _ = make_case(4, 10, "odd-even", device, torch.float32)
    huge = torch.full_like(raw, 1e4)
    y, _, log_det = ops.affine_coupling_update_indexed(x, huge, shift, shift_col, gather_index, "tanh")
    assert torch.isfinite(y).all() and torch.allclose(log_det, torch.full_like(log_det, 5.0))
    y, _, _ = ops.affine_coupling_update_indexed(x, huge, shift, shift_col, gather_index, "unbounded")
    y_ref, _, _ = reference.affine_coupling_update(x, huge, shift, shift_col, gather_index, "unbounded", False)
    assert torch.equal(torch.isinf(y), torch.isinf(y_ref)) and torch.isinf(y).any()
    x_nan = x.clone()
    x_nan[1, 1] = float("nan")
    raw_nan = raw.clone()
    raw_nan[2, 0] = float("nan")
    y, gathered, log_det = ops.affine_coupling_update_indexed(x_nan, raw_nan, shift, shift_col, gather_index)
    y_clean, gathered_clean, log_det_clean = ops.affine_coupling_update_indexed(x, raw, shift, shift_col,
                                                                                gather_index)
    for row in (0, 3):
        assert torch.equal(y[row], y_clean[row]) and torch.equal(log_det[row], log_det_clean[row])
        assert torch.equal(gathered[row], gathered_clean[row])
    assert torch.isnan(y[1]).any() and torch.isnan(log_det[2])


def test_mask_wrapper_and_checkerboard():
    mask = checkerboard_mask((1, 4, 5))
    g = torch.Generator().manual_seed(0)
    x, raw, shift = torch.randn(3, 20, generator=g), torch.randn(3, 10, generator=g), torch.randn(3, 10, generator=g)
    y, gathered, log_det = ops.affine_coupling_update(x, raw, shift, mask, next_mask=~mask)
    assert torch.equal(y[:, mask], x[:, mask])
    assert torch.allclose(y[:, ~mask], x[:, ~mask] * torch.exp(torch.tanh(raw)) + shift, atol=1e-6)
    assert torch.equal(gathered, y[:, ~mask])
    assert torch.allclose(log_det, torch.tanh(raw).sum(1))
    x_back, inverse_log_det = ops.affine_coupling_update(y, raw, shift, mask, inverse=True)
    assert torch.allclose(x_back, x, atol=1e-6) and torch.allclose(inverse_log_det, -log_det)


def test_empty_batch():
    x, raw, shift, shift_col, gather_index, _ = make_case(0, 6, "odd-even", "cpu", torch.float32)
    y, gathered, log_det = ops.affine_coupling_update_indexed(x, raw, shift, shift_col, gather_index)
    assert y.shape == (0, 6) and gathered.shape == (0, 3) and log_det.shape == (0,)


def test_bad_inputs_raise_clear_errors():
    x, raw, shift, shift_col, gather_index, _ = make_case(4, 10, "odd-even", "cpu", torch.float32)
    op = ops.affine_coupling_update_indexed
    with pytest.raises(RuntimeError, match="log_scale_raw must have the shape of shift"):
        op(x, raw[:3], shift, shift_col, gather_index)
    with pytest.raises(RuntimeError, match="x and log_scale_raw must have the same dtype"):
        op(x, raw.double(), shift, shift_col, gather_index)
    with pytest.raises(RuntimeError, match="log_scale_raw must be a floating-point"):
        op(x, raw.long(), shift, shift_col, gather_index)
    with pytest.raises(RuntimeError, match="shift must have the batch size of x"):
        op(x, raw, shift[:3], shift_col, gather_index)
    with pytest.raises(ValueError, match="log_scale_law must be one of"):
        op(x, raw, shift, shift_col, gather_index, "exp")
    with pytest.raises(RuntimeError, match="log_scale_law must be 'tanh' or 'unbounded'"):
        torch.ops.nice_ext.affine_coupling_update(x, raw, shift, shift_col, gather_index, "exp", False)
    bad_col = shift_col.clone()  # the CPU kernel's check, or the wrapper's where CUDA kernels read the maps
    bad_col[1] = bad_col[3]
    with pytest.raises(RuntimeError, match="one-to-one"):
        op(x, raw, shift, bad_col, gather_index)
    with pytest.raises(RuntimeError, match="distinct features"):
        op(x, raw, shift, shift_col, torch.tensor([4, 4], dtype=torch.int32))
    backward = torch.ops.nice_ext.affine_coupling_update_backward
    with pytest.raises(RuntimeError, match=r"grad_log_det must have shape \(4,\)"):
        backward(torch.randn_like(x), None, torch.randn(3), x, raw, shift, shift_col, gather_index, "tanh", False)
    with pytest.raises(RuntimeError, match="grad_y must have the shape of x"):
        backward(torch.randn(4, 12), None, None, x, raw, shift, shift_col, gather_index, "tanh", False)
    mask = odd_even_mask(10)
    with pytest.raises(ValueError, match="log_scale_raw must have the shape of shift"):
        ops.affine_coupling_update(x, raw[:, :4], shift, mask)
    with pytest.raises(ValueError, match=r"shift must have shape \(4, 5\)"):
        ops.affine_coupling_update(x, raw, shift[:, :4], mask)
