"""RMSProp with momentum (nice_ext/optim.py) against the released configs' rule written out per parameter."""
import copy

import pytest
import torch

from conftest import DEVICES
from nice_ext import optim
from nice_ext.optim import RMSPropMomentum


def released_rule(params, grads_per_step, lrs, momenta, averaging, stabilizer):
    """The pylearn2 RMSPropMomentum update, one parameter at a time, in float64."""
    params = [p.detach().double().clone() for p in params]
    mean_squares = [torch.zeros_like(p) for p in params]
    velocities = [torch.zeros_like(p) for p in params]
    for grads, lr, momentum in zip(grads_per_step, lrs, momenta):
        for i, g in enumerate(grads):
            g = g.double()
            mean_squares[i] = averaging * mean_squares[i] + (1 - averaging) * g * g
            root = torch.maximum(mean_squares[i].sqrt(), torch.tensor(stabilizer, dtype=torch.float64))
            velocities[i] = momentum * velocities[i] - lr * g / root
            params[i] = params[i] + velocities[i]
    return params


def make_problem(seed=0, steps=6):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(5, 3, generator=gen), torch.randn(7, generator=gen), torch.randn(2, 2, 2, generator=gen)]
    # gradients of every size: some rows far below the stabilizer (1e-2), some far above
    grads = [[torch.randn(p.shape, generator=gen) * 10.0 ** torch.randint(-4, 2, p.shape, generator=gen)
              for p in params] for _ in range(steps)]
    return params, grads


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("as_tensors", [False, True], ids=["python-numbers", "tensors"])
def test_matches_the_released_rule_with_a_changing_rate_and_momentum(as_tensors, device):
    params, grads = make_problem()
    lrs = [1e-2 / 1.5 ** k for k in range(len(grads))]
    momenta = [0.0, 0.0, 0.0, 0.5, 0.5, 0.9]
    expected = released_rule(params, grads, lrs, momenta, averaging=0.95, stabilizer=1e-2)
    weights = [torch.nn.Parameter(p.clone().to(device)) for p in params]
    value = (lambda v: torch.tensor(v, device=device)) if as_tensors else (lambda v: v)  # noqa: E731
    optimizer = RMSPropMomentum(weights, lr=value(lrs[0]), momentum=value(momenta[0]), averaging=0.95,
                                stabilizer=1e-2)
    for step_grads, lr, momentum in zip(grads, lrs, momenta):
        for group in optimizer.param_groups:
            if as_tensors:
                group["lr"].fill_(lr)
                group["momentum"].fill_(momentum)
            else:
                group["lr"], group["momentum"] = lr, momentum
        for w, g in zip(weights, step_grads):
            w.grad = g.clone().to(device)
        optimizer.step()
    for w, e in zip(weights, expected):
        torch.testing.assert_close(w.detach().cpu().double(), e, rtol=1e-5, atol=1e-6)


def test_the_multi_tensor_path_equals_the_per_tensor_path():
    """GPUs update all parameters in one list, CPUs one at a time: the same arithmetic."""
    params, grads = make_problem(seed=2, steps=1)
    results = []
    for lists in (True, False):
        gen = torch.Generator().manual_seed(3)  # the same mean squares and velocities for both paths
        state = [[p.clone() for p in params], [g.clone() for g in grads[0]],
                 [torch.rand(p.shape, generator=gen) for p in params],
                 [torch.randn(p.shape, generator=gen) for p in params]]
        if lists:
            optim._update(*state, 0.9, 1e-2, 3e-3, 0.5)
        else:
            for one in zip(*state):
                optim._update(*([t] for t in one), 0.9, 1e-2, 3e-3, 0.5)
        results.append(state)
    for a, b in zip(*results):
        for x, y in zip(a, b):
            assert torch.equal(x, y)


def test_the_stabilizer_floors_the_root():
    """A gradient far below the stabilizer moves its parameter by lr * g / stabilizer, not by lr."""
    w = torch.nn.Parameter(torch.zeros(1))
    optimizer = RMSPropMomentum([w], lr=0.1, averaging=0.0, stabilizer=1e-2)
    w.grad = torch.tensor([1e-4])
    optimizer.step()
    assert w.item() == pytest.approx(-0.1 * 1e-4 / 1e-2)
    w.grad = torch.tensor([5.0])  # above it: a step of lr, the sign of the gradient
    optimizer.step()
    assert w.item() == pytest.approx(-0.1 * 1e-4 / 1e-2 - 0.1)


def test_state_dict_round_trip_continues_the_same_steps():
    params, grads = make_problem(seed=1)
    a = [torch.nn.Parameter(p.clone()) for p in params]
    first = RMSPropMomentum(a, lr=3e-3, momentum=0.5)
    for step_grads in grads[:3]:
        for w, g in zip(a, step_grads):
            w.grad = g.clone()
        first.step()
    b = [torch.nn.Parameter(w.detach().clone()) for w in a]
    second = RMSPropMomentum(b, lr=3e-3, momentum=0.5)
    second.load_state_dict(copy.deepcopy(first.state_dict()))
    for step_grads in grads[3:]:
        for opt, ws in ((first, a), (second, b)):
            for w, g in zip(ws, step_grads):
                w.grad = g.clone()
            opt.step()
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_parameters_without_gradients_stay_put():
    used, unused = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    optimizer = RMSPropMomentum([used, unused], lr=1e-2)
    used.grad = torch.ones(3)
    optimizer.step()
    assert torch.equal(unused, torch.ones(3)) and not torch.equal(used, torch.ones(3))
    assert unused not in optimizer.state


def test_the_rule_over_all_parameters_at_once_is_the_rule_per_parameter():
    """On a GPU the update runs once over the lists of every parameter (a few multi-tensor launches); on a CPU
    once per parameter. Both must give the same step, with the 0-d tensor rate and momentum a captured step
    reads."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (4,), (2, 5, 2)]
    params, grads, mean_squares, velocities = ([torch.randn(shape, generator=generator, dtype=torch.float64).abs()
                                                for shape in shapes] for _ in range(4))
    lr, momentum = torch.tensor(0.01, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64)
    before = [p.clone() for p in params]
    together = [[t.clone() for t in group] for group in (params, mean_squares, velocities)]
    optim._update(together[0], grads, together[1], together[2], 0.95, 1e-2, lr, momentum)
    for i in range(len(shapes)):
        optim._update([params[i]], [grads[i]], [mean_squares[i]], [velocities[i]], 0.95, 1e-2, lr, momentum)
    for group, separately in zip(together, (params, mean_squares, velocities)):
        for a, b in zip(group, separately):
            assert torch.equal(a, b)
    assert all(not torch.equal(p, b) for p, b in zip(params, before))  # the step moved every parameter


@pytest.mark.parametrize("kwargs, message", [
    (dict(lr=-1e-3), "lr must be in"),
    (dict(momentum=1.5), "momentum must be in"),
    (dict(averaging=1.0), "averaging must be in"),
    (dict(stabilizer=0.0), "stabilizer must be positive"),
])
def test_bad_hyperparameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RMSPropMomentum([torch.nn.Parameter(torch.ones(2))], **kwargs)
