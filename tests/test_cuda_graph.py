"""The CUDA-graph training step: it must train exactly like the eager step it replaces."""
import pytest
import torch

from conftest import NETWORK_SETTINGS, with_network_settings
from nice_ext import NICE
from nice_ext.cuda_graph import GraphedTrainStep, optimizer_step

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def make(device, capturable, network_setting=None):
    torch.manual_seed(0)
    model = NICE(12, num_coupling_layers=4, num_hidden_layers=2, hidden_dim=16).to(device)
    with_network_settings(model, network_setting)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, capturable=capturable)
    return model, optimizer


@pytest.mark.parametrize("clip_grad", [None, 0.5])
def test_eager_step_clips_the_gradient_norm(clip_grad):
    """The eager step (training's step on every device without --cuda-graph): with plain SGD at lr 1 the
    parameters move by the gradient, whose norm --clip-grad caps."""
    model, _ = make("cpu", capturable=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    parameters = list(model.parameters())
    before = [p.detach().clone() for p in parameters]
    optimizer_step(lambda x: -model.log_prob(x).mean(), optimizer, parameters, clip_grad,
                   torch.rand(8, 12, generator=torch.Generator().manual_seed(0)))
    moved = torch.cat([(p.detach() - b).flatten() for p, b in zip(parameters, before)]).norm().item()
    grad_norm = torch.cat([p.grad.flatten() for p in parameters]).norm().item()
    assert moved == pytest.approx(grad_norm, rel=1e-5)
    if clip_grad is None:
        assert grad_norm > 1.0  # so that clipping at 0.5 is a real test
    else:
        assert grad_norm == pytest.approx(clip_grad, rel=1e-5)


def test_needs_a_capturable_optimizer():
    model, optimizer = make("cpu", capturable=False)
    with pytest.raises(ValueError, match="capturable=True"):
        GraphedTrainStep(lambda x: -model.log_prob(x).mean(), optimizer, model.parameters())


def test_rejects_cpu_batches():
    model, optimizer = make("cpu", capturable=True)
    step = GraphedTrainStep(lambda x: -model.log_prob(x).mean(), optimizer, model.parameters())
    with pytest.raises(ValueError, match="CUDA tensors"):
        step(torch.rand(4, 12))


@needs_cuda
@pytest.mark.parametrize("network_setting", [None, *NETWORK_SETTINGS])
@pytest.mark.parametrize("clip_grad", [None, 0.5])
def test_graphed_steps_match_eager_steps(clip_grad, network_setting):
    """With overlap_weight_grads the graph has a second branch (the weight gradients' stream), with
    fuse_bias_relu cuBLASLt's epilogues are captured; the eager model it is compared with runs as a plain
    network on one stream."""
    batches = [torch.rand(8, 12, device="cuda") for _ in range(7)] + [torch.rand(5, 12, device="cuda")]
    batches += [torch.rand(8, 12, device="cuda") for _ in range(2)]  # after an odd-sized (eager) batch

    eager_model, eager_opt = make("cuda", capturable=True)
    eager_losses = []
    for x in batches:
        eager_opt.zero_grad(set_to_none=True)
        loss = -eager_model.log_prob(x).mean()
        loss.backward()
        if clip_grad is not None:
            torch.nn.utils.clip_grad_norm_(eager_model.parameters(), clip_grad)
        eager_opt.step()
        eager_losses.append(loss.item())

    model, optimizer = make("cuda", capturable=True, network_setting=network_setting)
    step = GraphedTrainStep(lambda x: -model.log_prob(x).mean(), optimizer, model.parameters(), clip_grad)
    losses = [step(x).item() for x in batches]
    assert step.graph is not None  # the capture happened and later steps were replays
    assert losses == pytest.approx(eager_losses, rel=1e-5, abs=1e-5)
    for a, b in zip(model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
