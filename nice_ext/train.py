"""Train NICE: ``python -m nice_ext.train --dataset mnist --out-dir runs/mnist``.

``--preset paper-mnist`` is the paper's MNIST setup (§5.1): 4 additive couplings, odd/even masks,
5 x 1000 ReLU, logistic prior, Adam lr 1e-3, betas (0.9, 0.99), eps 1e-4, batch 200, 1500 epochs, best
model on validation log-likelihood. Outputs in ``--out-dir``: last.pt, best.pt, samples.png, metrics.csv,
curve.png, spectrum.png, and at the end result.json (the test log-likelihood of the best model with the
device, software, commit, date and command that produced it). A folder that already holds a run is
refused (``--resume`` continues it, ``--overwrite`` replaces it). ``--time-limit`` or ``--max_iter`` may
stop a run inside an epoch: last.pt keeps the place, and ``--resume`` goes on from there. ``--patience N``
ends a run once the validation log-likelihood has not improved for N epochs; ``--lr-plateau N`` divides the
learning rate instead (the paper keeps it constant). ``--preset released-mnist`` trains the same model as the
authors' released code does (RMSProp with momentum, a decaying rate, uniform initialisation). Under
``torchrun --nproc_per_node=N`` it trains with DistributedDataParallel (see nice_ext/distributed.py);
``--batch_size`` is then the global batch.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import io
import json
import math
import os
import platform
import random
import shlex
import signal
import sys
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from . import data as data_lib
from . import provenance
from .checkpoint import (CheckpointError, check_training_state, dataset_mismatch, host_copy, load_checkpoint,
                         make_checkpoint, model_from_checkpoint, save_atomic, trained_on_whitened_images)
from .cli_common import UsageError, add_data_arguments, add_device_argument, pick_device, run_tool, seed_value
from .cuda_graph import GraphedTrainStep, optimizer_step
from .evaluate import average_log_likelihood, log_likelihood_draws, summary
from .files import BackgroundWriter, check_can_write_in, stale_temporaries, write_bytes
from .model import NICE
from .optim import RMSPropMomentum

# Paper §5.1: Adam (lr 1e-3, betas (0.9, 0.99), eps 1e-4), four additive couplings, logistic prior, best
# validation model after 1500 epochs. Coupling MLPs: 5 x 1000 for MNIST, 4 x 2000 for SVHN and CIFAR-10.
# Batch 200 is the authors' released MNIST setting; the paper gives none for the others.
_PAPER = dict(batch_size=200, latent="logistic", lr=1e-3, momentum=0.9, decay=0.99, eps=1e-4, coupling=4,
              coup_type="additive", epochs=1500)
# The authors' released MNIST config (pylearn2, laurent-dinh/nice exp/nice_mnist.yaml) trains the same model
# otherwise than the paper's text: RMSProp with momentum (averaging 0.95, the root floored at 1e-2), the rate
# divided by 1.0005 per step down to 1e-4, momentum 0 for five epochs then 0.5, and weights drawn from
# U(-0.01, 0.01) with zero biases.
_RELEASED = dict(optimizer="rmsprop", momentum=0.5, decay=0.95, eps=1e-2, momentum_warmup=5, lr_decay=1.0005,
                 min_lr=1e-4, init_range=0.01)
PRESETS: Dict[str, Dict[str, object]] = {
    "paper-mnist": dict(_PAPER, dataset="mnist", mid_dim=1000, hidden=5),
    "released-mnist": dict(_PAPER, dataset="mnist", mid_dim=1000, hidden=5, **_RELEASED),
    "paper-cifar10": dict(_PAPER, dataset="cifar10", mid_dim=2000, hidden=4),
    "paper-svhn": dict(_PAPER, dataset="svhn", mid_dim=2000, hidden=4),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nice_ext.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="a published setup: paper-mnist, paper-cifar10 and paper-svhn as the paper states them, "
                        "released-mnist as the authors' released code trains MNIST; flags given too still win")

    data = p.add_argument_group("data")
    data.add_argument("--dataset", default="mnist",
                      help="mnist, fashion-mnist, cifar10, svhn, or images: one's own image files of one size, "
                           "8-bit grayscale or RGB, in DIR/train/ and DIR/test/ of --data-dir DIR (a sixth of "
                           "train/, at most 10,000, drawn once with a fixed seed, validates)")
    add_data_arguments(data)
    data.add_argument("--whiten", action="store_true",
                      help="--dataset images: ZCA-whiten the images with a matrix fitted on the training split, as "
                           "the paper does for CIFAR-10 and SVHN (likelihoods stay in pixel space)")
    data.add_argument("--subset", type=int, default=None, help="train on the first N training images")

    model = p.add_argument_group("model")
    model.add_argument("--coupling", type=int, default=4, help="number of coupling layers")
    model.add_argument("--coup-type", default="additive",
                       help="coupling law: additive, or affine (y = x * exp(tanh(r)) + b: a bounded log-scale)")
    model.add_argument("--mask", default="odd-even", help="odd-even or checkerboard")
    model.add_argument("--hidden", type=int, default=5, help="hidden layers per coupling network")
    model.add_argument("--mid-dim", type=int, default=1000, help="hidden units per coupling-network layer")
    model.add_argument("--latent", default="logistic", help="prior: logistic or gaussian")
    model.add_argument("--init-range", type=float, default=None, metavar="R",
                       help="draw every coupling-network weight from U(-R, R), biases and log-scales zero (the "
                            "released configs: 0.01); default: PyTorch's initialisation with each network's last "
                            "layer at zero")

    optim = p.add_argument_group("optimizer and learning rate")
    optim.add_argument("--optimizer", default="adam", choices=["adam", "rmsprop"],
                       help="adam (the paper) or rmsprop: RMSProp with momentum as in the authors' released configs "
                            "(nice_ext/optim.py); --momentum, --decay and --eps then mean its momentum, averaging "
                            "coefficient and stabilizer (--preset released-mnist sets all of it)")
    optim.add_argument("--batch_size", "--batch-size", type=int, default=200, help="images per optimizer step")
    optim.add_argument("--lr", type=float, default=1e-3, help="learning rate")
    optim.add_argument("--momentum", type=float, default=0.9, help="Adam beta1; rmsprop: the momentum")
    optim.add_argument("--decay", type=float, default=0.99,
                       help="Adam beta2 (the paper's 'beta2 = 0.01' means 1 - 0.01 = 0.99 in torch terms); rmsprop: "
                            "the averaging coefficient of the squared gradients")
    optim.add_argument("--eps", type=float, default=1e-4, help="Adam epsilon; rmsprop: the floor of the gradients' RMS")
    optim.add_argument("--momentum-warmup", type=int, default=0, metavar="N",
                       help="rmsprop: train the first N epochs without momentum (the released configs: 5)")
    optim.add_argument("--clip-grad", type=float, default=None, help="clip the gradient norm to this value")
    optim.add_argument("--lr-decay", type=float, default=None, metavar="FACTOR",
                       help="divide the learning rate by FACTOR after every step, down to --min-lr (the authors' "
                            "released MNIST config uses 1.0005 and 1e-4; default: a constant rate, as the paper "
                            "states)")
    optim.add_argument("--lr-plateau", type=int, default=None, metavar="N",
                       help="divide the learning rate by --lr-plateau-factor once the validation log-likelihood has "
                            "not improved for N epochs (since the best epoch or the last division), down to --min-lr")
    optim.add_argument("--lr-plateau-factor", type=float, default=10.0, help="the divisor of --lr-plateau")
    optim.add_argument("--min-lr", type=float, default=0.0, help="the floor of --lr-decay and --lr-plateau")

    length = p.add_argument_group("how long to train")
    length.add_argument("--epochs", type=int, default=None,
                        help="epochs to train (default 1500 with a preset, else 10)")
    length.add_argument("--max_iter", "--max-iter", type=int, default=None,
                        help="stop after this many optimizer steps")
    length.add_argument("--time-limit", type=float, default=None,
                        help="stop after this many seconds of training (last.pt keeps the place for --resume)")
    length.add_argument("--patience", type=int, default=None, metavar="N",
                        help="stop once the validation log-likelihood has not improved for N epochs (default: train "
                             "all epochs, as the paper does; the best model is kept either way)")

    run = p.add_argument_group("run, outputs and resuming")
    run.add_argument("--out-dir", default="runs/nice", help="where checkpoints, figures and metrics go")
    run.add_argument("--resume", default=None, metavar="PATH",
                     help="continue a run from its checkpoint (last.pt); settings not given again come from it")
    run.add_argument("--overwrite", action="store_true",
                     help="replace the run already in --out-dir (its checkpoints, metrics and figures are deleted)")
    run.add_argument("--save-every", type=float, default=5, help="write checkpoints and figures every N epochs")
    run.add_argument("--save-interval", type=float, default=0, metavar="SECONDS",
                     help="write files no more often than every SECONDS: best.pt waits on the host and the "
                          "outputs due every --save-every epochs are skipped until then; a stop or the end "
                          "writes everything (default 0: as often as --save-every and each validation gain "
                          "say; for epochs of a fraction of a second, as on a GPU with --cuda-graph)")
    run.add_argument("--sample_size", "--sample-size", type=int, default=64, help="images in the sample grid")
    run.add_argument("--eval-draws", type=int, default=3, help="dequantization draws for the final test score")
    run.add_argument("--eval-batch-size", type=int, default=1000, metavar="N",
                     help="images per forward pass when scoring the validation set (each epoch) and the test set "
                          "(at the end); default 1000. Larger takes fewer launches on a GPU, smaller less memory. "
                          "The scores do not depend on it on the CPU; on a GPU the dequantization noise is drawn "
                          "per batch, so they change with it by the noise's spread")
    run.add_argument("--seed", type=seed_value, default=0,
                     help="seed of the weights, the data order and the dequantization noise (default 0)")

    speed = p.add_argument_group("device and speed")
    add_device_argument(speed)
    speed.add_argument("--precision", choices=["fp32", "tf32", "bf16"], default="fp32",
                       help="coupling networks in fp32, TF32 matmuls, or bf16 autocast (likelihood sums stay fp32)")
    speed.add_argument("--compile", action="store_true", help="torch.compile the training loss")
    speed.add_argument("--compile-mode", default=None, choices=["default", "reduce-overhead", "max-autotune"],
                       help="torch.compile mode; reduce-overhead captures the loss's forward and backward in CUDA "
                            "graphs")
    speed.add_argument("--cuda-graph", action="store_true",
                       help="capture the whole training step (forward, backward, optimizer) in one CUDA graph and "
                            "replay it: the fastest way to train at small batch sizes on a GPU")
    speed.add_argument("--overlap-weight-grads", action="store_true",
                       help="compute the coupling networks' weight gradients on a second CUDA stream, beside the "
                            "chain of input gradients (the same gradients; for small batches, with --cuda-graph). "
                            "Not with --compile/--compile-mode or --precision bf16, where it would do nothing")
    speed.add_argument("--fuse-bias-relu", action="store_true",
                       help="compute each hidden layer of the coupling networks as one GEMM whose epilogue adds the "
                            "bias and applies the ReLU (cuBLASLt on a GPU; the same values, one kernel fewer per "
                            "layer). Not with --compile/--compile-mode or --precision bf16, where it would do nothing")
    return p


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    # A preset supplies defaults; any flag given on the command line (in any spelling) still wins.
    preset_parser = argparse.ArgumentParser(add_help=False)
    preset_parser.add_argument("--preset", choices=sorted(PRESETS), default=None)
    preset_args, _ = preset_parser.parse_known_args(argv)
    if preset_args.preset:
        parser.set_defaults(**PRESETS[preset_args.preset])
    args = parser.parse_args(argv)
    # What the command line (or the preset) sets, as opposed to defaults: a resumed run takes everything
    # else from its checkpoint (see inherit_settings).
    given = build_parser()
    for action in given._actions:
        action.default = argparse.SUPPRESS
    args.explicit = sorted(set(vars(given.parse_args(argv))) | set(PRESETS.get(args.preset, {})))
    args.command = "python -m nice_ext.train " + shlex.join(sys.argv[1:] if argv is None else argv)
    if args.epochs is None:
        args.epochs = 10
    checks = [(args.batch_size > 0, f"--batch_size must be positive, got {args.batch_size}"),
              (args.lr > 0 and math.isfinite(args.lr), f"--lr must be a positive number, got {args.lr}"),
              (args.lr_decay is None or (args.lr_decay >= 1 and math.isfinite(args.lr_decay)),
               f"--lr-decay must be a number >= 1, got {args.lr_decay}"),
              (args.lr_plateau is None or args.lr_plateau >= 1, f"--lr-plateau must be >= 1, got {args.lr_plateau}"),
              (args.lr_plateau_factor > 1 and math.isfinite(args.lr_plateau_factor),
               f"--lr-plateau-factor must be a number > 1, got {args.lr_plateau_factor}"),
              (0 <= args.min_lr <= args.lr, f"--min-lr must be in [0, --lr], got {args.min_lr}"),
              (0 <= args.momentum < 1, f"--momentum must be in [0, 1), got {args.momentum}"),
              (0 <= args.decay < 1, f"--decay must be in [0, 1), got {args.decay}"),
              (args.momentum_warmup >= 0, f"--momentum-warmup must be >= 0, got {args.momentum_warmup}"),
              (args.init_range is None or (args.init_range >= 0 and math.isfinite(args.init_range)),
               f"--init-range must be a finite number >= 0, got {args.init_range}"),
              (args.eps > 0, f"--eps must be positive, got {args.eps}"),
              (args.epochs >= 0, f"--epochs must be >= 0, got {args.epochs}"),
              (args.sample_size >= 0, f"--sample_size must be >= 0, got {args.sample_size}"),
              (args.coupling >= 1, f"--coupling must be >= 1, got {args.coupling}"),
              (args.mid_dim >= 1 and args.hidden >= 0, "--mid-dim must be >= 1 and --hidden >= 0"),
              (args.save_every > 0, f"--save-every must be positive, got {args.save_every}"),
              (args.save_interval >= 0 and math.isfinite(args.save_interval),
               f"--save-interval must be a finite number of seconds >= 0, got {args.save_interval}"),
              (args.max_iter is None or args.max_iter >= 0, f"--max_iter must be >= 0, got {args.max_iter}"),
              (args.subset is None or args.subset > 0, f"--subset must be positive, got {args.subset}"),
              (args.clip_grad is None or args.clip_grad > 0, f"--clip-grad must be positive, got {args.clip_grad}"),
              (not (args.cuda_graph and (args.compile or args.compile_mode)),
               "--cuda-graph and --compile/--compile-mode are alternatives; choose one"),
              (args.time_limit is None or args.time_limit > 0, f"--time-limit must be positive, got {args.time_limit}"),
              (args.patience is None or args.patience >= 1, f"--patience must be >= 1, got {args.patience}"),
              (args.eval_draws >= 1, f"--eval-draws must be >= 1, got {args.eval_draws}"),
              (args.eval_batch_size >= 1, f"--eval-batch-size must be >= 1, got {args.eval_batch_size}"),
              (args.dataset in data_lib.DATASETS, f"--dataset must be one of {', '.join(data_lib.DATASETS)}, "
                                                   f"got {args.dataset!r}"),
              (args.latent in ("logistic", "gaussian"), f"--latent must be logistic or gaussian, got {args.latent!r}"),
              (args.coup_type in ("additive", "affine"), f"--coup-type must be additive or affine, got "
                                                          f"{args.coup_type!r}"),
              (args.mask in ("odd-even", "checkerboard"), f"--mask must be odd-even or checkerboard, got "
                                                           f"{args.mask!r}")]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)
    return args


# Flags that say where and how one invocation runs, never taken from the checkpoint by --resume.
# The output folder is not inherited either: a resumed run continues in the checkpoint's own folder
# (wherever the run was moved or copied) unless --out-dir says otherwise.
NOT_INHERITED = ("resume", "overwrite", "device", "compile", "compile_mode", "cuda_graph", "overlap_weight_grads",
                 "fuse_bias_relu", "time_limit", "no_download", "out_dir", "explicit", "command")
# The coupling networks' speed settings (``CouplingMLP``'s, set model-wide), each with the note printed when
# it is given for a CPU run, where it changes nothing but does no harm.
COUPLING_NETWORK_SETTINGS = {
    "overlap_weight_grads": "overlaps work on a GPU's second stream; on the CPU the backward is the same "
                            "computation on one stream, as fast as without it",
    "fuse_bias_relu": "hands the bias and ReLU to the GEMM's epilogue on a GPU; on the CPU it is the same GEMM and "
                      "ReLU, as fast as without it",
}


def option(dest: str) -> str:
    """The command-line spelling of an argparse destination."""
    return "--" + dest.replace("_", "-")


# Architecture flags and the model-config entries they set: a resumed run cannot change them.
ARCHITECTURE = {"coupling": "num_coupling_layers", "hidden": "num_hidden_layers", "mid_dim": "hidden_dim",
                "latent": "prior", "coup_type": "coupling", "mask": "mask"}


def inherit_settings(args: argparse.Namespace, resume: Dict[str, object], path: str) -> List[str]:
    """``--resume`` continues a run as it was: each setting not given on this command line comes from the
    checkpoint (its epochs, batch size, subset, learning rate, ...); a given one wins. The dataset and
    the architecture cannot change, since the weights and preprocessing fit only them. Returns the
    settings this command line changes."""
    options = {action.dest: action.option_strings[0] for action in build_parser()._actions if action.option_strings}
    if "dataset" in args.explicit and args.dataset != resume["dataset"]:
        raise CheckpointError(f"{path}: trained on {resume['dataset']}, but --dataset is {args.dataset}")
    whitened = trained_on_whitened_images(resume)
    if "whiten" in args.explicit and resume["dataset"] == data_lib.IMAGES and args.whiten != whitened:
        raise UsageError(f"--whiten: {path} was trained on images that were not whitened; a resumed run keeps its "
                         f"preprocessing")
    for dest, key in ARCHITECTURE.items():
        stored = resume["model_config"][key]
        if dest in args.explicit and getattr(args, dest) != stored:
            raise UsageError(f"{options[dest]} {getattr(args, dest)} differs from {path}'s {stored}: a resumed run "
                             f"keeps its architecture")
    stored_optimizer = dict(resume.get("args", {})).get("optimizer", "adam")  # runs before --optimizer: Adam
    if "optimizer" in args.explicit and args.optimizer != stored_optimizer:
        raise UsageError(f"--optimizer {args.optimizer} differs from {path}'s {stored_optimizer}: a resumed run keeps "
                         f"its optimizer (its state fits only that one)")
    changed = []
    for dest, value in dict(resume.get("args", {})).items():
        if dest in NOT_INHERITED or not hasattr(args, dest):
            continue
        if dest not in args.explicit:
            setattr(args, dest, value)
        elif getattr(args, dest) != value and dest in options:
            changed.append(f"{options[dest]} {getattr(args, dest)} (was {value})")
    args.dataset = resume["dataset"]
    if "whiten" not in args.explicit:  # (an old checkpoint's args lack it: its preprocessing says)
        args.whiten = whitened
    if "out_dir" not in args.explicit:
        args.out_dir = os.path.dirname(path) or os.curdir  # as given: messages name the path the user typed
    return changed


def check_resolved_settings(args: argparse.Namespace) -> None:
    """Checks that depend on the optimizer, the dataset or the precision, made once a resumed run has its
    settings from the checkpoint."""
    if args.whiten and args.dataset != data_lib.IMAGES:
        raise UsageError(f"--whiten is for --dataset images; {args.dataset} is "
                         f"{'whitened' if data_lib.dataset_info(args.dataset).whiten else 'not whitened'}, as in "
                         f"the paper")
    if args.momentum_warmup and args.optimizer != "rmsprop":
        raise UsageError("--momentum-warmup applies to --optimizer rmsprop (Adam's --momentum is its beta1)")
    compiled = args.compile or args.compile_mode
    for flag in COUPLING_NETWORK_SETTINGS:
        if getattr(args, flag) and (compiled or args.precision == "bf16"):
            # (--precision may come from the checkpoint a run resumes)
            raise UsageError(f"{option(flag)} does nothing with "
                             f"{'--compile/--compile-mode' if compiled else '--precision bf16'} (the coupling "
                             f"networks then run as compiled or autocast code); leave it out")


def make_optimizer(parameters, args: argparse.Namespace) -> torch.optim.Optimizer:
    """The run's optimizer with its hyperparameters.

    Adam is fused on every device: one pass over the parameters per step instead of a handful per
    parameter tensor (on a 2-core CPU 11 ms instead of 65 ms for the paper's MNIST model, a third of a
    training step at batch 200); RMSProp with momentum runs on multi-tensor operations. With --cuda-graph,
    Adam's step count lives on the GPU (capturable), inside the graph; a learning rate that changes
    (--lr-decay, --lr-plateau) or rmsprop's momentum is then a float32 tensor on the GPU, changed in place
    before each step, since a captured graph would replay a Python number."""
    parameters = list(parameters)

    def on_device(value: float, changes: bool):
        return torch.tensor(value, dtype=torch.float32, device=parameters[0].device) \
            if args.cuda_graph and changes else value

    lr = on_device(args.lr, has_lr_schedule(args))
    if args.optimizer == "rmsprop":
        return RMSPropMomentum(parameters, lr=lr, momentum=on_device(epoch_momentum(args, 1), True),
                               averaging=args.decay, stabilizer=args.eps, capturable=bool(args.cuda_graph))
    return torch.optim.Adam(parameters, lr=lr, betas=(args.momentum, args.decay), eps=args.eps, fused=True,
                            capturable=bool(args.cuda_graph))


def optimizer_hyperparameters(args: argparse.Namespace) -> Dict[str, object]:
    """The run's settings as the optimizer's param-group entries (without the learning rate)."""
    if args.optimizer == "rmsprop":
        return dict(averaging=args.decay, stabilizer=args.eps)
    return dict(betas=(args.momentum, args.decay), eps=args.eps)


def epoch_momentum(args: argparse.Namespace, epoch: int) -> float:
    """rmsprop's momentum in ``epoch`` (from 1): none during the --momentum-warmup epochs, then --momentum
    (the released configs' MomentumAdjustor(start=5, saturate=6): 0 in epochs 1-5, 0.5 from epoch 6)."""
    return 0.0 if epoch <= args.momentum_warmup else args.momentum


def has_lr_schedule(args: argparse.Namespace) -> bool:
    return args.lr_decay is not None or args.lr_plateau is not None


def scheduled_lr(args: argparse.Namespace, step: int, plateau_drops: int = 0) -> float:
    """The learning rate of the step after ``step`` steps: --lr divided by --lr-decay once per step taken
    (the released MNIST config's exponential decay) and by --lr-plateau-factor once per plateau met so far,
    never below --min-lr. Logarithms, so that no power overflows."""
    log_divisor = plateau_drops * math.log(args.lr_plateau_factor)
    if args.lr_decay is not None:
        log_divisor += step * math.log(args.lr_decay)
    return max(args.lr * math.exp(-log_divisor), args.min_lr)


def lr_plateau_state(resume: Dict[str, object], path: str) -> Tuple[int, int]:
    """(divisions so far, epoch of the last) from a checkpoint; (0, 0) for one written before --lr-plateau."""
    state = resume.get("lr_plateau", {"drops": 0, "last_drop_epoch": 0})
    if not isinstance(state, dict) or not all(isinstance(state.get(k), int) and state[k] >= 0
                                              for k in ("drops", "last_drop_epoch")):
        raise CheckpointError(f"{path}: its --lr-plateau record is damaged")
    return state["drops"], state["last_drop_epoch"]


def set_hyperparameter(optimizer: torch.optim.Optimizer, key: str, value: float) -> None:
    """Set a value the next step reads (the learning rate, rmsprop's momentum) in every param group, in
    place where it is a tensor a CUDA graph reads."""
    for group in optimizer.param_groups:
        if isinstance(group[key], torch.Tensor):
            group[key].fill_(value)
        else:
            group[key] = value


def resume_optimizer(optimizer: torch.optim.Optimizer, state: Dict[str, object], args: argparse.Namespace) -> None:
    """Load the optimizer's state (Adam's moments and step counts, rmsprop's averages and velocities) with
    this run's hyperparameters (a learning rate given with --resume must take effect) and this device's
    implementation flags (a checkpoint written on a GPU with fused or capturable Adam resumes on a CPU, and
    the other way round)."""
    state = dict(state)
    # this run's kinds of values: floats, or tensors a CUDA graph reads
    current = {key: optimizer.param_groups[0][key] for key in ("lr", "momentum") if key in optimizer.defaults}
    implementation = {key: optimizer.defaults[key] for key in ("fused", "capturable", "foreach")
                      if key in optimizer.defaults}
    state["param_groups"] = [dict(group, **current, **optimizer_hyperparameters(args), **implementation)
                             for group in state["param_groups"]]
    optimizer.load_state_dict(state)


def epoch_place(resume: Dict[str, object], images: int, batch_size: int, path: str,
                generator: torch.Generator) -> Optional[Dict[str, object]]:
    """Where the checkpoint's run stopped inside an epoch (--time-limit or --max_iter), or None when it
    stopped between epochs. The place holds only for the same training images and batch size, on the same
    device type: otherwise the epoch starts over (said on stdout)."""
    place = resume.get("epoch_in_progress")
    if place is None:
        return None
    expected = {"epoch": int, "batches_done": int, "images": int, "batch_size": int, "order_rng": torch.Tensor,
                "loss_sum": float, "seen": int, "seconds": float}
    if not isinstance(place, dict) or any(not isinstance(place.get(k), t) for k, t in expected.items()) or \
            place["epoch"] != resume["epoch"] + 1:
        raise CheckpointError(f"{path}: its record of the epoch in progress is damaged")
    if (place["images"], place["batch_size"]) != (images, batch_size):
        print(f"note: {path} stopped after {place['batches_done']} batches of epoch {place['epoch']} with "
              f"--batch_size {place['batch_size']} on {place['images']} images; with --batch_size {batch_size} on "
              f"{images} images that epoch starts over")
        return None
    if not same_kind_of_generator(place["order_rng"], generator):
        print(f"note: {path} stopped inside epoch {place['epoch']} on another device type, whose shuffle cannot be "
              f"drawn here; that epoch starts over")
        return None
    return place


# What a run writes into --out-dir.
RUN_OUTPUTS = ("last.pt", "best.pt", "metrics.csv", "samples.png", "curve.png", "spectrum.png", "result.json")


def later_step_in(path: str, step: int) -> Optional[int]:
    """The step of the checkpoint at ``path`` when it is past ``step``; None when it is not, or is unreadable
    (a damaged last.pt is what resuming from another checkpoint recovers from)."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        later = int(payload["step"])
    except Exception:
        return None
    return later if later > step else None


def prepare_out_dir(args: argparse.Namespace, is_main: bool, resumed_step: Optional[int] = None) -> List[str]:
    """An output folder holds one run. A new run never replaces another run's files unless --overwrite says
    so; --resume from a checkpoint in --out-dir continues that run in place, and refuses to rewind it (from
    best.pt, say) over a later last.pt unless --overwrite says so. Returns the files --overwrite replaces:
    clear_out_dir removes them once the new run is ready to train, so a run that fails to start (missing
    data, a bad checkpoint) leaves the old one whole."""
    out_dir = args.out_dir
    existing = [name for name in RUN_OUTPUTS if os.path.exists(os.path.join(out_dir, name))]
    continuing = args.resume is not None and os.path.isdir(out_dir) and os.path.samefile(
        os.path.dirname(os.path.abspath(args.resume)), out_dir)
    last = os.path.join(out_dir, "last.pt")
    if continuing and not args.overwrite and os.path.exists(last) and not os.path.samefile(args.resume, last):
        later = later_step_in(last, resumed_step or 0)
        if later is not None:
            raise UsageError(f"--resume {args.resume} (step {resumed_step}) would rewind the run in {out_dir}, "
                             f"whose last.pt is at step {later}, and replace its later checkpoints: resume "
                             f"{last}, branch off with --out-dir NEW, or rewind it with --overwrite")
    if existing and not continuing:
        if not args.overwrite:
            raise UsageError(f"{out_dir} already holds a training run ({', '.join(existing)}): continue it with "
                             f"--resume {os.path.join(out_dir, 'last.pt')}, replace it with --overwrite, or choose "
                             f"another --out-dir")
    replaced = existing if existing and not continuing else []
    if not is_main:
        return replaced
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as error:
        raise UsageError(f"--out-dir {out_dir}: cannot create it: {error.strerror}") from None
    try:
        check_can_write_in(out_dir, "last.pt")
    except OSError as error:
        raise UsageError(f"--out-dir {out_dir}: cannot write in it: {error.strerror}") from None
    return replaced


def missing_folders(path: str) -> List[str]:
    """The folders of ``path`` that do not exist yet, itself first and then up towards the root."""
    missing, folder = [], os.path.abspath(path)
    while not os.path.exists(folder) and folder != os.path.dirname(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
    return missing


@contextlib.contextmanager
def removed_if_left_empty(folders: List[str]):
    """The output folders a new run made (``folders``, deepest first) go again, if still empty, when the run
    fails to start: a mistyped --data-dir or --device leaves nothing behind."""
    try:
        yield
    except BaseException:
        for folder in folders:
            with contextlib.suppress(OSError):  # not empty, or gone: it stays as it is
                os.rmdir(folder)
        raise


def clear_out_dir(out_dir: str, replaced: List[str]) -> None:
    """Remove the old run's outputs that --overwrite replaces, and temporaries left by interrupted writes."""
    for path in [os.path.join(out_dir, name) for name in replaced] + stale_temporaries(out_dir, RUN_OUTPUTS):
        with contextlib.suppress(FileNotFoundError):  # gone already
            os.unlink(path)


def cpu_has_native_bf16() -> bool:
    """Whether this x86 CPU multiplies bf16 natively (AVX512-BF16 or AMX). Without either, PyTorch emulates
    bf16 matmuls: on a 2-core AVX2 machine a 200 x 1000 x 1000 bf16 product took 249 ms against 3 ms in
    float32. Other architectures, and torch builds that cannot tell, count as native."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return True
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    answers = [probe() for probe in probes if callable(probe)]
    return any(answers) or not answers


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state(generator: torch.Generator) -> Dict[str, object]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    # plain values and tensors only, so that checkpoints load with torch.load(weights_only=True)
    state = {"torch": torch.get_rng_state(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos),
                                                       int(has_gauss), float(cached)),
             "python": random.getstate(), "data": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def same_kind_of_generator(state: torch.Tensor, generator: torch.Generator) -> bool:
    """Whether a saved generator state fits this generator: a CPU generator's state and a CUDA one's differ
    in kind and size, so a run written on one device type cannot continue the other's random stream."""
    return state.numel() == generator.get_state().numel()


def set_rng_state(state: Dict[str, object], generator: torch.Generator) -> bool:
    """Restore every random stream of a checkpoint; False when its data generator was another device type's
    (that stream is then left to the caller)."""
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    if not same_kind_of_generator(state["data"], generator):
        return False
    generator.set_state(state["data"])
    return True


def build_model(args: argparse.Namespace, info: data_lib.DatasetInfo) -> NICE:
    model = NICE(info.dim, num_coupling_layers=args.coupling, num_hidden_layers=args.hidden, hidden_dim=args.mid_dim,
                 prior=args.latent, coupling=args.coup_type, mask=args.mask, image_shape=info.image_shape,
                 data_range=info.data_range)
    return model.init_uniform_(args.init_range) if args.init_range is not None else model


class StopSignals:
    """SIGINT (Ctrl-C) and SIGTERM (what a job scheduler sends before it ends a job) stop training at the
    next step, as ``--time-limit`` does: last.pt keeps the place and ``--resume`` goes on from there. A
    second signal interrupts training at once; the process ends once the writer has written the files it
    was handed (one epoch's at most, see ``train``). Installed only around the training loop, in the main
    thread. A reader of the output that leaves stops the run as the first signal does (``output_closed``)."""

    def __init__(self) -> None:
        self.received: Optional[signal.Signals] = None  # what stops the run: the first signal, or SIGPIPE
        self.signalled = False  # a signal came (the second one interrupts)
        self.previous: Dict[int, object] = {}

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for number in (signal.SIGINT, signal.SIGTERM):
                if signal.getsignal(number) is not signal.SIG_IGN:  # an ignored one (nohup, `cmd &`) stays so
                    self.previous[number] = signal.signal(number, self._handle)

    def restore(self) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)
        self.previous.clear()

    def _handle(self, number: int, frame) -> None:
        if self.signalled:
            raise KeyboardInterrupt
        self.signalled = True
        self.received = self.received or signal.Signals(number)
        print(f"\n{signal.Signals(number).name} received: stopping after this step (again to stop at once)",
              file=sys.stderr, flush=True)

    def output_closed(self) -> None:
        """The reader of the run's output left (``| head``): training stops after this step as on SIGTERM,
        with the exit status of a process that SIGPIPE ended (141), rather than ending at the next line it
        prints and losing the epoch in progress."""
        if self.received is None:
            self.received = signal.SIGPIPE
            print("\nthe reader of the output left: stopping after this step", file=sys.stderr, flush=True)

    @property
    def reason(self) -> str:
        if self.received == signal.SIGPIPE:
            return "the reader of the output left (SIGPIPE)"
        return f"{self.received.name if self.received else 'a stop signal'} received"


