"""The command-line tools end to end on real MNIST with a tiny model: outputs, learning, resume, errors."""
import csv
import errno
import functools
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch

from conftest import ROOT, data_dir, make_first_epoch_unbeatable, signal_mid_run, write_images
import nice_ext
from nice_ext import data as data_lib
from nice_ext import evaluate, inpaint, sample, train
from nice_ext.checkpoint import load_checkpoint
from nice_ext.cli_common import ClosedPipeGuard
from nice_ext.cli_common import run_tool as run_in_process

pytestmark = pytest.mark.skipif(data_dir() is None, reason="the MNIST files are not available")
TINY = ["--subset", "1000", "--mid-dim", "24", "--hidden", "1", "--batch_size", "100", "--sample_size", "4",
        "--eval-draws", "1", "--device", "cpu", "--no-download", "--lr", "3e-3"]


def run_tool(module, *args):
    return subprocess.run([sys.executable, "-m", f"nice_ext.{module}", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


def errors(result):
    """stderr without the lines torch prints on import on a machine with a CUDA build but no GPU."""
    return [line for line in result.stderr.splitlines() if line.strip() and "No CUDA runtime is found" not in line]


def metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.csv")) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run"))
    result = run_tool("train", "--data-dir", data_dir(), "--out-dir", out, "--epochs", "3", *TINY)
    assert result.returncode == 0, result.stderr
    return out, result.stdout


def test_train_writes_everything_and_learns(trained):
    out, stdout = trained
    for name in ("last.pt", "best.pt", "samples.png", "metrics.csv", "curve.png", "spectrum.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    rows = metrics(out)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert set(rows[0]) == {"epoch", "step", "train_ll_nats", "train_bits_per_dim", "valid_ll_nats",
                            "valid_bits_per_dim", "seconds", "lr"}
    assert float(rows[-1]["valid_ll_nats"]) > float(rows[0]["valid_ll_nats"]) + 5
    assert "nats" in stdout and "bits/dim" in stdout
    # result.json records the printed test score with where it came from
    with open(os.path.join(out, "result.json")) as f:
        result = json.load(f)
    printed = re.search(r"test log-likelihood of best.pt \(epoch (\d+)\): (-?[\d.]+) nats, ([\d.]+) bits/dim", stdout)
    assert printed, stdout
    assert result["best_epoch"] == int(printed.group(1)) and result["epochs"] == 3 and result["status"] == "complete"
    assert abs(result["test_ll_nats"] - float(printed.group(2))) < 0.01
    assert abs(result["bits_per_dim"] - float(printed.group(3))) < 1e-4
    assert result["draws"] == 1 and result["dataset"] == "mnist" and result["device"].startswith("CPU")
    assert result["command"].startswith("python -m nice_ext.train --data-dir") and "--epochs 3" in result["command"]
    for key in ("torch", "commit", "date", "wall_seconds", "precision"):
        assert result[key], key


def test_eval_batch_size_changes_the_batches_not_the_scores_on_the_cpu(trained, tmp_path, monkeypatch):
    """--eval-batch-size 7 (batches that do not divide the validation set) scores epoch 1 as the default
    batches of 1000 do: on the CPU the noise of a set is one stream whatever its batches, and each image's
    score depends on its own pixels alone. Validation and the test score both take it."""
    batch_sizes = []
    score = evaluate.image_log_likelihoods

    def spy(model, preprocess, pixels, batch_size, generator=None):
        batch_sizes.append(batch_size)
        return score(model, preprocess, pixels, batch_size, generator)

    monkeypatch.setattr(evaluate, "image_log_likelihoods", spy)
    out = str(tmp_path / "run")
    args = ["--data-dir", data_dir(), "--out-dir", out, "--epochs", "1", "--eval-batch-size", "7", *TINY]
    assert run_in_process(train.main, args) == 0
    assert batch_sizes == [7, 7]  # epoch 1's validation, the final test score's one draw
    default_epoch_1 = metrics(trained[0])[0]
    assert abs(float(metrics(out)[0]["valid_ll_nats"]) - float(default_epoch_1["valid_ll_nats"])) < 0.01


def test_time_limit_stops_cleanly_and_says_so(tmp_path):
    out = str(tmp_path / "run")
    result = run_tool("train", "--data-dir", data_dir(), "--out-dir", out, "--epochs", "500", "--time-limit", "1",
                      *TINY)
    assert result.returncode == 0, result.stderr
    assert "stopped: --time-limit 1 s reached" in result.stdout and "test log-likelihood" in result.stdout
    with open(os.path.join(out, "result.json")) as f:
        written = json.load(f)
    assert written["epochs"] < 500 and written["steps"] >= 1 and written["wall_seconds"] < 60  # 1 s + one step
    assert written["status"].startswith(f"partial: --time-limit 1 s reached after {written['epochs']} of 500 epochs")
    last = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    assert last["epoch"] == written["epochs"] and last["step"] == written["steps"]
    place = last["epoch_in_progress"]  # where in the next epoch it stopped, if inside one
    assert place is None or (place["epoch"] == last["epoch"] + 1 and 0 < place["batches_done"] < 10 and
                             f"and {place['batches_done']} of 10 batches of epoch {place['epoch']}" in written["status"])


def test_evaluate_sample_inpaint(trained, tmp_path):
    out, _ = trained
    best = os.path.join(out, "best.pt")
    result = run_tool("evaluate", best, "--data-dir", data_dir(), "--draws", "2", "--device", "cpu", "--no-download")
    assert result.returncode == 0 and "nats" in result.stdout and "bits/dim" in result.stdout, result.stderr
    with open(os.path.join(out, "result.json")) as f:  # its first draw is the one the run's test score took
        trained_score = json.load(f)["test_ll_nats"]
    score_file = tmp_path / "scores" / "best.json"  # its folder is made
    result = run_tool("evaluate", best, "--data-dir", data_dir(), "--draws", "1", "--device", "cpu", "--no-download",
                      "--json", str(score_file))
    printed = re.search(r"mnist test \(10000 images\): (-?[\d.]+) nats, ([\d.]+) bits/dim \(1 "
                        r"dequantization draw\)", result.stdout)
    assert printed and abs(float(printed.group(1)) - trained_score) < 0.006, (trained_score, result.stdout)
    with open(score_file) as f:  # the same score, machine-readable, with where it comes from
        score = json.load(f)
    assert f"{score['ll_nats']:.2f}" == printed.group(1) and f"{score['bits_per_dim']:.4f}" == printed.group(2)
    assert score["draw_ll_nats"] == [pytest.approx(score["ll_nats"], abs=1e-4)] and score["draws"] == 1
    assert (score["checkpoint"], score["dataset"], score["split"], score["images"], score["seed"]) == \
        (best, "mnist", "test", 10000, evaluate.DRAW_SEED)
    assert score["epoch"] == load_checkpoint(best)["epoch"] and score["device"].startswith("CPU")
    assert score["command"].startswith("python -m nice_ext.evaluate ") and score["commit"] and score["date"]
    result = run_tool("sample", best, "--n", "9", "--out", str(tmp_path / "s.png"), "--device", "cpu")
    assert result.returncode == 0 and os.path.getsize(tmp_path / "s.png") > 0, result.stderr
    result = run_tool("sample", best, "--n", "9", "--out", str(tmp_path / "s.npy"), "--device", "cpu", "--seed", "3")
    assert result.returncode == 0 and "(uint8 pixels, 9 x 1 x 28 x 28)" in result.stdout, result.stderr
    pixels = np.load(tmp_path / "s.npy")
    model = nice_ext.load_model(best)
    torch.manual_seed(3)  # the tool's draws, quantized by hand: the 8-bit levels whose bins hold them
    drawn = model.sample(9).double()
    assert pixels.dtype == np.uint8 and np.array_equal(
        pixels, torch.floor(drawn * 256).clamp(0, 255).to(torch.uint8).view(9, 1, 28, 28).numpy())
    result = run_tool("inpaint", best, "--data-dir", data_dir(), "--out", str(tmp_path / "i.png"), "--n", "2",
                      "--steps", "5", "--device", "cpu", "--no-download")
    assert result.returncode == 0 and os.path.getsize(tmp_path / "i.png") > 0, result.stderr
    errors = re.findall(r"([\w-]+) ([\d.]+) \(grey ([\d.]+)\)", result.stdout.splitlines()[-1])
    assert [name for name, _, _ in errors] == list(inpaint.MASK_NAMES), result.stdout
    assert all(0 < float(filled) < 256 and 0 < float(grey) < 256 for _, filled, grey in errors), errors
    result = run_tool("inpaint", best, "--data-dir", data_dir(), "--out", str(tmp_path / "all.png"), "--n", "10001",
                      "--device", "cpu", "--no-download")  # not all 10000 in a grid 10001 wide
    assert result.returncode == 2 and "--n 10001 is more than the 10000 test images of mnist" in result.stderr
    assert not os.path.exists(tmp_path / "all.png")


def test_evaluate_and_inpaint_read_another_datasets_images_with_dataset(trained, tmp_path, capsys):
    """--dataset: images the model never saw, of its size and range (Fashion-MNIST for an MNIST model)."""
    best = os.path.join(trained[0], "best.pt")
    data = ["--device", "cpu", "--data-dir", data_dir(), "--no-download"]
    assert run_in_process(evaluate.main, [best, "--dataset", "fashion-mnist", "--draws", "1", *data]) == 0
    fashion = data_lib.load_pixels("fashion-mnist", data_dir(), "test", download=False)
    expected = evaluate.log_likelihood_draws(nice_ext.load_model(best), data_lib.Preprocess(
        data_lib.dataset_info("fashion-mnist")), fashion, 1)[0]
    assert f"fashion-mnist test (10000 images): {expected:.2f} nats" in capsys.readouterr().out
    with open(os.path.join(trained[0], "result.json")) as f:
        assert expected < json.load(f)["test_ll_nats"] - 5  # less likely than the digits it learned
    assert run_in_process(inpaint.main, [best, "--dataset", "fashion-mnist", "--n", "2", "--steps", "1", "--out",
                                         str(tmp_path / "i.png"), *data]) == 0
    assert run_in_process(evaluate.main, [best, "--dataset", "cifar10", *data]) == 2
    assert capsys.readouterr().err == "error: --dataset cifar10: model has 784 features, cifar10 has 3072\n"


