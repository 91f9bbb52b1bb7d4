"""The README's Python examples run as written."""
import os
import re

import torch

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def test_training_loop_on_your_own_data_runs_learns_and_saves(tmp_path, monkeypatch):
    readme = open(README, encoding="utf-8").read()
    match = re.search(r"for 8-bit pixels `pixels` \(uint8, N × D\):\n\n```python\n(.*?)```", readme, re.S)
    assert match, "the README's training-loop example is missing"
    code = match.group(1)
    # 8-bit "images" with structure to learn: each row a noisy copy of one of two patterns
    g = torch.Generator().manual_seed(0)
    patterns = torch.randint(0, 256, (2, 784), generator=g)
    rows = patterns[torch.randint(0, 2, (200,), generator=g)] + torch.randint(-8, 9, (200, 784), generator=g)
    pixels = rows.clamp(0, 255).to(torch.uint8)
    scope = {"pixels": pixels}
    torch.manual_seed(0)
    monkeypatch.chdir(tmp_path)  # where it saves the model
    exec(compile(code, README, "exec"), scope)  # 10 epochs of one batch of 200
    model = scope["model"]
    from nice_ext.data import dequantize
    with torch.no_grad():
        x = dequantize(pixels, (0.0, 1.0), generator=torch.Generator().manual_seed(1))
        trained = model.log_prob(x).mean().item()
        untrained = type(model)(data_dim=784).log_prob(x).mean().item()
    # a new model is the identity whatever its seed; ten steps of maximum likelihood must raise log p
    assert trained > untrained + 10, (trained, untrained)
    import nice_ext
    with torch.no_grad():
        assert torch.equal(nice_ext.load_model("my_model.pt").log_prob(x), model.log_prob(x))