def run(args: argparse.Namespace, stop_signals: Optional[StopSignals] = None) -> int:
    from tqdm import tqdm

    from . import plots
    from .distributed import Context

    ctx, stop_signals = Context(args.device), stop_signals or StopSignals()
    try:
        status = train(args, ctx, tqdm, plots, stop_signals)
        # The ranks leave together: the others wait here while rank 0 evaluates and writes the outputs, so
        # no rank tears its process group down while a peer still uses its own. (Not after an exception:
        # the other ranks may be inside a collective that would never complete.)
        ctx.leave_together()
        return status
    finally:
        stop_signals.restore()
        ctx.close()


class NonFiniteLoss(Exception):
    """The loss became NaN or infinite in this epoch: training stops with exit status 3."""

    def __init__(self, epoch: int) -> None:
        super().__init__(f"non-finite loss in epoch {epoch}")
        self.epoch = epoch


def train(args: argparse.Namespace, ctx, tqdm, plots, stop_signals: StopSignals) -> int:
    """Train as ``args`` say; the exit status: 0, 3 for a non-finite loss, 128 + N for stop signal N."""
    trainer = Trainer(args, ctx, plots, stop_signals)
    stop_signals.install()
    try:
        trainer.fit(tqdm)
    except NonFiniteLoss as error:
        return trainer.stop_on_non_finite_loss(error.epoch)
    except BaseException:
        trainer.writer.wait_quietly()  # files handed to the writer before the failure are still written
        raise
    stop_signals.restore()
    return trainer.finish()


