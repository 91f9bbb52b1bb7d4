"""A grid of samples from a checkpoint.

    python -m nice_ext.sample runs/mnist/best.pt --n 64 --out samples.png --temperature 0.8
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import List, Optional

import torch

from . import plots
from .cli_common import (UsageError, add_device_argument, check_image_out, inference_data, load_for_inference,
                         pick_device, run_tool, seed_value, tool_parser)


def build_parser() -> argparse.ArgumentParser:
    p = tool_parser("python -m nice_ext.sample", __doc__)
    p.add_argument("--n", type=int, default=64, help="number of samples (default 64)")
    p.add_argument("--out", required=True, help="image file to write (.png, .jpg, ...)")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="scale of the prior draws: below 1 gives cleaner, less varied samples (default 1)")
    add_device_argument(p)
    p.add_argument("--seed", type=seed_value, default=0, help="seed of the prior draws (default 0)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.n < 1:
        raise UsageError(f"--n must be positive, got {args.n}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise UsageError(f"--temperature must be a finite number >= 0, got {args.temperature}")
    check_image_out(args.out)
    device = pick_device(args.device)
    model, payload = load_for_inference(args.checkpoint, device)
    # The dataset's preprocessing maps samples back to pixels (it undoes a whitening), and its images have the
    # shape a model saved without image_shape= lacks. A model saved without a dataset has neither.
    info, preprocess = inference_data(model, payload, args.checkpoint, device) if payload["dataset"] else (None, None)
    image_shape = model.image_shape or (info.image_shape if info is not None else None)
    if image_shape is None:
        print(f"note: the model has no image shape: each sample is drawn as one row of its {model.data_dim} values")
    torch.manual_seed(args.seed)
    try:
        plots.sample_grid(model, args.n, args.out, preprocess, temperature=args.temperature, image_shape=image_shape)
    except OverflowError as error:  # samples beyond the model's dtype
        raise UsageError(f"--temperature: {error}") from None
    print(f"wrote {args.n} samples to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
