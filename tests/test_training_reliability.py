"""Training that survives: the NaN/Inf guard, whitened datasets end to end, atomic writes, SIGINT/SIGTERM and
SIGKILL at random moments."""
import collections
import csv
import errno
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time

import pytest
import torch
from PIL import Image

from conftest import ROOT, data_dir, signal_mid_run
from nice_ext import NICE, train
from nice_ext import data as data_lib
from nice_ext.checkpoint import host_copy, load_checkpoint, model_from_checkpoint
from nice_ext.files import BackgroundWriter, atomic_file, stale_temporaries, write_bytes

TINY = ["--mid-dim", "16", "--hidden", "1", "--batch_size", "50", "--sample_size", "4", "--eval-draws", "1",
        "--device", "cpu", "--no-download"]


@pytest.fixture
def fake_dataset(monkeypatch):
    """Synthetic uint8 pixels in place of the files: 10,300 'training' and 200 'test' images."""
    def load_pixels(name, data_dir, split, download=True, image_shape=None):
        info = data_lib.dataset_info(name)
        g = torch.Generator().manual_seed(0 if split == "train" else 1)
        n = 10_300 if split == "train" else 200
        base = torch.randint(0, 256, (1, info.dim), generator=g)
        return (base + torch.randint(-20, 21, (n, info.dim), generator=g)).clamp(0, 255).to(torch.uint8)

    monkeypatch.setattr(data_lib, "load_pixels", load_pixels)


@pytest.mark.parametrize("save_interval", [[], ["--save-interval", "3600"]])
def test_a_nan_loss_stops_training_and_names_epoch_and_step(fake_dataset, monkeypatch, tmp_path, capsys,
                                                           save_interval):
    # with --save-interval, epoch 2's best state is still on the host when the loss fails: the stop writes it
    real_log_prob, calls = NICE.log_prob, {"n": 0}

    def log_prob(self, x):
        out = real_log_prob(self, x)
        if not self.training:  # validation and test passes
            return out
        calls["n"] += 1
        return out * float("nan") if calls["n"] == 9 else out

    monkeypatch.setattr(NICE, "log_prob", log_prob)
    code = train.main(["--dataset", "mnist", "--out-dir", str(tmp_path), "--epochs", "3", "--subset", "200",
                       "--data-dir", str(tmp_path), *save_interval, *TINY])
    err = capsys.readouterr().err
    assert code == 3
    assert "epoch 3, step 9" in err  # 4 steps per epoch: the 9th step is the first of epoch 3
    payload = load_checkpoint(os.path.join(tmp_path, "best.pt"))  # the checkpoints on disk are intact
    assert payload["epoch"] == 2 and torch.isfinite(model_from_checkpoint(payload).log_scale).all()


def test_whitened_dataset_end_to_end(fake_dataset, tmp_path):
    """CIFAR-10's path: [-1, 1] data, ZCA fitted on the training split, log|det W| in every reported number."""
    out = str(tmp_path / "run")
    assert train.main(["--dataset", "cifar10", "--out-dir", out, "--epochs", "1", "--subset", "300",
                       "--data-dir", str(tmp_path), *TINY]) == 0
    payload = load_checkpoint(os.path.join(out, "best.pt"))
    preprocess = data_lib.Preprocess(data_lib.dataset_info("cifar10"))
    preprocess.load_state_dict(payload["preprocess_state"])
    assert preprocess.log_det != 0.0
    model = model_from_checkpoint(payload).eval()
    pixels = data_lib.load_pixels("cifar10", "", "test")[:50]
    g = torch.Generator().manual_seed(0)
    x = data_lib.dequantize(pixels, (-1.0, 1.0), g)
    whitened = preprocess.zca(x)
    direct = model.log_prob(whitened.float()).double() + preprocess.log_det
    assert torch.allclose(direct, model.log_prob(preprocess(pixels, torch.Generator().manual_seed(0))).double()
                          + preprocess.log_det, rtol=1e-4)
    assert os.path.getsize(os.path.join(out, "samples.png")) > 0