def launch_bound_note(args: argparse.Namespace, device: torch.device, distributed: bool) -> Optional[str]:
    """What to tell a run on one GPU that launches its step's kernels one by one from Python: at the paper's
    batch size the launches, not the GPU, set the pace, and --cuda-graph removes them (numbers from
    benchmarks/results, the H100's fused-eager, fused-graphed and fused-graphed-tf32 steps)."""
    if device.type != "cuda" or distributed or args.cuda_graph or args.compile or args.compile_mode:
        return None
    return ("note: each step launches a few hundred small kernels from Python, which sets the pace on a GPU; "
            "--cuda-graph replays the whole step as one CUDA graph (the paper's MNIST model at batch 200 on an "
            "H100: 2.1 ms per step instead of 7.5 ms, 1.1 ms with --precision tf32)")


def run_pace(epoch_seconds: List[float], wall_seconds: float, partial_seconds: float) -> Optional[Dict[str, float]]:
    """How fast a process trained: the median seconds of its complete epochs (steps and validation: the
    ``seconds`` of metrics.csv) and the mean seconds between them, the rest of its wall time less
    ``partial_seconds`` spent in an epoch it did not finish (handing the files to the writer, drawing the
    samples, waiting for a write still under way). None before a complete epoch."""
    if not epoch_seconds:
        return None
    between = max(0.0, wall_seconds - sum(epoch_seconds) - partial_seconds) / len(epoch_seconds)
    return dict(seconds_per_epoch=round(float(np.median(epoch_seconds)), 3), seconds_between_epochs=round(between, 3))


