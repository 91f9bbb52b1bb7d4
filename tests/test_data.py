"""Dequantization, splits, whitening and file handling."""
import gzip
import os

import pytest
import torch

from conftest import data_dir, run_python, write_images
from nice_ext import data as data_lib

needs_mnist = pytest.mark.skipif(data_dir() is None, reason="the MNIST files are not available")


def test_dequantization_range_and_independence():
    pixels = torch.tensor([[0, 255, 7]], dtype=torch.uint8).expand(20000, 3)
    x = data_lib.dequantize(pixels, (0.0, 1.0), torch.Generator().manual_seed(0))
    assert (x[:, 0] >= 0).all() and (x[:, 0] < 1 / 256).all()
    # float32 rounds 255 + u up to 256 for u within 2^-17 of 1, so the top bin's upper end is reached
    # (about 1 in 131,000 draws; no clamping, which would move probability mass)
    assert (x[:, 1] >= 255 / 256).all() and (x[:, 1] <= 1).all()
    # a fresh draw per example and per feature: no two rows or columns share their noise
    noise = x * 256 - pixels.float()
    assert abs(noise.mean().item() - 0.5) < 0.01 and abs(noise.var().item() - 1 / 12) < 0.005
    assert abs(torch.corrcoef(noise.T)[0, 2].item()) < 0.03
    assert noise[:, 0].unique().numel() > 19000
    y = data_lib.dequantize(pixels[:5], (0.0, 1.0))
    assert not torch.equal(y, data_lib.dequantize(pixels[:5], (0.0, 1.0)))
    z = data_lib.dequantize(pixels, (-1.0, 1.0), torch.Generator().manual_seed(1))
    assert z.min() >= -1 and z.max() <= 1  # < 1 failed for about 1 process in 7: torch seeds each one anew


def test_dequantization_takes_integer_levels_and_refuses_scaled_floats():
    levels = torch.tensor([[0, 128, 255]])
    for dtype in (torch.uint8, torch.int16, torch.int64):
        x = data_lib.dequantize(levels.to(dtype), (0.0, 1.0), torch.Generator().manual_seed(0))
        assert torch.equal(torch.floor(x * 256), levels.float())
    with pytest.raises(TypeError, match=r"levels 0\.\.255 \(uint8\), got torch.float32.*\* 255"):
        data_lib.dequantize(levels.float() / 255, (0.0, 1.0))  # torchvision's ToTensor scaling
    for bad in (torch.tensor([[0, 256]]), torch.tensor([[-1, 3]], dtype=torch.int8)):
        with pytest.raises(ValueError, match=r"must lie in 0\.\.255"):
            data_lib.dequantize(bad, (0.0, 1.0))
    with pytest.raises(TypeError, match="bool"):
        data_lib.dequantize(torch.ones(2, 3, dtype=torch.bool), (0.0, 1.0))
    with pytest.raises(TypeError, match="list"):
        data_lib.dequantize([[0, 1]], (0.0, 1.0))