def test_written_files_get_the_usual_permissions(tmp_path):
    """Not mkstemp's private 0600: a new file gets 0666 less the umask, a replaced one keeps its mode."""
    old_umask = os.umask(0o022)
    try:
        with atomic_file(str(tmp_path / "metrics.csv")) as f:
            f.write(b"new")
        assert os.stat(tmp_path / "metrics.csv").st_mode & 0o777 == 0o644
        os.chmod(tmp_path / "metrics.csv", 0o640)
        with atomic_file(str(tmp_path / "metrics.csv")) as f:
            f.write(b"newer")
        assert os.stat(tmp_path / "metrics.csv").st_mode & 0o777 == 0o640
        os.umask(0o077)
        with atomic_file(str(tmp_path / "best.pt")) as f:
            f.write(b"private")
        assert os.stat(tmp_path / "best.pt").st_mode & 0o777 == 0o600
    finally:
        os.umask(old_umask)


def test_an_interrupted_write_leaves_the_old_file(tmp_path):
    target = tmp_path / "samples.png"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="interrupted"):
        with atomic_file(str(target)) as f:
            f.write(b"half of the new")
            raise RuntimeError("interrupted")
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["samples.png"]
    with atomic_file(str(target)) as f:
        f.write(b"new")
    assert target.read_bytes() == b"new" and os.listdir(tmp_path) == ["samples.png"]
    # A SIGKILL skips the clean-up: the next run finds the temporary file (and train removes it).
    (tmp_path / ".tmp-curve.png-x1y2").write_bytes(b"half")
    (tmp_path / ".tmp-notes.txt-x1y2").write_bytes(b"not ours")
    assert stale_temporaries(str(tmp_path), list(train.RUN_OUTPUTS)) == [str(tmp_path / ".tmp-curve.png-x1y2")]


def test_a_failed_write_names_its_file_and_leaves_the_old_one(tmp_path):
    target = tmp_path / "last.pt"
    target.write_bytes(b"old")
    with pytest.raises(OSError) as raised:
        with atomic_file(str(target)) as f:
            f.write(b"part of the new")
            raise OSError(errno.ENOSPC, "No space left on device")  # as a write to a full disk raises it
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(target)
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["last.pt"]


def test_a_folder_one_cannot_write_in_names_the_file_asked_for(tmp_path, monkeypatch):
    def refused(prefix, dir):
        raise PermissionError(errno.EACCES, "Permission denied", os.path.join(dir, prefix + "x1y2"))
    with monkeypatch.context() as patched:
        patched.setattr(tempfile, "mkstemp", refused)
        with pytest.raises(PermissionError) as raised:
            write_bytes(b"new", str(tmp_path / "samples.png"))
    assert raised.value.filename == str(tmp_path / "samples.png") and ".tmp-" not in str(raised.value)
    if os.path.isdir("/proc/self"):  # a real one: Linux's /proc takes no new files
        with pytest.raises(OSError) as raised:
            write_bytes(b"new", "/proc/samples.png")
        assert raised.value.filename == "/proc/samples.png"


def test_the_writer_keeps_the_order_holds_one_batch_at_a_time_and_reports_failures(capsys):
    writer, log = BackgroundWriter(), []
    release = threading.Event()
    writer.submit([lambda: release.wait(30), lambda: log.append("first batch")])
    handed_over = threading.Event()
    second = threading.Thread(target=lambda: (writer.submit([lambda: log.append("second batch")]), handed_over.set()))
    second.start()
    assert not handed_over.wait(0.2)  # the second batch waits for the first to be written
    release.set()
    second.join(30)
    writer.wait()
    assert log == ["first batch", "second batch"]

    def full_disk():
        raise OSError(errno.ENOSPC, "No space left on device", "run/last.pt")

    writer.submit([full_disk, lambda: log.append("after the failure")])
    with pytest.raises(OSError, match="last.pt"):
        writer.wait()
    assert log[-1] == "second batch"  # a batch stops at its first failure
    writer.wait()  # the failure is reported once
    writer.submit([full_disk])
    with pytest.raises(OSError, match="last.pt"):  # the next hand-over reports it too
        writer.submit([lambda: log.append("next")])
    writer.wait()
    writer.submit([full_disk])
    deadline = time.time() + 30
    with pytest.raises(OSError, match="last.pt"):  # and so does a look without waiting, once it has failed
        while time.time() < deadline:
            writer.poll()
            time.sleep(0.01)
    writer.poll()
    writer.submit([full_disk])
    writer.wait_quietly()  # for a caller that is failing already: printed, not raised
    assert "a file write failed too: OSError" in capsys.readouterr().err


