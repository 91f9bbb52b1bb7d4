"""What the evaluate / sample / inpaint tools share: loading a checkpoint onto a device, clean errors."""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
from typing import Any, Callable, List, Optional, Tuple

import torch

from . import data as data_lib
from .checkpoint import (CheckpointError, dataset_mismatch, load_checkpoint, model_dataset_info, model_from_checkpoint,
                         trained_dataset_info)
from .data import DataError
from .files import check_can_write_in
from .model import NICE


class UsageError(ValueError):
    pass


def seed_value(text: str) -> int:
    """argparse type of ``--seed``: numpy's generator takes seeds in [0, 2**32)."""
    try:
        seed = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 0 <= seed < 2**32:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**32), got {seed}")
    return seed


def tool_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """The parser of a tool that reads a trained model: its usage from the module's docstring, and the
    checkpoint to read."""
    p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a checkpoint written by nice_ext.train (its best.pt or last.pt) or by "
                                      "nice_ext.save_model")
    return p


def add_data_arguments(group) -> None:
    """--data-dir and --no-download, as every tool that reads a dataset takes them."""
    group.add_argument("--data-dir", default="data", help="folder with the datasets (see nice_ext/data.py)")
    group.add_argument("--no-download", action="store_true", help="never try to download missing datasets")


def add_device_argument(group) -> None:
    group.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                       help="auto: cuda when a GPU is visible, else cpu")


def check_out_file(path: str, flag: str, extensions, kind: str) -> None:
    """Fail before any work is done when the file a flag names cannot be written as ``kind``: a name without
    one of ``extensions`` (which also keeps a tool from writing over a checkpoint), a folder of that name, or
    a folder that cannot be made."""
    if os.path.splitext(path)[1].lower() not in extensions:
        names = ", ".join(list(extensions)[:2]) + (", ..." if len(extensions) > 2 else "")
        raise UsageError(f"{flag} {path}: not {kind} file name (use {names})")
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path}: is a folder; name a file in it")
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as error:
        raise UsageError(f"{flag} {path}: cannot create its folder: {error.strerror}") from None
    try:
        check_can_write_in(folder, path)
    except OSError as error:
        raise UsageError(f"{flag} {path}: cannot write in {folder}: {error.strerror}") from None


def check_image_out(path: str) -> None:
    """``--out`` of the tools that draw: a format the image library knows."""
    from PIL import Image

    check_out_file(path, "--out", [".png", ".jpg", *Image.registered_extensions()], "an image")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for, but no CUDA GPU is available")
    return torch.device(name)


def load_for_inference(path: str, device: torch.device) -> Tuple[NICE, dict]:
    """The model of checkpoint ``path``, in eval mode on ``device``, and the checkpoint."""
    payload = load_checkpoint(path)
    return model_from_checkpoint(payload, path).to(device).eval(), payload


def add_dataset_argument(group) -> None:
    """--dataset of the tools that read images for a trained model."""
    group.add_argument("--dataset", choices=data_lib.DATASETS,
                       help="the images to read (default: those the model was trained on); another dataset of the "
                            "same size and range, such as fashion-mnist for an MNIST model, gives data the model "
                            "never saw; images: image files of the model's shape in DIR/test/ (DIR/train/ for "
                            "--split train and valid) of --data-dir DIR")


def inference_data(model: NICE, payload: dict, path: str, device: torch.device, dataset: Optional[str] = None
                   ) -> Tuple[data_lib.DatasetInfo, data_lib.Preprocess]:
    """The dataset a tool reads for the model of checkpoint ``path``, and the preprocessing that maps its
    pixels to the model's input: ``dataset`` (the tool's --dataset) where given, else the one the model was
    trained on. The preprocessing is the model's own, as it was trained (the dequantization to its data
    range, and the whitening fitted to its training images): its density over 8-bit pixels is then the same
    whatever images it scores, as a comparison across datasets needs. Another dataset's pixels must have
    the model's number of features; a model that names no dataset reads them as the dataset's own."""
    given = dataset is not None
    name = dataset if given else payload["dataset"]
    if name is None:
        raise UsageError(f"{path} names no dataset (saved by nice_ext.save_model without dataset=): pass --dataset, "
                         f"the images to read")
    try:
        trained = trained_dataset_info(model, payload)
    except ValueError as error:  # the images dataset for a model without an image shape
        raise CheckpointError(f"{path}: {error}") from None
    try:
        info = model_dataset_info(model, name)
    except ValueError as error:
        raise UsageError(f"--dataset {name}: {error}") from None
    if trained is not None:
        mismatch = dataset_mismatch(model, trained)
        if mismatch:
            raise CheckpointError(f"{path}: {mismatch}")
        info = dataclasses.replace(info, data_range=trained.data_range, whiten=trained.whiten)  # as the model reads
    mismatch = dataset_mismatch(model, info)
    if mismatch:
        raise UsageError(f"--dataset {name}: {mismatch}")
    preprocess = data_lib.Preprocess(info)
    if trained is not None:
        try:
            preprocess.load_state_dict(payload["preprocess_state"])
        except RuntimeError as error:
            raise CheckpointError(f"{path}: its preprocessing does not fit {trained.name}: {error}") from None
    elif info.whiten:
        raise UsageError(f"--dataset {name} is whitened, and {path} holds no whitening fitted to it (its model was "
                         f"trained on a dataset it does not name)")
    return info, preprocess.to(device)