@pytest.mark.parametrize("data_range", [(0.0, 1.0), (-1.0, 1.0)])
def test_quantize_gives_back_the_levels_dequantize_was_given(data_range):
    pixels = torch.randint(0, 256, (200, 784), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    exact = data_lib.dequantize(pixels, data_range, torch.Generator().manual_seed(1), dtype=torch.float64)
    assert torch.equal(data_lib.quantize(exact, data_range), pixels)
    single = data_lib.dequantize(pixels, data_range, torch.Generator().manual_seed(1))  # float32: a bin's very edge
    assert (data_lib.quantize(single, data_range) == pixels).double().mean() > 0.9999  # may round into the next
    low, high = data_range
    outside = torch.tensor([low - 1.0, high + 1.0, high, float("nan"), low])
    assert data_lib.quantize(outside, data_range).tolist() == [0, 255, 255, 0, 0]  # clamped; NaN as level 0
    with pytest.raises(TypeError, match="floating-point"):
        data_lib.quantize(pixels, data_range)


@pytest.mark.parametrize("data_range, error", [((1.0, 0.0), ValueError), ((0.0, float("nan")), ValueError),
                                               ((-float("inf"), 1.0), ValueError), (1.0, TypeError)])
def test_a_data_range_that_is_no_interval_is_refused(data_range, error):
    """A reversed range flipped the images, and a NaN made every value NaN, without a word."""
    with pytest.raises(error, match="data_range must be"):
        data_lib.dequantize(torch.zeros(2, 3, dtype=torch.uint8), data_range)
    with pytest.raises(error, match="data_range must be"):
        data_lib.bits_per_dim(-1000.0, 784, data_range)


def test_bits_per_dim_matches_the_paper():
    assert abs(data_lib.bits_per_dim(1980.50, 784, (0.0, 1.0)) - 4.36) < 0.005
    assert abs(data_lib.bits_per_dim(5371.78, 3072, (-1.0, 1.0)) - 4.48) < 0.005
    assert data_lib.bits_per_dim(1980.50, torch.tensor(784).numpy(), (0, 1)) == \
        data_lib.bits_per_dim(1980.50, 784, (0.0, 1.0))  # numpy integers are integers
    for dim in (0, -784, 784.0, True):
        with pytest.raises(ValueError, match="dim must be a positive int"):
            data_lib.bits_per_dim(1980.50, dim, (0.0, 1.0))


def test_zca_whitens_and_reports_its_log_det():
    g = torch.Generator().manual_seed(0)
    mixing = torch.randn(5, 5, generator=g, dtype=torch.float64)
    x = torch.randn(20000, 5, generator=g, dtype=torch.float64) @ mixing
    zca = data_lib.ZCA(5).fit(x, eps=0.0)
    w = zca(x)
    assert torch.allclose(torch.cov(w.T), torch.eye(5, dtype=torch.float64), atol=1e-6)
    assert abs(zca.log_det.item() - torch.linalg.slogdet(zca.matrix)[1].item()) < 1e-9


def test_zca_fit_in_chunks_is_the_covariance_of_all_rows():
    # float32 rows far from the origin, as dequantized pixels are: the chunks' sums must centre them exactly
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(5000, 7, generator=g) @ torch.randn(7, 7, generator=g) + 100.0).float()
    whole = data_lib.ZCA(7).fit(x, rows_per_chunk=len(x))
    chunked = data_lib.ZCA(7).fit(x, rows_per_chunk=333)
    centred = x.double() - x.double().mean(dim=0)
    expected = torch.linalg.eigh(torch.cov(centred.T))
    for zca in (whole, chunked):
        assert torch.allclose(zca.mean, x.double().mean(dim=0), rtol=1e-14, atol=0)
        cov = torch.linalg.inv(zca.matrix @ zca.matrix)  # W = C_eps^-1/2, so (W W)^-1 = C + eps I
        assert torch.allclose(cov - 1e-5 * torch.eye(7, dtype=torch.float64), torch.cov(centred.T), rtol=1e-9)
        assert abs(zca.log_det.item() - (-0.5 * (expected.eigenvalues + 1e-5).log().sum().item())) < 1e-9
    with pytest.raises(data_lib.DataError, match="needs at least 2, got 1"):
        data_lib.ZCA(7).fit(x[:1])


def test_zca_fit_needs_no_float64_copy_of_the_images():
    """Fitting 20000 float32 rows of 1024 features (80 MB) took 515 MB more memory while the fit summed a
    float64 copy and its centred copy of all rows; in chunks it takes about 125 MB (the D x D matrices and
    one chunk)."""
    code = ("import resource, torch\n"
            "from nice_ext.data import ZCA\n"
            "x = torch.rand(20000, 1024, generator=torch.Generator().manual_seed(0))\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "ZCA(1024).fit(x)\n"
            "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)\n")
    done = run_python(code)
    assert done.returncode == 0, done.stderr
    assert float(done.stdout) < 240, f"the fit took {float(done.stdout):.0f} MB more"


def test_idx_reader_rejects_bad_files(tmp_path):
    bad = tmp_path / "x-images-idx3-ubyte.gz"
    with gzip.open(bad, "wb") as f:
        f.write((2051).to_bytes(4, "big") + (10).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + b"\0" * 100)
    with pytest.raises(data_lib.DataError, match="truncated"):
        data_lib.read_idx_images(str(bad))
    bad.write_bytes(b"not gzip at all")
    with pytest.raises(data_lib.DataError, match="cannot be read"):
        data_lib.read_idx_images(str(bad))


def test_a_failed_download_leaves_no_empty_folders_behind(tmp_path, monkeypatch):
    import torchvision

    class Offline:
        """What torchvision's MNIST does with no network: make root/MNIST/raw, then fail to download."""

        def __init__(self, root, train, download):
            os.makedirs(os.path.join(root, "MNIST", "raw"), exist_ok=True)
            raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(torchvision.datasets, "MNIST", Offline)
    typo = tmp_path / "dta"  # a mistyped --data-dir
    with pytest.raises(data_lib.DataError, match="download failed: Error downloading"):
        data_lib.load_pixels("mnist", str(typo), "train", download=True)
    assert not typo.exists()
    (tmp_path / "data" / "kept").mkdir(parents=True)  # a folder that was there stays, empty or not
    with pytest.raises(data_lib.DataError):
        data_lib.load_pixels("mnist", str(tmp_path / "data"), "train", download=True)
    assert sorted(os.listdir(tmp_path / "data")) == ["kept"]