def test_host_copy_is_a_snapshot_training_cannot_change():
    Pair = collections.namedtuple("Pair", "a b")
    weight = torch.ones(3)
    payload = {"model_state": {"w": weight}, "history": [{"epoch": 1}], "rng": ("name", torch.arange(3), 2),
               "pair": Pair(torch.zeros(1), "b"), "epoch": 1, "args": {"lr": 1e-3, "device": None}}
    copy = host_copy(payload)
    weight += 1  # training goes on in place
    payload["history"].append({"epoch": 2})
    payload["history"][0]["epoch"] = 99
    assert torch.equal(copy["model_state"]["w"], torch.ones(3)) and copy["history"] == [{"epoch": 1}]
    assert isinstance(copy["rng"], tuple) and torch.equal(copy["rng"][1], torch.arange(3))
    assert isinstance(copy["pair"], Pair) and copy["pair"].b == "b"
    assert copy["args"] == {"lr": 1e-3, "device": None} and copy["epoch"] == 1


def test_training_goes_on_while_its_files_are_written(fake_dataset, monkeypatch, tmp_path):
    """best.pt of epoch 1 is held back until epoch 2 trains, which it could not if training waited for the
    write; and a run's files are all written, and of its last epoch, when it returns."""
    real_save, real_log_prob, calls = train.save_atomic, NICE.log_prob, {"n": 0}
    epoch_2_trains, seen = threading.Event(), {}

    def log_prob(self, x):
        if self.training:
            calls["n"] += 1
            if calls["n"] == 5:  # 4 steps per epoch: the first step of epoch 2
                epoch_2_trains.set()
        return real_log_prob(self, x)

    def slow_save(payload, path):
        if payload["epoch"] == 1 and path.endswith("best.pt"):
            seen["trained on"] = epoch_2_trains.wait(60)
        time.sleep(0.2)  # a slow disk
        # what is written is the state of its epoch, though training went on meanwhile
        seen.setdefault("rows per epoch", []).append((payload["epoch"], len(payload["history"])))
        real_save(payload, path)

    monkeypatch.setattr(NICE, "log_prob", log_prob)
    monkeypatch.setattr(train, "save_atomic", slow_save)
    out = str(tmp_path / "run")
    assert train.main(["--dataset", "mnist", "--out-dir", out, "--epochs", "3", "--subset", "200",
                       "--save-every", "1", "--data-dir", str(tmp_path), *TINY]) == 0
    assert seen["trained on"]
    assert (1, 1) in seen["rows per epoch"] and all(epoch == rows for epoch, rows in seen["rows per epoch"])
    assert load_checkpoint(os.path.join(out, "last.pt"))["epoch"] == 3
    assert sorted(os.listdir(out)) == sorted(["best.pt", "last.pt", "metrics.csv", "samples.png", "curve.png",
                                              "spectrum.png", "result.json"])
    assert len(open(os.path.join(out, "metrics.csv")).read().splitlines()) == 1 + 3


