"""The coupling network m (nice_ext.mlp): with its speed settings (``overlap_weight_grads``: the weight and
bias gradients on a second CUDA stream; ``fuse_bias_relu``: the hidden layers' bias and ReLU in the GEMM's
epilogue; or both) it gives the plain nn.Sequential's output and gradients."""
import contextlib
import copy
import threading

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import DEVICES, NETWORK_SETTINGS, sliced, with_network_settings
from nice_ext import NICE
from nice_ext.mlp import CouplingMLP

OWN_NODE = "_ReluMLPBackward"  # the autograd node of the network's own backward
settings = pytest.mark.parametrize("setting", list(NETWORK_SETTINGS))


def twin_networks(in_features, out_features, hidden_layers, dtype, device, hidden_dim=16, setting="overlap"):
    """(plain, tuned): the same weights, the second with ``NETWORK_SETTINGS[setting]``; the output layer is
    given weights too (it starts at zero)."""
    plain = CouplingMLP(in_features, out_features, hidden_dim, hidden_layers).to(device, dtype)
    with torch.no_grad():
        for p in plain.parameters():
            p.normal_(0.0, 0.5)
    return plain, with_network_settings(copy.deepcopy(plain), setting)


def forward_backward(net, x, grad_out):
    x = sliced(x.detach()).requires_grad_(x.requires_grad)  # a view into a larger buffer, a leaf of its own
    assert x._base is not None and x.storage_offset() > 0
    out = net(x)
    out.backward(grad_out)
    return out, x.grad, [p.grad for p in net.parameters()]


def assert_same(actual, expected, device):
    # On a CPU the same operators on the same operands give the same bits; on a GPU cuBLAS may choose
    # another algorithm for a stream of its own.
    tolerance = dict(rtol=0, atol=0) if device == "cpu" else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(actual, expected, **tolerance)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("hidden_layers", [0, 1, 5])
@pytest.mark.parametrize("batch", [1, 3, 257])
@pytest.mark.parametrize("input_needs_grad", [False, True], ids=["data-input", "input-needs-grad"])
@settings
def test_same_output_and_gradients_as_the_plain_network(device, dtype, hidden_layers, batch, input_needs_grad,
                                                        setting):
    plain, tuned = twin_networks(7, 5, hidden_layers, dtype, device, setting=setting)
    x = sliced(torch.randn(batch, 7, dtype=dtype, device=device)).requires_grad_(input_needs_grad)
    grad_out = sliced(torch.randn(batch, 5, dtype=dtype, device=device))  # as a chunk of a wider gradient
    out, x_grad, grads = forward_backward(tuned, x, grad_out)
    assert type(out.grad_fn).__name__ == OWN_NODE
    expected_out, expected_x_grad, expected_grads = forward_backward(plain, x, grad_out)
    assert_same(out, expected_out, device)
    if input_needs_grad:
        assert_same(x_grad, expected_x_grad, device)
    else:
        assert x_grad is None
    assert len(grads) == len(expected_grads) == 2 * (hidden_layers + 1)
    for grad, expected in zip(grads, expected_grads):
        assert_same(grad, expected, device)


def as_function(net):
    """The network as a function of its input and parameters, and inputs for it (float64, needing grad)."""
    names = [name for name, _ in net.named_parameters()]

    def network(x, *weights_and_biases):
        return torch.func.functional_call(net, dict(zip(names, weights_and_biases)), (x,))

    inputs = (torch.randn(5, 4, dtype=torch.float64, requires_grad=True),
              *[p.detach().clone().requires_grad_() for p in net.parameters()])
    return network, inputs


@settings
def test_gradcheck_in_float64(setting):
    _, tuned = twin_networks(4, 3, 2, torch.float64, "cpu", hidden_dim=6, setting=setting)
    network, inputs = as_function(tuned)
    assert type(network(*inputs).grad_fn).__name__ == OWN_NODE
    assert torch.autograd.gradcheck(network, inputs)


@settings
def test_parameters_without_gradients_get_none(setting):
    plain, tuned = twin_networks(6, 4, 2, torch.float32, "cpu", setting=setting)
    for net in (plain, tuned):
        net[0].weight.requires_grad_(False)
        net[2].bias.requires_grad_(False)
    x, grad_out = torch.randn(9, 6), torch.randn(9, 4)
    _, _, grads = forward_backward(tuned, x, grad_out)
    _, _, expected = forward_backward(plain, x, grad_out)
    assert grads[0] is None and grads[3] is None
    for grad, want in zip(grads, expected):
        assert (grad is None) == (want is None)
        if grad is not None:
            assert torch.equal(grad, want)


