"""Properties of the NICE model: exact log-likelihood, exact inverse, sampling, gradients, inpainting."""
import math

import numpy as np
import pytest
import torch

from conftest import DEVICES, NETWORK_SETTINGS, rel_error, with_network_settings
from nice_ext import NICE, reference
from nice_ext.masks import odd_even_mask
from nice_ext.seed_model import SeedMaskedNICE

MASKS = ["odd-even", "checkerboard", "tensor"]


def small_model(prior="logistic", coupling="additive", mask="odd-even", fused=True, dim=6, dtype=torch.float64,
                device="cpu", seed=0):
    """coupling: "additive", "affine" (bounded log-scale, the default) or "affine-unbounded"."""
    torch.manual_seed(seed)
    image_shape = (1, 2, 3) if dim == 6 else None
    mask_arg = torch.tensor([True, False, False, True, True, False])[:dim] if mask == "tensor" else mask
    coupling, _, log_scale = coupling.partition("-")
    model = NICE(dim, num_coupling_layers=4, num_hidden_layers=2, hidden_dim=16, prior=prior, coupling=coupling,
                 mask=mask_arg, image_shape=image_shape, fused=fused, affine_log_scale=log_scale or "tanh")
    with torch.no_grad():  # leave the identity start: random weights make every test meaningful
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model.to(device, dtype)


