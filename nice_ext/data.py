"""Datasets for NICE (paper §5.1): loading, the validation split, dequantization and whitening.

Images are kept as uint8 pixels (N, D) and dequantized afresh every time a batch is drawn:

    x = (pixel + u) / 256,  u ~ U(0, 1) per example and per feature      (MNIST, Fashion-MNIST, SVHN)
    x = (pixel + u) / 128 - 1                                               (CIFAR-10: range [-1, 1])

with no clamping (clamping would move probability mass). SVHN and CIFAR-10 are then whitened with a ZCA
matrix W fitted on the training split; the model sees x' = (x - mean) W, so log p(x) = log p(x') +
log|det W|, and every likelihood reported by nice_ext adds ``log_det`` back: numbers stay in the
dequantized pixel space, comparable with the paper.

``--data-dir DIR`` may hold ``DIR/mnist/`` (or ``DIR/fashion-mnist/``) with the four original IDX .gz
files, or torchvision's own layout; CIFAR-10 and SVHN use torchvision's layout. Missing files are
downloaded through torchvision when ``download`` is set; otherwise a clear error names what is missing.

The ``images`` dataset is one's own: ``DIR/train/`` and ``DIR/test/`` hold image files of one size, 8-bit
grayscale or RGB, in any format the image library reads (found in subfolders too; other files are passed
over). Its pixels are dequantized as MNIST's, to [0, 1], and whitened only when asked (``whiten``, the
train tool's ``--whiten``). A sixth of the training images,
at most 10,000, drawn once with a fixed seed, validates; the test images keep the order of their paths.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import math
import operator
import os
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from .masks import check_image_shape

IMAGES = "images"  # one's own images, in a folder (module docstring)
DATASETS = ("mnist", "fashion-mnist", "cifar10", "svhn", IMAGES)
VALIDATION_SIZE = 10_000
IDX_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
             "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


class DataError(RuntimeError):
    """A dataset could not be found or read; the message says which files were expected where."""


@dataclass
class DatasetInfo:
    name: str
    image_shape: Tuple[int, int, int]
    data_range: Tuple[float, float]
    whiten: bool

    @property
    def dim(self) -> int:
        return math.prod(self.image_shape)


INFO = {
    "mnist": DatasetInfo("mnist", (1, 28, 28), (0.0, 1.0), False),
    "fashion-mnist": DatasetInfo("fashion-mnist", (1, 28, 28), (0.0, 1.0), False),
    "cifar10": DatasetInfo("cifar10", (3, 32, 32), (-1.0, 1.0), True),
    "svhn": DatasetInfo("svhn", (3, 32, 32), (0.0, 1.0), True),
}


def dataset_info(name: str, image_shape: Optional[Tuple[int, int, int]] = None, whiten: bool = False) -> DatasetInfo:
    """What the tools know of dataset ``name``. The ``images`` dataset's image shape is that of its files
    (``image_shape``: read from them, or the shape of a model trained on them); the others have their own,
    which ``image_shape``, when given, must be. ``whiten``: the images dataset ZCA-whitened, as the paper
    whitens CIFAR-10 and SVHN (the named datasets are whitened as the paper does, or not)."""
    if name == IMAGES:
        if image_shape is None:
            raise ValueError("the images dataset has the image shape of its files: pass image_shape=(C, H, W)")
        return DatasetInfo(IMAGES, check_image_shape(image_shape), (0.0, 1.0), bool(whiten))
    if name not in INFO:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if whiten:
        raise ValueError(f"whiten is for the images dataset; {name} is "
                         f"{'whitened' if INFO[name].whiten else 'not whitened'}, as in the paper")
    if image_shape is not None and tuple(image_shape) != INFO[name].image_shape:
        raise ValueError(f"{name}'s images are {INFO[name].image_shape} (C, H, W), not {tuple(image_shape)}")
    return INFO[name]


# ------------------------------------------------------------------------------------------------
# Loading raw pixels
# ------------------------------------------------------------------------------------------------
def read_idx_images(path: str) -> Tensor:
    """An IDX3 image file (optionally gzip-compressed) as a uint8 tensor (N, rows * cols)."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as error:
        raise DataError(f"{path}: cannot be read ({error})") from error
    if len(data) < 16 or int.from_bytes(data[0:4], "big") != 2051:
        raise DataError(f"{path}: not an IDX image file (expected magic number 2051)")
    count, rows, cols = (int.from_bytes(data[i:i + 4], "big") for i in (4, 8, 12))
    expected = 16 + count * rows * cols
    if len(data) != expected:
        raise DataError(f"{path}: truncated or corrupt ({len(data)} bytes, expected {expected})")
    pixels = np.frombuffer(data, dtype=np.uint8, offset=16).reshape(count, rows * cols)
    return torch.from_numpy(pixels.copy())