@settings
def test_plain_path_where_the_settings_do_not_apply(setting):
    """Under autocast, inside torch.func and forward-mode AD, and on inputs that are not 2-D, the network
    runs as a plain nn.Sequential: the same values, the autograd of its modules. Without gradients it
    gives the plain network's values."""
    plain, tuned = twin_networks(6, 4, 2, torch.float32, "cpu", setting=setting)
    x = torch.randn(5, 6)
    with torch.no_grad():
        assert tuned(x).grad_fn is None and torch.equal(tuned(x), plain(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tuned(x.requires_grad_())
        assert out.dtype == torch.bfloat16 and type(out.grad_fn).__name__ != OWN_NODE
        assert torch.equal(out, plain(x))
    batches = torch.randn(2, 5, 6, requires_grad=True)  # a batch of batches: nn.Linear takes it
    out = tuned(batches)
    assert type(out.grad_fn).__name__ != OWN_NODE and torch.equal(out, plain(batches))
    x = x.detach()
    grad_of_sum = torch.func.grad(lambda x: tuned(x).sum())(x)
    torch.testing.assert_close(grad_of_sum, torch.func.grad(lambda x: plain(x).sum())(x), rtol=0, atol=0)
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(x, torch.ones_like(x))
        tangent = torch.autograd.forward_ad.unpack_dual(tuned(dual)).tangent
        expected = torch.autograd.forward_ad.unpack_dual(plain(dual)).tangent
    torch.testing.assert_close(tangent, expected, rtol=0, atol=0)


def test_input_grads_only_runs_the_plain_network_in_its_thread_alone():
    from nice_ext.mlp import input_grads_only

    _, tuned = twin_networks(6, 4, 2, torch.float32, "cpu")
    x = torch.randn(5, 6, requires_grad=True)
    node = lambda: type(tuned(x).grad_fn).__name__  # noqa: E731
    seen_in_other_thread = []
    with input_grads_only():
        with input_grads_only():
            assert node() != OWN_NODE
        assert node() != OWN_NODE  # the inner block left the outer one's setting
        thread = threading.Thread(target=lambda: seen_in_other_thread.append(node()))
        thread.start()
        thread.join()
    assert node() == OWN_NODE and seen_in_other_thread == [OWN_NODE]


@settings
def test_inpainting_asks_for_the_input_gradient_alone(monkeypatch, setting):
    """Inpainting needs d log p / dx only: with the speed settings its networks run plain (no weight
    gradients computed), and it fills in what it fills in without them."""
    from nice_ext import mlp

    calls = []
    own_apply = mlp._ReluMLP.apply
    monkeypatch.setattr(mlp._ReluMLP, "apply", lambda *a: calls.append(1) or own_apply(*a))
    model = NICE(12, num_coupling_layers=2, num_hidden_layers=1, hidden_dim=8)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    x, observed = torch.rand(3, 12), torch.arange(12) % 3 == 0
    plain = model.inpaint(x, observed, steps=5, generator=torch.Generator().manual_seed(1))
    with_network_settings(model, setting)
    filled = model.inpaint(x, observed, steps=5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(filled, plain) and not calls
    model.log_prob(x).sum().backward()  # (the spy sees the network's own path where it applies)
    assert len(calls) == 2


@settings
def test_second_derivatives_in_float64(setting):
    """A backward with create_graph=True gives gradients that can be differentiated again (the network is
    run again from its input and parameters): gradgradcheck, and the first derivatives of that backward
    are those of the usual one."""
    plain, tuned = twin_networks(4, 3, 2, torch.float64, "cpu", hidden_dim=6, setting=setting)
    network, inputs = as_function(tuned)
    assert torch.autograd.gradgradcheck(network, inputs)
    x = inputs[0].detach().clone().requires_grad_()
    (with_graph,) = torch.autograd.grad(tuned(x).square().sum(), x, create_graph=True)
    (without,) = torch.autograd.grad(plain(x).square().sum(), x)
    assert with_graph.grad_fn is not None
    torch.testing.assert_close(with_graph, without, rtol=0, atol=0)


class StreamLog(TorchDispatchMode):
    """Stands in for the two CUDA streams of the overlapped backward on the CPU: logs each stream wait, and
    each ATen operator that computes (views and allocations left out) with the stream it would have been
    launched on. (A dispatch mode, unlike a torch-function mode, sees into autograd's backward.)"""

    NOT_LAUNCHES = {"t", "transpose", "empty_like", "new_empty", "empty", "detach", "alias", "view"}

    def __init__(self):
        super().__init__()
        self.entries, self.current = [], "main"

    def stream(self, name):
        log = self

        class FakeStream:
            def wait_stream(self, other):
                log.entries.append(("wait", name, other.name))

        fake = FakeStream()
        fake.name = name
        return fake

    @contextlib.contextmanager
    def on_stream(self, stream):  # (None: where launches would go anyway)
        before, self.current = self.current, self.current if stream is None else stream.name
        try:
            yield
        finally:
            self.current = before

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in self.NOT_LAUNCHES:
            self.entries.append(("op", self.current, name))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("input_needs_grad", [False, True], ids=["data-input", "input-needs-grad"])
def test_the_backward_launches_weight_gradients_on_the_side_stream_after_a_wait(monkeypatch, input_needs_grad):
    """The two streams' choreography, checked without a GPU: each layer's weight and bias gradients go to
    the side stream, which first waits for the main stream (where the layer's gradient g was made); nothing
    else runs there; and the main stream waits for the side stream before the backward returns, as the
    autograd engine and the optimizer read the gradients on the main stream."""
    from nice_ext import mlp

    layers = 3
    _, overlapped = twin_networks(6, 4, layers - 1, torch.float32, "cpu")
    log = StreamLog()
    monkeypatch.setattr(mlp, "_weight_grad_streams", lambda device: (log.stream("main"), log.stream("side")))
    monkeypatch.setattr(mlp, "_on_stream", log.on_stream)
    x = torch.randn(5, 6, requires_grad=input_needs_grad)
    out = overlapped(x)
    grad_out = torch.randn_like(out)
    with log:
        out.backward(grad_out)
    entries = log.entries
    side_ops = [e for e in entries if e[:2] == ("op", "side")]
    assert [e[2] for e in side_ops] == ["mm", "sum"] * layers  # weight and bias gradients, a layer each
    for i, entry in enumerate(entries):
        if entry[:2] == ("op", "side") and entries[i - 1][:2] != ("op", "side"):  # a run of side launches
            assert entries[i - 1] == ("wait", "side", "main"), entries[i - 3:i + 1]
    assert entries[-1] == ("wait", "main", "side") and entries.count(("wait", "main", "side")) == 1
    main_ops = [e[2] for e in entries if e[:2] == ("op", "main")]
    # on the main stream: the ReLU backwards and the input gradients (g W) of the chain, nothing else
    assert sorted(set(main_ops)) == ["mm", "threshold_backward"]
    assert main_ops.count("mm") == layers - (0 if input_needs_grad else 1)
    # and the gradients are right (the plain network's, as in the tests above)
    plain = copy.deepcopy(overlapped)
    plain.overlap_weight_grads = False
    x_plain = x.detach().clone().requires_grad_(input_needs_grad)
    plain(x_plain).backward(grad_out)
    for p, q in zip(overlapped.parameters(), plain.parameters()):
        assert torch.equal(p.grad, q.grad)


@pytest.mark.parametrize("records_grad", [False, True], ids=["no-grad", "grad"])
def test_fuse_bias_relu_launches_one_gemm_per_hidden_layer_and_one_stream(monkeypatch, records_grad):
    """With fuse_bias_relu alone the forward is one _addmm_activation per hidden layer (no ReLU of its own),
    with or without gradients; the backward is the plain one's operators, all on the main stream, with no
    stream waits."""
    from nice_ext import mlp

    hidden_layers = 2
    plain, fused = twin_networks(6, 4, hidden_layers, torch.float32, "cpu", setting="fuse")
    log = StreamLog()
    monkeypatch.setattr(mlp, "_weight_grad_streams", lambda device: (log.stream("main"), log.stream("side")))
    monkeypatch.setattr(mlp, "_on_stream", log.on_stream)
    x = torch.randn(5, 6)
    with log, torch.set_grad_enabled(records_grad):
        out = fused(x)
    forward_ops = [e[2] for e in log.entries]
    assert forward_ops == ["_addmm_activation"] * hidden_layers + ["addmm"]
    assert torch.equal(out, plain(x))
    if not records_grad:
        return
    grad_out = torch.randn_like(out)
    log.entries.clear()
    with log:
        out.backward(grad_out)
    assert all(e[:2] == ("op", "main") for e in log.entries), log.entries  # no waits, no side stream
    backward_ops = [e[2] for e in log.entries]
    assert backward_ops.count("threshold_backward") == hidden_layers
    assert backward_ops.count("sum") == hidden_layers + 1
    plain(x).backward(grad_out)
    for p, q in zip(fused.parameters(), plain.parameters()):
        assert torch.equal(p.grad, q.grad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("coupling", ["additive", "affine"])
@settings
def test_nice_log_prob_and_gradients_are_unchanged(device, coupling, setting):
    torch.manual_seed(0)
    plain = NICE(20, num_coupling_layers=3, num_hidden_layers=2, hidden_dim=16, coupling=coupling).to(device)
    with torch.no_grad():
        for p in plain.parameters():
            p.normal_(0.0, 0.2)
    tuned = with_network_settings(copy.deepcopy(plain), setting)
    x = torch.rand(11, 20, device=device)
    log_p = plain.log_prob(x)
    tuned_log_p = tuned.log_prob(x)
    assert_same(tuned_log_p, log_p, device)
    log_p.mean().backward()
    tuned_log_p.mean().backward()
    for p, q in zip(tuned.parameters(), plain.parameters()):
        assert_same(p.grad, q.grad, device)
    with torch.no_grad():  # evaluation and sampling (the epilogues without a backward)
        assert_same(tuned.log_prob(x), log_p.detach(), device)
        z = torch.randn(4, 20, device=device)
        assert_same(tuned.inverse(z), plain.inverse(z), device)


@pytest.mark.parametrize("name", ["overlap_weight_grads", "fuse_bias_relu"])
def test_a_speed_setting_not_part_of_the_model(name):
    model = NICE(12, num_coupling_layers=2, num_hidden_layers=1, hidden_dim=8)
    assert getattr(model, name) is False
    keys = set(model.state_dict())
    setattr(model, name, True)
    assert all(getattr(layer.net, name) for layer in model.layers)
    assert set(model.state_dict()) == keys and "layers.0.net.0.weight" in keys  # the names of nn.Sequential's
    assert name not in model.config
    assert getattr(NICE(12, 2, 1, 8, **{name: True}), name) is True
    with pytest.raises(TypeError, match=f"{name} must be a bool"):
        setattr(model, name, "yes")
    assert isinstance(model.layers[0].net, nn.Sequential)
    assert f"{name}=True" in repr(model.layers[0].net)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@settings
def test_paper_sized_network_on_cuda_over_several_steps(setting):
    """The paper's coupling network at its batch size (200 rows, 392 -> 5 x 1000 -> 392), where the two
    streams' GEMMs run side by side and cuBLASLt takes the epilogues; steps one after another with other
    allocations in between, so that memory freed too early would be reused while the side stream still
    reads it."""
    plain, tuned = twin_networks(392, 392, 5, torch.float32, "cuda", hidden_dim=1000, setting=setting)
    with torch.no_grad():
        for net in (plain, tuned):
            for p in net.parameters():
                p.mul_(0.1)
    for step in range(4):
        x = torch.randn(200, 392, device="cuda", requires_grad=step % 2 == 1)
        grad_out = torch.randn(200, 392, device="cuda")
        for net in (plain, tuned):
            net.zero_grad(set_to_none=True)
        out, x_grad, grads = forward_backward(tuned, x, grad_out)
        scratch = [torch.full((200, 1000), float("nan"), device="cuda") for _ in range(8)]  # reuse freed blocks
        expected_out, expected_x_grad, expected_grads = forward_backward(plain, x, grad_out)
        del scratch
        assert_same(out, expected_out, "cuda")
        if x.requires_grad:
            assert_same(x_grad, expected_x_grad, "cuda")
        for grad, expected in zip(grads, expected_grads):
            assert_same(grad, expected, "cuda")