def steps_left(args: argparse.Namespace, completed_epoch: int, batches_done: int, batches_per_epoch: int,
               step: int) -> Tuple[int, str]:
    """The optimizer steps left to the limit that would end this run next, and that limit's name: the end of
    --epochs, or --max_iter where it comes first and has not stopped the run already (one that has is resumed
    with a larger --max_iter, so the rest of --epochs is what is left). ``batches_done``: the place inside the
    epoch in progress."""
    left, limit = (args.epochs - completed_epoch) * batches_per_epoch - batches_done, f"--epochs {args.epochs}"
    if args.max_iter is not None and 0 < args.max_iter - step < left:
        left, limit = args.max_iter - step, f"--max_iter {args.max_iter}"
    return max(0, left), limit


def remaining_seconds(pace: Dict[str, float], steps: int, batches_per_epoch: int) -> float:
    """The time ``steps`` more steps would take: at the epochs' pace (validation and the time between epochs
    included) once an epoch is complete, else at the steps' alone."""
    if "seconds_per_epoch" in pace:
        return steps / batches_per_epoch * (pace["seconds_per_epoch"] + pace["seconds_between_epochs"])
    return steps * pace["seconds_per_step"]


def synchronized_time(device: torch.device) -> float:
    """time.time() once the device has done the work queued on it: a GPU's steps are timed as they ran, not
    as the host queued them."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.time()


def in_epochs(steps: int, batches_per_epoch: int) -> str:
    """A number of steps in epochs, as a message gives it: 1465, or 1494.5 with part of an epoch."""
    return str(steps // batches_per_epoch) if steps % batches_per_epoch == 0 else f"{steps / batches_per_epoch:.1f}"


def duration(seconds: float) -> str:
    """A span of time as a person reads it: 0.4 s, 42 s, 49 min, 7.0 h."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


