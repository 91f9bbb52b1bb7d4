"""Data-parallel training: 2 CPU processes (gloo, under torchrun) take the same step as one process.

The global batch of 99 splits 50 + 49: a rank that averaged its own slice, instead of scaling its sum to
the global batch, would take a different step."""
import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, data_dir, make_first_epoch_unbeatable, signal_mid_run

pytestmark = pytest.mark.skipif(data_dir() is None, reason="the MNIST files are not available")
ARGS = ["-m", "nice_ext.train", "--subset", "198", "--batch_size", "99", "--mid-dim", "16", "--hidden", "1",
        "--sample_size", "0", "--eval-draws", "1", "--device", "cpu", "--no-download", "--epochs", "1"]


TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def run(launcher, out, *extra, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, *launcher, *ARGS, "--data-dir", data_dir(), "--out-dir", out, *extra],
                            cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.parametrize("speed_flags", [[], ["--overlap-weight-grads", "--fuse-bias-relu"]],
                         ids=["plain", "networks-own-backward"])
def test_two_processes_take_the_same_step_as_one(tmp_path, speed_flags):
    """(With --overlap-weight-grads and --fuse-bias-relu the ranks' coupling networks return their weight
    gradients from a backward of their own, which DistributedDataParallel's gradient hooks must see as they
    see autograd's.)"""
    single, double = str(tmp_path / "single"), str(tmp_path / "double")
    run([], single, "--max_iter", "1")
    stdout = run(TORCHRUN, double, "--max_iter", "1", *speed_flags)
    assert stdout.count("test log-likelihood") == 1  # rank 0 alone reports
    with open(os.path.join(double, "result.json")) as f:
        assert json.load(f)["processes"] == 2
    a = torch.load(os.path.join(single, "last.pt"), weights_only=True)
    b = torch.load(os.path.join(double, "last.pt"), weights_only=True)
    assert a["step"] == b["step"] == 1
    for name, value in a["model_state"].items():
        assert torch.allclose(value, b["model_state"][name], rtol=1e-5, atol=1e-7), name
    # the step really moved the parameters: the comparison above is not between two untouched models
    start = torch.load(os.path.join(single, "last.pt"), weights_only=True)["optimizer_state"]["state"]
    assert all(float(s["step"]) == 1 for s in start.values())
    # one step of two-batch epochs: both stopped inside epoch 1 and kept the whole batch's loss (all ranks')
    assert a["epoch_in_progress"]["batches_done"] == b["epoch_in_progress"]["batches_done"] == 1
    assert a["epoch_in_progress"]["loss_sum"] == pytest.approx(b["epoch_in_progress"]["loss_sum"], rel=1e-6)


def test_all_ranks_stop_together_when_patience_runs_out(tmp_path):
    """Only rank 0 validates; a rank that did not hear its verdict would start another epoch and wait
    forever for the others' gradients."""
    out = str(tmp_path / "run")
    run([], out)
    make_first_epoch_unbeatable(os.path.join(out, "last.pt"))
    stdout = run(TORCHRUN, out, "--resume", os.path.join(out, "last.pt"), "--epochs", "10", "--patience", "2",
                 timeout=300)
    assert "stopped: --patience 2: no validation gain since epoch 1" in stdout
    assert torch.load(os.path.join(out, "last.pt"), weights_only=True)["epoch"] == 3