def test_missing_files_without_download_name_what_is_expected(tmp_path):
    with pytest.raises(data_lib.DataError, match="train-images-idx3-ubyte.gz"):
        data_lib.load_pixels("mnist", str(tmp_path), "train", download=False)
    with pytest.raises(ValueError, match="unknown dataset"):
        data_lib.load_pixels("imagenet", str(tmp_path), "train")


@needs_mnist
def test_mnist_splits():
    splits = data_lib.load_splits("mnist", data_dir(), download=False)
    assert splits.train.shape == (50000, 784) and splits.valid.shape == (10000, 784)
    assert splits.test.shape == (10000, 784) and splits.train.dtype == torch.uint8
    full = data_lib.load_pixels("mnist", data_dir(), "train", download=False)
    assert torch.equal(splits.valid, full[-10000:])  # the last 10,000 training images
    assert data_lib.load_splits("mnist", data_dir(), download=False, subset=123).train.shape[0] == 123


def write_cifar10(root, images_per_batch=6):
    """CIFAR-10 in torchvision's layout (python pickles, HWC rows flattened C, H, W) with random pixels."""
    import pickle

    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder)
    generator = torch.Generator().manual_seed(0)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        pixels = torch.randint(0, 256, (images_per_batch, 3 * 32 * 32), generator=generator, dtype=torch.uint8)
        batches[name] = pixels
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump({"data": pixels.numpy(), "labels": [0] * images_per_batch}, f)
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": [str(i) for i in range(10)]}, f)
    return batches


def test_cifar10_in_torchvisions_layout(tmp_path, monkeypatch):
    import torchvision

    batches = write_cifar10(str(tmp_path))
    # torchvision checks each file's MD5 against the real dataset's; these files are synthetic.
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)
    train = data_lib.load_pixels("cifar10", str(tmp_path), "train", download=False)
    expected = torch.cat([batches[f"data_batch_{i}"] for i in range(1, 6)])
    assert train.dtype == torch.uint8 and torch.equal(train, expected)  # rows flattened C, H, W, as stored
    assert torch.equal(data_lib.load_pixels("cifar10", str(tmp_path), "test", download=False), batches["test_batch"])


def test_svhn_in_torchvisions_layout(tmp_path, monkeypatch):
    scipy_io = pytest.importorskip("scipy.io")
    import torchvision

    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    # SVHN's .mat files hold X as (H, W, C, N) and labels 1..10.
    scipy_io.savemat(str(tmp_path / "test_32x32.mat"),
                     {"X": images.permute(2, 3, 1, 0).numpy(), "y": torch.ones(5, 1, dtype=torch.uint8).numpy()})
    monkeypatch.setattr(torchvision.datasets.svhn, "check_integrity", lambda *args, **kwargs: True)
    test = data_lib.load_pixels("svhn", str(tmp_path), "test", download=False)
    assert test.dtype == torch.uint8 and torch.equal(test, images.reshape(5, -1))


def test_missing_rgb_datasets_name_what_is_expected(tmp_path):
    with pytest.raises(data_lib.DataError, match="cifar-10-batches-py"):
        data_lib.load_pixels("cifar10", str(tmp_path), "train", download=False)
    with pytest.raises(data_lib.DataError, match="train_32x32.mat|needs scipy"):
        data_lib.load_pixels("svhn", str(tmp_path), "train", download=False)