def test_evaluate_scores_writes_each_images_log_likelihood(trained, tmp_path, capsys):
    """--scores: each image's log-likelihood, the mean over the draws, in the split's order (.npy and .csv)."""
    best = os.path.join(trained[0], "best.pt")
    data = ["--device", "cpu", "--data-dir", data_dir(), "--no-download", "--split", "valid", "--draws", "2"]
    npy, table = str(tmp_path / "scores.npy"), str(tmp_path / "out" / "scores.csv")  # its folder is made
    assert run_in_process(evaluate.main, [best, "--scores", npy, *data]) == 0
    printed = float(re.search(r"\): (-?[\d.]+) nats", capsys.readouterr().out).group(1))
    scores = np.load(npy)
    model, info = nice_ext.load_model(best), data_lib.dataset_info("mnist")
    valid = data_lib.load_splits("mnist", data_dir(), download=False).valid
    assert scores.dtype == np.float64 and scores.shape == (valid.shape[0],)
    assert f"{scores.mean():.2f}" == f"{printed:.2f}"
    per_draw = evaluate.image_log_likelihood_draws(model, data_lib.Preprocess(info), valid, 2)
    for k in (0, 1):  # draw k: the model's log_prob of the images dequantized with seed DRAW_SEED + k
        generator = torch.Generator().manual_seed(evaluate.DRAW_SEED + k)
        draw = torch.cat([model.log_prob(data_lib.Preprocess(info)(batch, generator)).double()
                          for batch in valid.split(1000)])
        assert torch.allclose(draw, per_draw[k], rtol=0, atol=1e-9)
    assert np.allclose(scores, per_draw.mean(0).numpy(), rtol=0, atol=1e-9) and scores.std() > 1  # images differ
    assert run_in_process(evaluate.main, [best, "--scores", table, *data]) == 0
    with open(table) as f:
        rows = list(csv.DictReader(f))
    assert [int(r["index"]) for r in rows] == list(range(len(scores)))
    assert np.allclose([float(r["ll_nats"]) for r in rows], scores, rtol=0, atol=1e-6)
    assert np.allclose([float(r["bits_per_dim"]) for r in rows],
                       [data_lib.bits_per_dim(s, 784, (0.0, 1.0)) for s in scores], rtol=0, atol=1e-6)
    assert run_in_process(evaluate.main, [best, "--scores", str(tmp_path / "scores.txt"), *data]) == 2
    assert "--scores " + str(tmp_path / "scores.txt") + ": not a .npy or .csv file name (use .npy, .csv)" in \
        capsys.readouterr().err and not os.path.exists(tmp_path / "scores.txt")


def mnist_as_image_files(folder, train_images, test_images):
    """The first MNIST training and test images as PNG files, in the images dataset's layout."""
    for split, count in (("train", train_images), ("test", test_images)):
        pixels = data_lib.load_pixels("mnist", data_dir(), split, download=False)[:count]
        write_images(os.path.join(folder, split), pixels.reshape(-1, 1, 28, 28))
    return str(folder)


def test_ones_own_images_train_resume_and_every_tool_reads_them(trained, tmp_path, capsys):
    """--dataset images: a folder of one's own image files (here MNIST's first images, as PNG files) is
    trained on, resumed, scored, sampled and inpainted as the named datasets are."""
    own = mnist_as_image_files(tmp_path / "own", 600, 50)
    out = str(tmp_path / "run")
    assert train.main(["--dataset", "images", "--data-dir", own, "--out-dir", out, "--epochs", "2", *TINY]) == 0
    assert "note: --subset 1000 is more than the 500 training images of images" in capsys.readouterr().out
    valid = [float(r["valid_ll_nats"]) for r in metrics(out)]
    assert len(valid) == 2 and valid[1] > valid[0]  # it learns; 100 of the 600 validate
    best = os.path.join(out, "best.pt")
    model = nice_ext.load_model(best)
    assert model.image_shape == (1, 28, 28) and load_checkpoint(best)["dataset"] == "images"
    # The files hold MNIST's pixels, in their order: the images dataset's scores are MNIST's first 50 test scores
    data = ["--device", "cpu", "--draws", "2", "--no-download"]
    assert run_in_process(evaluate.main, [best, "--data-dir", own, "--scores", str(tmp_path / "own.npy"), *data]) == 0
    assert "images test (50 images): " in capsys.readouterr().out
    assert run_in_process(evaluate.main, [best, "--data-dir", data_dir(), "--dataset", "mnist", "--scores",
                                          str(tmp_path / "mnist.npy"), *data]) == 0
    assert np.allclose(np.load(tmp_path / "own.npy"), np.load(tmp_path / "mnist.npy")[:50], rtol=0, atol=1e-9)
    for tool, args in ((sample.main, [best, "--out", str(tmp_path / "s.png")]),
                       (inpaint.main, [best, "--data-dir", own, "--n", "2", "--steps", "2", "--out",
                                       str(tmp_path / "i.png")])):
        assert run_in_process(tool, [*args, "--device", "cpu"]) == 0
    other = mnist_as_image_files(tmp_path / "other", 601, 50)  # one image more: not the images the run trained on
    assert train.main(["--resume", os.path.join(out, "last.pt"), "--epochs", "3", "--data-dir", other]) == 2
    assert f"--data-dir {other}: its images (train/ and test/) are not those {out}/last.pt was trained on" in \
        capsys.readouterr().err
    assert train.main(["--resume", os.path.join(out, "last.pt"), "--epochs", "3", "--data-dir", own]) == 0
    assert [r["epoch"] for r in metrics(out)] == ["1", "2", "3"]
    # A model trained on MNIST scores one's own images of its size; images of another size are refused.
    mnist_best = os.path.join(trained[0], "best.pt")
    capsys.readouterr()
    assert run_in_process(evaluate.main, [mnist_best, "--dataset", "images", "--data-dir", own, *data]) == 0
    assert "images test (50 images): " in capsys.readouterr().out
    shutil.rmtree(os.path.join(own, "train"))  # the test images alone are scored: DIR/test/ is enough
    assert run_in_process(evaluate.main, [mnist_best, "--dataset", "images", "--data-dir", own, *data]) == 0
    assert "images test (50 images): " in capsys.readouterr().out
    assert run_in_process(evaluate.main, [mnist_best, "--dataset", "images", "--data-dir", own, "--split", "valid",
                                          *data]) == 1
    assert f"images: no folder {own}/train/" in capsys.readouterr().err
    write_images(str(tmp_path / "rgb" / "train"), torch.zeros(6, 3, 28, 28, dtype=torch.uint8))
    write_images(str(tmp_path / "rgb" / "test"), torch.zeros(1, 3, 28, 28, dtype=torch.uint8))
    assert run_in_process(evaluate.main, [mnist_best, "--dataset", "images", "--data-dir", str(tmp_path / "rgb"),
                                          *data]) == 1
    assert "img0000.png: a 3x28x28 image (channels x height x width), not 1x28x28 as the model's" in \
        capsys.readouterr().err


def test_ones_own_images_whitened_train_resume_and_score_in_pixel_space(tmp_path, capsys):
    """--whiten: one's own images ZCA-whitened as the paper whitens CIFAR-10 and SVHN. The whitening is
    fitted on the training split, kept in the checkpoints, taken by evaluate (which repeats the run's test
    score), by sample (which undoes it) and by a resume (which cannot drop it), and refused elsewhere."""
    own = mnist_as_image_files(tmp_path / "own", 600, 50)
    out = str(tmp_path / "run")
    assert train.main(["--dataset", "images", "--whiten", "--data-dir", own, "--out-dir", out, "--epochs", "1",
                       *TINY]) == 0
    best = os.path.join(out, "best.pt")
    state = load_checkpoint(best)["preprocess_state"]
    splits = data_lib.load_splits("images", own)
    expected = data_lib.Preprocess(data_lib.dataset_info("images", (1, 28, 28), whiten=True))
    expected.fit(splits.train, torch.Generator().manual_seed(0))  # the run's --seed 0
    assert torch.equal(state["zca.matrix"], expected.zca.matrix) and float(state["zca.log_det"]) > 1000
    with open(os.path.join(out, "result.json")) as f:
        run_score = json.load(f)["test_ll_nats"]
    assert run_in_process(evaluate.main, [best, "--data-dir", own, "--draws", "1", "--json", str(tmp_path / "s.json"),
                                          "--device", "cpu"]) == 0
    with open(tmp_path / "s.json") as f:
        assert json.load(f)["ll_nats"] == pytest.approx(run_score, abs=0.006)  # with log|det W|, as training
    assert run_in_process(sample.main, [best, "--out", str(tmp_path / "s.png"), "--device", "cpu"]) == 0
    assert train.main(["--resume", os.path.join(out, "last.pt"), "--epochs", "2", "--data-dir", own]) == 0
    assert torch.equal(load_checkpoint(os.path.join(out, "last.pt"))["preprocess_state"]["zca.matrix"],
                       state["zca.matrix"])
    capsys.readouterr()
    plain = str(tmp_path / "plain")
    assert train.main(["--dataset", "images", "--data-dir", own, "--out-dir", plain, "--epochs", "1", *TINY]) == 0
    assert "zca.matrix" not in load_checkpoint(os.path.join(plain, "last.pt"))["preprocess_state"]
    assert train.main(["--resume", os.path.join(plain, "last.pt"), "--whiten", "--epochs", "2"]) == 2
    assert (f"--whiten: {plain}/last.pt was trained on images that were not whitened; a resumed run keeps its "
            f"preprocessing") in capsys.readouterr().err
    assert train.main(["--dataset", "mnist", "--whiten", "--data-dir", data_dir(), "--out-dir",
                       str(tmp_path / "m"), *TINY]) == 2
    assert "--whiten is for --dataset images; mnist is not whitened, as in the paper" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "m")


def test_the_score_line_says_how_many_draws_it_averages():
    assert evaluate.summary([-1000.0, -1002.0], 784, (0.0, 1.0)) == \
        "-1001.00 nats, 9.8420 bits/dim (mean of 2 dequantization draws, spread 1.000 nats)"
    assert evaluate.summary([-1000.0], 784, (0.0, 1.0)) == "-1000.00 nats, 9.8402 bits/dim (1 dequantization draw)"


