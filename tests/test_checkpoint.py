"""nice_ext.save_model: a model trained in a loop of one's own, written so that load_model and the tools read it
(with the images --dataset names where it was saved without its dataset)."""
import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import DEVICES, data_dir, write_images
import nice_ext
from nice_ext import NICE, data as data_lib, evaluate, inpaint, sample, train
from nice_ext.checkpoint import load_checkpoint
from nice_ext.cli_common import run_tool


def trained_a_little(model: NICE) -> NICE:
    """Weights away from their initial values (the last layers start at zero), as training leaves them."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype)
                           .to(parameter.device))
    return model


MODELS = {
    "additive-odd-even": dict(data_dim=12, num_coupling_layers=3, num_hidden_layers=2, hidden_dim=16),
    "affine-checkerboard-gaussian": dict(data_dim=2 * 3 * 4, num_coupling_layers=4, num_hidden_layers=1,
                                         hidden_dim=8, coupling="affine", mask="checkerboard",
                                         image_shape=(2, 3, 4), prior="gaussian", data_range=(-1.0, 1.0)),
    "unbounded-affine-own-mask": dict(data_dim=7, num_coupling_layers=2, num_hidden_layers=0, hidden_dim=4,
                                      coupling="affine", affine_log_scale="unbounded",
                                      mask=torch.tensor([1, 1, 0, 0, 0, 1, 0], dtype=torch.bool)),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("kind", list(MODELS))
def test_load_model_gives_back_a_saved_model(kind, dtype, device, tmp_path):
    model = trained_a_little(NICE(**MODELS[kind]).to(device, dtype))
    path = str(tmp_path / "model.pt")
    nice_ext.save_model(model, path)
    loaded = nice_ext.load_model(path)  # on the CPU, whatever device the model was saved from
    assert loaded.config == model.config and not loaded.training and loaded.log_scale.device.type == "cpu"
    assert loaded.log_scale.dtype == dtype  # float64 weights are not rounded to float32
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value.cpu()), name
    x = torch.rand(5, model.data_dim, generator=torch.Generator().manual_seed(0), dtype=dtype) * 2 - 1
    assert torch.equal(loaded.log_prob(x), model.cpu().log_prob(x))
    z, _ = model(x)
    assert torch.equal(loaded.inverse(z), model.inverse(z))


def test_save_model_unwraps_a_compiled_model_and_replaces_an_earlier_file(tmp_path):
    model = trained_a_little(NICE(6, num_coupling_layers=2, num_hidden_layers=1, hidden_dim=8))
    path = str(tmp_path / "model.pt")
    nice_ext.save_model(torch.compile(model), path)
    assert torch.equal(nice_ext.load_model(path).log_scale, model.log_scale)
    with torch.no_grad():
        model.log_scale.add_(1.0)
    nice_ext.save_model(model, path)  # a later save replaces the file
    assert torch.equal(nice_ext.load_model(path).log_scale, model.log_scale)
    assert sorted(os.listdir(tmp_path)) == ["model.pt"]  # no temporary file left behind


def test_save_model_refuses_what_it_cannot_write_faithfully_and_writes_nothing(tmp_path):
    model = trained_a_little(NICE(784, num_coupling_layers=2, num_hidden_layers=1, hidden_dim=8))
    path = tmp_path / "model.pt"
    nice_ext.save_model(model, str(path))
    before = path.read_bytes()
    cifar = data_lib.Preprocess(data_lib.dataset_info("cifar10"))
    for call, error, message in (
            (lambda: nice_ext.save_model(model.state_dict(), str(path)), TypeError,
             r"model must be a nice_ext.NICE, got OrderedDict \(a state dict\? pass the model itself\)"),
            (lambda: nice_ext.save_model(model, str(path), dataset="imagenet"), ValueError, "unknown dataset 'imagenet'"),
            (lambda: nice_ext.save_model(model, str(path), dataset="cifar10"), ValueError,
             "the model does not fit cifar10: model has 784 features, cifar10 has 3072"),
            (lambda: nice_ext.save_model(model, str(path), preprocess=cifar), ValueError, "pass dataset= as well"),
            (lambda: nice_ext.save_model(model, str(path), dataset="mnist", preprocess=cifar), ValueError,
             "preprocess is not mnist's"),
            (lambda: nice_ext.save_model(model, str(path), dataset="mnist", preprocess="zca"), TypeError,
             "preprocess must be a nice_ext.data.Preprocess, got str")):
        with pytest.raises(error, match=message):
            call()
    with torch.no_grad():
        model.layers[1].net[0].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or infinite values in layers\.1\.net\.0\.weight: load_model would "
                                         r"refuse it"):
        nice_ext.save_model(model, str(path))
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["model.pt"]


def test_save_model_to_a_folder_names_the_folder_and_writes_nothing(tmp_path):
    model = NICE(6, num_coupling_layers=2, num_hidden_layers=1, hidden_dim=8)
    folder = tmp_path / "models"
    folder.mkdir()
    with pytest.raises(IsADirectoryError, match=r"is a folder: name a file to write: '.*models'$"):
        nice_ext.save_model(model, str(folder))
    assert os.listdir(folder) == [] and sorted(os.listdir(tmp_path)) == ["models"]  # no temporary file either


def test_a_whitened_dataset_needs_its_fitted_preprocessing(tmp_path, capsys):
    model = NICE(3072, num_coupling_layers=2, num_hidden_layers=0, hidden_dim=4, image_shape=(3, 32, 32),
                 data_range=(-1.0, 1.0))
    path = str(tmp_path / "cifar.pt")
    preprocess = data_lib.Preprocess(data_lib.dataset_info("cifar10"))
    with pytest.raises(ValueError, match="cifar10 is whitened: pass the fitted data.Preprocess"):
        nice_ext.save_model(model, path, dataset="cifar10")
    with pytest.raises(ValueError, match="preprocess has not been fitted"):
        nice_ext.save_model(model, path, dataset="cifar10", preprocess=preprocess)
    pixels = torch.randint(0, 256, (4000, 3072), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    preprocess.fit(pixels, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=re.escape("the model does not fit svhn: model's data range is (-1.0, 1.0), "
                                                   "svhn's is (0.0, 1.0)")):
        nice_ext.save_model(model, path, dataset="svhn", preprocess=preprocess)
    svhn_model = NICE(3072, num_coupling_layers=2, num_hidden_layers=0, hidden_dim=4, image_shape=(3, 32, 32))
    with pytest.raises(ValueError, match=re.escape("preprocess dequantizes to (-1.0, 1.0), svhn to (0.0, 1.0)")):
        nice_ext.save_model(svhn_model, path, dataset="svhn", preprocess=preprocess)  # cifar10's whitening
    nice_ext.save_model(model, path, dataset="cifar10", preprocess=preprocess)
    stored = load_checkpoint(path)
    assert stored["dataset"] == "cifar10"
    assert torch.equal(stored["preprocess_state"]["zca.matrix"], preprocess.zca.matrix)
    # without its whitening, the tools cannot read a whitened dataset for it
    nice_ext.save_model(model, str(tmp_path / "bare.pt"))
    assert run_tool(evaluate.main, [str(tmp_path / "bare.pt"), "--dataset", "cifar10", "--device", "cpu"]) == 2
    assert capsys.readouterr().err == (f"error: --dataset cifar10 is whitened, and {tmp_path / 'bare.pt'} holds no "
                                       f"whitening fitted to it (its model was trained on a dataset it does not "
                                       f"name)\n")


def test_other_images_are_scored_through_the_models_own_preprocessing(tmp_path, monkeypatch, capsys):
    """A model scores another dataset's pixels as it scores its own: dequantized to its data range and
    through the whitening fitted to its training images. (An SVHN model on one's own 32x32 RGB images had
    been scored without its whitening; on CIFAR-10, refused for CIFAR-10's range; and a model of unwhitened
    images, refused on SVHN for having no whitening fitted to it.)"""
    pixels = {split: torch.randint(0, 256, (n, 3 * 32 * 32), dtype=torch.uint8,
                                   generator=torch.Generator().manual_seed(n))
              for split, n in (("train", data_lib.VALIDATION_SIZE + 10), ("test", 40))}
    monkeypatch.setattr(data_lib, "load_pixels", lambda name, data_dir, split, download=True, image_shape=None:
                        pixels[split])  # CIFAR-10 and SVHN, here
    write_images(tmp_path / "own" / "train", pixels["train"][:12].view(-1, 3, 32, 32))
    write_images(tmp_path / "own" / "test", pixels["test"].view(-1, 3, 32, 32))
    svhn = data_lib.Preprocess(data_lib.dataset_info("svhn")).fit(pixels["train"][:300],
                                                                              torch.Generator().manual_seed(0))
    plain = data_lib.Preprocess(data_lib.dataset_info("images", (3, 32, 32)))
    model = trained_a_little(NICE(3072, num_coupling_layers=2, num_hidden_layers=0, hidden_dim=4,
                                  image_shape=(3, 32, 32))).eval()
    nice_ext.save_model(model, str(tmp_path / "svhn.pt"), dataset="svhn", preprocess=svhn)
    nice_ext.save_model(model, str(tmp_path / "own.pt"), dataset="images")
    whitened_own = data_lib.Preprocess(data_lib.dataset_info("images", (3, 32, 32), whiten=True)).fit(
        pixels["train"][:300], torch.Generator().manual_seed(1))  # one's own images, whitened (train --whiten)
    nice_ext.save_model(model, str(tmp_path / "own-whitened.pt"), dataset="images", preprocess=whitened_own)
    for checkpoint, dataset, preprocess in (("svhn.pt", "images", svhn), ("svhn.pt", "cifar10", svhn),
                                            ("own.pt", "svhn", plain), ("own-whitened.pt", "images", whitened_own),
                                            ("own-whitened.pt", "svhn", whitened_own)):
        scores = tmp_path / f"{checkpoint}-{dataset}.npy"
        assert run_tool(evaluate.main, [str(tmp_path / checkpoint), "--dataset", dataset, "--data-dir",
                                        str(tmp_path / "own"), "--draws", "1", "--device", "cpu", "--scores",
                                        str(scores)]) == 0
        expected = evaluate.image_log_likelihood_draws(model, preprocess, pixels["test"], 1)[0]
        torch.testing.assert_close(torch.from_numpy(np.load(scores)), expected, rtol=0, atol=1e-6)
    whitened, unwhitened = (evaluate.image_log_likelihood_draws(model, p, pixels["test"], 1)[0] for p in (svhn, plain))
    assert (whitened - unwhitened).abs().min() > 100  # the whitening is no detail
    assert run_tool(inpaint.main, [str(tmp_path / "svhn.pt"), "--dataset", "images", "--data-dir", str(tmp_path / "own"),
                                   "--device", "cpu", "--out", str(tmp_path / "i.png")]) == 2
    assert capsys.readouterr().err == (f"error: inpainting works in pixel space, and {tmp_path / 'svhn.pt'}'s model "
                                       f"sees whitened images (it was trained on svhn)\n")


def test_the_tools_take_a_saved_model(tmp_path, capsys):
    model = trained_a_little(NICE(784, num_coupling_layers=2, num_hidden_layers=1, hidden_dim=8,
                                  image_shape=(1, 28, 28)))
    without_data, with_data = str(tmp_path / "model.pt"), str(tmp_path / "mnist.pt")
    nice_ext.save_model(model, without_data)
    nice_ext.save_model(model, with_data, dataset="mnist")
    assert run_tool(sample.main, [without_data, "--n", "4", "--out", str(tmp_path / "s.png"), "--device", "cpu"]) == 0
    assert os.path.getsize(tmp_path / "s.png") > 0 and "note" not in capsys.readouterr().out
    # a model saved without image_shape= is drawn in its dataset's shape, or as rows of values without a dataset
    shapeless = trained_a_little(NICE(784, num_coupling_layers=2, num_hidden_layers=1, hidden_dim=8))
    flat, flat_mnist = str(tmp_path / "flat.pt"), str(tmp_path / "flat_mnist.pt")
    nice_ext.save_model(shapeless, flat)
    nice_ext.save_model(shapeless, flat_mnist, dataset="mnist")
    assert run_tool(sample.main, [flat, "--n", "4", "--out", str(tmp_path / "f.png"), "--device", "cpu"]) == 0
    assert "note: the model has no image shape: each sample is drawn as one row of its 784 values" in \
        capsys.readouterr().out
    assert run_tool(sample.main, [flat_mnist, "--n", "4", "--out", str(tmp_path / "m.png"), "--device", "cpu"]) == 0
    assert "note" not in capsys.readouterr().out
    with Image.open(tmp_path / "m.png") as grid, Image.open(tmp_path / "f.png") as rows:
        assert grid.size == (2 * 28 + 3 * 2, 2 * 28 + 3 * 2) and rows.size == (2 * 784 + 3 * 2, 2 * 1 + 3 * 2)
    for tool, args in ((evaluate, []), (inpaint, ["--out", str(tmp_path / "i.png")])):
        assert run_tool(tool.main, [without_data, "--device", "cpu", "--data-dir", str(tmp_path), *args]) == 2
        err = capsys.readouterr().err
        assert err == (f"error: {without_data} names no dataset (saved by nice_ext.save_model without dataset=): "
                       f"pass --dataset, the images to read\n")
    assert train.main(["--resume", without_data, "--device", "cpu"]) == 1
    assert "holds a model but not the state of a training run (it lacks epoch, step, optimizer_state, best_valid, " \
           "history, rng_state, dataset)" in capsys.readouterr().err
    if data_dir() is None:
        pytest.skip("the MNIST files are not available")
    info = data_lib.dataset_info("mnist")
    test_pixels = data_lib.load_pixels("mnist", data_dir(), "test", download=False)
    expected = evaluate.log_likelihood_draws(model.eval(), data_lib.Preprocess(info), test_pixels, 1)[0]
    for path, args in ((with_data, []), (without_data, ["--dataset", "mnist"])):
        json_path = str(tmp_path / "score.json")
        assert run_tool(evaluate.main, [path, "--device", "cpu", "--data-dir", data_dir(), "--no-download",
                                        "--draws", "1", "--json", json_path, *args]) == 0
        assert f"mnist test (10000 images): {expected:.2f} nats" in capsys.readouterr().out
        with open(json_path) as f:
            score = json.load(f)
        assert (score["dataset"], score["trained_on"], score["epoch"]) == ("mnist", "mnist" if not args else None, None)
        assert run_tool(inpaint.main, [path, "--device", "cpu", "--data-dir", data_dir(), "--no-download",
                                       "--n", "2", "--steps", "1", "--out", str(tmp_path / "i.png"), *args]) == 0
    assert run_tool(inpaint.main, [flat_mnist, "--device", "cpu", "--data-dir", data_dir(), "--no-download",
                                   "--n", "2", "--steps", "1", "--out", str(tmp_path / "i.png")]) == 0
    rows = 3 * len(inpaint.MASK_NAMES)
    with Image.open(tmp_path / "i.png") as grid:  # 3 rows per mask (originals, masked, filled) of 2 images of 28 x 28
        assert grid.size == (2 * 28 + 3 * 2, rows * 28 + (rows + 1) * 2)


def test_a_model_of_ones_own_images_is_saved_with_its_image_shape(tmp_path, capsys):
    """dataset="images": the tools read DIR/test/ of --data-dir DIR in the model's image shape."""
    from conftest import write_images

    images = torch.randint(0, 256, (8, 3, 2, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    write_images(str(tmp_path / "own" / "train"), images[:6])
    write_images(str(tmp_path / "own" / "test"), images[6:])
    shapeless = NICE(18, num_coupling_layers=2, num_hidden_layers=1, hidden_dim=8)
    with pytest.raises(ValueError, match=r"the images dataset's files must have the model's image shape, and this "
                                         r"model has none \(NICE\(..., image_shape=\(C, H, W\)\)\)"):
        nice_ext.save_model(shapeless, str(tmp_path / "m.pt"), dataset="images")
    nice_ext.save_model(shapeless, str(tmp_path / "shapeless.pt"))  # saved without a dataset, it is refused later
    assert run_tool(evaluate.main, [str(tmp_path / "shapeless.pt"), "--dataset", "images", "--data-dir",
                                    str(tmp_path / "own"), "--device", "cpu"]) == 2
    assert "--dataset images: the images dataset's files must have the model's image shape" in capsys.readouterr().err
    model = trained_a_little(NICE(18, num_coupling_layers=2, num_hidden_layers=1, hidden_dim=8, image_shape=(3, 2, 3)))
    path = str(tmp_path / "own.pt")
    nice_ext.save_model(model, path, dataset="images")
    assert run_tool(evaluate.main, [path, "--data-dir", str(tmp_path / "own"), "--device", "cpu", "--draws", "1"]) == 0
    info = data_lib.dataset_info("images", (3, 2, 3))
    expected = evaluate.log_likelihood_draws(model, data_lib.Preprocess(info), images[6:].reshape(2, -1), 1)[0]
    assert f"images test (2 images): {expected:.2f} nats" in capsys.readouterr().out