def _folders(root: str) -> List[str]:
    """root and the folders up to two levels below it (as deep as torchvision makes its own)."""
    if not os.path.isdir(root):
        return []
    found = [root]
    for entry in os.scandir(root):
        if entry.is_dir(follow_symlinks=False):
            found.append(entry.path)
            found += [sub.path for sub in os.scandir(entry.path) if sub.is_dir(follow_symlinks=False)]
    return found


@contextlib.contextmanager
def _empty_folders_removed_on_failure(root: str):
    """torchvision makes its folders (root, root/MNIST/raw) before it downloads: when it fails, the empty
    folders it made are removed again, so that a mistyped --data-dir leaves nothing behind."""
    existing = set(_folders(root))
    try:
        yield
    except Exception:
        for folder in sorted(set(_folders(root)) - existing, key=len, reverse=True):  # the deepest first
            with contextlib.suppress(OSError):  # one that holds something stays
                os.rmdir(folder)
        raise


def _load_idx_dataset(name: str, data_dir: str, split: str, download: bool) -> Tensor:
    folder = os.path.join(data_dir, name)
    image_file = os.path.join(folder, IDX_FILES[split][0])
    if os.path.exists(image_file):
        return read_idx_images(image_file)
    import torchvision

    cls = torchvision.datasets.MNIST if name == "mnist" else torchvision.datasets.FashionMNIST
    try:
        with _empty_folders_removed_on_failure(data_dir):
            dataset = cls(root=data_dir, train=(split == "train"), download=download)
    except Exception as error:  # torchvision raises RuntimeError or URLError/OSError when offline
        expected = ", ".join(IDX_FILES["train"] + IDX_FILES["test"])
        raise DataError(f"{name} not found: expected {expected} in {folder}/ (or torchvision's layout under "
                        f"{data_dir}/); download {'failed: ' + str(error) if download else 'is off'}") from error
    return dataset.data.reshape(len(dataset.data), -1).to(torch.uint8)


def _load_torchvision_rgb(name: str, data_dir: str, split: str, download: bool) -> Tensor:
    import torchvision

    if name == "svhn":
        try:
            import scipy.io  # noqa: F401  torchvision reads SVHN's .mat files with it
        except ImportError as error:
            raise DataError("svhn: reading SVHN's .mat files needs scipy (pip install scipy)") from error
    expected = ("cifar-10-batches-py/ (data_batch_1..5, test_batch)" if name == "cifar10"
                else f"{split}_32x32.mat")
    try:
        with _empty_folders_removed_on_failure(data_dir):
            if name == "cifar10":
                dataset = torchvision.datasets.CIFAR10(root=data_dir, train=(split == "train"), download=download)
                images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2)  # NHWC -> NCHW
            else:
                dataset = torchvision.datasets.SVHN(root=data_dir, split=split, download=download)
                images = torch.from_numpy(dataset.data)  # already NCHW
    except Exception as error:
        raise DataError(f"{name} not found or corrupted: expected {expected} under {data_dir}/ (torchvision's "
                        f"layout); download {'failed: ' + str(error) if download else 'is off'}") from error
    return images.reshape(images.shape[0], -1).contiguous()


IMAGE_MODES = {"L": 1, "RGB": 3}  # 8-bit grayscale and RGB: the channels of each


def image_files(folder: str) -> List[str]:
    """The image files under ``folder`` (subfolders too), by path; files of other kinds are passed over."""
    from PIL import Image

    extensions = {ext.lower() for ext in Image.registered_extensions()}
    return sorted(os.path.join(root, f) for root, _, files in os.walk(folder) for f in files
                  if os.path.splitext(f)[1].lower() in extensions and not f.startswith("."))


