"""A grid of samples from a checkpoint, or the samples' pixels as a NumPy array.

    python -m nice_ext.sample runs/mnist/best.pt --n 64 --out samples.png --temperature 0.8
    python -m nice_ext.sample runs/mnist/best.pt --n 10000 --out samples.npy
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import List, Optional

import numpy as np
import torch

from . import data as data_lib
from . import plots
from .cli_common import (UsageError, add_device_argument, check_image_out, check_out_file, inference_data,
                         load_for_inference, pick_device, run_tool, seed_value, tool_parser)
from .files import atomic_file


def build_parser() -> argparse.ArgumentParser:
    p = tool_parser("python -m nice_ext.sample", __doc__)
    p.add_argument("--n", type=int, default=64, help="number of samples (default 64)")
    p.add_argument("--out", required=True,
                   help="image file of the grid to write (.png, .jpg, ...), or .npy: the samples' 8-bit pixels, "
                        "uint8 (N, C, H, W), for measures of sample quality")
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
    pixels_out = os.path.splitext(args.out)[1].lower() == ".npy"
    if pixels_out:
        check_out_file(args.out, "--out", [".npy"], "a .npy")
    else:
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
        images = plots.sample_images(model, args.n, preprocess, temperature=args.temperature, image_shape=image_shape)
    except OverflowError as error:  # samples beyond the model's dtype
        raise UsageError(f"--temperature: {error}") from None
    if pixels_out:
        pixels = data_lib.quantize(images, (0.0, 1.0)).numpy()  # the levels whose bins hold the samples
        with atomic_file(args.out) as f:
            np.save(f, pixels)
        print(f"wrote {args.n} samples to {args.out} (uint8 pixels, {' x '.join(map(str, pixels.shape))})")
    else:
        plots.save_grid(images, args.out)
        print(f"wrote {args.n} samples to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
