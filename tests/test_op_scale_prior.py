"""The fused scaling + prior log-density op against its reference, its gradients, and its checks."""
import pytest
import torch

from conftest import DEVICES, rel_error, sliced
from nice_ext import ops, reference

PRIORS = ["logistic", "gaussian"]


def make_case(batch, features, device, dtype, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, features, generator=g, dtype=torch.float64) * scale
    log_scale = torch.randn(features, generator=g, dtype=torch.float64) * 0.5
    return h.to(device, dtype), log_scale.to(device, dtype)


def plain_torch_error(h, log_scale, prior):
    """The error plain PyTorch makes at h's precision, against float64: the bar for the kernel."""
    _, lp = reference.scale_prior(h, log_scale, prior, False)
    _, lp64 = reference.scale_prior(h.double().cpu(), log_scale.double().cpu(), prior, False)
    return rel_error(lp, lp64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch", [1, 3, 257])
@pytest.mark.parametrize("features", [2, 3, 784, 3072])
@pytest.mark.parametrize("prior", PRIORS)
def test_matches_reference_on_sliced_inputs(device, batch, features, prior):
    h, log_scale = make_case(batch, features, device, torch.float32)
    z, log_prob = ops.scale_prior(sliced(h), log_scale, prior)
    z_ref, lp_ref = reference.scale_prior(h.double().cpu(), log_scale.double().cpu(), prior, True)
    assert z.shape == h.shape and log_prob.shape == (batch,) and log_prob.dtype == torch.float32
    assert rel_error(z, z_ref) < 1e-6
    assert rel_error(log_prob, lp_ref) <= max(2 * plain_torch_error(h, log_scale, prior), 1e-6)
    z2, lp2 = ops.scale_prior(h, log_scale, prior, compute_z=False)
    assert z2.numel() == 0 and torch.equal(lp2, log_prob)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("prior", PRIORS)
def test_dtypes_accumulate_in_float32_or_wider(device, dtype, prior):
    h, log_scale = make_case(257, 784, device, dtype)
    _, log_prob = ops.scale_prior(h, log_scale, prior)
    assert log_prob.dtype == (torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype)
    _, lp_ref = reference.scale_prior(h.double().cpu(), log_scale.double().cpu(), prior, False)
    bound = {torch.float64: 1e-12, torch.float32: 1e-6}.get(dtype, 1e-5)  # half inputs: exact inputs, fp32 sums
    assert rel_error(log_prob, lp_ref) < bound


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("prior", PRIORS)
def test_stable_at_extreme_values(device, prior):
    h = torch.tensor([[1e4, -1e4, 0.0, 80.0, -80.0, 1e-30]], device=device)
    log_scale = torch.zeros(6, device=device)
    z, log_prob = ops.scale_prior(h, log_scale, prior)
    assert torch.isfinite(log_prob).all()
    _, lp_ref = reference.scale_prior(h.double().cpu(), log_scale.double().cpu(), prior, False)
    assert rel_error(log_prob, lp_ref) < 1e-6
    h.requires_grad_(True)
    _, log_prob = ops.scale_prior(h, log_scale, prior)
    log_prob.sum().backward()
    assert torch.isfinite(h.grad).all()


@pytest.mark.parametrize("device", DEVICES)
def test_logistic_prior_is_accurate_elementwise(device):
    """Each feature's log-density and score in float32 against float64, over a dense grid of z and the
    small and huge ones: with one feature per row, log_prob is the log-density itself and h's gradient is
    the score. The bounds are those of the formulas both backends share (nice_ext.h: an exp2, one division
    and an atanh series): a few ulp of the log-density (measured: 2.6 with exact exp2 and division, under 5
    with the GPU's 2-ulp hardware ones), and for the score, a tanh, an absolute error of a few 1e-7."""
    grid = torch.linspace(-30, 30, 60001)
    small = torch.logspace(-8, 1, 1001)
    z = torch.cat([grid, small, -small, torch.tensor([0.0, 87.0, -88.0, 1e4, -1e4])])
    h = z[:, None].to(device).requires_grad_(True)
    _, log_prob = ops.scale_prior(h, torch.zeros(1, device=device), "logistic", compute_z=False)
    log_prob.sum().backward()
    z64 = z.double()
    density = -(z64.abs() + 2 * torch.log1p(torch.exp(-z64.abs())))
    magnitude = density.abs().float()
    ulp = (torch.nextafter(magnitude, torch.tensor(float("inf"))) - magnitude).double()
    density_ulps = (log_prob.detach().double().cpu() - density).abs() / ulp
    assert density_ulps.max() <= 8, f"worst at z = {z[density_ulps.argmax()]}: {density_ulps.max():.1f} ulp"
    score_error = (h.grad.double().cpu()[:, 0] - (-torch.tanh(z64 / 2))).abs()
    assert score_error.max() <= 4e-7, f"worst at z = {z[score_error.argmax()]}: {score_error.max():.2e}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("prior", PRIORS)
@pytest.mark.parametrize("compute_z", [True, False])
@pytest.mark.parametrize("check", [torch.autograd.gradcheck, torch.autograd.gradgradcheck])
def test_gradcheck_float64(device, prior, compute_z, check):
    # gradgradcheck: a backward recorded with create_graph=True runs the composite twin (csrc/autograd.h).
    h, log_scale = make_case(5, 7, device, torch.float64)
    h.requires_grad_(True)
    log_scale.requires_grad_(True)
    assert check(lambda a, s: ops.scale_prior(a, s, prior, compute_z=compute_z), (h, log_scale))
    assert torch.autograd.gradcheck(ops.scale_inverse, (h, log_scale))


@pytest.mark.parametrize("device", DEVICES)
def test_inverse_scaling_has_a_second_derivative(device):
    # Its backward is made of differentiable ops (scale_inverse itself, a product and a sum).
    z, log_scale = make_case(4, 6, device, torch.float64)
    assert torch.autograd.gradgradcheck(ops.scale_inverse, (z.requires_grad_(True), log_scale.requires_grad_(True)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("prior", PRIORS)
@pytest.mark.parametrize("features", [2, 3, 784])
def test_backward_op_matches_its_reference(device, prior, features):
    h, log_scale = make_case(2049, features, device, torch.float64)  # 2049 rows: a ragged last reduction chunk
    grad_log_prob, grad_z = torch.randn(2049, dtype=h.dtype, device=device), torch.randn_like(h)
    for z_grad in (sliced(grad_z), None):
        args = (grad_log_prob, z_grad, sliced(h), log_scale, prior)
        fused = torch.ops.nice_ext.scale_prior_backward(*args)
        for name, got, expected in zip(("grad_h", "grad_log_scale"), fused, reference.scale_prior_backward(*args)):
            assert rel_error(got, expected) < 1e-12, name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("prior", PRIORS)
@pytest.mark.parametrize("batch", [3, 2049])  # 2049: several reduction chunks and a ragged last one
def test_gradients_match_reference_and_are_deterministic(device, prior, batch):
    h, log_scale = make_case(batch, 784, device, torch.float32)
    grad_z, grad_lp = torch.randn_like(h), torch.randn(batch, device=device)

    def grads(fn, a, s):
        a, s = a.clone().requires_grad_(), s.clone().requires_grad_()
        z, lp = fn(a, s, prior, True)
        torch.autograd.backward((z, lp), (grad_z.to(a.device, a.dtype), grad_lp.to(lp.device, lp.dtype)))
        return a.grad, s.grad

    gh, gs = grads(ops.torch.ops.nice_ext.scale_prior, h, log_scale)
    gh64, gs64 = grads(reference.scale_prior, h.double().cpu(), log_scale.double().cpu())
    assert rel_error(gh, gh64) < 1e-5 and rel_error(gs, gs64) < 1e-5
    gh2, gs2 = grads(ops.torch.ops.nice_ext.scale_prior, h, log_scale)
    assert torch.equal(gs, gs2) and torch.equal(gh, gh2)


@pytest.mark.parametrize("device", DEVICES)
def test_inverse_undoes_scaling(device):
    h, log_scale = make_case(257, 3072, device, torch.float32)
    z, _ = ops.scale_prior(h, log_scale)
    assert rel_error(ops.scale_inverse(sliced(z), log_scale), h) < 1e-6
    assert rel_error(ops.scale_inverse(z, log_scale), reference.scale_inverse(z, log_scale)) < 1e-6


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    h, log_scale = make_case(6, 9, device, torch.float32)
    h.requires_grad_(True)
    log_scale.requires_grad_(True)
    for prior in PRIORS:
        for compute_z in (True, False):
            torch.library.opcheck(torch.ops.nice_ext.scale_prior, (h, log_scale, prior, compute_z))
        # the backward op is not differentiated again: check it on plain tensors
        glp, hd, sd = torch.randn(6, device=device), h.detach(), log_scale.detach()
        torch.library.opcheck(torch.ops.nice_ext.scale_prior_backward, (glp, torch.randn_like(hd), hd, sd, prior))
        torch.library.opcheck(torch.ops.nice_ext.scale_prior_backward, (glp, None, hd, sd, prior))
        for op in (torch.ops.nice_ext.scale_prior_backward, torch.ops.nice_ext.scale_prior_backward_composite):
            torch.library.opcheck(op, (glp, None, hd.clone().requires_grad_(True), sd, prior))
    torch.library.opcheck(torch.ops.nice_ext.scale_inverse, (h, log_scale))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    h, log_scale = make_case(9, 20, device, torch.float32)

    def loss(a, s):
        z, lp = ops.scale_prior(a, s, "logistic")
        return -lp.mean() + ops.scale_inverse(z, s).sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    a, s = h.clone().requires_grad_(), log_scale.clone().requires_grad_()
    compiled(a, s).backward()
    a2, s2 = h.clone().requires_grad_(), log_scale.clone().requires_grad_()
    loss(a2, s2).backward()
    assert torch.allclose(a.grad, a2.grad, atol=1e-6) and torch.allclose(s.grad, s2.grad, atol=1e-5)


def test_empty_batch():
    h, log_scale = make_case(0, 5, "cpu", torch.float32)
    h.requires_grad_(True)
    log_scale.requires_grad_(True)
    z, lp = ops.scale_prior(h, log_scale)
    assert z.shape == (0, 5) and lp.shape == (0,)
    lp.sum().backward()
    assert torch.equal(log_scale.grad, torch.zeros(5))


@pytest.mark.parametrize("device", ["cpu"])  # CUDA: tests/test_op_coupling.py::test_bad_cuda_inputs_raise
def test_bad_inputs_raise_clear_errors(device):
    h, log_scale = make_case(4, 10, device, torch.float32)
    with pytest.raises(RuntimeError, match="one entry per feature"):
        ops.scale_prior(h, log_scale[:9])
    with pytest.raises(RuntimeError, match="floating-point"):
        ops.scale_prior(h.int(), log_scale.int())
    with pytest.raises(RuntimeError, match="same dtype"):
        ops.scale_prior(h, log_scale.double())
    with pytest.raises(RuntimeError, match="1-D"):
        ops.scale_prior(h, log_scale[None])
    with pytest.raises(RuntimeError, match="2-D"):
        ops.scale_prior(h[0], log_scale)
    with pytest.raises(ValueError, match="prior must be one of"):
        ops.scale_prior(h, log_scale, "laplace")
    with pytest.raises(RuntimeError, match="prior must be"):
        torch.ops.nice_ext.scale_prior(h, log_scale, "laplace", True)
    # the inverse names its own argument, z
    with pytest.raises(RuntimeError, match=r"one entry per feature of z \(10\), got 9"):
        ops.scale_inverse(h, log_scale[:9])
    with pytest.raises(RuntimeError, match="z must be a 2-D"):
        ops.scale_inverse(h[0], log_scale)
    if device == "cuda":
        with pytest.raises(RuntimeError, match="same device"):
            ops.scale_prior(h, log_scale.cpu())