def load_image_folder(folder: str, image_shape: Optional[Tuple[int, int, int]] = None,
                      shape_source: str = "the model's") -> Tuple[Tensor, Tuple[int, int, int]]:
    """uint8 pixels (N, D) of the image files under ``folder``, rows flattened C, H, W, and their shape
    (C, H, W): ``image_shape`` (``shape_source``, named in the error) where given, else the first image's. An
    image of another shape or mode, one the image library cannot read and a folder with none are a DataError
    naming the file or folder."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.isdir(folder):
        raise DataError(f"images: no folder {folder}/ (the images dataset reads DIR/train/ and DIR/test/ of "
                        f"--data-dir DIR)")
    paths = image_files(folder)
    if not paths:
        raise DataError(f"images: no image files in {folder}/")
    rows: Optional[np.ndarray] = None  # filled in place: the images are held once, not as a list and a copy
    for number, path in enumerate(paths):
        try:
            with Image.open(path) as image:
                image.load()
                mode, (width, height) = image.mode, image.size
                pixels = np.asarray(image, dtype=np.uint8) if mode in IMAGE_MODES else None
        except (OSError, UnidentifiedImageError, ValueError) as error:
            raise DataError(f"{path}: cannot be read as an image ({error})") from None
        if pixels is None:
            raise DataError(f"{path}: an image of mode {mode}; the images dataset takes 8-bit grayscale (L) or RGB "
                            f"images (PIL: image.convert('RGB') or image.convert('L'))")
        shape = (IMAGE_MODES[mode], height, width)
        if image_shape is None:
            image_shape, shape_source = shape, f"the first image's ({path})"
        if shape != tuple(image_shape):
            raise DataError(f"{path}: a {'x'.join(map(str, shape))} image (channels x height x width), not "
                            f"{'x'.join(map(str, image_shape))} as {shape_source}; the images must all have one "
                            f"size and mode")
        if rows is None:
            rows = np.empty((len(paths), math.prod(shape)), dtype=np.uint8)
        rows[number] = pixels.reshape(height, width, -1).transpose(2, 0, 1).reshape(-1)  # H, W, C -> C, H, W
    return torch.from_numpy(rows), tuple(image_shape)


def load_pixels(name: str, data_dir: str, split: str, download: bool = True,
                image_shape: Optional[Tuple[int, int, int]] = None) -> Tensor:
    """uint8 pixels (N, D) of ``split`` ('train' or 'test'), rows flattened C, H, W. ``image_shape``: the
    shape the images dataset's files must have (of the model that reads them)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if name == IMAGES:
        return load_image_folder(os.path.join(data_dir, split), image_shape)[0]
    dataset_info(name, image_shape)  # an unknown name, or another shape than the dataset's, is refused
    if name in ("mnist", "fashion-mnist"):
        return _load_idx_dataset(name, data_dir, split, download)
    return _load_torchvision_rgb(name, data_dir, split, download)


# ------------------------------------------------------------------------------------------------
# Dequantization and whitening
# ------------------------------------------------------------------------------------------------
def check_pixels(pixels: Tensor) -> None:
    """Refuses what dequantization would silently get wrong: anything but integer levels 0..255 (floats
    scaled to [0, 1], as torchvision's ToTensor gives them, would land in the first of the 256 bins)."""
    if not isinstance(pixels, Tensor):
        raise TypeError(f"pixels must be a tensor of 8-bit levels 0..255, got {type(pixels).__name__}")
    if pixels.dtype == torch.uint8:
        return
    if pixels.is_floating_point() or pixels.is_complex() or pixels.dtype == torch.bool:
        raise TypeError(f"pixels must hold the integer levels 0..255 (uint8), got {pixels.dtype}; images scaled to "
                        f"[0, 1] are (images * 255).round().to(torch.uint8) before dequantization")
    if pixels.numel() and (int(pixels.min()) < 0 or int(pixels.max()) > 255):
        raise ValueError(f"pixels must lie in 0..255, got values in {int(pixels.min())}..{int(pixels.max())}")


def check_data_range(data_range: Tuple[float, float]) -> Tuple[float, float]:
    """``data_range`` as (low, high) floats, or a clear error: the pixels' interval must be finite and not
    empty (a reversed one would flip the images and the likelihood's sign of log-width)."""
    try:
        low, high = (float(v) for v in data_range)
    except (TypeError, ValueError):
        raise TypeError(f"data_range must be a pair of numbers (low, high), got {data_range!r}") from None
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ValueError(f"data_range must be finite with low < high, got {data_range!r}")
    return low, high


