import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                              reason="needs a CUDA GPU"))]


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64; NaN anywhere is an infinite error."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    if not torch.isfinite(actual).all():
        return float("inf")
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-300))


def sliced(t: torch.Tensor, pad_rows: int = 2, pad_cols: int = 3) -> torch.Tensor:
    """The same values as ``t``, as a view into a larger buffer (row offset and a row stride != D)."""
    big = torch.randn(t.shape[0] + 2 * pad_rows, t.shape[1] + 2 * pad_cols, dtype=t.dtype, device=t.device)
    view = big[pad_rows:pad_rows + t.shape[0], pad_cols:pad_cols + t.shape[1]]
    view.copy_(t)
    return view


def data_dir():
    """The shared MNIST / Fashion-MNIST files, or None when absent."""
    for candidate in (os.environ.get("NICE_EXT_DATA_DIR"), os.path.join(ROOT, "..", "shared", "data"),
                      os.path.join(ROOT, "data")):
        if candidate and os.path.exists(os.path.join(candidate, "mnist", "train-images-idx3-ubyte.gz")):
            return candidate
    return None


def make_first_epoch_unbeatable(checkpoint_path: str) -> None:
    """Rewrite a checkpoint as if its first epoch had scored a validation log-likelihood no later epoch
    can reach: every epoch after it is then one without a gain (to test --patience deterministically)."""
    state = torch.load(checkpoint_path, weights_only=True)
    state["history"][0]["valid_ll_nats"] = state["best_valid"] = 1e9
    torch.save(state, checkpoint_path)