def one_line(error: Exception) -> str:
    """An error's message as one line: wrapped causes (torchvision's download errors, say) span several."""
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip())


def is_out_of_memory(error: BaseException) -> bool:
    """A CUDA out-of-memory error, or the CPU allocator's (a plain RuntimeError)."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "can't allocate memory" in str(error))


def allocation_size(error: RuntimeError) -> str:
    """What an out-of-memory error says failed, short: torch's messages run to several sentences."""
    message = str(error)
    cpu = re.search(r"allocate (\d+) bytes", message)
    if cpu:
        return f"{int(cpu.group(1)) / 2**30:.1f} GiB could not be allocated in host memory"
    cuda = re.search(r"Tried to allocate ([\d.]+ [KMGT]?i?B)", message)
    if cuda:
        return f"{cuda.group(1)} could not be allocated on the GPU"
    return one_line(error)[:200]


class ClosedPipeGuard:
    """A tool's sys.stdout or sys.stderr, for when the reader of its pipe leaves (``| head``, a pager that is
    quit): the BrokenPipeError of the next write is swallowed rather than ending the tool with an error, the
    stream's file descriptor is pointed at os.devnull (so that nothing later, the interpreter's last flush
    included, writes to the closed pipe again), and ``on_close`` is called once. The tool goes on, so the
    files it was asked for are still written (training stops, see ``train.StopSignals.output_closed``)."""

    def __init__(self, stream, on_close: Optional[Callable[[], None]] = None) -> None:
        self._stream, self._on_close, self._reader_gone = stream, on_close, False

    def write(self, text: str) -> int:
        if not self._reader_gone:
            try:
                return self._stream.write(text)
            except BrokenPipeError:
                self._reader_left()
        return len(text)

    def flush(self) -> None:
        if not self._reader_gone:
            try:
                self._stream.flush()
            except BrokenPipeError:
                self._reader_left()

    def _reader_left(self) -> None:
        self._reader_gone = True
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(devnull, self._stream.fileno())
            finally:
                os.close(devnull)
        except (OSError, ValueError):  # a stream without a file descriptor of its own
            pass
        if self._on_close is not None:
            self._on_close()

    def __getattr__(self, name: str):  # isatty, fileno, encoding, ...: the stream's own
        return getattr(self._stream, name)


def run_script(main: Callable[[], Any]) -> int:
    """run_tool for a script (``benchmarks/``) whose main() reads sys.argv itself and returns its results
    rather than an exit status: its results files are written even when its reader left early."""
    def status(argv: Optional[List[str]]) -> int:
        main()
        return 0
    return run_tool(status)


def run_tool(main: Callable[[Optional[List[str]]], int], argv: Optional[List[str]] = None,
             on_output_closed: Optional[Callable[[], None]] = None) -> int:
    """Run a tool's main, turning the errors a user can cause into one line and an exit status. Its output
    may go to a reader that leaves early (see ClosedPipeGuard; ``on_output_closed`` is then called)."""
    streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = (ClosedPipeGuard(stream, on_output_closed) for stream in streams)
    try:
        status = main(argv)
        sys.stdout.flush()  # here, where a closed pipe is the guard's to catch, not at the interpreter's exit
        return status
    except KeyboardInterrupt:  # Ctrl-C: what was written stays (every write is atomic); no traceback
        print("interrupted", file=sys.stderr)
        return 130
    except UsageError as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    except (CheckpointError, DataError) as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 1
    except OSError as error:  # a file that cannot be read or written: a full disk, a missing permission
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 1
    except RuntimeError as error:
        if not is_out_of_memory(error):
            raise  # a bug, not a user's doing: keep the traceback
        print(f"error: out of memory: {allocation_size(error)}; ask for less at once (a smaller --n or "
              "--batch_size)", file=sys.stderr)
        return 1
    finally:
        sys.stderr.flush()
        sys.stdout, sys.stderr = streams