def check_generator(generator: Optional[torch.Generator], device: torch.device, what: str) -> None:
    """``generator``: None (torch's global one) or a torch.Generator of the type of ``device``, where ``what``
    (named in the error) draws its random numbers."""
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        kind = type(generator)
        raise TypeError(f"generator must be a torch.Generator or None, got {kind.__module__}.{kind.__qualname__}")
    if generator.device.type != torch.device(device).type:
        raise ValueError(f"generator is a {generator.device.type} generator but {what} is on {device}: pass "
                         f"torch.Generator(device={torch.device(device).type!r})")


def dequantize(pixels: Tensor, data_range: Tuple[float, float], generator: Optional[torch.Generator] = None,
               dtype: torch.dtype = torch.float32) -> Tensor:
    """Uniform dequantization: a fresh u ~ U(0, 1) per example and per feature, mapped to ``data_range``.

    ``pixels`` are the integer levels 0..255 (uint8, or another integer dtype holding them)."""
    check_pixels(pixels)
    low, high = check_data_range(data_range)
    check_generator(generator, pixels.device, "pixels")
    noise = torch.rand(pixels.shape, device=pixels.device, dtype=dtype, generator=generator)
    return (pixels.to(dtype) + noise) * ((high - low) / 256.0) + low


def quantize(x: Tensor, data_range: Tuple[float, float]) -> Tensor:
    """The 8-bit levels (uint8) whose dequantization bins hold ``x``: floor((x - low) * 256 / (high - low)),
    clamped to 0..255 (a sample may leave the data range). It undoes ``dequantize`` (to within float32's
    rounding at the very edge of a bin; exactly in float64)."""
    low, high = check_data_range(data_range)
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    levels = torch.floor((x.double() - low) * (256.0 / (high - low)))
    return levels.nan_to_num(0.0).clamp(0, 255).to(torch.uint8)


def bits_per_dim(log_likelihood_nats: float, dim: int, data_range: Tuple[float, float]) -> float:
    """Bits per dimension of the discrete pixels: (-LL + D ln(256 / width)) / (D ln 2)."""
    try:
        valid_dim = not isinstance(dim, bool) and operator.index(dim) >= 1
    except TypeError:
        valid_dim = False
    if not valid_dim:
        raise ValueError(f"dim must be a positive int (the features per example), got {dim!r}")
    low, high = check_data_range(data_range)
    return (-log_likelihood_nats + dim * math.log(256.0 / (high - low))) / (dim * math.log(2.0))


class ZCA(torch.nn.Module):
    """Exact ZCA whitening x' = (x - mean) W, W = U diag((lambda + eps)^-1/2) U^T, with log|det W|."""

    def __init__(self, dim: int):
        super().__init__()
        # float64: the whitening matrix and its log-determinant feed reported likelihoods
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("matrix", torch.eye(dim, dtype=torch.float64))
        self.register_buffer("log_det", torch.zeros((), dtype=torch.float64))

    @torch.no_grad()
    def fit(self, x: Tensor, eps: float = 1e-5, rows_per_chunk: int = 4096) -> "ZCA":
        """Fit to the rows of ``x`` (N, D). The mean and the covariance are summed in float64 over chunks
        of rows, so the fit holds one chunk and the D x D matrix in float64, not a float64 copy of all of
        ``x`` and its centred copy (CIFAR-10's training split: 1 GB each)."""
        n = x.shape[0]
        if n < 2:
            raise DataError(f"whitening fits a covariance of the training images: it needs at least 2, got {n}")
        chunks = x.split(rows_per_chunk)
        mean = torch.stack([chunk.double().sum(dim=0) for chunk in chunks]).sum(dim=0) / n
        cov = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
        for chunk in chunks:
            centred = chunk.double() - mean
            cov.addmm_(centred.T, centred)
        cov /= n - 1  # the unbiased estimate, as torch.cov gives
        eigenvalues, eigenvectors = torch.linalg.eigh(cov)
        eigenvalues = eigenvalues.clamp_min(0) + eps
        self.mean.copy_(mean)
        self.matrix.copy_(eigenvectors @ torch.diag(eigenvalues.rsqrt()) @ eigenvectors.T)
        self.log_det.copy_(-0.5 * eigenvalues.log().sum())
        return self

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean.to(x.dtype)) @ self.matrix.to(x.dtype)


