"""Test log-likelihood of a checkpoint, averaged over several dequantization draws.

    python -m nice_ext.evaluate runs/mnist/best.pt --data-dir data --draws 10
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

import numpy as np
import torch

from . import data as data_lib
from .cli_common import UsageError, load_for_inference, pick_device, run_tool, seed_value
from .train import average_log_likelihood


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m nice_ext.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--split", choices=["test", "valid", "train"], default="test")
    p.add_argument("--draws", type=int, default=5, help="dequantization draws to average")
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--seed", type=seed_value, default=0)
    p.add_argument("--no-download", action="store_true")
    args = p.parse_args(argv)
    if args.draws < 1:
        raise UsageError(f"--draws must be >= 1, got {args.draws}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    device = pick_device(args.device)
    model, preprocess, payload = load_for_inference(args.checkpoint, device)
    splits = data_lib.load_splits(payload["dataset"], args.data_dir, download=not args.no_download)
    pixels = getattr(splits, args.split).to(device)
    draws = [average_log_likelihood(model, preprocess, pixels, args.batch_size,
                                    torch.Generator(device=device).manual_seed(args.seed + k))
             for k in range(args.draws)]
    ll, spread = float(np.mean(draws)), float(np.std(draws))
    bpd = data_lib.bits_per_dim(ll, model.data_dim, model.data_range)
    print(f"{payload['dataset']} {args.split} ({pixels.shape[0]} images): {ll:.2f} nats, {bpd:.4f} bits/dim "
          f"(mean of {args.draws} dequantization draws, std {spread:.3f} nats)")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