class Trainer:
    """One training run. Set-up (``__init__``) reads the command line and the checkpoint it resumes, and
    builds the data, the model, its optimizer and the step; ``fit`` trains epoch by epoch (``train_epoch``,
    then ``end_epoch``: validation, best.pt, the rate's plateaus, patience, periodic outputs); ``finish``
    writes the outputs and scores the best model on the test set (result.json). Its attributes are the
    state a checkpoint keeps: the step, the best validation score and its epoch, the history, the rate's
    plateau divisions, and the place inside an epoch where a run stopped."""

    def __init__(self, args: argparse.Namespace, ctx, plots, stop_signals: StopSignals) -> None:
        self.args, self.ctx, self.plots, self.stop_signals = args, ctx, plots, stop_signals
        # The code that runs is the checkout as it is now; a commit made while the run goes must not be named.
        self.commit = provenance.source_commit() if ctx.is_main else None
        self.resume = resume = load_checkpoint(args.resume) if args.resume else None
        if resume is not None:
            check_training_state(resume, args.resume)
            changed = inherit_settings(args, resume, args.resume)
            if ctx.is_main:
                print(f"resuming {args.resume} after epoch {resume['epoch']} (step {resume['step']})"
                      + (f", changing {', '.join(changed)}" if changed else ""), flush=True)
        check_resolved_settings(args)
        made_folders = missing_folders(args.out_dir) if ctx.is_main else []
        replaced = prepare_out_dir(args, ctx.is_main, resume["step"] if resume is not None else None)
        with removed_if_left_empty(made_folders):  # a run that cannot start leaves no empty folder behind
            self.device = device = ctx.device if ctx.enabled else pick_device(args.device)
            seed_everything(args.seed)
            if args.precision in ("tf32", "bf16"):  # bf16 autocast covers the matmuls it can; TF32 the rest
                torch.backends.cuda.matmul.allow_tf32 = True
                torch.backends.cudnn.allow_tf32 = True
            if args.precision == "tf32" and device.type == "cpu" and ctx.is_main:
                print("note: --precision tf32 is a setting of NVIDIA GPUs' matmuls; on the CPU they stay fp32 "
                      "(--precision bf16 is the CPU's faster one where it has AMX or AVX512-BF16)", flush=True)
            if args.precision == "bf16" and device.type == "cpu" and ctx.is_main and not cpu_has_native_bf16():
                print("note: --precision bf16: this CPU has no native bf16 arithmetic (AVX512-BF16 or AMX), so bf16 "
                      "matmuls are emulated and run many times slower than fp32; --precision fp32 is faster here",
                      flush=True)
            for flag, cpu_note in COUPLING_NETWORK_SETTINGS.items():
                if getattr(args, flag) and device.type == "cpu" and ctx.is_main:
                    print(f"note: {option(flag)} {cpu_note}", flush=True)
            note = launch_bound_note(args, device, ctx.enabled)
            if note and ctx.is_main:
                print(note, flush=True)
            self.generator = torch.Generator(device=device).manual_seed(args.seed)
            self.load_data()
            self.build_model_and_optimizer()
            self.restore_training_state()
            self.train_step = self.make_train_step()
        self.out_dir = args.out_dir
        self.writer = BackgroundWriter()  # rank 0's files: best.pt, last.pt, metrics.csv and the figures
        # --save-interval: the host copy of a best state not yet written to best.pt, and when files were last
        # handed to the writer
        self.unwritten_best: Optional[Dict[str, Any]] = None
        self.files_written_at = -math.inf
        if ctx.is_main:  # everything is ready to train: only now may the run it replaces go
            clear_out_dir(self.out_dir, replaced)

        # The NaN/Inf guard: the first step whose loss is not finite is recorded on the device and read every
        # `check_every` steps (every step on the CPU), so the GPU is not synchronised at every step.
        self.check_every = 1 if device.type == "cpu" else 50
        self.first_bad_step = torch.full((), -1, dtype=torch.long, device=device)
        self.started = time.time()
        # A resumed run whose patience ran out already does not train (a larger --patience goes on).
        self.stop_reason = self.patience_spent(self.start_epoch) if resume is not None else None
        self.stopped_early = self.stop_reason is not None
        # Nor does one that has taken --max_iter steps already (a larger --max_iter goes on): the check after
        # each step comes too late for that.
        if self.stop_reason is None and args.max_iter is not None and self.step >= args.max_iter:
            self.stop_reason = f"--max_iter {args.max_iter} reached"
        self.completed_epoch, self.start_step = self.start_epoch, self.step
        self.batches_per_epoch = math.ceil(self.train_pixels.shape[0] / args.batch_size)
        # Where the resumed run stopped inside an epoch (see epoch_place), or None.
        self.place = epoch_place(resume, self.train_pixels.shape[0], args.batch_size, args.resume, self.generator) \
            if resume is not None else None
        # Seconds an earlier process spent in the epoch this one resumes: in that epoch's row, not in our time.
        self.carried_seconds = self.place["seconds"] if self.place is not None else 0.0
        # The time of this process's steps (its first one, which compiles or captures, left out) and their count.
        self.step_seconds, self.timed_steps = 0.0, 0

    def load_data(self) -> None:
        """The splits, on the device (uint8: MNIST is 39 MB), and the dequantization (and whitening) map,
        fitted on the training images or taken from the checkpoint."""
        args, device, resume = self.args, self.device, self.resume
        # one's own images (the images dataset) must have the shape of the model a resumed run trains
        image_shape = resume["model_config"].get("image_shape") if resume and args.dataset == data_lib.IMAGES else None
        splits = data_lib.load_splits(args.dataset, args.data_dir, download=not args.no_download, subset=args.subset,
                                      image_shape=image_shape, whiten=args.whiten)
        if resume is not None and resume.get("images_digest") not in (None, splits.digest):
            raise UsageError(f"--data-dir {args.data_dir}: its images (train/ and test/) are not those "
                             f"{args.resume} was trained on")
        self.info, self.images_digest = splits.info, splits.digest
        if args.subset is not None and args.subset > splits.train.shape[0] and self.ctx.is_main:
            print(f"note: --subset {args.subset} is more than the {splits.train.shape[0]} training images of "
                  f"{args.dataset}: training on all of them", flush=True)
        self.preprocess = data_lib.Preprocess(self.info)
        if self.resume is not None:
            self.preprocess.load_state_dict(self.resume["preprocess_state"])
        else:
            self.preprocess.fit(splits.train, torch.Generator().manual_seed(args.seed))
        self.preprocess.to(device)
        self.train_pixels = splits.train.to(device)
        self.valid_pixels, self.test_pixels = splits.valid.to(device), splits.test.to(device)

    def build_model_and_optimizer(self) -> None:
        args, resume = self.args, self.resume
        self.model = model_from_checkpoint(resume, args.resume) if resume is not None else build_model(args, self.info)
        mismatch = dataset_mismatch(self.model, self.info)
        if mismatch:
            raise CheckpointError(f"{args.resume}: {mismatch}")
        self.model.to(self.device)
        for flag in COUPLING_NETWORK_SETTINGS:  # speed settings, not saved with the model
            setattr(self.model, flag, getattr(args, flag))
        if args.cuda_graph and (self.device.type != "cuda" or self.ctx.enabled):
            raise UsageError("--cuda-graph needs a single CUDA device (not the CPU, not torchrun)")
        self.log_prob_module = self.ctx.wrap(self.model)  # DistributedDataParallel under torchrun
        self.optimizer = make_optimizer(self.model.parameters(), args)

    def restore_training_state(self) -> None:
        """Where the run stands: from the checkpoint it resumes, or at its start."""
        args, resume = self.args, self.resume
        self.start_epoch, self.step, self.best_valid, self.history = 0, 0, -math.inf, []
        if resume is not None:
            resume_optimizer(self.optimizer, resume["optimizer_state"], args)
            self.start_epoch, self.step = resume["epoch"], resume["step"]
            self.best_valid, self.history = resume["best_valid"], resume["history"]
            if not set_rng_state(resume["rng_state"], self.generator):
                self.generator.manual_seed(args.seed + self.step)
                print(f"note: {args.resume} was written on another device type, whose data order and noise cannot "
                      f"go on here: they continue from seed {args.seed} + step {self.step}")
        # The epoch of the best validation score so far (improvements are strict, so the first maximum).
        self.best_epoch = max(self.history, key=lambda row: row["valid_ll_nats"])["epoch"] if self.history \
            else self.start_epoch
        # --lr-plateau's state: how many times the rate was divided, and the epoch of the last division.
        self.plateau_drops, self.last_drop_epoch = lr_plateau_state(resume, args.resume) if resume is not None \
            else (0, 0)
        # Where a run stopped inside an epoch (see epoch_place). A resumed run that trains nothing keeps the
        # checkpoint's place, so that a later --resume can still go on from it.
        self.in_progress = resume.get("epoch_in_progress") if resume is not None else None

    def make_train_step(self):
        """The step: x (a global batch) -> its detached loss, after the optimizer's update."""
        args, ctx = self.args, self.ctx
        # A captured graph must not use autocast's cache of cast weights (it would hold stale copies).
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16",
                                  cache_enabled=not args.cuda_graph)

        def loss_fn(x: torch.Tensor) -> torch.Tensor:
            """This rank's share of the global batch's mean negative log-likelihood: DDP averages the
            gradients over ranks, so each rank divides its sum by (global batch / world size)."""
            with autocast:
                log_px = self.log_prob_module(ctx.local_slice(x))
            return -log_px.float().sum() * (ctx.world_size / x.shape[0])

        parameters = list(self.model.parameters())
        if args.cuda_graph:
            return GraphedTrainStep(loss_fn, self.optimizer, parameters, args.clip_grad)
        compile_mode = None if args.compile_mode in (None, "default") else args.compile_mode
        loss_step = torch.compile(loss_fn, mode=compile_mode) if (args.compile or args.compile_mode) else loss_fn
        return functools.partial(optimizer_step, loss_step, self.optimizer, parameters, args.clip_grad)

    def checkpoint(self, epoch: int) -> Dict[str, object]:
        return make_checkpoint(self.model, self.args.dataset, self.preprocess.state_dict(),
                               optimizer_state=self.optimizer.state_dict(), epoch=epoch, step=self.step,
                               best_valid=self.best_valid, history=self.history, rng_state=rng_state(self.generator),
                               args=vars(self.args), epoch_in_progress=self.in_progress,
                               lr_plateau=dict(drops=self.plateau_drops, last_drop_epoch=self.last_drop_epoch),
                               images_digest=self.images_digest)

    def write_files(self, epoch: int, best: bool, outputs: bool, final: bool = False) -> None:
        """Write best.pt (``best``) and the outputs (``outputs``: last.pt, metrics.csv, samples.png, curve.png,
        spectrum.png) of the state after ``epoch``. That state is copied to the host here and the samples are
        drawn here; the files are written and the figures drawn on the writer's thread while training goes
        on (the paper's MNIST checkpoint, optimizer state included, is 230 MB).

        Within --save-interval of the last files (unless ``final``: a stop or the end), a best state stays on
        the host until files are next written, and outputs are skipped. On an H200 with --cuda-graph, where
        an epoch of the paper's MNIST run takes 0.31 s, writing at every gain and every 5 epochs added
        about 0.1 s per epoch between epochs and slowed the epochs after each figure drawing."""
        checkpoint = host_copy(self.checkpoint(epoch)) if best else None
        if checkpoint is not None:
            self.unwritten_best = checkpoint
        too_soon = not final and time.time() - self.files_written_at < self.args.save_interval
        if too_soon or not (self.unwritten_best is not None or outputs):
            self.writer.poll()  # a write that failed in this epoch stops the run now, not at the next one
            return
        out_dir, plots = self.out_dir, self.plots
        jobs = []
        if self.unwritten_best is not None:
            jobs.append(functools.partial(save_atomic, self.unwritten_best, os.path.join(out_dir, "best.pt")))
            self.unwritten_best = None
        if outputs:
            checkpoint = checkpoint if checkpoint is not None else host_copy(self.checkpoint(epoch))
            jobs.append(functools.partial(save_atomic, checkpoint, os.path.join(out_dir, "last.pt")))
            history = checkpoint["history"]
            table = io.StringIO()
            # every column any row has (rows from before the lr column was added leave it empty)
            columns = list(dict.fromkeys(key for row in history for key in row)) or ["epoch"]
            writer = csv.DictWriter(table, fieldnames=columns)
            writer.writeheader()
            writer.writerows(history)
            jobs.append(functools.partial(write_bytes, table.getvalue().encode(), os.path.join(out_dir, "metrics.csv")))
            if self.args.sample_size > 0:  # drawn now, from the model as it is after this epoch
                images = plots.sample_images(self.model, self.args.sample_size, self.preprocess)
                jobs.append(functools.partial(plots.save_grid, images, os.path.join(out_dir, "samples.png")))
            if history:
                jobs.append(functools.partial(plots.training_curve, history, os.path.join(out_dir, "curve.png")))
            jobs.append(functools.partial(plots.scaling_spectrum, checkpoint["model_state"]["log_scale"],
                                          os.path.join(out_dir, "spectrum.png")))
        self.writer.submit(jobs)
        self.files_written_at = time.time()

    def stop_on_non_finite_loss(self, epoch: int) -> int:
        if self.ctx.is_main:
            self.write_files(epoch, best=False, outputs=False, final=True)  # a best state still on the host
        self.writer.wait()
        last = os.path.join(self.out_dir, "last.pt")
        last_good = f"The last good checkpoint is {last}." if os.path.exists(last) else "No checkpoint was written yet."
        print(f"error: the loss became NaN or infinite at epoch {epoch}, step {self.first_bad_step.item()}; "
              f"stopping. {last_good} Try a lower --lr or --clip-grad.", file=sys.stderr)
        return 3

    def patience_spent(self, epoch: int) -> Optional[str]:
        """Why --patience stops the run after ``epoch``, or None while the run goes on."""
        if self.args.patience is None or epoch - self.best_epoch < self.args.patience:
            return None
        return f"--patience {self.args.patience}: no validation gain since epoch {self.best_epoch}"

    def fit(self, tqdm) -> None:
        """Train until --epochs, a stop (--patience, --max_iter, --time-limit, a signal) or a non-finite loss
        (NonFiniteLoss)."""
        last_epoch = self.start_epoch if self.stop_reason else self.args.epochs
        for epoch in range(self.start_epoch + 1, last_epoch + 1):
            trained = self.train_epoch(epoch, tqdm)  # (training log-likelihood, the epoch's start time)
            if trained is None:  # stopped inside the epoch: self.in_progress keeps its place
                break
            self.end_epoch(epoch, *trained)
            if self.stop_reason:
                break

    def train_epoch(self, epoch: int, tqdm) -> Optional[Tuple[float, float]]:
        """One epoch's steps. Returns (training log-likelihood, the epoch's start time, earlier by the seconds
        a resumed piece already spent) once the epoch is complete, or None when a stop came inside it."""
        args, ctx, device, generator = self.args, self.ctx, self.device, self.generator
        preprocess, info = self.preprocess, self.info
        epoch_start, self.in_progress = time.time(), None
        self.model.train()
        if args.optimizer == "rmsprop":
            set_hyperparameter(self.optimizer, "momentum", epoch_momentum(args, epoch))
        # The epoch's shuffle comes from the data generator's state at its start. A run stopped inside an
        # epoch saved that state and how far it got (`place`): resuming draws the same order, skips the
        # batches already taken and carries on with the sums, as an uninterrupted run would.
        place = self.place
        order_rng = generator.get_state() if place is None else place["order_rng"]
        stopped_at = generator.get_state()
        generator.set_state(order_rng)
        order = torch.randperm(self.train_pixels.shape[0], device=device, generator=generator)
        first_batch, seen, seconds_before, loss_so_far = 0, 0, 0.0, 0.0
        if place is not None:
            generator.set_state(stopped_at)  # the dequantization noise goes on from where the run stopped
            first_batch, seen, seconds_before = place["batches_done"], place["seen"], place["seconds"]
            loss_so_far = place["loss_sum"] if ctx.is_main else 0.0  # all ranks' sum, counted once
            self.place = None
        loss_sum = torch.tensor(loss_so_far, dtype=torch.float64, device=device)  # read once per epoch, not per step
        batch_number = first_batch
        timed_from, untimed_steps = synchronized_time(device), self.step
        bar = tqdm(data_lib.batches(self.train_pixels, args.batch_size, order, first_batch),
                   total=self.batches_per_epoch - first_batch, desc=f"epoch {epoch}/{args.epochs}",
                   disable=not (ctx.is_main and sys.stderr.isatty()), leave=False)
        for batch in bar:
            x = preprocess(batch, generator)  # the global batch: the same on every rank
            if has_lr_schedule(args):
                set_hyperparameter(self.optimizer, "lr", scheduled_lr(args, self.step, self.plateau_drops))
            loss = self.train_step(x)
            bad = self.first_bad_step
            self.first_bad_step = torch.where(torch.isfinite(loss) | (bad >= 0), bad, self.step + 1)
            self.step += 1
            if self.step == self.start_step + 1:  # the process's first step: compilation, graph capture
                timed_from, untimed_steps = synchronized_time(device), self.step
            batch_number += 1
            loss_sum += loss.double() * batch.shape[0] / ctx.world_size  # this rank's -sum log p
            if self.step % self.check_every == 0 and ctx.any(self.first_bad_step.item() >= 0, device):
                raise NonFiniteLoss(epoch)
            seen += batch.shape[0]
            if not bar.disable:  # an interactive progress bar shows the running log-likelihood
                ll = -loss_sum.item() / seen + preprocess.log_det
                bar.set_postfix(ll=f"{ll:.1f}", bpd=f"{data_lib.bits_per_dim(ll, info.dim, info.data_range):.3f}")
            reason = self.stop_inside_epoch()
            if reason:
                self.stop_reason = reason
                break
        if ctx.any(self.first_bad_step.item() >= 0, device):
            raise NonFiniteLoss(epoch)
        total_loss = ctx.sum(loss_sum).item()  # every rank's share
        self.step_seconds += synchronized_time(device) - timed_from
        self.timed_steps += self.step - untimed_steps
        if batch_number < self.batches_per_epoch:  # stopped inside the epoch: keep its place for --resume
            self.in_progress = dict(epoch=epoch, batches_done=batch_number, images=self.train_pixels.shape[0],
                                    batch_size=args.batch_size, order_rng=order_rng, loss_sum=total_loss, seen=seen,
                                    seconds=seconds_before + time.time() - epoch_start)
            return None
        self.completed_epoch = epoch
        train_ll = -total_loss / seen + preprocess.log_det if seen else float("nan")
        return train_ll, epoch_start - seconds_before

    def stop_inside_epoch(self) -> Optional[str]:
        """Why training stops after this step (--max_iter, --time-limit, a signal), or None."""
        args, ctx, device = self.args, self.ctx, self.device
        if args.max_iter is not None and self.step >= args.max_iter:
            return f"--max_iter {args.max_iter} reached"
        checked = self.step % self.check_every == 0
        if args.time_limit is not None and checked and ctx.any(time.time() - self.started > args.time_limit, device):
            return f"--time-limit {args.time_limit:g} s reached"
        # a Python flag: read at every step by a lone process, with the other checks under torchrun
        if (checked or not ctx.enabled) and ctx.any(self.stop_signals.received is not None, device):
            return self.stop_signals.reason
        return None

    def end_epoch(self, epoch: int, train_ll: float, epoch_started: float) -> None:
        """After a complete epoch: rank 0 validates, logs and keeps the best model; every rank applies the
        rate's plateau divisions and the stops that rank 0 decides; the outputs are written every
        --save-every epochs."""
        args, ctx, device = self.args, self.ctx, self.device
        improved = False
        if ctx.is_main:  # the others go on to the next epoch
            info = self.info
            self.model.eval()
            valid_ll = average_log_likelihood(self.model, self.preprocess, self.valid_pixels, args.eval_batch_size,
                                              torch.Generator(device=device).manual_seed(12345))
            bpd = lambda ll: round(data_lib.bits_per_dim(ll, info.dim, info.data_range), 5)  # noqa: E731
            row = dict(epoch=epoch, step=self.step, train_ll_nats=round(train_ll, 4),
                       train_bits_per_dim=bpd(train_ll), valid_ll_nats=round(valid_ll, 4),
                       valid_bits_per_dim=bpd(valid_ll), seconds=round(time.time() - epoch_started, 3),
                       lr=float(f"{scheduled_lr(args, self.step - 1, self.plateau_drops):.6g}"))  # its last step's
            self.history.append(row)
            improved = valid_ll > self.best_valid
            if improved:
                self.best_valid, self.best_epoch = valid_ll, epoch
            pace, _, limit = self.pace_and_time_left(time.time() - self.started)
            time_left = f" (the rest of {limit}: about {duration(pace['remaining_seconds_estimate'])})" \
                if "remaining_seconds_estimate" in pace and not (self.stop_reason or self.patience_spent(epoch)) else ""
            print(f"epoch {epoch}: train {train_ll:.2f} nats, valid {valid_ll:.2f} nats "
                  f"({row['valid_bits_per_dim']:.4f} bits/dim), {row['seconds']:.1f} s{time_left}", flush=True)
        # --lr-plateau, decided by rank 0 (which alone validates) and applied by every rank.
        if args.lr_plateau is not None:
            waited = epoch - max(self.best_epoch, self.last_drop_epoch)  # epochs without a gain since the last
            lower = scheduled_lr(args, self.step, self.plateau_drops + 1)
            if ctx.any(ctx.is_main and waited >= args.lr_plateau
                       and lower < scheduled_lr(args, self.step, self.plateau_drops), device):
                self.plateau_drops, self.last_drop_epoch = self.plateau_drops + 1, epoch
                if ctx.is_main:
                    print(f"epoch {epoch}: {waited} epochs without a validation gain; the learning rate is now "
                          f"{lower:.3g}", flush=True)
        # Only rank 0 knows the validation score: its verdict is shared so that all ranks stop together.
        if args.patience is not None and ctx.any(ctx.is_main and self.patience_spent(epoch) is not None, device):
            self.stop_reason, self.stopped_early = self.stop_reason or self.patience_spent(epoch), True
        if not self.stop_reason and ctx.any(self.stop_signals.received is not None, device):  # came in validation
            self.stop_reason = self.stop_signals.reason
        # The final outputs are written once, in finish(). (An epoch that improved validation cannot have
        # divided the rate or spent the patience, so best.pt holds the state right after its validation.)
        outputs_due = epoch % args.save_every < 1 and epoch != args.epochs and not self.stop_reason
        if ctx.is_main:
            self.write_files(epoch, best=improved, outputs=outputs_due)

    def pace_and_time_left(self, wall_seconds: float) -> Tuple[Dict[str, float], int, str]:
        """This process's pace after ``wall_seconds`` (see run_pace; ``seconds_per_step``, its steps after the
        first), the steps left to the limit that ends the run next and its name, and, when steps are left, the
        time they would take at that pace (``remaining_seconds_estimate``)."""
        in_progress = self.in_progress
        trained_here = [row["seconds"] for row in self.history if row["epoch"] > self.start_epoch]
        spent_in_current = in_progress["seconds"] if in_progress and trained_here else 0.0
        pace = run_pace(trained_here, wall_seconds + self.carried_seconds, spent_in_current) or {}
        if self.timed_steps:
            pace["seconds_per_step"] = float(f"{self.step_seconds / self.timed_steps:.4g}")
        left, limit = (0, "") if self.stopped_early else \
            steps_left(self.args, self.completed_epoch, in_progress["batches_done"] if in_progress else 0,
                       self.batches_per_epoch, self.step)
        if left > 0 and pace:
            pace["remaining_seconds_estimate"] = round(remaining_seconds(pace, left, self.batches_per_epoch), 1)
        return pace, left, limit

    def finish(self) -> int:
        """Write the final outputs, say why training stopped, and (unless a signal stopped it) score the best
        model on the test set into result.json. Returns the exit status."""
        args, ctx, stop_reason, in_progress = self.args, self.ctx, self.stop_reason, self.in_progress
        train_seconds = time.time() - self.started
        received = self.stop_signals.received
        signalled = received is not None and stop_reason == self.stop_signals.reason
        if not ctx.is_main:
            return 128 + received if signalled else 0
        out_dir, completed_epoch, step = self.out_dir, self.completed_epoch, self.step
        if step == self.start_step and self.stopped_early:
            print(f"nothing to train: {stop_reason} (a larger --patience goes on)")
        elif step == self.start_step and stop_reason and args.epochs > self.start_epoch:  # --max_iter reached
            print(f"nothing to train: --max_iter {args.max_iter}" +
                  (f" is not above the checkpoint's step {step} (a larger --max_iter goes on)"
                   if self.resume is not None else ""))
        elif step == self.start_step:
            print(f"nothing to train: --epochs {args.epochs}" +
                  (f" is not above the checkpoint's epoch {self.start_epoch} (a larger --epochs goes on)"
                   if self.resume is not None else ""))
        self.write_files(completed_epoch, best=False, outputs=True, final=True)
        self.writer.wait()  # every file is written before the run reports, reads best.pt and ends
        last = os.path.join(out_dir, "last.pt")
        if stop_reason and step != self.start_step:
            where = f" in epoch {in_progress['epoch']} after {in_progress['batches_done']} of " \
                    f"{self.batches_per_epoch} batches (--resume {last} goes on from there)" if in_progress else ""
            print(f"stopped: {stop_reason}{where}", flush=True)
        # This process's pace; for a run stopped short of its end, what the rest would take at it.
        pace, left, limit = self.pace_and_time_left(train_seconds)
        if "remaining_seconds_estimate" in pace:
            at = f"{pace['seconds_per_epoch']:.3g} s per epoch and {pace['seconds_between_epochs']:.2g} s between " \
                 f"epochs" if "seconds_per_epoch" in pace else f"{pace['seconds_per_step']:.3g} s per step " \
                 f"(no epoch is complete yet: validation and the time between epochs are left out)"
            print(f"at {at}, the {in_epochs(left, self.batches_per_epoch)} epochs ({left} steps) left of {limit} would "
                  f"take about {duration(pace['remaining_seconds_estimate'])}", flush=True)
        if signalled:  # whoever sent it wants the process gone soon: no test evaluation, no result.json
            if not in_progress:  # (a stop inside an epoch said where already)
                print(f"last.pt holds epoch {completed_epoch}; --resume {last} goes on", flush=True)
            return 128 + received
        best_path = os.path.join(out_dir, "best.pt")  # absent when no epoch was validated in this folder
        best, best_name = (load_checkpoint(best_path), "best.pt") if os.path.exists(best_path) else \
            (self.checkpoint(completed_epoch), "the final model")
        best_model = model_from_checkpoint(best).to(self.device).eval()
        info = self.info
        draws = log_likelihood_draws(best_model, self.preprocess, self.test_pixels, args.eval_draws,
                                     args.eval_batch_size)
        test_ll = float(np.mean(draws))
        bpd = data_lib.bits_per_dim(test_ll, info.dim, info.data_range)
        trained_for = f"epoch {best['epoch']}"
        if best_name == "the final model" and in_progress:  # stopped inside the epoch after it
            trained_for += f" and {in_progress['batches_done']} of {self.batches_per_epoch} batches of epoch " \
                           f"{in_progress['epoch']}"
        print(f"test log-likelihood of {best_name} ({trained_for}): "
              f"{summary(draws, info.dim, info.data_range)}; trained {train_seconds:.1f} s")
        if self.stopped_early:  # a finished run, not a piece of one
            status = f"stopped early: {stop_reason}; trained {completed_epoch} of {args.epochs} epochs"
        elif completed_epoch >= args.epochs:
            status = "complete"
        else:
            status = f"partial: {stop_reason or 'stopped'} after {completed_epoch} of {args.epochs} epochs"
        if in_progress and status.startswith("partial"):
            status += f" and {in_progress['batches_done']} of {self.batches_per_epoch} batches of epoch " \
                      f"{in_progress['epoch']}"
        result = dict(status=status, dataset=args.dataset, test_ll_nats=round(test_ll, 4), bits_per_dim=round(bpd, 5),
                      draws=len(draws), draw_spread_nats=round(float(np.std(draws)), 4), draw_ll_nats=draws,
                      model=best_name, best_epoch=best["epoch"], epochs=completed_epoch, steps=step,
                      resumed_after_epoch=self.start_epoch, wall_seconds=round(train_seconds, 1), **pace,
                      precision=args.precision, processes=ctx.world_size,
                      **provenance.record(self.device, args.command, commit=self.commit))
        write_bytes((json.dumps(result, indent=1) + "\n").encode(), os.path.join(out_dir, "result.json"))
        return 0


def main(argv: Optional[List[str]] = None) -> int:
    stop_signals = StopSignals()
    return run_tool(lambda a: run(parse_args(a), stop_signals), argv, on_output_closed=stop_signals.output_closed)


if __name__ == "__main__":
    sys.exit(main())