def test_all_ranks_divide_the_learning_rate_together(tmp_path):
    """--lr-plateau is rank 0's decision: a rank that kept the old rate would step its own copy of the weights
    differently, and its gradients would pull rank 0's away from a single process's."""
    first, single, double = str(tmp_path / "first"), str(tmp_path / "single"), str(tmp_path / "double")
    run([], first)
    make_first_epoch_unbeatable(os.path.join(first, "last.pt"))
    plateau = ["--resume", os.path.join(first, "last.pt"), "--epochs", "4", "--lr-plateau", "1", "--lr", "3e-3"]
    run([], single, *plateau)
    stdout = run(TORCHRUN, double, *plateau, timeout=300)
    assert stdout.count("the learning rate is now") == 3
    a = torch.load(os.path.join(single, "last.pt"), weights_only=True)
    b = torch.load(os.path.join(double, "last.pt"), weights_only=True)
    assert a["lr_plateau"] == b["lr_plateau"] == {"drops": 3, "last_drop_epoch": 4}
    for name, value in a["model_state"].items():
        assert torch.allclose(value, b["model_state"][name], rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_to_torchrun_stops_every_rank_at_the_same_step(tmp_path, stop):
    """torchrun passes a SIGTERM (a scheduler's notice) or SIGINT on to every rank. The ranks must agree on
    the step to stop at (one that went on would wait forever for the others' gradients), and rank 0 must
    keep the place, before torchrun's own grace period runs out."""
    out = str(tmp_path / "run")
    args = [sys.executable, *TORCHRUN, *ARGS, "--epochs", "1000", "--batch_size", "50", "--subset", "500",
            "--save-every", "1000", "--data-dir", data_dir(), "--out-dir", out]  # (a flag given again wins)
    # A scheduler signals torchrun alone; Ctrl-C the foreground group (torchrun starts each rank with
    # setsid, in a process group of its own, so each rank hears it once, from torchrun).
    returncode, stdout, stderr = signal_mid_run(args, stop, to_group=stop == signal.SIGINT, timeout=120,
                                                env=dict(os.environ, OMP_NUM_THREADS="1"))
    # torchrun itself ends with status 1 and its own traceback (SignalException) after the ranks have exited
    assert returncode != 0 and stderr.count(f"{stop.name} received: stopping after this step") == 2, stderr
    assert "KeyboardInterrupt" not in stderr and "interrupted" not in stderr  # each rank heard it once
    assert f"stopped: {stop.name} received" in stdout, stdout
    saved = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    assert saved["epoch"] >= 2 and not os.path.exists(os.path.join(out, "result.json"))
    stdout = run(TORCHRUN, out, "--resume", os.path.join(out, "last.pt"), "--epochs", str(saved["epoch"] + 1),
                 timeout=300)
    assert "test log-likelihood" in stdout
    assert torch.load(os.path.join(out, "last.pt"), weights_only=True)["epoch"] == saved["epoch"] + 1


# Rank 0 "evaluates" for three times the collectives' timeout while rank 1 waits at the end.
LEAVE_SCRIPT = """
import time
from datetime import timedelta
import torch.distributed as dist
from nice_ext.distributed import Context
ctx = Context("cpu", timeout=timedelta(seconds=2))
if ctx.rank == 0:
    time.sleep(6)
{wait}
ctx.close()
print("left")
"""


@pytest.mark.parametrize("wait, leaves", [("ctx.leave_together()", True), ("dist.barrier()", False)])
def test_ranks_wait_at_the_end_for_longer_than_the_collectives_timeout(wait, leaves):
    # dist.barrier(), the wait this replaced, times out after the process group's timeout (NCCL's
    # default is 10 minutes): the control case shows the test would catch it.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = LEAVE_SCRIPT.format(wait=wait)
    ranks = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                                                  WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank)))
             for rank in (0, 1)]
    try:
        outputs = [rank.communicate(timeout=120) for rank in ranks]
    finally:
        for rank in ranks:
            rank.kill()
    waiting_rank_out, waiting_rank_err = outputs[1]
    if leaves:
        assert [rank.returncode for rank in ranks] == [0, 0], outputs
        assert all(out.strip() == "left" for out, _ in outputs)
    else:
        assert ranks[1].returncode != 0 and "left" not in waiting_rank_out
        assert "Timed out" in waiting_rank_err, waiting_rank_err[-2000:]  # gloo's words


def test_each_rank_trains_on_its_own_part_of_the_global_batch():
    from nice_ext.distributed import Context

    ctx = Context("cpu")  # outside torchrun: one process, the whole batch
    x = torch.arange(99.0).view(99, 1)
    assert torch.equal(ctx.local_slice(x), x)
    ctx.enabled, ctx.world_size = True, 2
    parts = []
    for rank in (0, 1):
        ctx.rank = rank
        parts.append(ctx.local_slice(x))
    assert [p.shape[0] for p in parts] == [50, 49] and torch.equal(torch.cat(parts), x)