def test_images_dataset_reads_ones_own_image_files(tmp_path):
    """DIR/train/ and DIR/test/ of image files (subfolders too, other files passed over), read in the order
    of their paths, rows flattened C, H, W as the other datasets'; a fixed random sixth of train/ validates."""
    generator = torch.Generator().manual_seed(0)
    rgb = torch.randint(0, 256, (14, 3, 5, 4), generator=generator, dtype=torch.uint8)
    write_images(str(tmp_path / "train" / "b_class"), rgb[6:12])  # read after a_class: the paths' order
    write_images(str(tmp_path / "train" / "a_class"), rgb[:6], ext=".bmp")  # any format the image library reads
    write_images(str(tmp_path / "test"), rgb[12:])
    (tmp_path / "train" / "labels.csv").write_text("not an image\n")
    (tmp_path / "train" / ".DS_Store").write_bytes(b"\0\1")
    splits = data_lib.load_splits("images", str(tmp_path))
    assert splits.info == data_lib.DatasetInfo("images", (3, 5, 4), (0.0, 1.0), False)
    files = rgb[:12].reshape(12, -1)
    assert torch.equal(data_lib.load_pixels("images", str(tmp_path), "train"), files)
    once = files[torch.randperm(12, generator=torch.Generator().manual_seed(0))]  # the same order on every run
    assert torch.equal(splits.train, once[:10]) and torch.equal(splits.valid, once[10:])
    assert torch.equal(splits.test, rgb[12:].reshape(2, -1))
    assert torch.equal(data_lib.load_pixels("images", str(tmp_path), "test", image_shape=(3, 5, 4)), splits.test)
    assert splits.digest == data_lib.load_splits("images", str(tmp_path), subset=3).digest  # the files, not --subset
    gray = torch.randint(0, 256, (7, 1, 2, 3), generator=generator, dtype=torch.uint8)
    write_images(str(tmp_path / "gray" / "train"), gray[:6])
    write_images(str(tmp_path / "gray" / "test"), gray[6:])
    splits = data_lib.load_splits("images", str(tmp_path / "gray"))
    assert splits.info.image_shape == (1, 2, 3) and splits.valid.shape == (1, 6) and splits.train.shape == (5, 6)
    assert splits.digest != data_lib.load_splits("images", str(tmp_path)).digest
    assert data_lib.validation_size("images", 600_000) == 10_000 and data_lib.validation_size("mnist", 60) == 10_000
    # one folder per class, read one after the other: every class validates, not the last one alone
    for label in range(3):
        write_images(str(tmp_path / "classes" / "train" / f"class{label}"),
                     torch.full((60, 1, 2, 2), label, dtype=torch.uint8))
    write_images(str(tmp_path / "classes" / "test"), torch.zeros(1, 1, 2, 2, dtype=torch.uint8))
    valid = data_lib.load_splits("images", str(tmp_path / "classes")).valid
    assert valid.shape == (30, 4) and all(5 <= int((valid[:, 0] == label).sum()) <= 15 for label in range(3))


def test_images_dataset_names_what_it_cannot_read(tmp_path):
    from PIL import Image

    def refused(message, **kwargs):
        with pytest.raises(data_lib.DataError, match=message):
            data_lib.load_splits("images", str(tmp_path), **kwargs)

    refused(r"images: no folder .*train/ \(the images dataset reads DIR/train/ and DIR/test/ of --data-dir DIR\)")
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "notes.txt").write_text("")
    refused(r"images: no image files in .*train/")
    write_images(str(tmp_path / "train"), torch.zeros(5, 1, 4, 4, dtype=torch.uint8))
    write_images(str(tmp_path / "test"), torch.zeros(1, 1, 4, 4, dtype=torch.uint8))
    refused("images: only 5 training images, need at least 6 \\(a sixth validate\\)")
    write_images(str(tmp_path / "train"), torch.zeros(1, 1, 4, 4, dtype=torch.uint8), prefix="more")
    assert data_lib.load_splits("images", str(tmp_path)).train.shape == (5, 16)
    refused(r"img0000.png: a 1x4x4 image \(channels x height x width\), not 3x4x4 as the model's",
            image_shape=(3, 4, 4))
    Image.new("L", (5, 4)).save(tmp_path / "test" / "wide.png")
    refused(r"wide.png: a 1x4x5 image \(channels x height x width\), not 1x4x4 as the training images'")
    os.remove(tmp_path / "test" / "wide.png")
    Image.new("RGBA", (4, 4)).save(tmp_path / "train" / "zz.png")
    refused(r"zz.png: an image of mode RGBA; the images dataset takes 8-bit grayscale \(L\) or RGB images")
    (tmp_path / "train" / "zz.png").write_bytes(b"not a png")
    refused(r"zz.png: cannot be read as an image")
    os.remove(tmp_path / "train" / "zz.png")
    Image.new("L", (4, 5)).save(tmp_path / "train" / "tall.png")
    refused(r"tall.png: a 1x5x4 image \(channels x height x width\), not 1x4x4 as the first image's \(.*img0000.png\)")
    with pytest.raises(ValueError, match=r"the images dataset has the image shape of its files"):
        data_lib.dataset_info("images")
    with pytest.raises(ValueError, match=r"mnist's images are \(1, 28, 28\) \(C, H, W\), not \(3, 28, 28\)"):
        data_lib.dataset_info("mnist", (3, 28, 28))