def test_save_interval_keeps_the_best_state_on_the_host_and_skips_outputs_until_the_end(fake_dataset, monkeypatch,
                                                                                     tmp_path):
    """--save-interval 3600: after the first epoch's files, validation gains wait on the host and the outputs
    due every epoch are skipped; the end writes the best state (of its own epoch) and the last one."""
    real_save, written = train.save_atomic, []

    def recording_save(payload, path):
        written.append((os.path.basename(path), payload["epoch"]))
        real_save(payload, path)

    monkeypatch.setattr(train, "save_atomic", recording_save)
    out = str(tmp_path / "run")
    assert train.main(["--dataset", "mnist", "--out-dir", out, "--epochs", "4", "--subset", "200",
                       "--save-every", "1", "--save-interval", "3600", "--data-dir", str(tmp_path), *TINY]) == 0
    rows = list(csv.DictReader(open(os.path.join(out, "metrics.csv"))))
    valid = [float(row["valid_ll_nats"]) for row in rows]
    best_epoch = 1 + valid.index(max(valid))
    assert [epoch for name, epoch in written if name == "last.pt"] == [1, 4]
    assert [epoch for name, epoch in written if name == "best.pt"] == sorted({1, best_epoch})
    assert load_checkpoint(os.path.join(out, "best.pt"))["epoch"] == best_epoch and len(rows) == 4
    refused = subprocess.run([sys.executable, "-m", "nice_ext.train", "--save-interval", "-1"], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "--save-interval must be a finite number of seconds >= 0" in refused.stderr


def test_a_write_that_fails_during_training_stops_the_run_with_its_file_named(fake_dataset, monkeypatch, tmp_path,
                                                                              capsys):
    real_save = train.save_atomic

    def full_disk(payload, path):
        if path.endswith("last.pt"):
            raise OSError(errno.ENOSPC, "No space left on device", path)
        real_save(payload, path)

    monkeypatch.setattr(train, "save_atomic", full_disk)
    out = str(tmp_path / "run")
    code = train.main(["--dataset", "mnist", "--out-dir", out, "--epochs", "4", "--subset", "200",
                       "--save-every", "1", "--data-dir", str(tmp_path), *TINY])
    err = capsys.readouterr().err
    assert code == 1 and "No space left on device" in err and "last.pt" in err, err
    assert load_checkpoint(os.path.join(out, "best.pt"))["epoch"] >= 1  # what was written stays loadable
    assert not os.path.exists(os.path.join(out, "result.json"))


@pytest.mark.skipif(data_dir() is None, reason="the MNIST files are not available")
def test_sigkill_at_random_moments_leaves_loadable_checkpoints(tmp_path):
    out = str(tmp_path / "run")
    args = [sys.executable, "-m", "nice_ext.train", "--data-dir", data_dir(), "--out-dir", out, "--subset", "500",
            "--save-every", "1", "--epochs", "40", *TINY]
    rng = random.Random(0)
    for attempt in range(4):
        resume = ["--resume", os.path.join(out, "last.pt")] if os.path.exists(os.path.join(out, "last.pt")) else []
        proc = subprocess.Popen(args + resume, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if attempt == 0:  # the first run gets as far as one checkpoint, however slow or busy the machine
            deadline = time.time() + 300
            while not os.path.exists(os.path.join(out, "last.pt")) and proc.poll() is None and time.time() < deadline:
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 2.0))
        else:
            time.sleep(rng.uniform(3.0, 9.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        for name in os.listdir(out) if os.path.exists(out) else []:
            if name.endswith(".pt") and not name.startswith(".tmp-"):  # a killed write leaves only a temp file
                payload = load_checkpoint(os.path.join(out, name))  # raises if truncated or corrupt
                model_from_checkpoint(payload)
            if name.endswith(".png") and not name.startswith(".tmp-"):  # figures are written atomically too
                with Image.open(os.path.join(out, name)) as image:
                    image.verify()
    assert os.path.exists(os.path.join(out, "last.pt")), "no checkpoint was ever completed"
    before = load_checkpoint(os.path.join(out, "last.pt"))["epoch"]
    result = subprocess.run(args[:-len(TINY) - 2] + ["--epochs", str(before + 1), *TINY, "--resume",
                                                     os.path.join(out, "last.pt")],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert load_checkpoint(os.path.join(out, "last.pt"))["epoch"] == before + 1
    assert not [name for name in os.listdir(out) if name.startswith(".tmp-")]  # leftovers were cleared


@pytest.mark.skipif(data_dir() is None, reason="the MNIST files are not available")
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_sigint_and_sigterm_save_the_place_and_resume_goes_on(tmp_path, stop):
    """Ctrl-C, or a scheduler's SIGTERM, stops the run as --time-limit does: last.pt (never written on a
    schedule here) keeps the place, the exit status is 128 + the signal, and --resume goes on."""
    out = str(tmp_path / "run")
    args = [sys.executable, "-m", "nice_ext.train", "--data-dir", data_dir(), "--out-dir", out, "--subset", "500",
            "--save-every", "1000", "--epochs", "1000", *TINY]
    returncode, stdout, stderr = signal_mid_run(args, stop)
    assert returncode == 128 + stop, stderr
    assert f"stopped: {stop.name} received" in stdout and "Traceback" not in stderr, (stdout, stderr)
    assert not os.path.exists(os.path.join(out, "result.json"))  # no test evaluation on the way out
    saved = load_checkpoint(os.path.join(out, "last.pt"))
    assert saved["epoch"] >= 2 and saved["args"]["epochs"] == 1000
    result = subprocess.run(args[:-len(TINY) - 2] + ["--epochs", str(saved["epoch"] + 1), *TINY, "--resume",
                                                     os.path.join(out, "last.pt")],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert load_checkpoint(os.path.join(out, "last.pt"))["epoch"] == saved["epoch"] + 1
    assert os.path.exists(os.path.join(out, "result.json"))


@pytest.mark.skipif(data_dir() is None, reason="the MNIST files are not available")
def test_training_piped_into_head_stops_as_on_a_signal_and_keeps_its_place(tmp_path):
    """``train ... | head``: once the reader left, the next line training prints would fail. The run stops
    after that step instead, as on SIGTERM: last.pt keeps the place, no test evaluation, no traceback, and
    the exit status of a process that SIGPIPE ended (128 + 13)."""
    out = str(tmp_path / "run")
    args = [sys.executable, "-m", "nice_ext.train", "--data-dir", data_dir(), "--out-dir", out, "--subset", "500",
            "--save-every", "1000", "--epochs", "1000", *TINY]
    with open(tmp_path / "stderr", "w+") as stderr:
        proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=stderr, text=True)
        assert proc.stdout.readline().startswith("epoch 1:")
        proc.stdout.close()
        returncode = proc.wait(timeout=300)
        stderr.seek(0)
        said = stderr.read()
    assert returncode == 128 + signal.SIGPIPE, said
    assert "the reader of the output left: stopping after this step" in said and "Traceback" not in said, said
    assert "Broken pipe" not in said and not os.path.exists(os.path.join(out, "result.json"))
    saved = load_checkpoint(os.path.join(out, "last.pt"))
    assert saved["epoch"] >= 2 and saved["epoch"] < 1000


def test_a_signal_after_the_reader_left_still_stops_gently_the_first_time():
    stop_signals = train.StopSignals()
    stop_signals.output_closed()
    assert stop_signals.received == signal.SIGPIPE
    assert stop_signals.reason == "the reader of the output left (SIGPIPE)"
    interrupt = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        stop_signals.install()
        try:
            os.kill(os.getpid(), signal.SIGTERM)  # the first signal: no KeyboardInterrupt, the reason stays
            assert stop_signals.received == signal.SIGPIPE and stop_signals.signalled
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
        finally:
            stop_signals.restore()
    finally:
        signal.signal(signal.SIGINT, interrupt)


def test_a_second_stop_signal_interrupts_at_once():
    interrupt = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in an interactive Python
    try:
        stop_signals = train.StopSignals()
        before = signal.getsignal(signal.SIGTERM)
        stop_signals.install()
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            assert stop_signals.received == signal.SIGTERM and stop_signals.reason == "SIGTERM received"
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
        finally:
            stop_signals.restore()
        assert signal.getsignal(signal.SIGTERM) is before
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, interrupt)
    # A signal the process was started ignoring (nohup, a shell's `cmd &`) stays ignored.
    interrupt = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        stop_signals = train.StopSignals()
        stop_signals.install()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        stop_signals.restore()
    finally:
        signal.signal(signal.SIGINT, interrupt)