def test_inpaint_takes_a_choice_of_masks_and_masks_of_ones_own(trained, tmp_path, capsys):
    """--masks picks among the built-in masks; --mask-file adds one's own, whose light pixels mark what to
    fill. The filled pixels are those the mask marks, the others stay the test image's."""
    from PIL import Image

    best = os.path.join(trained[0], "best.pt")
    hole = np.zeros((28, 28), dtype=np.uint8)
    hole[10:18, 4:24] = 255  # a band across the middle to fill
    Image.fromarray(hole).save(tmp_path / "hole.png")
    observed = inpaint.mask_from_file(str(tmp_path / "hole.png"), (1, 28, 28))
    assert observed.shape == (784,) and int((~observed).sum()) == 8 * 20
    assert torch.equal(observed.view(28, 28), torch.from_numpy(hole == 0))
    Image.fromarray(np.stack([hole] * 3, axis=2)).save(tmp_path / "hole_rgb.jpg", quality=95)  # any mode; JPEG noise
    assert torch.equal(inpaint.mask_from_file(str(tmp_path / "hole_rgb.jpg"), (3, 28, 28)),
                       observed.view(1, 784).expand(3, 784).reshape(-1))

    base = [best, "--data-dir", data_dir(), "--no-download", "--n", "2", "--steps", "2", "--device", "cpu"]
    assert run_in_process(inpaint.main, base + ["--out", str(tmp_path / "two.png"), "--masks", "left,random90"]) == 0
    out = capsys.readouterr().out
    assert "for masks left, random90 to" in out and re.search(r": left [\d.]+ \(grey [\d.]+\), random90 ", out)
    assert run_in_process(inpaint.main, base + ["--out", str(tmp_path / "own.png"), "--mask-file",
                                                str(tmp_path / "hole.png"), "--masks", "top"]) == 0
    out = capsys.readouterr().out
    assert f"for masks top, {tmp_path / 'hole.png'} to" in out and os.path.getsize(tmp_path / "own.png") > 0
    # The tool's own inpainting of this mask keeps the observed pixels and changes the hole alone.
    model = nice_ext.load_model(best)
    x = torch.rand(2, 784)
    filled = inpaint.inpaint_masks(model, x, {"hole": observed}, steps=2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(filled["hole"][:, observed], x[:, observed])
    assert (filled["hole"][:, ~observed] != x[:, ~observed]).all()

    Image.fromarray(np.zeros((28, 28), dtype=np.uint8)).save(tmp_path / "none.png")
    Image.fromarray(hole[:20]).save(tmp_path / "short.png")
    (tmp_path / "text.png").write_text("not an image")
    mask_bytes = (tmp_path / "hole.png").read_bytes()
    assert run_in_process(inpaint.main, base + ["--out", str(tmp_path / "hole.png"), "--mask-file",
                                                str(tmp_path / "hole.png")]) == 2
    assert f"--out {tmp_path / 'hole.png'} is a --mask-file: name another file" in capsys.readouterr().err
    assert (tmp_path / "hole.png").read_bytes() == mask_bytes
    for extra, message in ((["--masks", "middle"], "--masks: unknown mask 'middle'; choose among top, bottom"),
                           (["--masks", ","], "no masks: name some with --masks or give --mask-file"),
                           (["--mask-file", str(tmp_path / "gone.png")], "no such file"),
                           (["--mask-file", str(tmp_path / "none.png")], "marks no pixel to fill"),
                           (["--mask-file", str(tmp_path / "short.png")], "28x20 pixels (width x height); the "
                                                                            "images are 28x28"),
                           (["--mask-file", str(tmp_path / "text.png")], "cannot be read as an image")):
        assert run_in_process(inpaint.main, base + ["--out", str(tmp_path / "bad.png"), *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not os.path.exists(tmp_path / "bad.png")


def test_inpainting_error_counts_the_missing_pixels_alone():
    x = torch.tensor([[0.0, 0.25, 1.0, 0.5]])
    observed = torch.tensor([True, True, False, False])
    filled = torch.tensor([[0.9, 0.9, 0.75, 0.5]])  # the observed pixels' values do not count
    assert inpaint.missing_pixel_error(x, filled, observed, (0.0, 1.0)) == pytest.approx(256 * (0.25 ** 2 / 2) ** 0.5)
    assert inpaint.missing_pixel_error(2 * x - 1, 2 * filled - 1, observed, (-1.0, 1.0)) == \
        pytest.approx(256 * (0.25 ** 2 / 2) ** 0.5)  # in 8-bit levels whatever the data range


def test_model_flags_reach_the_model_resume_and_every_tool(tmp_path):
    """--coup-type, --mask, --latent, --coupling and --clip-grad: the run trains that model, its checkpoints
    rebuild it, a resume keeps it without being told again, and evaluate, sample and inpaint take it."""
    out = str(tmp_path / "run")
    flags = ["--coup-type", "affine", "--mask", "checkerboard", "--latent", "gaussian", "--coupling", "3",
             "--clip-grad", "5"]
    result = run_tool("train", "--data-dir", data_dir(), "--out-dir", out, "--epochs", "1", *flags, *TINY)
    assert result.returncode == 0, result.stderr
    result = run_tool("train", "--resume", os.path.join(out, "last.pt"), "--epochs", "2", "--data-dir", data_dir(),
                      "--device", "cpu", "--no-download")
    assert result.returncode == 0, result.stderr
    assert [int(r["epoch"]) for r in metrics(out)] == [1, 2]
    board = nice_ext.checkerboard_mask((1, 28, 28))
    for name in ("best.pt", "last.pt"):
        model = nice_ext.load_model(os.path.join(out, name), device="cpu")
        assert (model.prior, model.coupling, len(model.layers)) == ("gaussian", "affine", 3), name
        assert torch.equal(model.layers[0].mask, board) or torch.equal(model.layers[0].mask, ~board), name
    assert load_checkpoint(os.path.join(out, "last.pt"))["args"]["clip_grad"] == 5
    best = os.path.join(out, "best.pt")
    result = run_tool("evaluate", best, "--data-dir", data_dir(), "--draws", "1", "--device", "cpu", "--no-download")
    assert result.returncode == 0 and "nats" in result.stdout, result.stderr
    result = run_tool("sample", best, "--n", "4", "--out", str(tmp_path / "s.png"), "--device", "cpu")
    assert result.returncode == 0 and os.path.getsize(tmp_path / "s.png") > 0, result.stderr
    result = run_tool("inpaint", best, "--data-dir", data_dir(), "--out", str(tmp_path / "i.png"), "--n", "2",
                      "--steps", "3", "--device", "cpu", "--no-download")
    assert result.returncode == 0 and os.path.getsize(tmp_path / "i.png") > 0, result.stderr


def test_load_model_gives_back_the_trained_model(trained, tmp_path):
    """nice_ext.load_model, the Python way into a run: the model it loads scores what training printed."""
    out, _ = trained
    model = nice_ext.load_model(os.path.join(out, "best.pt"), device="cpu")
    assert isinstance(model, nice_ext.NICE) and not model.training and model.log_scale.device.type == "cpu"
    with open(os.path.join(out, "result.json")) as f:
        result = json.load(f)
    info = data_lib.dataset_info("mnist")
    test_pixels = data_lib.load_pixels("mnist", data_dir(), "test", download=False)
    # evaluate's draws are the run's own (draws of other seeds differ here by about 1e-5 nats)
    assert evaluate.log_likelihood_draws(model, data_lib.Preprocess(info), test_pixels, 1) == \
        pytest.approx(result["draw_ll_nats"], rel=0, abs=1e-9)
    assert result["test_ll_nats"] == pytest.approx(result["draw_ll_nats"][0], rel=0, abs=1e-4)
    with pytest.raises(nice_ext.CheckpointError, match="missing.pt: no such checkpoint"):
        nice_ext.load_model(str(tmp_path / "missing.pt"))
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    with pytest.raises(nice_ext.CheckpointError, match="foreign.pt: not a nice_ext checkpoint"):
        nice_ext.load_model(str(tmp_path / "foreign.pt"))


def test_resume_continues_exactly(tmp_path):
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    assert train.main(["--data-dir", data_dir(), "--out-dir", straight, "--epochs", "2", *TINY]) == 0
    assert train.main(["--data-dir", data_dir(), "--out-dir", split, "--epochs", "1", *TINY]) == 0
    resumed = torch.load(os.path.join(split, "last.pt"), weights_only=True)
    assert resumed["epoch"] == 1 and resumed["step"] == 10 and resumed["optimizer_state"]["state"]
    # Only the new target is given: the folder, data, architecture and optimizer settings come with the run.
    assert train.main(["--resume", os.path.join(split, "last.pt"), "--epochs", "2", "--device", "cpu"]) == 0
    a, b = metrics(straight), metrics(split)
    assert [r["epoch"] for r in b] == ["1", "2"]
    assert a[1]["train_ll_nats"] == b[1]["train_ll_nats"] and a[1]["valid_ll_nats"] == b[1]["valid_ll_nats"]


def test_resume_inside_an_epoch_continues_exactly(tmp_path):
    """A run stopped inside an epoch (--max_iter here; --time-limit takes the same path) resumes with the
    same batches and sums: its weights and metrics end as an uninterrupted run's do."""
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    assert train.main(["--data-dir", data_dir(), "--out-dir", straight, "--epochs", "2", *TINY]) == 0
    assert train.main(["--data-dir", data_dir(), "--out-dir", split, "--epochs", "2", "--max_iter", "15", *TINY]) == 0
    stopped = torch.load(os.path.join(split, "last.pt"), weights_only=True)
    assert (stopped["epoch"], stopped["step"], stopped["epoch_in_progress"]["batches_done"]) == (1, 15, 5)
    assert [r["epoch"] for r in metrics(split)] == ["1"]  # half an epoch is not a row of metrics.csv
    with open(os.path.join(split, "result.json")) as f:
        piece = json.load(f)  # the pace of epoch 1, and what the rest of epoch 2 (half of it) would take at it
    assert piece["seconds_per_epoch"] == float(metrics(split)[0]["seconds"]) and piece["seconds_between_epochs"] >= 0
    assert piece["remaining_seconds_estimate"] == pytest.approx(
        (piece["seconds_per_epoch"] + piece["seconds_between_epochs"]) / 2, abs=0.1)
    assert 0 < piece["seconds_per_step"] < piece["seconds_per_epoch"] / 3  # an epoch: 10 steps and a validation
    assert train.main(["--resume", os.path.join(split, "last.pt"), "--max_iter", "1000", "--device", "cpu"]) == 0
    with open(os.path.join(split, "result.json")) as f:
        finished = json.load(f)  # epoch 2's row holds the seconds both processes spent in it
    assert finished["seconds_per_epoch"] == float(metrics(split)[1]["seconds"])
    assert finished["seconds_between_epochs"] >= 0 and "remaining_seconds_estimate" not in finished
    a = torch.load(os.path.join(straight, "last.pt"), weights_only=True)
    b = torch.load(os.path.join(split, "last.pt"), weights_only=True)
    assert (b["epoch"], b["step"], b["epoch_in_progress"]) == (2, 20, None)
    for name, value in a["model_state"].items():
        assert torch.equal(value, b["model_state"][name]), name
    drop_seconds = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert drop_seconds(metrics(straight)) == drop_seconds(metrics(split))


def test_a_piece_shorter_than_an_epoch_estimates_from_its_steps(tmp_path, capsys):
    """Before any epoch is complete there is no epoch's pace: the time left comes from the steps' pace (the
    first step, which compiles or captures on a GPU, left out), and the message says what that leaves out."""
    out = str(tmp_path / "run")
    assert train.main(["--data-dir", data_dir(), "--out-dir", out, "--epochs", "2", "--max_iter", "5", *TINY]) == 0
    stdout = capsys.readouterr().out
    with open(os.path.join(out, "result.json")) as f:
        piece = json.load(f)
    assert "seconds_per_epoch" not in piece and piece["seconds_per_step"] > 0
    assert piece["remaining_seconds_estimate"] == round(15 * piece["seconds_per_step"], 1)  # 15 of 20 steps left
    assert "s per step (no epoch is complete yet: validation and the time between epochs are left out), the 1.5 " \
           "epochs (15 steps) left of --epochs 2 would take about" in stdout
    assert "test log-likelihood of the final model (epoch 0 and 5 of 10 batches of epoch 1): " in stdout
    # resumed to the end: each epoch's line says what the rest of the run would take, but the last one's
    assert train.main(["--resume", os.path.join(out, "last.pt"), "--max_iter", "1000", "--device", "cpu"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch ")]
    assert len(lines) == 2 and "s (the rest of --epochs 2: about " in lines[0] and lines[1].endswith(" s"), lines


def test_pace_and_the_time_left():
    pace = train.run_pace([2.0, 3.0, 10.0], wall_seconds=16.0, partial_seconds=0.5)
    assert pace == dict(seconds_per_epoch=3.0, seconds_between_epochs=0.167)
    assert train.remaining_seconds(pace, steps=25, batches_per_epoch=10) == pytest.approx(2.5 * 3.167)
    # before an epoch is complete, the steps' pace alone
    assert train.remaining_seconds(dict(seconds_per_step=0.4), steps=25, batches_per_epoch=10) == pytest.approx(10.0)
    left = functools.partial(train.steps_left, train.parse_args(["--epochs", "5"]), batches_per_epoch=10)
    assert left(completed_epoch=1, batches_done=3, step=13) == (37, "--epochs 5")
    assert left(completed_epoch=5, batches_done=0, step=50) == (0, "--epochs 5")
    # --max_iter ends the run first when it lies ahead and below the end of --epochs; once it has stopped the
    # run (a larger one resumes it), the rest of --epochs is what is left
    left = functools.partial(train.steps_left, train.parse_args(["--epochs", "5", "--max_iter", "30"]),
                             batches_per_epoch=10)
    assert left(completed_epoch=1, batches_done=3, step=13) == (17, "--max_iter 30")
    assert left(completed_epoch=3, batches_done=0, step=30) == (20, "--epochs 5")
    left = functools.partial(train.steps_left, train.parse_args(["--epochs", "2", "--max_iter", "90"]),
                             batches_per_epoch=10)
    assert left(completed_epoch=1, batches_done=0, step=10) == (10, "--epochs 2")  # --max_iter lies beyond
    assert train.run_pace([], 5.0, 0.0) is None
    assert train.run_pace([4.0], wall_seconds=3.9, partial_seconds=0.0)["seconds_between_epochs"] == 0.0
    assert [train.duration(s) for s in (0.44, 42.4, 2940.0, 25200.0)] == ["0.4 s", "42 s", "49 min", "7.0 h"]
    assert [train.in_epochs(s, 250) for s in (366250, 373625, 25)] == ["1465", "1494.5", "0.1"]


def test_resume_inside_an_epoch_with_another_batch_size_starts_it_over(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert train.main(["--data-dir", data_dir(), "--out-dir", out, "--epochs", "2", "--max_iter", "15", *TINY]) == 0
    last = os.path.join(out, "last.pt")
    assert train.main(["--resume", last, "--max_iter", "1000", "--batch_size", "50", "--device", "cpu"]) == 0
    assert "with --batch_size 50 on 1000 images that epoch starts over" in capsys.readouterr().out
    resumed = torch.load(last, weights_only=True)
    assert (resumed["epoch"], resumed["step"]) == (2, 15 + 20)
    damaged = torch.load(last, weights_only=True)
    damaged["epoch"], damaged["epoch_in_progress"] = 1, {"epoch": 2, "batches_done": "five"}
    torch.save(damaged, str(tmp_path / "damaged.pt"))
    result = run_tool("train", "--resume", str(tmp_path / "damaged.pt"), "--data-dir", data_dir(), "--device", "cpu")
    assert result.returncode == 1 and "record of the epoch in progress is damaged" in result.stderr


def test_patience_stops_a_run_that_no_longer_improves(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert train.main(["--data-dir", data_dir(), "--out-dir", out, "--epochs", "2", *TINY]) == 0
    last = os.path.join(out, "last.pt")
    make_first_epoch_unbeatable(last)  # epochs 2, 3, ... bring no gain over epoch 1
    capsys.readouterr()
    assert train.main(["--resume", last, "--epochs", "10", "--patience", "3", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "stopped: --patience 3: no validation gain since epoch 1" in printed
    epoch_lines = [line for line in printed.splitlines() if line.startswith("epoch ")]  # epochs 3 and 4
    assert "(the rest of --epochs 10: about" in epoch_lines[0] and "the rest of" not in epoch_lines[1], epoch_lines
    assert [r["epoch"] for r in metrics(out)] == ["1", "2", "3", "4"]
    with open(os.path.join(out, "result.json")) as f:
        result = json.load(f)
    assert result["status"] == "stopped early: --patience 3: no validation gain since epoch 1; trained 4 of 10 epochs"
    assert torch.load(last, weights_only=True)["epoch"] == 4
    # The patience is the run's: resumed again, it trains nothing; a larger --patience goes on.
    assert train.main(["--resume", last, "--device", "cpu"]) == 0
    assert "nothing to train: --patience 3: no validation gain since epoch 1 (a larger --patience goes on)" in \
        capsys.readouterr().out
    assert torch.load(last, weights_only=True)["epoch"] == 4 and len(metrics(out)) == 4
    assert train.main(["--resume", last, "--patience", "5", "--device", "cpu"]) == 0
    assert [r["epoch"] for r in metrics(out)] == ["1", "2", "3", "4", "5", "6"]


def test_scheduled_learning_rate():
    args = train.parse_args(["--lr", "1e-3", "--lr-decay", "1.0005", "--min-lr", "1e-4"])
    assert train.scheduled_lr(args, 0) == 1e-3
    assert train.scheduled_lr(args, 100) == pytest.approx(1e-3 / 1.0005 ** 100, rel=1e-12)
    assert train.scheduled_lr(args, 4606) > 1e-4 and train.scheduled_lr(args, 4607) == 1e-4  # about 18 epochs
    steep = train.parse_args(["--lr-decay", "2"])
    assert train.scheduled_lr(steep, 10 ** 9) == 0.0  # no overflow, floor 0
    assert train.scheduled_lr(train.parse_args([]), 10 ** 6) == 1e-3  # constant by default
    plateau = train.parse_args(["--lr", "1e-3", "--lr-plateau", "5", "--min-lr", "5e-6"])
    assert train.scheduled_lr(plateau, 10 ** 6, 1) == pytest.approx(1e-4, rel=1e-12)
    assert train.scheduled_lr(plateau, 0, 2) == pytest.approx(1e-5, rel=1e-12)
    assert train.scheduled_lr(plateau, 0, 3) == 5e-6
    both = train.parse_args(["--lr-decay", "1.1", "--lr-plateau", "5", "--lr-plateau-factor", "4"])
    assert train.scheduled_lr(both, 3, 2) == pytest.approx(1e-3 / 1.1 ** 3 / 16, rel=1e-12)


def test_lr_decay_trains_with_the_scheduled_rate_and_resumes_on_it(tmp_path):
    def weights(out):
        return torch.load(os.path.join(out, "last.pt"), weights_only=True)

    runs = {name: str(tmp_path / name) for name in ("constant", "factor1", "decayed", "split")}
    assert train.main(["--data-dir", data_dir(), "--out-dir", runs["constant"], "--epochs", "2", *TINY]) == 0
    # a factor of 1 takes the tensor learning rate's path and must take exactly the constant run's steps
    assert train.main(["--data-dir", data_dir(), "--out-dir", runs["factor1"], "--epochs", "2", "--lr-decay", "1",
                       *TINY]) == 0
    decayed = ["--lr-decay", "1.2", "--min-lr", "1e-3", *TINY]
    assert train.main(["--data-dir", data_dir(), "--out-dir", runs["decayed"], "--epochs", "2", *decayed]) == 0
    assert train.main(["--data-dir", data_dir(), "--out-dir", runs["split"], "--epochs", "1", *decayed]) == 0
    assert train.main(["--resume", os.path.join(runs["split"], "last.pt"), "--epochs", "2", "--device", "cpu"]) == 0
    constant, factor1, decayed, split = (weights(runs[name]) for name in runs)
    # the rate of the 20th (last) step: 3e-3 / 1.2^19 is below the floor
    assert float(decayed["optimizer_state"]["param_groups"][0]["lr"]) == pytest.approx(1e-3)
    assert float(factor1["optimizer_state"]["param_groups"][0]["lr"]) == pytest.approx(3e-3)
    for name, value in constant["model_state"].items():
        assert torch.equal(value, factor1["model_state"][name]), name
        assert torch.equal(decayed["model_state"][name], split["model_state"][name]), name
    assert any(not torch.equal(value, decayed["model_state"][name]) for name, value in constant["model_state"].items())


def test_lr_plateau_divides_the_rate_after_epochs_without_gain_and_resumes_on_it(tmp_path, capsys):
    first = str(tmp_path / "first")
    assert train.main(["--data-dir", data_dir(), "--out-dir", first, "--epochs", "2", *TINY]) == 0
    make_first_epoch_unbeatable(os.path.join(first, "last.pt"))  # epochs 2, 3, ... bring no gain over epoch 1
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    plateau = ["--lr-plateau", "2", "--min-lr", "3e-5", "--device", "cpu"]
    capsys.readouterr()
    assert train.main(["--resume", os.path.join(first, "last.pt"), "--out-dir", straight, "--epochs", "7",
                       *plateau]) == 0
    printed = capsys.readouterr().out
    assert "epoch 3: 2 epochs without a validation gain; the learning rate is now 0.0003" in printed
    assert "epoch 5: 2 epochs without a validation gain; the learning rate is now 3e-05" in printed
    assert printed.count("the learning rate is now") == 2  # at epoch 7 the floor is reached: no third
    rows = metrics(straight)
    assert [float(r["lr"]) for r in rows] == pytest.approx([3e-3, 3e-3, 3e-3, 3e-4, 3e-4, 3e-5, 3e-5])
    last = torch.load(os.path.join(straight, "last.pt"), weights_only=True)
    assert last["lr_plateau"] == {"drops": 2, "last_drop_epoch": 5}
    assert last["optimizer_state"]["param_groups"][0]["lr"] == pytest.approx(3e-5)
    # Stopped between the divisions and resumed, the run takes the same steps as one made in one go.
    assert train.main(["--resume", os.path.join(first, "last.pt"), "--out-dir", split, "--epochs", "4",
                       *plateau]) == 0
    assert train.main(["--resume", os.path.join(split, "last.pt"), "--epochs", "7", "--device", "cpu"]) == 0
    resumed = torch.load(os.path.join(split, "last.pt"), weights_only=True)
    assert resumed["lr_plateau"] == last["lr_plateau"]
    for name, value in last["model_state"].items():
        assert torch.equal(value, resumed["model_state"][name]), name
    damaged = dict(resumed, lr_plateau={"drops": -1, "last_drop_epoch": 5})
    torch.save(damaged, str(tmp_path / "damaged.pt"))
    result = run_tool("train", "--resume", str(tmp_path / "damaged.pt"), "--data-dir", data_dir(), "--device", "cpu",
                      "--epochs", "8")
    assert result.returncode == 1 and "its --lr-plateau record is damaged" in result.stderr


RMSPROP = ["--optimizer", "rmsprop", "--momentum", "0.5", "--decay", "0.95", "--eps", "1e-2", "--momentum-warmup", "1",
           "--init-range", "0.01", "--lr-decay", "1.05", "--min-lr", "1e-3"]


def test_rmsprop_with_momentum_warmup_learns_and_resumes_exactly(tmp_path, capsys):
    """The released configs' training (--preset released-mnist on a tiny model): no momentum in the warm-up
    epoch, then --momentum; the optimizer's averages and velocities go on through --resume."""
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    assert train.main(["--data-dir", data_dir(), "--out-dir", straight, "--epochs", "3", *TINY, *RMSPROP]) == 0
    assert train.main(["--data-dir", data_dir(), "--out-dir", split, "--epochs", "1", *TINY, *RMSPROP]) == 0
    first = torch.load(os.path.join(split, "last.pt"), weights_only=True)
    assert first["optimizer_state"]["param_groups"][0]["momentum"] == 0.0
    assert set(first["optimizer_state"]["state"][0]) == {"mean_square", "velocity"}
    assert train.main(["--resume", os.path.join(split, "last.pt"), "--epochs", "3", "--device", "cpu"]) == 0
    a = torch.load(os.path.join(straight, "last.pt"), weights_only=True)
    b = torch.load(os.path.join(split, "last.pt"), weights_only=True)
    assert a["optimizer_state"]["param_groups"][0]["momentum"] == 0.5
    assert a["args"]["optimizer"] == "rmsprop" and a["args"]["init_range"] == 0.01
    for name, value in a["model_state"].items():
        assert torch.equal(value, b["model_state"][name]), name
    rows = metrics(straight)
    assert float(rows[-1]["valid_ll_nats"]) > float(rows[0]["valid_ll_nats"]) + 5
    capsys.readouterr()
    assert train.main(["--resume", os.path.join(split, "last.pt"), "--optimizer", "adam", "--epochs", "4",
                       "--device", "cpu"]) == 2
    assert "--optimizer adam differs from" in capsys.readouterr().err


def test_a_run_from_before_the_lr_column_gets_it_from_its_next_epoch(tmp_path):
    out = str(tmp_path / "run")
    assert train.main(["--data-dir", data_dir(), "--out-dir", out, "--epochs", "1", *TINY]) == 0
    last = os.path.join(out, "last.pt")
    old = torch.load(last, weights_only=True)
    for row in old["history"]:
        del row["lr"]
    del old["lr_plateau"]
    torch.save(old, last)
    assert train.main(["--resume", last, "--epochs", "2", "--device", "cpu"]) == 0
    assert [(r["epoch"], r["lr"]) for r in metrics(out)] == [("1", ""), ("2", "0.003")]


def test_a_resume_that_trains_nothing_keeps_the_place_inside_an_epoch(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert train.main(["--data-dir", data_dir(), "--out-dir", out, "--epochs", "2", "--max_iter", "15", *TINY]) == 0
    last = os.path.join(out, "last.pt")
    assert train.main(["--resume", last, "--epochs", "1", "--device", "cpu"]) == 0
    assert "nothing to train: --epochs 1" in capsys.readouterr().out
    kept = torch.load(last, weights_only=True)
    assert (kept["epoch"], kept["step"], kept["epoch_in_progress"]["batches_done"]) == (1, 15, 5)


def test_a_max_iter_reached_already_takes_no_step(tmp_path, capsys):
    """--max_iter is checked after each step, and also before the first: a run given a limit it has reached
    (0, or a resume with the limit that stopped it) trains nothing and keeps its place."""
    out = str(tmp_path / "run")
    assert train.main(["--data-dir", data_dir(), "--out-dir", out, "--epochs", "2", "--max_iter", "0", *TINY]) == 0
    assert "nothing to train: --max_iter 0\n" in capsys.readouterr().out
    last = os.path.join(out, "last.pt")
    assert (torch.load(last, weights_only=True)["step"], metrics(out)) == (0, [])
    with open(os.path.join(out, "result.json")) as f:
        assert json.load(f)["status"] == "partial: --max_iter 0 reached after 0 of 2 epochs"
    assert train.main(["--resume", last, "--max_iter", "15", "--device", "cpu"]) == 0
    stopped = torch.load(last, weights_only=True)
    assert train.main(["--resume", last, "--max_iter", "15", "--device", "cpu"]) == 0
    assert "nothing to train: --max_iter 15 is not above the checkpoint's step 15 (a larger --max_iter goes on)" \
        in capsys.readouterr().out
    kept = torch.load(last, weights_only=True)
    assert (kept["epoch"], kept["step"], kept["epoch_in_progress"]["batches_done"]) == (1, 15, 5)
    assert torch.equal(kept["epoch_in_progress"]["order_rng"], stopped["epoch_in_progress"]["order_rng"])
    assert torch.equal(kept["model_state"]["log_scale"], stopped["model_state"]["log_scale"])


def test_resume_of_a_run_from_another_device_type(tmp_path, capsys):
    """A CUDA generator's state (16 bytes) cannot drive a CPU generator: a GPU run resumed on a CPU goes on
    with a fresh data stream and starts its unfinished epoch over, saying so, instead of failing."""
    out = str(tmp_path / "run")
    assert train.main(["--data-dir", data_dir(), "--out-dir", out, "--epochs", "2", "--max_iter", "15", *TINY]) == 0
    last = os.path.join(out, "last.pt")
    payload = torch.load(last, weights_only=True)
    cuda_like = torch.zeros(16, dtype=torch.uint8)
    payload["rng_state"]["data"] = cuda_like
    payload["epoch_in_progress"]["order_rng"] = cuda_like
    torch.save(payload, last)
    capsys.readouterr()
    assert train.main(["--resume", last, "--max_iter", "1000", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "written on another device type" in printed and "that epoch starts over" in printed
    resumed = torch.load(last, weights_only=True)
    assert (resumed["epoch"], resumed["step"], resumed["epoch_in_progress"]) == (2, 25, None)


def test_resume_applies_new_settings_and_keeps_the_architecture(trained, tmp_path, capsys):
    out = str(tmp_path / "run")
    shutil.copytree(trained[0], out)
    last = os.path.join(out, "last.pt")
    assert train.main(["--resume", last, "--mid-dim", "50", "--device", "cpu"]) == 2
    assert "--mid-dim 50 differs from" in capsys.readouterr().err
    assert train.main(["--resume", last, "--epochs", "4", "--lr", "1e-4", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "--epochs 4 (was 3)" in printed and "--lr 0.0001 (was 0.003)" in printed
    payload = torch.load(last, weights_only=True)
    assert payload["epoch"] == 4 and payload["args"]["subset"] == 1000 and payload["args"]["mid_dim"] == 24
    assert payload["optimizer_state"]["param_groups"][0]["lr"] == 1e-4


def test_resume_adopts_this_devices_adam_flags():
    """Adam state written with other implementation flags (capturable, as with --cuda-graph; the per-tensor
    loop, as before Adam was fused everywhere) loads on any device with this run's."""
    model = torch.nn.Linear(3, 2)
    written = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    written.step()
    state = written.state_dict()
    state["param_groups"][0].update(fused=None, foreach=None, capturable=True)
    args = train.parse_args(["--lr", "2e-3"])
    optimizer = train.make_optimizer(model.parameters(), args)
    train.resume_optimizer(optimizer, state, args)
    group = optimizer.param_groups[0]
    assert (group["fused"], group["capturable"], group["lr"]) == (True, False, 2e-3)
    assert state["param_groups"][0]["capturable"]  # the checkpoint's own state is left as it was
    optimizer.step()


def test_bad_checkpoints_give_one_clear_line(trained, tmp_path):
    out, _ = trained
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(open(os.path.join(out, "best.pt"), "rb").read()[:1000])
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    not_ours = tmp_path / "notes.pt"
    not_ours.write_text("# not a checkpoint at all\n")
    damaged = tmp_path / "nan.pt"  # readable, but a weight is NaN: every score and sample would be NaN
    payload = torch.load(os.path.join(out, "best.pt"), weights_only=True)
    payload["model_state"]["layers.1.net.0.weight"][0, 0] = float("nan")
    torch.save(payload, damaged)
    for path, message in ((truncated, "truncated or corrupt"), (foreign, "not a nice_ext checkpoint"),
                          (tmp_path / "missing.pt", "no such checkpoint"), (not_ours, "truncated or corrupt"),
                          (damaged, "model_state holds NaN or infinite values in layers.1.net.0.weight")):
        result = run_tool("evaluate", str(path), "--data-dir", data_dir(), "--device", "cpu")
        assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr
        assert len(errors(result)) == 1, result.stderr
    result = run_tool("train", "--data-dir", data_dir(), "--out-dir", str(tmp_path / "x"), "--dataset",
                      "fashion-mnist", "--resume", os.path.join(out, "best.pt"), *TINY)
    assert result.returncode == 1 and "trained on mnist" in result.stderr


def test_checkpoints_that_fit_no_dataset_or_no_resume_are_one_clear_line(trained, tmp_path, capsys):
    """Readable checkpoints whose contents do not fit: an unknown dataset, a model of other images than its
    dataset's, and one without a run's state given to --resume. Each had ended in a traceback or a KeyError."""
    best = os.path.join(trained[0], "best.pt")

    def edited(name, edit):
        payload = torch.load(best, weights_only=True)
        edit(payload)
        torch.save(payload, tmp_path / name)
        return str(tmp_path / name)

    unknown = edited("unknown.pt", lambda p: p.update(dataset="imagenet"))
    with pytest.raises(nice_ext.CheckpointError, match="its dataset 'imagenet' is none this nice_ext knows"):
        load_checkpoint(unknown)
    other_images = edited("cifar.pt", lambda p: p.update(dataset="cifar10"))
    other_range = edited("range.pt", lambda p: p["model_config"].update(data_range=(-1.0, 1.0)))
    for path, message in ((unknown, "its dataset 'imagenet' is none"), (other_images, "model has 784 features, "
                          "cifar10 has 3072"), (other_range, "model's data range is (-1.0, 1.0), mnist's is (0.0, 1.0)")):
        for tool, args in ((sample, ["--out", str(tmp_path / "s.png")]),
                           (evaluate, ["--data-dir", data_dir(), "--no-download"])):
            assert run_in_process(tool.main, [path, "--device", "cpu", *args]) == 1
            err = capsys.readouterr().err
            assert err.startswith(f"error: {path}: {message}") and err.count("\n") == 1, err
    model_only = edited("model.pt", lambda p: [p.pop(key) for key in ("epoch", "optimizer_state", "rng_state")])
    assert train.main(["--resume", model_only, "--out-dir", str(tmp_path / "go-on"), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert ("holds a model but not the state of a training run (it lacks epoch, optimizer_state, rng_state): "
            "--resume continues a run") in err and err.count("\n") == 1, err


def test_a_damaged_checkpoint_points_to_the_runs_other_one(trained, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    good = open(os.path.join(trained[0], "best.pt"), "rb").read()
    (out / "best.pt").write_bytes(good)
    (out / "last.pt").write_bytes(good[:1000])  # cut short (a disk failing, a copy broken off)
    advice = "the run's other checkpoint, {}, may be whole"
    with pytest.raises(nice_ext.CheckpointError,
                       match="truncated or corrupt.*" + re.escape(advice.format(out / "best.pt"))):
        load_checkpoint(str(out / "last.pt"))
    (out / "last.pt").write_bytes(good)
    payload = torch.load(out / "best.pt", weights_only=True)
    payload["model_state"]["log_scale"][0] = float("inf")
    torch.save(payload, out / "best.pt")
    with pytest.raises(nice_ext.CheckpointError, match="NaN or infinite values in log_scale " +
                       re.escape("(" + advice.format(out / "last.pt") + ")")):
        load_checkpoint(str(out / "best.pt"))
    (out / "last.pt").unlink()  # no other checkpoint: no advice
    with pytest.raises(nice_ext.CheckpointError, match=r"NaN or infinite values in log_scale$"):
        load_checkpoint(str(out / "best.pt"))


def test_a_runs_folder_given_for_its_checkpoint_names_the_files_in_it(trained, tmp_path):
    with pytest.raises(nice_ext.CheckpointError, match=re.escape(
            f"{trained[0]} is a folder, not a checkpoint file: pass {os.path.join(trained[0], 'best.pt')} or "
            f"{os.path.join(trained[0], 'last.pt')}")):
        load_checkpoint(trained[0])
    with pytest.raises(nice_ext.CheckpointError, match=f"{re.escape(str(tmp_path))} is a folder, not a checkpoint "
                       "file$"):
        load_checkpoint(str(tmp_path))


def test_a_new_run_never_replaces_another(trained, tmp_path, capsys):
    out = str(tmp_path / "run")
    shutil.copytree(trained[0], out)
    before = {name: open(os.path.join(out, name), "rb").read() for name in os.listdir(out)}
    assert train.main(["--data-dir", data_dir(), "--out-dir", out, "--epochs", "1", *TINY]) == 2
    message = capsys.readouterr().err
    assert "already holds a training run" in message and "--resume" in message and "--overwrite" in message
    assert {name: open(os.path.join(out, name), "rb").read() for name in os.listdir(out)} == before
    # --resume from another folder into this one would mix two runs' files as well
    assert train.main(["--data-dir", data_dir(), "--out-dir", out, "--epochs", "4", "--resume",
                       os.path.join(trained[0], "last.pt"), *TINY]) == 2
    # --overwrite replaces the run only once the new one is ready to train: one that cannot start keeps it
    assert train.main(["--data-dir", str(tmp_path / "no-data"), "--out-dir", out, "--epochs", "1", "--overwrite",
                       *TINY]) == 1
    assert "not found" in capsys.readouterr().err
    assert {name: open(os.path.join(out, name), "rb").read() for name in os.listdir(out)} == before
    assert train.main(["--data-dir", data_dir(), "--out-dir", out, "--epochs", "1", "--overwrite", *TINY]) == 0
    assert [r["epoch"] for r in metrics(out)] == ["1"]
    assert torch.load(os.path.join(out, "best.pt"), weights_only=True)["epoch"] == 1
    assert "test log-likelihood of best.pt (epoch 1)" in capsys.readouterr().out


def test_resume_never_rewinds_a_run_over_its_later_checkpoints(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert train.main(["--data-dir", data_dir(), "--out-dir", out, "--epochs", "1", *TINY]) == 0
    early = os.path.join(out, "epoch1.pt")
    shutil.copy(os.path.join(out, "last.pt"), early)
    assert train.main(["--resume", os.path.join(out, "last.pt"), "--epochs", "2", "--device", "cpu"]) == 0
    later = open(os.path.join(out, "last.pt"), "rb").read()
    capsys.readouterr()
    assert train.main(["--resume", early, "--epochs", "3", "--device", "cpu"]) == 2
    message = capsys.readouterr().err
    assert "would rewind the run" in message and "step 20" in message and "--overwrite" in message
    assert open(os.path.join(out, "last.pt"), "rb").read() == later
    branch = str(tmp_path / "branch")  # branching off into another folder leaves the run alone
    assert train.main(["--resume", early, "--out-dir", branch, "--epochs", "2", "--device", "cpu"]) == 0
    assert open(os.path.join(out, "last.pt"), "rb").read() == later
    assert train.main(["--resume", early, "--epochs", "2", "--overwrite", "--device", "cpu"]) == 0  # as asked
    assert [r["epoch"] for r in metrics(out)] == ["1", "2"]


def test_outputs_that_cannot_be_written_are_one_clear_line(trained, tmp_path, capsys):
    best = os.path.join(trained[0], "best.pt")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert train.main(["--data-dir", data_dir(), "--out-dir", str(blocker / "run"), *TINY]) == 2
    assert "cannot create it" in capsys.readouterr().err
    assert run_in_process(sample.main, [best, "--out", str(tmp_path / "grid.txt"), "--device", "cpu"]) == 2
    assert "not an image file name" in capsys.readouterr().err
    best_bytes = open(best, "rb").read()  # a slip of the keyboard must not write a score over the checkpoint
    assert run_in_process(evaluate.main, [best, "--json", best, "--device", "cpu", "--data-dir", data_dir()]) == 2
    assert "--json " + best + ": not a JSON file name (use .json)" in capsys.readouterr().err
    assert open(best, "rb").read() == best_bytes
    assert run_in_process(sample.main, [best, "--out", str(blocker / "grid.png"), "--device", "cpu"]) == 2
    assert "cannot create its folder" in capsys.readouterr().err
    for taken in ("taken.png", "taken.json", "taken.csv"):  # a folder where the file should go: refused up front
        (tmp_path / taken).mkdir()
    assert run_in_process(sample.main, [best, "--out", str(tmp_path / "taken.png"), "--device", "cpu"]) == 2
    assert capsys.readouterr().err == f"error: --out {tmp_path / 'taken.png'}: is a folder; name a file in it\n"
    for flag, taken in (("--json", "taken.json"), ("--scores", "taken.csv")):
        assert run_in_process(evaluate.main, [best, flag, str(tmp_path / taken), "--device", "cpu", "--data-dir",
                                              data_dir(), "--no-download"]) == 2
        assert capsys.readouterr() == ("", f"error: {flag} {tmp_path / taken}: is a folder; name a file in it\n")


def test_a_folder_one_cannot_write_in_is_refused_before_the_work(trained, tmp_path, capsys, monkeypatch):
    """--out, --json, --scores and --out-dir in a folder that takes no new files (its permissions, a
    read-only file system): one line naming the folder, before a sample is drawn or an epoch trained."""
    best = os.path.join(trained[0], "best.pt")
    locked = tmp_path / "locked"
    locked.mkdir()
    if os.geteuid() == 0:  # permissions do not bind root: the file system's refusal, as mkstemp raises it
        real_mkstemp = tempfile.mkstemp

        def mkstemp(prefix="", dir=None, **kwargs):
            if os.path.abspath(dir).startswith(str(locked)):
                raise PermissionError(errno.EACCES, "Permission denied", os.path.join(dir, prefix + "x1y2"))
            return real_mkstemp(prefix=prefix, dir=dir, **kwargs)
        monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    else:
        locked.chmod(0o555)

    def drawn(*args, **kwargs):
        raise AssertionError("the work began")
    monkeypatch.setattr(sample.plots, "sample_images", drawn)
    monkeypatch.setattr(evaluate, "image_log_likelihood_draws", drawn)
    monkeypatch.setattr(train.Trainer, "fit", drawn)
    try:
        assert run_in_process(sample.main, [best, "--out", str(locked / "grid.png"), "--device", "cpu"]) == 2
        assert capsys.readouterr().err == (f"error: --out {locked / 'grid.png'}: cannot write in {locked}: "
                                           "Permission denied\n")
        for flag, name in (("--json", "score.json"), ("--scores", "scores.csv")):
            assert run_in_process(evaluate.main, [best, flag, str(locked / name), "--device", "cpu", "--data-dir",
                                                  data_dir(), "--no-download"]) == 2
            assert f"error: {flag} {locked / name}: cannot write in {locked}: Permission denied" in \
                capsys.readouterr().err
        assert train.main(["--data-dir", data_dir(), "--out-dir", str(locked), *TINY]) == 2
        assert f"error: --out-dir {locked}: cannot write in it: Permission denied" in capsys.readouterr().err
        assert os.listdir(locked) == []
    finally:
        locked.chmod(0o755)


def test_compiled_training_matches_eager(tmp_path):
    eager, compiled = str(tmp_path / "eager"), str(tmp_path / "compiled")
    assert train.main(["--data-dir", data_dir(), "--out-dir", eager, "--epochs", "1", *TINY]) == 0
    assert train.main(["--data-dir", data_dir(), "--out-dir", compiled, "--epochs", "1", "--compile", *TINY]) == 0
    a, b = metrics(eager)[0], metrics(compiled)[0]
    assert float(a["valid_ll_nats"]) == pytest.approx(float(b["valid_ll_nats"]), abs=0.05)
    assert float(a["train_ll_nats"]) == pytest.approx(float(b["train_ll_nats"]), abs=0.05)


@pytest.mark.parametrize("flag, note", [
    ("--overlap-weight-grads", "overlaps work on a GPU's second stream"),
    ("--fuse-bias-relu", "hands the bias and ReLU to the GEMM's epilogue on a GPU"),
])
def test_coupling_network_speed_flags_train_as_without_them(tmp_path, capsys, monkeypatch, flag, note):
    """On the CPU the networks' own forward and backward are the same computation: the same metrics to the
    last digit. The flags are speed settings: a resumed run takes them from its own command line only, and
    refuses them where the precision it inherits (bf16 autocast) would leave them doing nothing."""
    from nice_ext import mlp

    calls = []
    own_apply = mlp._ReluMLP.apply
    monkeypatch.setattr(mlp._ReluMLP, "apply", lambda *a: calls.append(1) or own_apply(*a))
    plain, tuned = str(tmp_path / "plain"), str(tmp_path / "tuned")
    assert train.main(["--data-dir", data_dir(), "--out-dir", plain, "--epochs", "1", *TINY]) == 0
    assert not calls
    assert train.main(["--data-dir", data_dir(), "--out-dir", tuned, "--epochs", "1", flag, *TINY]) == 0
    assert len(calls) == 4 * 10  # every coupling network (TINY: 4 layers) in each of the epoch's 10 steps
    # (the note once: the run with the flag has it, the one before without it does not)
    assert capsys.readouterr().out.count(f"note: {flag} {note}") == 1
    untimed = lambda rows: [{k: v for k, v in row.items() if k != "seconds"} for row in rows]  # noqa: E731
    assert untimed(metrics(plain)) == untimed(metrics(tuned))
    calls.clear()
    assert train.main(["--resume", os.path.join(tuned, "last.pt"), "--epochs", "2"]) == 0
    assert not calls  # not taken over from the run it resumes
    bf16 = str(tmp_path / "bf16")
    assert train.main(["--data-dir", data_dir(), "--out-dir", bf16, "--epochs", "1", "--precision", "bf16",
                       *TINY]) == 0
    capsys.readouterr()
    assert train.main(["--resume", os.path.join(bf16, "last.pt"), "--epochs", "2", flag]) == 2
    assert f"{flag} does nothing with --precision bf16" in capsys.readouterr().err


def test_cuda_graph_needs_a_cuda_device(tmp_path):
    result = run_tool("train", "--data-dir", data_dir(), "--out-dir", str(tmp_path), "--epochs", "1", "--cuda-graph",
                      *TINY)
    assert result.returncode == 2 and "--cuda-graph needs a single CUDA device" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("schedule", [[], ["--lr-decay", "1.2", "--min-lr", "1e-3"], RMSPROP],
                         ids=["constant", "decaying", "rmsprop"])
def test_cuda_graph_training_matches_eager(tmp_path, schedule):
    """A decaying learning rate (and rmsprop's momentum, 0 in the first epoch) is a tensor the graph reads:
    a captured Python number would replay its first value."""
    on_cuda = [a if a != "cpu" else "cuda" for a in TINY] + schedule
    eager, graphed = str(tmp_path / "eager"), str(tmp_path / "graphed")
    assert train.main(["--data-dir", data_dir(), "--out-dir", eager, "--epochs", "2", *on_cuda]) == 0
    assert train.main(["--data-dir", data_dir(), "--out-dir", graphed, "--epochs", "2", "--cuda-graph", *on_cuda]) == 0
    for a, b in zip(metrics(eager), metrics(graphed)):
        assert float(a["valid_ll_nats"]) == pytest.approx(float(b["valid_ll_nats"]), abs=0.05)
        assert float(a["train_ll_nats"]) == pytest.approx(float(b["train_ll_nats"]), abs=0.05)


def test_preset_gives_defaults_and_explicit_flags_win():
    args = train.parse_args(["--preset", "paper-mnist", "--lr=3e-3", "--epochs", "7"])
    assert args.lr == 3e-3 and args.epochs == 7 and args.mid_dim == 1000 and args.decay == 0.99
    assert args.eps == 1e-4 and args.batch_size == 200 and args.hidden == 5
    assert train.parse_args([]).epochs == 10 and train.parse_args(["--preset", "paper-mnist"]).epochs == 1500
    released = train.parse_args(["--preset", "released-mnist", "--momentum", "0.6"])
    assert (released.optimizer, released.momentum, released.decay, released.eps, released.momentum_warmup) == \
        ("rmsprop", 0.6, 0.95, 1e-2, 5)
    assert (released.lr, released.lr_decay, released.min_lr, released.init_range) == (1e-3, 1.0005, 1e-4, 0.01)
    assert (released.mid_dim, released.hidden, released.batch_size, released.epochs) == (1000, 5, 200, 1500)
    cifar = train.parse_args(["--preset", "paper-cifar10"])
    assert (cifar.dataset, cifar.mid_dim, cifar.hidden, cifar.decay) == ("cifar10", 2000, 4, 0.99)


def test_underscore_flags_also_take_hyphens():
    """The seed's flags are spelled with underscores, the rest with hyphens; each takes both spellings, and a
    flag given in either counts as given (a resumed run does not take it from the checkpoint)."""
    for underscore, hyphen, dest in (("--batch_size", "--batch-size", "batch_size"),
                                     ("--max_iter", "--max-iter", "max_iter"),
                                     ("--sample_size", "--sample-size", "sample_size")):
        by_underscore, by_hyphen = train.parse_args([underscore, "7"]), train.parse_args([hyphen, "7"])
        assert getattr(by_underscore, dest) == getattr(by_hyphen, dest) == 7
        assert dest in by_hyphen.explicit and dest not in train.parse_args([]).explicit
    assert evaluate.build_parser().parse_args(["ckpt", "--batch_size", "9"]).batch_size == 9


def test_a_single_gpu_run_that_launches_each_kernel_is_told_of_cuda_graph():
    cuda = torch.device("cuda")  # a device object only: no GPU is needed to make one
    assert "--cuda-graph" in train.launch_bound_note(train.parse_args(["--preset", "paper-mnist"]), cuda, False)
    for argv in (["--cuda-graph"], ["--compile"], ["--compile-mode", "reduce-overhead"]):
        assert train.launch_bound_note(train.parse_args(argv), cuda, False) is None
    assert train.launch_bound_note(train.parse_args([]), cuda, True) is None  # torchrun: no graphs there
    assert train.launch_bound_note(train.parse_args([]), torch.device("cpu"), False) is None


@pytest.mark.parametrize("tool", [train, evaluate, sample, inpaint], ids=lambda tool: tool.__name__)
def test_every_flag_is_explained_in_help(tool):
    parser = tool.build_parser()
    unexplained = [action.dest for action in parser._actions if not action.help]
    assert not unexplained, f"{tool.__name__} --help says nothing of {unexplained}"


@pytest.mark.parametrize("args, message", [
    (["--batch_size", "0"], "--batch_size must be positive"),
    (["--lr", "-1"], "--lr must be a positive number"),
    (["--dataset", "imagenet"], "--dataset must be one of"),
    (["--sample_size", "-3"], "--sample_size must be >= 0"),
    (["--cuda-graph", "--compile"], "--cuda-graph and --compile/--compile-mode are alternatives"),
    (["--seed", "-1"], "argument --seed: must be in [0, 2**32)"),
    (["--time-limit", "0"], "--time-limit must be positive"),
    (["--patience", "0"], "--patience must be >= 1"),
    (["--eval-batch-size", "0"], "--eval-batch-size must be >= 1"),
    (["--lr-decay", "0.5"], "--lr-decay must be a number >= 1"),
    (["--lr-decay", "inf"], "--lr-decay must be a number >= 1"),
    (["--min-lr", "0.1"], "--min-lr must be in [0, --lr]"),
    (["--lr-plateau", "0"], "--lr-plateau must be >= 1"),
    (["--lr-plateau", "3", "--lr-plateau-factor", "1"], "--lr-plateau-factor must be a number > 1"),
    (["--optimizer", "sgd"], "argument --optimizer: invalid choice"),
    (["--momentum-warmup", "-1"], "--momentum-warmup must be >= 0"),
    (["--momentum-warmup", "5"], "--momentum-warmup applies to --optimizer rmsprop"),
    (["--init-range", "-0.1"], "--init-range must be a finite number >= 0"),
    (["--init-range", "nan"], "--init-range must be a finite number >= 0"),
    (["--latent", "cauchy"], "--latent must be logistic or gaussian"),
    (["--coup-type", "multiplicative"], "--coup-type must be additive or affine"),
    (["--mask", "stripes"], "--mask must be odd-even or checkerboard"),
    (["--clip-grad", "nan"], "--clip-grad must be positive"),
    (["--overlap-weight-grads", "--precision", "bf16"], "--overlap-weight-grads does nothing with --precision bf16"),
    (["--overlap-weight-grads", "--compile"], "--overlap-weight-grads does nothing with --compile/--compile-mode"),
    (["--fuse-bias-relu", "--compile-mode", "default"], "--fuse-bias-relu does nothing with --compile/--compile-mode"),
    (["--fuse-bias-relu", "--precision", "bf16"], "--fuse-bias-relu does nothing with --precision bf16"),
])
def test_bad_cli_values(args, message, tmp_path):
    result = run_tool("train", "--out-dir", str(tmp_path), *args)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_missing_data_is_one_clear_line(tmp_path):
    result = run_tool("train", "--data-dir", str(tmp_path), "--out-dir", str(tmp_path / "o" / "run"),
                      "--no-download")
    assert result.returncode == 1 and "train-images-idx3-ubyte.gz" in result.stderr
    assert "Traceback" not in result.stderr
    assert not os.path.exists(tmp_path / "o")  # a run that cannot start leaves no empty folder behind
    (tmp_path / "mine").mkdir()  # a folder that was there before stays
    assert train.main(["--data-dir", str(tmp_path), "--out-dir", str(tmp_path / "mine"), "--no-download"]) == 1
    assert os.path.isdir(tmp_path / "mine")


def test_reproduce_script_runs_in_pieces_and_files_results(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, DATA_DIR=data_dir(), RUNS_DIR=str(tmp_path / "runs"),
               RESULTS_DIR=str(tmp_path / "results"), INPAINT_STEPS="5")
    tiny = ["--subset", "1000", "--mid-dim", "24", "--hidden", "1", "--batch_size", "100", "--sample_size", "4",
            "--epochs", "2", "--device", "cpu", "--no-download"]

    def script(tag, *args):
        result = subprocess.run(["bash", "scripts/reproduce_mnist.sh", tag, *args], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        with open(tmp_path / "results" / f"reproduce_mnist_{tag}.json") as f:
            return result.stdout, json.load(f)

    stdout, first = script("t", *tiny, "--max_iter", "15")  # stops inside epoch 2
    assert "== starting" in stdout and first["status"].startswith("partial: --max_iter 15 reached after 1 of 2")
    assert first["command"].count("--preset") == 1 and "--preset paper-mnist" in first["command"]
    stdout, second = script("t", "--max_iter", "1000")
    assert "== resuming" in stdout and second["status"] == "complete" and second["epochs"] == 2
    assert second["steps"] == 20 and "--resume" in second["command"]
    filed = sorted(os.listdir(tmp_path / "results" / "reproduce_mnist_t"))
    assert filed == ["curve.png", "inpaint.png", "metrics.csv", "samples.png", "spectrum.png", "train.log"]
    log = (tmp_path / "results" / "reproduce_mnist_t" / "train.log").read_text()
    assert log.count("test log-likelihood") == 2  # both pieces, in one log
    # a preset among the flags replaces the paper's (another tag: a run of its own)
    stdout, released = script("r", "--preset", "released-mnist", *tiny, "--max_iter", "3")
    assert released["command"].count("--preset") == 1 and "--preset released-mnist" in released["command"]
    # stopped before its first epoch ended: no best.pt, so no inpainting, and the rest is still filed
    assert "no best.pt to inpaint with" in stdout
    assert "train.log" in os.listdir(tmp_path / "results" / "reproduce_mnist_r")
    usage = subprocess.run(["bash", "scripts/reproduce_mnist.sh"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert usage.returncode == 2 and "usage: bash scripts/reproduce_mnist.sh TAG" in usage.stderr


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_reproduce_script_passes_a_stop_on(tmp_path, stop):
    """A scheduler's SIGTERM goes to the script alone: the script must pass it on to training (bash would
    otherwise wait for its child). Ctrl-C in a terminal goes to the whole foreground group: training must
    get it once (a second one would stop it at once, without saving its place). Either way training keeps
    its place, nothing is filed, the script exits with training's status, and the next call goes on."""
    env = dict(os.environ, PYTHON=sys.executable, DATA_DIR=data_dir(), RUNS_DIR=str(tmp_path / "runs"),
               RESULTS_DIR=str(tmp_path / "results"), INPAINT_STEPS="5")
    args = ["bash", "scripts/reproduce_mnist.sh", "s", "--subset", "500", "--save-every", "1000", *TINY]
    returncode, stdout, stderr = signal_mid_run(args + ["--epochs", "1000"], stop, to_group=stop == signal.SIGINT,
                                                env=env)
    assert returncode == 128 + stop, (stdout, stderr)
    assert f"stopped: {stop.name} received" in stdout and "Traceback" not in stderr, (stdout, stderr)
    assert "interrupted" not in stderr  # one signal reached training, not two
    run_dir = tmp_path / "runs" / "reproduce_mnist_s"
    assert f"stopped: {stop.name} received" in (run_dir / "train.log").read_text()  # the log is complete
    assert not (tmp_path / "results").exists()
    epoch = load_checkpoint(str(run_dir / "last.pt"))["epoch"]
    result = subprocess.run(args + ["--epochs", str(epoch + 1)], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    with open(tmp_path / "results" / "reproduce_mnist_s.json") as f:
        assert json.load(f)["epochs"] == epoch + 1
    log = (run_dir / "train.log").read_text()
    assert f"stopped: {stop.name} received" in log and "test log-likelihood" in log  # both calls, one log


def test_a_stop_signal_during_validation_ends_the_run_after_that_epoch(tmp_path, monkeypatch, capsys):
    """A signal that lands between steps (here during epoch 1's validation) stops the run at the end of that
    epoch: last.pt holds it whole, with no place inside an epoch, and --resume goes on from the next."""
    out = str(tmp_path / "run")
    validate = train.average_log_likelihood

    def validate_and_be_signalled(*args, **kwargs):
        handler = signal.getsignal(signal.SIGTERM)  # training's own, installed around its loop
        assert callable(handler), handler
        handler(signal.SIGTERM, None)  # as the operating system would call it
        return validate(*args, **kwargs)

    monkeypatch.setattr(train, "average_log_likelihood", validate_and_be_signalled)
    assert train.main(["--data-dir", data_dir(), "--out-dir", out, "--epochs", "5", *TINY]) == 128 + signal.SIGTERM
    stdout = capsys.readouterr().out
    assert "stopped: SIGTERM received" in stdout and f"last.pt holds epoch 1; --resume {out}/last.pt goes on" in stdout
    assert "s between epochs, the 4 epochs (40 steps) left of --epochs 5 would take about" in stdout
    stopped = load_checkpoint(os.path.join(out, "last.pt"))
    assert (stopped["epoch"], stopped["step"], stopped["epoch_in_progress"]) == (1, 10, None)
    assert not os.path.exists(os.path.join(out, "result.json"))  # a signalled run is not scored
    monkeypatch.setattr(train, "average_log_likelihood", validate)
    assert train.main(["--resume", os.path.join(out, "last.pt"), "--epochs", "2", "--device", "cpu"]) == 0
    assert [r["epoch"] for r in metrics(out)] == ["1", "2"]


@pytest.mark.parametrize("error, expected", [
    (RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you "
                  "tried to allocate 3221225472 bytes. Error code 12 (Cannot allocate memory)"),
     "3.0 GiB could not be allocated in host memory"),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 79.19 "
                            "GiB of which 1.2 GiB is free. Including non-PyTorch memory, ..."),
     "20.00 GiB could not be allocated on the GPU")])
def test_out_of_memory_is_one_clear_line(error, expected, capsys):
    def main(argv):
        raise error
    assert run_in_process(main, []) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: out of memory: " + expected) and len(err.strip().splitlines()) == 1


def test_ctrl_c_in_any_tool_is_one_line_and_status_130(trained, tmp_path, capsys, monkeypatch):
    out, _ = trained

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(sample.plots, "sample_images", interrupted)  # Ctrl-C while the grid is drawn
    assert run_in_process(sample.main, [os.path.join(out, "best.pt"), "--out", str(tmp_path / "s.png"),
                                        "--device", "cpu"]) == 130
    assert capsys.readouterr().err == "interrupted\n" and not os.path.exists(tmp_path / "s.png")


def test_a_closed_pipe_is_swallowed_once_and_its_descriptor_then_goes_to_devnull():
    """The guard of a tool's output: a write to a pipe whose reader left neither raises nor is retried."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    closed = []
    with os.fdopen(write_end, "w") as stream:
        guard = ClosedPipeGuard(stream, on_close=lambda: closed.append(True))
        assert guard.write("a line\n") == len("a line\n")  # buffered: the pipe is not touched yet
        guard.flush()
        guard.write("more\n")
        guard.flush()
        assert closed == [True]
        assert stat.S_ISCHR(os.fstat(stream.fileno()).st_mode)  # os.devnull now, not the pipe
        assert guard.fileno() == stream.fileno() and not guard.isatty()  # the rest is the stream's


@pytest.mark.parametrize("merged", [False, True], ids=["stdout", "stdout-and-stderr"])
def test_a_tool_piped_into_head_ends_quietly(merged):
    """``python -m nice_ext | head -1``: the report goes on after its reader left, with no traceback and no
    "Broken pipe" error, and ends with its own exit status."""
    proc = subprocess.Popen([sys.executable, "-m", "nice_ext"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT if merged else subprocess.PIPE, text=True)
    assert proc.stdout.readline().startswith("nice_ext ")
    proc.stdout.close()  # as head does after its line; the report's checks still have lines to print
    stderr = "" if merged else proc.stderr.read()
    assert proc.wait(timeout=300) == 0, stderr
    assert stderr == ""


@pytest.mark.parametrize("tool, args, message", [
    (evaluate, ["--draws", "0"], "--draws must be >= 1"),
    (evaluate, ["--batch-size", "0"], "--batch-size must be >= 1"),
    (sample, ["--n", "0"], "--n must be positive"),
    (sample, ["--temperature", "-1"], "--temperature must be a finite number >= 0"),
    (sample, ["--temperature", "nan"], "--temperature must be a finite number >= 0"),
    (sample, ["--temperature", "1e38", "--n", "4"], "--temperature: 4 of the 4 samples are not finite: temperature 1e+38 takes"),
    (inpaint, ["--n", "0"], "--n must be positive and --steps >= 0"),
    (inpaint, ["--steps", "-1"], "--n must be positive and --steps >= 0"),
])
def test_bad_tool_values_are_one_line(trained, tool, args, message, tmp_path, capsys):
    out, _ = trained
    argv = [os.path.join(out, "best.pt"), "--device", "cpu", *args]
    argv += ["--data-dir", data_dir(), "--no-download"] if tool is not sample else []
    argv += ["--out", str(tmp_path / "x.png")] if tool is not evaluate else []
    assert run_in_process(tool.main, argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1, err


def test_a_bug_keeps_its_traceback():
    def main(argv):
        raise RuntimeError("an internal error")
    with pytest.raises(RuntimeError, match="an internal error"):
        run_in_process(main, [])


def test_a_subset_larger_than_the_dataset_says_so(tmp_path, capsys):
    tiny = [arg if arg != "1000" else "100000000" for arg in TINY]
    assert train.main(["--data-dir", data_dir(), "--out-dir", str(tmp_path), "--max_iter", "1", *tiny]) == 0
    assert "--subset 100000000 is more than the 50000 training images of mnist" in capsys.readouterr().out


def test_result_names_the_commit_the_run_started_from(tmp_path, monkeypatch):
    from nice_ext import provenance
    checkout = {"commit": "started-here"}
    monkeypatch.setattr(provenance, "source_commit", lambda: checkout["commit"])
    prepare_out_dir = train.prepare_out_dir

    def prepare_then_commit(*args, **kwargs):  # the checkout moves on once the run has begun
        replaced = prepare_out_dir(*args, **kwargs)
        checkout["commit"] = "committed-while-running"
        return replaced
    monkeypatch.setattr(train, "prepare_out_dir", prepare_then_commit)
    assert train.main(["--data-dir", data_dir(), "--out-dir", str(tmp_path), "--max_iter", "2", *TINY]) == 0
    assert json.load(open(tmp_path / "result.json"))["commit"] == "started-here"


@pytest.mark.parametrize("native", [False, True])
def test_bf16_on_a_cpu_without_native_bf16_says_fp32_is_faster(tmp_path, capsys, monkeypatch, native):
    monkeypatch.setattr(train, "cpu_has_native_bf16", lambda: native)
    out = str(tmp_path / "run")
    assert train.main(["--data-dir", data_dir(), "--out-dir", out, "--epochs", "1", "--precision", "bf16", *TINY]) == 0
    printed = capsys.readouterr().out
    assert ("this CPU has no native bf16 arithmetic" in printed) == (not native)


def test_tf32_on_the_cpu_says_it_changes_nothing_there(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert train.main(["--data-dir", data_dir(), "--out-dir", out, "--max_iter", "1", "--precision", "tf32", *TINY]) == 0
    assert "note: --precision tf32 is a setting of NVIDIA GPUs' matmuls; on the CPU they stay fp32" in \
        capsys.readouterr().out


def test_native_bf16_probe(monkeypatch):
    monkeypatch.setattr(train.platform, "machine", lambda: "x86_64")
    for avx512_bf16, amx, native in ((False, False, False), (True, False, True), (False, True, True)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
        assert train.cpu_has_native_bf16() == native
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    assert train.cpu_has_native_bf16()  # a torch that cannot tell: no note
    monkeypatch.setattr(train.platform, "machine", lambda: "aarch64")
    assert train.cpu_has_native_bf16()