class Preprocess(torch.nn.Module):
    """Dequantization (and whitening where the paper uses it) as one fixed map, with its log|det|."""

    def __init__(self, info: DatasetInfo):
        super().__init__()
        self.data_range = info.data_range
        self.zca = ZCA(info.dim) if info.whiten else None

    def fit(self, train_pixels: Tensor, generator: Optional[torch.Generator] = None) -> "Preprocess":
        if self.zca is not None:
            self.zca.fit(dequantize(train_pixels, self.data_range, generator))
        return self

    def forward(self, pixels: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        x = dequantize(pixels, self.data_range, generator)
        return self.zca(x) if self.zca is not None else x

    @property
    def log_det(self) -> float:
        """Added to the model's log-likelihood to report it in dequantized pixel space."""
        return float(self.zca.log_det) if self.zca is not None else 0.0


@dataclass
class Splits:
    train: Tensor
    valid: Tensor
    test: Tensor
    info: DatasetInfo
    digest: Optional[str] = None  # of the images dataset's files' pixels: a resumed run checks it reads the same


def pixels_digest(*pixels: Tensor) -> str:
    """SHA-256 of uint8 pixel tensors, their shapes included."""
    digest = hashlib.sha256()
    for part in pixels:
        digest.update(repr(tuple(part.shape)).encode())
        digest.update(part.contiguous().numpy().tobytes())
    return digest.hexdigest()


def validation_size(name: str, train_images: int) -> int:
    """The last 10,000 training images validate (the paper's MNIST split); of one's own images, a sixth, at
    most 10,000 (MNIST's share)."""
    return min(VALIDATION_SIZE, train_images // 6) if name == IMAGES else VALIDATION_SIZE


def shuffled_once(pixels: Tensor) -> Tensor:
    """``pixels`` in one fixed random order (seed 0), the same on every run and machine: one's own files
    are in the order of their paths, often one class's folder after another, and the last sixth of that
    order would validate on the last classes alone."""
    return pixels[torch.randperm(pixels.shape[0], generator=torch.Generator().manual_seed(0))]


def load_splits(name: str, data_dir: str, download: bool = True, subset: Optional[int] = None,
                image_shape: Optional[Tuple[int, int, int]] = None, whiten: bool = False) -> Splits:
    """Train / validation / test pixels. Validation is the last training images (``validation_size``: model
    selection only, never trained on), of one's own images after ``shuffled_once``; ``subset`` keeps the first
    N training images. ``image_shape``: the shape the images dataset's files must have (else the first
    training image's); ``whiten``: see ``dataset_info``."""
    digest = None
    if name == IMAGES:
        given = image_shape is not None
        train_all, image_shape = load_image_folder(os.path.join(data_dir, "train"), image_shape)
        test = load_image_folder(os.path.join(data_dir, "test"), image_shape,
                                 "the model's" if given else "the training images'")[0]
        digest = pixels_digest(train_all, test)
        train_all = shuffled_once(train_all)
    else:
        train_all = load_pixels(name, data_dir, "train", download, image_shape)
        test = load_pixels(name, data_dir, "test", download)
    info = dataset_info(name, image_shape, whiten)
    held_out = validation_size(name, train_all.shape[0])
    if held_out < 1 or train_all.shape[0] <= held_out:
        need = 6 if name == IMAGES else VALIDATION_SIZE + 1
        raise DataError(f"{name}: only {train_all.shape[0]} training images, need at least {need} ("
                        f"{'a sixth' if name == IMAGES else f'the last {VALIDATION_SIZE}'} validate)")
    train, valid = train_all[:-held_out], train_all[-held_out:]
    if subset is not None:
        if subset < 1:
            raise ValueError(f"subset must be positive, got {subset}")
        train = train[:subset]
    return Splits(train, valid, test, info, digest)


def batches(pixels: Tensor, batch_size: int, order: Optional[Tensor] = None, first: int = 0):
    """Batches of a pixel tensor that already lives on the training device (no DataLoader): in ``order``
    (an epoch's shuffle, ``torch.randperm``) or as stored, from batch number ``first`` on."""
    n = pixels.shape[0]
    for start in range(first * batch_size, n, batch_size):
        yield pixels[order[start:start + batch_size]] if order is not None else pixels[start:start + batch_size]
