"""How much drawing a run's figures on the writer thread slows the training thread's steps.

    python benchmarks/figures_vs_steps.py [--steps N]

A step here is what a CUDA-graph training step is to the host: a little Python (a few small tensor ops)
and about a millisecond of waiting with the GIL released (the replay; here a sleep). The writer thread
draws the three figures a run writes (`nice_ext.plots`: the sample grid, the training curve, the scaling
spectrum), in Python, holding the GIL most of the time. Printed: the figures' time alone, the steps' time
alone, and the steps' time while the figures are drawn on another thread (with Python's default switch
interval and with a tenth of it). No GPU is needed: the contention is the interpreter's.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from nice_ext import plots  # noqa: E402
from nice_ext.cli_common import run_script  # noqa: E402


def draw_figures(folder: str) -> float:
    """Seconds to draw and write the figures of a 100-epoch MNIST run."""
    history = [dict(epoch=e, step=250 * e, train_ll_nats=1000.0 + e, train_bits_per_dim=5.0,
                    valid_ll_nats=990.0 + e, valid_bits_per_dim=5.1, seconds=0.3, lr=1e-3) for e in range(1, 101)]
    started = time.perf_counter()
    plots.save_grid(torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(0)),
                    os.path.join(folder, "samples.png"))
    plots.training_curve(history, os.path.join(folder, "curve.png"))
    plots.scaling_spectrum(torch.randn(784, generator=torch.Generator().manual_seed(1)),
                           os.path.join(folder, "spectrum.png"))
    return time.perf_counter() - started


def step_ms(steps: int) -> float:
    """Mean milliseconds of ``steps`` steps: 20 small tensor ops, then 1 ms with the GIL released."""
    x = torch.zeros(8)
    started = time.perf_counter()
    for _ in range(steps):
        for _ in range(20):
            x = x + 1
        time.sleep(0.001)
    return (time.perf_counter() - started) / steps * 1e3


def steps_while_drawing(folder: str, rounds: int) -> float:
    """Mean milliseconds per step while another thread draws the figures ``rounds`` times."""
    drawer = threading.Thread(target=lambda: [draw_figures(folder) for _ in range(rounds)])
    drawer.start()
    times = []
    while drawer.is_alive():
        times.append(step_ms(10))
    drawer.join()
    return sum(times) / len(times)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="steps timed alone (default 300)")
    p.add_argument("--rounds", type=int, default=3, help="times the figures are drawn beside the steps (default 3)")
    args = p.parse_args()
    if args.steps < 1 or args.rounds < 1:
        p.error("--steps and --rounds must be positive")
    default_interval = sys.getswitchinterval()
    with tempfile.TemporaryDirectory() as folder:
        draw_figures(folder)  # imports and fonts, once
        result = dict(figures_s=draw_figures(folder), step_ms=step_ms(args.steps))
        for name, interval in (("default", default_interval), ("tenth", default_interval / 10)):
            sys.setswitchinterval(interval)
            try:
                result[f"step_ms_while_drawing_{name}_interval"] = steps_while_drawing(folder, args.rounds)
            finally:
                sys.setswitchinterval(default_interval)
    print(f"figures alone: {result['figures_s']:.3f} s; steps alone: {result['step_ms']:.3f} ms")
    print(f"steps while the figures are drawn: {result['step_ms_while_drawing_default_interval']:.3f} ms "
          f"(switch interval {default_interval * 1e3:g} ms), {result['step_ms_while_drawing_tenth_interval']:.3f} ms "
          f"(a tenth of it)")
    return result


if __name__ == "__main__":
    sys.exit(run_script(main))
