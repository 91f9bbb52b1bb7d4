"""Test log-likelihood of a checkpoint, averaged over several dequantization draws.

    python -m nice_ext.evaluate runs/mnist/best.pt --data-dir data --draws 10 [--json score.json]
    python -m nice_ext.evaluate runs/mnist/best.pt --data-dir data --dataset fashion-mnist   # images it never saw
    python -m nice_ext.evaluate runs/mnist/best.pt --data-dir data --scores mnist_test.npy      # each image's score
"""

from __future__ import annotations

import argparse
import io
import json
import shlex
import sys
from typing import List, Optional, Tuple

import numpy as np
import torch

from . import data as data_lib
from . import provenance
from .cli_common import (UsageError, add_data_arguments, add_dataset_argument, add_device_argument, check_out_file,
                         inference_data, load_for_inference, pick_device, run_tool, seed_value, tool_parser)
from .files import write_bytes
from .model import NICE

# Draw k of a test score takes its dequantization noise from seed DRAW_SEED + k, in training's final score
# as here, so `evaluate --draws K` on a run's best.pt repeats the figure the run printed (same device).
DRAW_SEED = 777


@torch.no_grad()
def image_log_likelihoods(model: NICE, preprocess: data_lib.Preprocess, pixels: torch.Tensor, batch_size: int,
                          generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Each image's log-likelihood (nats, dequantized pixel space; float64, on the pixels' device, in their
    order): one dequantization draw. The scores stay on the device: a GPU is not made to wait for the host
    after every batch."""
    scores = [(model.log_prob(preprocess(batch, generator)) + preprocess.log_det).double()
              for batch in data_lib.batches(pixels, batch_size)]
    return torch.cat(scores) if scores else torch.zeros(0, dtype=torch.float64, device=pixels.device)


def average_log_likelihood(model: NICE, preprocess: data_lib.Preprocess, pixels: torch.Tensor, batch_size: int,
                           generator: Optional[torch.Generator] = None) -> float:
    """Mean log-likelihood (nats, dequantized pixel space) over ``pixels``: one dequantization draw."""
    return mean_per_draw(image_log_likelihoods(model, preprocess, pixels, batch_size, generator)[None])[0]


def mean_per_draw(scores: torch.Tensor) -> List[float]:
    """Each draw's mean over the images of (draws, N) image scores (0 for no images)."""
    return [row.sum().item() / max(row.numel(), 1) for row in scores]


def image_log_likelihood_draws(model: NICE, preprocess: data_lib.Preprocess, pixels: torch.Tensor, draws: int,
                               batch_size: int = 1000, seed: int = DRAW_SEED) -> torch.Tensor:
    """image_log_likelihoods for ``draws`` dequantization draws, draw k from seed ``seed + k``: (draws, N)."""
    return torch.stack([image_log_likelihoods(model, preprocess, pixels, batch_size,
                                              torch.Generator(device=pixels.device).manual_seed(seed + k))
                        for k in range(draws)])


def log_likelihood_draws(model: NICE, preprocess: data_lib.Preprocess, pixels: torch.Tensor, draws: int,
                         batch_size: int = 1000, seed: int = DRAW_SEED) -> List[float]:
    """average_log_likelihood for ``draws`` dequantization draws, draw k from seed ``seed + k``."""
    return mean_per_draw(image_log_likelihood_draws(model, preprocess, pixels, draws, batch_size, seed))


def summary(draws: List[float], dim: int, data_range: Tuple[float, float]) -> str:
    """What train and evaluate print: 'N nats, N bits/dim (mean of K dequantization draws, spread S nats)', or
    '(1 dequantization draw)'."""
    ll = float(np.mean(draws))
    draws_text = (f"mean of {len(draws)} dequantization draws, spread {float(np.std(draws)):.3f} nats"
                  if len(draws) > 1 else "1 dequantization draw")
    return f"{ll:.2f} nats, {data_lib.bits_per_dim(ll, dim, data_range):.4f} bits/dim ({draws_text})"