@pytest.mark.parametrize("prior", ["logistic", "gaussian"])
@pytest.mark.parametrize("coupling", ["additive", "affine", "affine-unbounded"])
@pytest.mark.parametrize("mask", MASKS)
def test_log_prob_is_prior_plus_log_det_of_the_jacobian(prior, coupling, mask):
    model = small_model(prior, coupling, mask)
    x = torch.rand(3, 6, dtype=torch.float64)
    log_prob = model.log_prob(x)
    z, log_det = model(x)
    for i in range(3):
        jacobian = torch.autograd.functional.jacobian(lambda v: model(v[None])[0][0], x[i])
        sign, logabsdet = torch.linalg.slogdet(jacobian)
        assert sign != 0
        assert torch.allclose(log_det[i], logabsdet, atol=1e-10)
        expected = reference.prior_log_density(z[i], prior).sum() + logabsdet
        assert torch.allclose(log_prob[i], expected, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("coupling", ["additive", "affine", "affine-unbounded"])
@pytest.mark.parametrize("mask", MASKS)
def test_inverse_undoes_forward(device, coupling, mask):
    model = small_model(coupling=coupling, mask=mask, device=device)
    x = torch.rand(17, 6, dtype=torch.float64, device=device)
    z, _ = model(x)
    assert rel_error(model.inverse(z), x) < 1e-12
    assert rel_error(model(model.inverse(z))[0], z) < 1e-12


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("prior", ["logistic", "gaussian"])
def test_samples_shape_device_dtype(device, dtype, prior):
    model = small_model(prior=prior, device=device, dtype=dtype)
    samples = model.sample(5, temperature=0.7)
    assert samples.shape == (5, 6) and samples.dtype == dtype and samples.device.type == device
    assert torch.isfinite(samples).all()
    assert model.sample(0).shape == (0, 6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_logistic_prior_samples_have_the_logistic_scale(dtype):
    model = small_model(dtype=dtype)
    z = model.sample_prior(200_000, generator=torch.Generator().manual_seed(0))
    assert z.dtype == dtype
    # a standard logistic has variance pi^2 / 3 and median 0 (in bfloat16, a draw of u = 0 once gave
    # z = -87 for 1 in 256 values, which took the variance past 30)
    assert abs(z.double().var().item() - math.pi ** 2 / 3) < 0.05
    assert abs(z.double().median().item()) < 0.02


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_logistic_prior_tails_end_symmetrically_at_the_ends_of_rands_range(dtype, monkeypatch):
    model = small_model(dtype=dtype)
    eps = torch.finfo(dtype).eps
    ends = torch.tensor([[0.0, 1 - eps / 2, 0.5, 0.25, 0.75, 0.5]], dtype=dtype)  # 1 - eps/2: the last below 1
    monkeypatch.setattr(torch, "rand", lambda *size, **kwargs: ends.clone())
    z = model.sample_prior(1)
    assert z[0, 1].item() == pytest.approx(math.log(2 / eps - 1), rel=1e-6)
    assert z[0, 0].item() == pytest.approx(-z[0, 1].item(), rel=1e-6)
    assert z[0, 2].item() == 0 and z[0, 3].item() == pytest.approx(-math.log(3))


@pytest.mark.parametrize("coupling", ["additive", "affine"])
def test_every_parameter_receives_a_gradient(coupling):
    model = small_model(coupling=coupling, dtype=torch.float32)
    (-model.log_prob(torch.rand(8, 6)).mean()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_a_new_model_is_the_identity_and_trains_every_layer_after_one_step():
    model = NICE(10, num_coupling_layers=4, num_hidden_layers=2, hidden_dim=8)
    x = torch.rand(4, 10)
    z, log_det = model(x)
    assert torch.equal(z, x) and torch.equal(log_det, torch.zeros(4))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(2):
        optimizer.zero_grad()
        (-model.log_prob(x).mean()).backward()
        optimizer.step()
    assert all(p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("coupling", ["additive", "affine", "affine-unbounded"])
@pytest.mark.parametrize("prior", ["logistic", "gaussian"])
def test_fused_and_pure_pytorch_models_agree(device, coupling, prior):
    fused = small_model(prior, coupling, dim=784, dtype=torch.float32, device=device)
    if coupling == "affine-unbounded":  # smaller log-scales, or these random weights overflow e^a at D = 784
        with torch.no_grad():
            for layer in fused.layers:
                layer.net[-1].weight.mul_(0.05)
    plain = small_model(prior, coupling, fused=False, dim=784, dtype=torch.float32, device=device, seed=1)
    plain.load_state_dict(fused.state_dict())
    x = torch.rand(33, fused.data_dim, device=device)
    for model in (fused, plain):
        model.zero_grad()
    lp_fused, lp_plain = fused.log_prob(x), plain.log_prob(x)
    assert rel_error(lp_fused, lp_plain) < 1e-5
    lp_fused.sum().backward()
    lp_plain.sum().backward()
    for (name, a), (_, b) in zip(fused.named_parameters(), plain.named_parameters()):
        assert rel_error(a.grad, b.grad) < 1e-4, name
    # The decoder amplifies rounding through the layers (affine ones reach |x| ~ 1e3 here), so each float32
    # decoder is held to float64 arithmetic on the same weights: the fused one may not be the worse by much.
    z = torch.randn(5, fused.data_dim, device=device)
    exact = plain.double().inverse(z.double())
    plain.float()
    assert rel_error(fused.inverse(z), exact) < max(1e-5, 2 * rel_error(plain.inverse(z), exact))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("coupling", ["additive", "affine", "affine-unbounded"])
@pytest.mark.parametrize("prior", ["logistic", "gaussian"])
@pytest.mark.parametrize("network_setting", [None, *NETWORK_SETTINGS])
def test_second_order_gradients_match_the_pure_pytorch_model(device, coupling, prior, network_setting):
    # A gradient penalty: the parameters' gradient of |d log p / dx|^2 needs the backward of the backward.
    # (Before the backward ops had autograd, the fused model's came out wrong, with only a warning.)
    fused = small_model(prior, coupling, dim=6, device=device)
    with_network_settings(fused, network_setting)  # (their create_graph backward runs the networks again)
    plain = small_model(prior, coupling, fused=False, dim=6, device=device, seed=1)
    plain.load_state_dict(fused.state_dict())
    x = torch.rand(5, 6, dtype=torch.float64, device=device)
    penalties = []
    for model in (fused, plain):
        inputs = x.clone().requires_grad_(True)
        score, = torch.autograd.grad(model.log_prob(inputs).sum(), inputs, create_graph=True)
        penalty = score.square().sum()
        penalties.append((penalty, torch.autograd.grad(penalty, [inputs, *model.parameters()])))
    (penalty_fused, grads_fused), (penalty_plain, grads_plain) = penalties
    assert rel_error(penalty_fused, penalty_plain) < 1e-12
    names = ["x"] + [name for name, _ in fused.named_parameters()]
    for name, a, b in zip(names, grads_fused, grads_plain):
        assert rel_error(a, b) < 1e-10, name


@pytest.mark.parametrize("coupling", ["additive", "affine"])
def test_a_first_order_backward_runs_the_fused_backward_kernels(coupling):
    model = small_model(coupling=coupling, dim=6, dtype=torch.float32)
    loss = -model.log_prob(torch.rand(4, 6)).mean()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        loss.backward()
    ran = {event.name for event in profile.events()}
    coupling_op = "nice_ext::coupling_update_backward" if coupling == "additive" else \
        "nice_ext::affine_coupling_update_backward"
    assert {coupling_op, "nice_ext::scale_prior_backward"} <= ran
    assert not any(name.endswith("_composite") for name in ran)


class LogProb(torch.nn.Module):
    """model.log_prob as a module's forward, for torch.func.functional_call."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.log_prob(x)


def autograd_node_names(output):
    names, stack, seen = set(), [output.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(node.name())
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


def test_torch_compile_traces_the_fused_ops_of_a_fused_model():
    # The check that sends torch.func transforms to the reference path must not send torch.compile there.
    model = small_model("logistic", "additive", dim=6)
    graphs = []

    def record(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    x = torch.rand(4, 6, dtype=torch.float64)
    log_prob = torch.compile(model.log_prob, backend=record, fullgraph=True)(x)
    targets = [str(node.target) for graph in graphs for node in graph.graph.nodes]
    assert targets.count("nice_ext.coupling_update") == 4 and "nice_ext.scale_prior" in targets
    assert rel_error(log_prob, model.log_prob(x)) < 1e-14


@pytest.mark.parametrize("coupling", ["additive", "affine"])
def test_torch_func_transforms_run_the_reference_path_of_a_fused_model(coupling):
    # functorch refuses the fused ops' C++ autograd, so inside a transform a fused model takes its
    # pure-PyTorch path: per-example gradients of log_prob (vmap of grad) agree with autograd's through
    # the fused ops, row by row; outside transforms the fused ops still run.
    model = small_model("logistic", coupling, dim=6)
    x = torch.rand(3, 6, dtype=torch.float64)
    wrapped = LogProb(model)
    params = {name: p.detach() for name, p in wrapped.named_parameters()}

    def log_prob_sum(p, rows):
        return torch.func.functional_call(wrapped, p, (rows,)).sum()

    per_example = torch.func.vmap(torch.func.grad(lambda p, row: log_prob_sum(p, row[None])),
                                  in_dims=(None, 0))(params, x)
    for i in range(3):
        wrapped.zero_grad()
        log_prob = wrapped(x[i:i + 1])
        assert any("nice_ext" in name for name in autograd_node_names(log_prob))  # the fused ops ran
        log_prob.sum().backward()
        for name, p in wrapped.named_parameters():
            assert rel_error(per_example[name][i], p.grad) < 1e-10, name
    jacobian = torch.func.jacrev(lambda rows: model(rows)[0])(x[:1])
    expected = torch.autograd.functional.jacobian(lambda rows: model(rows)[0], x[:1])
    assert rel_error(jacobian, expected) < 1e-12


@pytest.mark.parametrize("coupling", ["additive", "affine"])
def test_forward_mode_ad_runs_the_reference_path_of_a_fused_model(coupling):
    # The fused ops' C++ autograd has no forward-mode formula; inside dual_level a fused model takes its
    # pure-PyTorch path (it raised "jvp is not implemented for the c++ API of custom Function" before).
    import torch.autograd.forward_ad as forward_ad

    model = small_model("logistic", coupling, dim=6)
    x, tangent = torch.rand(3, 6, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)
    with forward_ad.dual_level():
        log_prob = model.log_prob(forward_ad.make_dual(x, tangent))
        directional = forward_ad.unpack_dual(log_prob).tangent
    jacobian = torch.autograd.functional.jacobian(lambda rows: model.log_prob(rows).sum(), x)
    assert rel_error(directional, (jacobian * tangent).sum(dim=1)) < 1e-12
    assert any("nice_ext" in name for name in autograd_node_names(model.log_prob(x)))  # outside: fused


@pytest.mark.parametrize("log_scale", ["tanh", "unbounded"])
def test_affine_log_scales_are_bounded_by_default(log_scale):
    """A coupling network whose output has grown large (as the paper's MNIST setup makes it within five Adam
    steps) must not overflow: with a = tanh(r) every scale stays within e^(+-1) per layer."""
    model = small_model(coupling="affine" if log_scale == "tanh" else "affine-unbounded", dtype=torch.float32)
    with torch.no_grad():
        for layer in model.layers:
            bias = layer.net[-1].bias  # (log-scale outputs r, shift outputs b)
            bias[:bias.numel() // 2].fill_(200.0)  # r = 200 + ...: exp(200) overflows float32
    x = torch.rand(5, 6)
    z, log_det = model(x)
    if log_scale == "unbounded":
        assert not torch.isfinite(z).all()
        return
    updated = sum(int((~layer.mask).sum()) for layer in model.layers)
    assert torch.isfinite(z).all() and (log_det - model.log_scale.sum()).abs().max() <= updated
    assert rel_error(model.inverse(z), x) < 1e-5


def test_affine_checkpoints_from_before_the_bound_keep_their_function():
    from nice_ext.checkpoint import make_checkpoint, model_from_checkpoint

    old = small_model(coupling="affine-unbounded", dtype=torch.float32)
    payload = make_checkpoint(old, "mnist", {})
    del payload["model_config"]["affine_log_scale"]  # as written before the option existed
    loaded = model_from_checkpoint(payload)
    x = torch.rand(4, 6)
    assert loaded.config["affine_log_scale"] == "unbounded" and torch.equal(loaded.log_prob(x), old.log_prob(x))
    with pytest.raises(ValueError, match="affine_log_scale must be one of"):
        NICE(6, coupling="affine", affine_log_scale="sigmoid")


def test_a_model_with_a_mask_of_its_own_round_trips_through_a_checkpoint(tmp_path):
    from nice_ext.checkpoint import load_model, make_checkpoint, save_atomic

    mask = torch.tensor([True, False, False, True, True, False])
    model = NICE(6, num_coupling_layers=3, num_hidden_layers=1, hidden_dim=8, mask=mask)
    with torch.no_grad():
        for parameter in model.parameters():  # away from the identity the new model starts as
            parameter.normal_(std=0.3, generator=torch.Generator().manual_seed(parameter.numel()))
    path = str(tmp_path / "own_mask.pt")
    save_atomic(make_checkpoint(model, "mnist", {}), path)
    loaded = load_model(path)
    assert [layer.mask.tolist() for layer in loaded.layers] == [layer.mask.tolist() for layer in model.layers]
    x = torch.rand(5, 6)
    assert torch.equal(loaded.log_prob(x), model.log_prob(x))


def test_seed_model_computes_a_likelihood():
    model = SeedMaskedNICE(data_dim=12, num_hidden_layers=2, hidden_dim=8)
    assert model.log_prob(torch.rand(3, 12)).shape == (3,)


def test_inpaint_keeps_observed_pixels_and_the_data_range():
    model = small_model(dim=6)
    x = torch.rand(4, 6, dtype=torch.float64)
    observed = torch.tensor([True, True, False, False, True, False])
    filled = model.inpaint(x, observed, steps=20, generator=torch.Generator().manual_seed(0))
    assert torch.equal(filled[:, observed], x[:, observed])
    assert (filled >= 0).all() and (filled <= 1).all()
    per_row = torch.rand(4, 6) < 0.5
    filled = model.inpaint(x, per_row, steps=3)
    assert torch.equal(filled[per_row], x[per_row])
    with pytest.raises(ValueError, match="observed must have shape"):
        model.inpaint(x, observed[:5])
    with pytest.raises(TypeError, match="bool"):
        model.inpaint(x, observed.float())
    # NaN may mark what is missing; at an observed feature it is refused (it spread to every feature)
    marked = x.masked_fill(~observed, float("nan"))
    filled = model.inpaint(marked, observed, steps=20, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(filled).all() and torch.equal(filled[:, observed], x[:, observed])
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="NaN or infinite values at observed features"):
            model.inpaint(marked.index_put((torch.tensor([2]), torch.tensor([4])), torch.tensor(bad, dtype=x.dtype)),
                          observed)  # feature 4 is observed


def test_inpaint_tool_fills_every_mask_in_one_batch():
    """python -m nice_ext.inpaint runs all its masks as one batch: each mask's rows come back in its place,
    with its own observed pixels kept and its hidden ones filled."""
    from nice_ext.inpaint import MASK_NAMES, inpaint_masks, observed_masks

    torch.manual_seed(0)
    model = NICE(16, num_coupling_layers=4, num_hidden_layers=1, hidden_dim=8, image_shape=(1, 4, 4))
    masks = observed_masks(model.image_shape, torch.Generator().manual_seed(0))
    x = torch.rand(3, 16)
    filled = inpaint_masks(model, x, masks, steps=4, generator=torch.Generator().manual_seed(0))
    assert list(filled) == list(MASK_NAMES)
    for name, observed in masks.items():
        assert filled[name].shape == x.shape
        assert torch.equal(filled[name][:, observed], x[:, observed]), name
        assert (filled[name][:, ~observed] != x[:, ~observed]).all(), name


def test_inpaint_tools_masks_are_those_of_the_authors_released_demo():
    """The released MNIST demo (laurent-dinh/nice, pylearn2/scripts/reconstruct_mnist_gif.py) builds its
    masks on the flattened 28 x 28 image; the tool builds them in two dimensions: the same pixels."""
    from nice_ext.inpaint import MASK_NAMES, observed_masks

    released = {name: torch.ones(784, dtype=torch.bool) for name in MASK_NAMES[:8]}
    released["top"][:392] = False
    released["bottom"][392:] = False
    released["stripes-even"][::2] = False
    released["stripes-odd"][1::2] = False
    released["middle-rows"][196:588] = False
    for i in range(28):
        released["left"][i * 28:(2 * i + 1) * 14] = False
        released["right"][(2 * i + 1) * 14:(i + 1) * 28] = False
        released["middle-columns"][(4 * i + 1) * 7:(4 * i + 3) * 7] = False
    masks = observed_masks((1, 28, 28), torch.Generator().manual_seed(0))
    assert list(masks) == list(MASK_NAMES)
    for name, observed in released.items():
        assert torch.equal(masks[name], observed), name
    for name, kept in (("random75", 0.25), ("random90", 0.10)):  # binomial(p=.25) and (p=.1) kept in the demo
        assert abs(masks[name].double().mean().item() - kept) < 0.05, name
    rgb = observed_masks((3, 28, 28), torch.Generator().manual_seed(0))  # a missing pixel, in every channel
    assert all(torch.equal(rgb[name], masks[name].repeat(3)) for name in MASK_NAMES)


def test_inpainting_raises_the_likelihood():
    model = small_model(dim=6, seed=3)
    x = torch.rand(64, 6, dtype=torch.float64)
    observed = torch.tensor([True, False, True, False, True, False])
    start = torch.where(observed, x, torch.rand(64, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    filled = model.inpaint(x, observed, steps=300, generator=torch.Generator().manual_seed(1))
    assert model.log_prob(filled).mean() > model.log_prob(start).mean()


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(data_dim=1), ValueError, "at least 2"),
    (dict(data_dim=10, prior="laplace"), ValueError, "prior must be one of"),
    (dict(data_dim=10, coupling="multiplicative"), ValueError, "coupling must be one of"),
    (dict(data_dim=10, mask="stripes"), ValueError, "mask must be"),
    (dict(data_dim=784, mask="checkerboard"), ValueError, "image_shape"),
    (dict(data_dim=10, mask="checkerboard", image_shape=(1, 3, 3)), ValueError, "9 values"),
    (dict(data_dim=784, image_shape=(1, 27, 27)), ValueError, "729 values, but data_dim is 784"),  # odd-even too
    (dict(data_dim=784, image_shape=(28, 28)), ValueError, r"\(C, H, W\)"),
    (dict(data_dim=8, image_shape=(1, 2.5, 4)), TypeError, "of ints"),  # was read as (1, 2, 4)
    (dict(data_dim=8, mask="checkerboard", image_shape=(1, 2.0, 4)), TypeError, "of ints"),
    (dict(data_dim=8, image_shape="124"), TypeError, "of ints"),
    (dict(data_dim=10, mask=torch.ones(10, dtype=torch.bool)), ValueError, "keep some features"),
    (dict(data_dim=10, mask=odd_even_mask(9)), ValueError, r"shape \(10,\)"),
    (dict(data_dim=10, mask=torch.zeros(10)), TypeError, "bool"),
    (dict(data_dim=10.0), TypeError, "data_dim must be an int"),
    (dict(data_dim=10, num_coupling_layers=0), ValueError, "num_coupling_layers"),
    (dict(data_dim=10, data_range=(1.0, 0.0)), ValueError, "low < high"),
    (dict(data_dim=10, data_range=(0.0, float("inf"))), ValueError, "finite"),
    (dict(data_dim=10, data_range=1.0), TypeError, "pair of numbers"),
])
def test_bad_constructor_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        NICE(**kwargs)


def test_bad_inputs():
    model = NICE(10, 2, 1, 4)
    with pytest.raises(ValueError, match=r"shape \(batch, 10\)"):
        model.log_prob(torch.rand(3, 9))
    with pytest.raises(TypeError, match="floating-point"):
        model.log_prob(torch.ones(3, 10, dtype=torch.long))
    with pytest.raises(TypeError, match="dtype"):
        model.log_prob(torch.rand(3, 10, dtype=torch.float64))
    for n in (-1, 2.5, True, "3", torch.tensor(2.0)):
        with pytest.raises(ValueError, match="n must be a non-negative int"):
            model.sample(n)
    for temperature in (-1, math.nan, math.inf, "hot", True, torch.ones(2)):
        with pytest.raises(ValueError, match="temperature must be a finite number"):
            model.sample(2, temperature=temperature)
    with pytest.raises(ValueError, match="steps must be a non-negative int"):
        model.inpaint(torch.rand(2, 10), torch.ones(10, dtype=torch.bool), steps=-1)
    assert model.log_prob(torch.rand(0, 10)).shape == (0,)


@pytest.mark.parametrize("device", DEVICES)
def test_a_generator_that_cannot_draw_here_is_one_clear_error(device):
    """sample, inpaint and dequantize take None or a torch.Generator of their tensors' device type."""
    from nice_ext.data import dequantize

    model = NICE(10, 2, 1, 4).to(device)
    x, observed = torch.rand(2, 10, device=device), torch.ones(10, dtype=torch.bool)
    pixels = torch.zeros(2, 10, dtype=torch.uint8, device=device)
    calls = {"sample": lambda g: model.sample(2, generator=g),
             "inpaint": lambda g: model.inpaint(x, observed, steps=1, generator=g),
             "dequantize": lambda g: dequantize(pixels, (0.0, 1.0), generator=g)}
    for name, call in calls.items():
        for generator, kind in ((np.random.default_rng(0), "numpy.random._generator.Generator"), (7, "builtins.int")):
            with pytest.raises(TypeError, match=f"generator must be a torch.Generator or None, got {kind}$"):
                call(generator)
        assert call(torch.Generator(device=device).manual_seed(1)).device.type == device, name
        if device == "cuda":  # the other device type's generator
            with pytest.raises(ValueError, match=r"generator is a cpu generator but .* is on cuda(:0)?: pass "
                                                 r"torch.Generator\(device='cuda'\)"):
                call(torch.Generator())


def test_counts_and_temperatures_from_numpy_or_tensors_are_accepted():
    model = NICE(10, 2, 1, 4)
    torch.manual_seed(0)
    expected = model.sample(3, temperature=0.5)
    for n, temperature in ((np.int64(3), np.float32(0.5)), (torch.tensor(3), torch.tensor(0.5))):
        torch.manual_seed(0)
        assert torch.equal(model.sample(n, temperature=temperature), expected)
    assert model.inpaint(torch.rand(2, 10), torch.ones(10, dtype=torch.bool), steps=np.int32(1)).shape == (2, 10)


def test_samples_beyond_the_dtype_are_an_overflow_error_not_nan():
    model = NICE(10, 2, 1, 4)
    with pytest.raises(OverflowError, match=r"^\d+ of the 3 samples are not finite: temperature 1e\+38 takes the "
                                            r"prior's draws beyond .* torch.float32; use a smaller one$"):
        model.sample(3, temperature=1e38)
    assert torch.isfinite(model.sample(3, temperature=1e30)).all()
    assert torch.isfinite(model.double().sample(3, temperature=1e38)).all()  # within float64's range
    with torch.no_grad():
        model.layers[0].net[0].weight[0, 0] = float("nan")
    with pytest.raises(OverflowError, match="3 of the 3 samples are not finite: the model's weights are not all"):
        model.sample(3)


def test_nan_in_one_row_leaves_the_other_rows_untouched():
    model = small_model(dtype=torch.float32)
    x = torch.rand(4, 6)
    clean = model.log_prob(x)
    x[2, 3] = float("nan")
    dirty = model.log_prob(x)
    assert torch.isnan(dirty[2])
    assert torch.equal(dirty[[0, 1, 3]], clean[[0, 1, 3]])


def test_init_uniform_is_the_released_configs_initialisation():
    torch.manual_seed(0)
    model = NICE(data_dim=10, num_coupling_layers=3, num_hidden_layers=2, hidden_dim=64, coupling="affine")
    with torch.no_grad():
        model.log_scale.fill_(0.3)
    assert model.init_uniform_(0.01) is model
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 3 * 3
    weights = torch.cat([m.weight.detach().flatten() for m in linears])
    assert weights.abs().max() <= 0.01 and weights.abs().max() > 0.0099  # U(-0.01, 0.01), its edges reached
    assert abs(weights.mean()) < 1e-3 and weights.std().item() == pytest.approx(0.01 / math.sqrt(3), rel=0.05)
    assert all(torch.equal(m.bias, torch.zeros_like(m.bias)) for m in linears)
    assert torch.equal(model.log_scale, torch.zeros(10))
    x = torch.rand(4, 10)
    torch.testing.assert_close(model.inverse(model(x)[0]), x, rtol=1e-5, atol=1e-5)
    for bad in (-1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="weight_range must be a finite number >= 0"):
            model.init_uniform_(bad)


class _Calls(torch.nn.Module):
    """One of the model's methods as a module's forward, the form torch.export takes."""

    def __init__(self, model, method):
        super().__init__()
        self.model, self.method = model, method

    def forward(self, v):
        return getattr(self.model, self.method)(v)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("coupling", ["additive", "affine"])
def test_torch_export_with_a_dynamic_batch_keeps_the_fused_ops(tmp_path, device, coupling):
    model = small_model(coupling=coupling, dim=10, dtype=torch.float32, device=device).eval()
    batch = torch.export.Dim("batch")
    for method in ("log_prob", "inverse"):
        exported = torch.export.export(_Calls(model, method), (torch.rand(8, 10, device=device),),
                                       dynamic_shapes={"v": {0: batch}})
        ops = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
        assert any(op.startswith("nice_ext.") for op in ops), ops  # the kernels, not a traced-through reference
        torch.export.save(exported, tmp_path / f"{method}.pt2")
        loaded = torch.export.load(tmp_path / f"{method}.pt2").module()
        v = torch.rand(5, 10, device=device)  # another batch size than the traced one
        assert torch.equal(loaded(v), getattr(model, method)(v))
