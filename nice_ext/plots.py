"""Figures written by the command-line tools: sample grids, training curves, the scaling spectrum."""

from __future__ import annotations

import math
import os
from typing import Dict, List, Optional

import torch
from torchvision.utils import save_image

from .files import atomic_file
from .model import NICE


def figure(width: float = 6, height: float = 4):
    """A matplotlib figure with one axes, made without pyplot: pyplot's global state belongs to one thread,
    and training draws its figures on the thread that writes its files (``files.BackgroundWriter``)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    return fig, fig.subplots()


def to_images(x: torch.Tensor, model: NICE, preprocess=None, image_shape=None) -> torch.Tensor:
    """Model-space rows (N, D) back to images (N, C, H, W) in [0, 1]: of ``image_shape``, else the model's, else
    one row of D values each."""
    if preprocess is not None and preprocess.zca is not None:
        x = x.double() @ torch.linalg.inv(preprocess.zca.matrix.double()) + preprocess.zca.mean.double()
    low, high = model.data_range
    shape = image_shape or model.image_shape or (1, 1, model.data_dim)
    return ((x.float() - low) / (high - low)).clamp(0, 1).reshape(-1, *shape).cpu()


def image_format(path: str) -> str:
    """The image format a file name asks for (``grid.png`` -> ``PNG``), as the image library names it."""
    from PIL import Image

    return Image.registered_extensions().get(os.path.splitext(path)[1].lower(), "PNG")


def save_grid(images: torch.Tensor, path: str, nrow: Optional[int] = None) -> None:
    with atomic_file(path) as f:
        save_image(images, f, format=image_format(path), nrow=nrow or max(1, int(math.sqrt(images.shape[0]))),
                   padding=2, pad_value=0.5)


def save_figure(fig, path: str) -> None:
    with atomic_file(path) as f:
        fig.savefig(f, format=os.path.splitext(path)[1][1:].lower() or "png", dpi=120)


@torch.no_grad()
def sample_images(model: NICE, n: int, preprocess=None, temperature: float = 1.0, image_shape=None) -> torch.Tensor:
    """``n`` samples of ``model`` as images (N, C, H, W) in [0, 1], on the host (``to_images``)."""
    was_training = model.training
    model.eval()
    images = to_images(model.sample(n, temperature=temperature), model, preprocess, image_shape)
    model.train(was_training)
    return images


def training_curve(history: List[Dict[str, float]], path: str) -> None:
    fig, ax = figure()
    epochs = [row["epoch"] for row in history]
    ax.plot(epochs, [row["train_ll_nats"] for row in history], label="train")
    ax.plot(epochs, [row["valid_ll_nats"] for row in history], label="validation")
    ax.set_xlabel("epoch")
    ax.set_ylabel("log-likelihood (nats)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


@torch.no_grad()
def scaling_spectrum(log_scale: torch.Tensor, path: str) -> None:
    """The learned scales exp(s_d) of a model's ``log_scale``, sorted: paper §3.3 reads large s_d as
    unimportant directions."""
    s = log_scale.detach().float().cpu().sort(descending=True).values
    fig, ax = figure()
    ax.plot(torch.exp(s).numpy())
    ax.set_yscale("log")
    ax.set_xlabel("dimension (sorted)")
    ax.set_ylabel("scale exp(s_d)")
    ax.set_title("learned scaling spectrum")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)
