"""Inpainting with a trained model (paper §5.2): test images, their masked versions and the filled-in
results, one row group per mask (the masks of the authors' released demo: top / bottom / left / right half,
even or odd columns, the middle rows or columns, 75 % and 90 % at random missing; or masks of one's own
from image files), and each mask's error on the missing pixels, beside that of filling them with mid-grey.

    python -m nice_ext.inpaint runs/mnist/best.pt --data-dir data --out inpaint.png
    python -m nice_ext.inpaint runs/mnist/best.pt --data-dir data --out filled.png --mask-file hole.png
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from . import data as data_lib
from . import plots
from .cli_common import (UsageError, add_data_arguments, add_dataset_argument, add_device_argument, check_image_out,
                         inference_data, load_for_inference, pick_device, run_tool, seed_value, tool_parser)

# The masks of the authors' released MNIST inpainting demo (laurent-dinh/nice,
# pylearn2/scripts/reconstruct_mnist_gif.py), each named by what is missing: a half of the image, every
# other column (its stripes: `m[:, ::2]` of a 28-wide image), the middle half of the rows or of the
# columns (`m[:, 196:588]`, and columns 7-20 of each row), and 75 % or 90 % of the pixels at random.
MASK_NAMES = ("top", "bottom", "left", "right", "stripes-even", "stripes-odd", "middle-rows", "middle-columns",
              "random75", "random90")


def observed_masks(image_shape, generator: torch.Generator) -> Dict[str, torch.Tensor]:
    """Observed-pixel masks (True = kept) of MASK_NAMES, flattened like the images; a pixel missing is missing
    in every channel."""
    channels, height, width = image_shape
    rows = torch.arange(height).view(height, 1).expand(height, width)
    cols = torch.arange(width).view(1, width).expand(height, width)
    middle_rows = (rows >= height // 4) & (rows < 3 * height // 4)
    middle_cols = (cols >= width // 4) & (cols < 3 * width // 4)
    spatial = {"top": rows >= height // 2, "bottom": rows < height // 2,  # "top" = the top half is missing
               "left": cols >= width // 2, "right": cols < width // 2,
               "stripes-even": cols % 2 == 1, "stripes-odd": cols % 2 == 0,  # the even or the odd columns missing
               "middle-rows": ~middle_rows, "middle-columns": ~middle_cols,
               "random75": torch.rand(height, width, generator=generator) >= 0.75,
               "random90": torch.rand(height, width, generator=generator) >= 0.90}
    return {name: m.expand(channels, height, width).reshape(-1).clone() for name, m in spatial.items()}


def mask_from_file(path: str, image_shape) -> torch.Tensor:
    """The observed-pixel mask (True = kept, flattened like the images) of an image file of the images'
    height and width: its light pixels (>= 128 in grayscale) mark what is missing, to be filled, as in
    OpenCV's and most inpainting tools' masks; a missing pixel is missing in every channel."""
    from PIL import Image, UnidentifiedImageError

    channels, height, width = image_shape
    try:
        with Image.open(path) as image:
            gray = np.asarray(image.convert("L"), dtype=np.uint8)
    except FileNotFoundError:
        raise UsageError(f"--mask-file {path}: no such file") from None
    except (OSError, UnidentifiedImageError, ValueError) as error:
        raise UsageError(f"--mask-file {path}: cannot be read as an image ({error})") from None
    if gray.shape != (height, width):
        raise UsageError(f"--mask-file {path}: {gray.shape[1]}x{gray.shape[0]} pixels (width x height); the images "
                         f"are {width}x{height}")
    missing = torch.from_numpy(gray >= 128)
    if not missing.any():
        raise UsageError(f"--mask-file {path}: marks no pixel to fill (light pixels, >= 128 in grayscale, mark "
                         f"the missing ones)")
    return (~missing).expand(channels, height, width).reshape(-1).clone()


def chosen_masks(names: Optional[str], mask_files: List[str], image_shape,
                 generator: torch.Generator) -> Dict[str, torch.Tensor]:
    """The masks --masks names (default: all of MASK_NAMES, or none when --mask-file is given), then those of
    the --mask-file files, named by their paths."""
    if names is None:
        names = "" if mask_files else ",".join(MASK_NAMES)
    chosen = [name for name in names.split(",") if name]
    unknown = [name for name in chosen if name not in MASK_NAMES]
    if unknown:
        raise UsageError(f"--masks: unknown mask {unknown[0]!r}; choose among {', '.join(MASK_NAMES)}")
    built_in = observed_masks(image_shape, generator)  # all drawn, so that a random mask is the same in any choice
    masks = {name: built_in[name] for name in MASK_NAMES if name in chosen}
    for path in mask_files:
        masks[path] = mask_from_file(path, image_shape)
    if not masks:
        raise UsageError("no masks: name some with --masks or give --mask-file")
    return masks


def inpaint_masks(model, x: torch.Tensor, masks: Dict[str, torch.Tensor], steps: int,
                  generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
    """Each mask's inpainting of the images x, in one batched call of ``model.inpaint`` (a row per image
    and mask): each step passes over the weights once for all masks, not once per mask."""
    observed = torch.cat([m.to(x.device).expand(len(x), -1) for m in masks.values()])
    filled = model.inpaint(x.repeat(len(masks), 1), observed, steps=steps, generator=generator)
    return dict(zip(masks, filled.split(len(x))))


def missing_pixel_error(x: torch.Tensor, filled: torch.Tensor, observed: torch.Tensor,
                        data_range: Tuple[float, float]) -> float:
    """Root mean square of filled - x over the pixels that were not observed, in 8-bit levels (0-255)."""
    missing = ~observed.to(x.device).expand_as(x)
    low, high = data_range
    return float(((filled - x)[missing].double() * (256.0 / (high - low))).pow(2).mean().sqrt())


def build_parser() -> argparse.ArgumentParser:
    p = tool_parser("python -m nice_ext.inpaint", __doc__)
    add_data_arguments(p)
    add_dataset_argument(p)
    p.add_argument("--out", required=True, help="image file to write (.png, .jpg, ...)")
    p.add_argument("--n", type=int, default=8, help="test images per mask (default 8)")
    p.add_argument("--steps", type=int, default=10000,
                   help="gradient-ascent steps (default 10000: fewer leave the fill further from the truth than "
                        "mid-grey, see the README; the released demo ran 111,895, the sum of i^2 for i < 70)")
    p.add_argument("--masks", metavar="NAMES", default=None,
                   help=f"comma-separated masks among {', '.join(MASK_NAMES)} (default: all of them, or none "
                        "with --mask-file)")
    p.add_argument("--mask-file", metavar="FILE", action="append", default=[],
                   help="a mask of one's own: an image file of the images' size whose light pixels (>= 128 in "
                        "grayscale) mark what to fill; may be repeated")
    add_device_argument(p)
    p.add_argument("--seed", type=seed_value, default=0,
                   help="seed of the random masks, the dequantization and the ascent's noise (default 0)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.n < 1 or args.steps < 0:
        raise UsageError(f"--n must be positive and --steps >= 0, got {args.n}, {args.steps}")
    check_image_out(args.out)
    if any(os.path.realpath(path) == os.path.realpath(args.out) for path in args.mask_file):
        raise UsageError(f"--out {args.out} is a --mask-file: name another file for the inpainting")
    device = pick_device(args.device)
    model, payload = load_for_inference(args.checkpoint, device)
    info, preprocess = inference_data(model, payload, args.checkpoint, device, args.dataset)
    if preprocess.zca is not None:
        raise UsageError(f"inpainting works in pixel space, and {args.checkpoint}'s model sees whitened images (it "
                         f"was trained on {payload['dataset']})")
    image_shape = model.image_shape or info.image_shape  # (a model saved without image_shape= has its data's)
    generator = torch.Generator().manual_seed(args.seed)
    masks = chosen_masks(args.masks, args.mask_file, image_shape, generator)
    test = data_lib.load_pixels(info.name, args.data_dir, "test", download=not args.no_download,
                                image_shape=info.image_shape)
    if args.n > test.shape[0]:  # (the grid's rows are --n wide)
        raise UsageError(f"--n {args.n} is more than the {test.shape[0]} test images of {info.name}")
    x = preprocess(test[:args.n].to(device), torch.Generator(device=device).manual_seed(args.seed))
    filled = inpaint_masks(model, x, masks, args.steps, torch.Generator(device=device).manual_seed(args.seed))
    rows, errors = [], []
    for name, observed in masks.items():
        # hidden pixels in mid-grey: black would be indistinguishable from the background
        masked = torch.where(observed.to(device), x, torch.full_like(x, sum(model.data_range) / 2))
        rows += [plots.to_images(t, model, image_shape=image_shape) for t in (x, masked, filled[name])]
        errors.append(f"{name} {missing_pixel_error(x, filled[name], observed, model.data_range):.1f} "
                      f"(grey {missing_pixel_error(x, masked, observed, model.data_range):.1f})")
    plots.save_grid(torch.cat(rows), args.out, nrow=args.n)
    print(f"wrote inpainting for masks {', '.join(masks)} to {args.out} "
          f"(per mask: originals, masked, inpainted)")
    print("error on the missing pixels, root mean square in 8-bit levels (filled with mid-grey instead): "
          + ", ".join(errors))
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
