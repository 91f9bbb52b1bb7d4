"""Test log-likelihood of a checkpoint, averaged over several dequantization draws.

    python -m nice_ext.evaluate runs/mnist/best.pt --data-dir data --draws 10 [--json score.json]
    python -m nice_ext.evaluate runs/mnist/best.pt --data-dir data --dataset fashion-mnist   # images it never saw
"""

from __future__ import annotations

import argparse
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
def average_log_likelihood(model: NICE, preprocess: data_lib.Preprocess, pixels: torch.Tensor, batch_size: int,
                           generator: Optional[torch.Generator] = None) -> float:
    """Mean log-likelihood (nats, dequantized pixel space) over ``pixels``: one dequantization draw. The sum
    stays on the device until the end: a GPU is not made to wait for the host after every batch."""
    total, count = torch.zeros((), dtype=torch.float64, device=pixels.device), 0
    for batch in data_lib.batches(pixels, batch_size):
        log_px = model.log_prob(preprocess(batch, generator)) + preprocess.log_det
        total += log_px.double().sum()
        count += batch.shape[0]
    return total.item() / max(count, 1)


def log_likelihood_draws(model: NICE, preprocess: data_lib.Preprocess, pixels: torch.Tensor, draws: int,
                         batch_size: int = 1000, seed: int = DRAW_SEED) -> List[float]:
    """average_log_likelihood for ``draws`` dequantization draws, draw k from seed ``seed + k``."""
    return [average_log_likelihood(model, preprocess, pixels, batch_size,
                                   torch.Generator(device=pixels.device).manual_seed(seed + k))
            for k in range(draws)]


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
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.draws < 1:
        raise UsageError(f"--draws must be >= 1, got {args.draws}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.json is not None:
        check_out_file(args.json, "--json", [".json"], "a JSON")
    command = "python -m nice_ext.evaluate " + shlex.join(sys.argv[1:] if argv is None else argv)
    commit = provenance.source_commit()  # the code as it is when the measurement begins
    device = pick_device(args.device)
    model, payload = load_for_inference(args.checkpoint, device)
    info, preprocess = inference_data(model, payload, args.checkpoint, device, args.dataset)
    splits = data_lib.load_splits(info.name, args.data_dir, download=not args.no_download)
    pixels = getattr(splits, args.split).to(device)
    draws = log_likelihood_draws(model, preprocess, pixels, args.draws, args.batch_size, args.seed)
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
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