def build_parser() -> argparse.ArgumentParser:
    p = tool_parser("python -m nice_ext.evaluate", __doc__)
    add_data_arguments(p)
    add_dataset_argument(p)
    p.add_argument("--split", choices=["test", "valid", "train"], default="test",
                   help="the images to score: test, valid (those training held out for validation) or train "
                        "(default test)")
    p.add_argument("--draws", type=int, default=5, help="dequantization draws to average (default 5)")
    p.add_argument("--batch-size", "--batch_size", type=int, default=1000,
                   help="images per forward pass (default 1000, as training scores its runs)")
    add_device_argument(p)
    p.add_argument("--seed", type=seed_value, default=DRAW_SEED,
                   help="draw k uses seed SEED + k (default: the seeds of the score a training run prints)")
    p.add_argument("--json", metavar="FILE",
                   help="also write the score to FILE (.json): the mean and each draw in nats, bits/dim, the "
                        "checkpoint and its epoch, the split, and the device, software, commit, date and command")
    p.add_argument("--scores", metavar="FILE",
                   help="also write each image's log-likelihood, in nats and averaged over the draws, in the "
                        "split's order: FILE.npy holds them as a float64 array, FILE.csv as rows of index, "
                        "nats and bits/dim")
    return p


def scores_file_bytes(path: str, scores: np.ndarray, dim: int, data_range: Tuple[float, float]) -> bytes:
    """``scores`` (nats per image) as the bytes of a .npy or a .csv file, chosen by the name of ``path``."""
    buffer = io.BytesIO()
    if path.lower().endswith(".npy"):
        np.save(buffer, scores.astype(np.float64))
    else:
        table = np.column_stack([np.arange(len(scores)), scores, data_lib.bits_per_dim(scores, dim, data_range)])
        np.savetxt(buffer, table, fmt=["%d", "%.6f", "%.6f"], delimiter=",", header="index,ll_nats,bits_per_dim",
                   comments="")
    return buffer.getvalue()


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.draws < 1:
        raise UsageError(f"--draws must be >= 1, got {args.draws}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.json is not None:
        check_out_file(args.json, "--json", [".json"], "a JSON")
    if args.scores is not None:
        check_out_file(args.scores, "--scores", [".npy", ".csv"], "a .npy or .csv")
    command = "python -m nice_ext.evaluate " + shlex.join(sys.argv[1:] if argv is None else argv)
    commit = provenance.source_commit()  # the code as it is when the measurement begins
    device = pick_device(args.device)
    model, payload = load_for_inference(args.checkpoint, device)
    info, preprocess = inference_data(model, payload, args.checkpoint, device, args.dataset)
    if args.split == "test":  # the test images alone: one's own need only DIR/test/
        pixels = data_lib.load_pixels(info.name, args.data_dir, "test", download=not args.no_download,
                                      image_shape=info.image_shape)
    else:
        pixels = getattr(data_lib.load_splits(info.name, args.data_dir, download=not args.no_download,
                                              image_shape=info.image_shape), args.split)
    pixels = pixels.to(device)
    image_scores = image_log_likelihood_draws(model, preprocess, pixels, args.draws, args.batch_size, args.seed)
    draws = mean_per_draw(image_scores)
    print(f"{info.name} {args.split} ({pixels.shape[0]} images): "
          f"{summary(draws, model.data_dim, model.data_range)}")
    if args.json is not None:
        ll = float(np.mean(draws))
        score = dict(checkpoint=args.checkpoint, epoch=payload.get("epoch"), dataset=info.name,
                     trained_on=payload["dataset"], split=args.split, images=pixels.shape[0], ll_nats=round(ll, 4),
                     bits_per_dim=round(data_lib.bits_per_dim(ll, model.data_dim, model.data_range), 5),
                     draws=len(draws), draw_spread_nats=round(float(np.std(draws)), 4), draw_ll_nats=draws,
                     seed=args.seed, batch_size=args.batch_size,
                     **provenance.record(device, command, commit=commit))
        write_bytes((json.dumps(score, indent=1) + "\n").encode(), args.json)
        print(f"wrote {args.json}")
    if args.scores is not None:
        per_image = image_scores.mean(0).cpu().numpy()
        write_bytes(scores_file_bytes(args.scores, per_image, model.data_dim, model.data_range), args.scores)
        print(f"wrote {args.scores} ({len(per_image)} images)")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
