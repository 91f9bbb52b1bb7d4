"""How a model's scores of its own test images compare with its scores of images it never saw.

    python -m nice_ext.evaluate runs/mnist/best.pt --data-dir data --scores mnist_on_mnist.csv
    python -m nice_ext.evaluate runs/mnist/best.pt --data-dir data --dataset fashion-mnist \\
        --scores mnist_on_fashion.csv
    python benchmarks/compare_scores.py mnist_on_mnist.csv mnist_on_fashion.csv \\
        --labels "MNIST test" "Fashion-MNIST test" --title "MNIST model" [--out FIG.png] [--json FILE]

Reads the per-image scores ``evaluate --scores FILE.csv`` writes and prints, per file, the mean and the 5th,
50th and 95th percentiles of the images' log-likelihoods (nats) and bits/dim, and, for the second file
against the first: the AUROC of telling them apart by the score (the probability that an image of the first
file scores higher than one of the second, ties counted half: 1 when every first-file image scores higher,
0.5 for no difference, below 0.5 when the second file's images score higher, as Nalisnick et al. (2019)
found for other flows), and the share of the second file's images that score above the first file's median
and above its 5th percentile. ``--out`` draws both histograms of bits/dim (a log axis: the images a model
never saw can cost it ten times the bits); ``--json`` writes the numbers with the command, commit and date.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import shlex
import sys
from typing import Dict, List

import numpy as np
from matplotlib import ticker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from nice_ext import provenance  # noqa: E402
from nice_ext.cli_common import run_tool  # noqa: E402
from nice_ext.files import write_bytes  # noqa: E402
from nice_ext.plots import figure, save_figure  # noqa: E402

PERCENTILES = (5, 50, 95)


def read_scores(path: str) -> Dict[str, np.ndarray]:
    """ll_nats and bits_per_dim of each image, from a .csv that ``evaluate --scores`` wrote."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as error:
        raise SystemExit(f"error: {path}: {error.strerror}")
    try:
        scores = {key: np.array([float(row[key]) for row in rows]) for key in ("ll_nats", "bits_per_dim")}
    except (KeyError, TypeError, ValueError):
        raise SystemExit(f"error: {path}: not a scores file of python -m nice_ext.evaluate --scores FILE.csv "
                         "(columns index, ll_nats, bits_per_dim)")
    if len(rows) == 0 or not all(np.isfinite(values).all() for values in scores.values()):
        raise SystemExit(f"error: {path}: {'no images' if not rows else 'a score that is NaN or infinite'}")
    return scores


def auroc(higher: np.ndarray, lower: np.ndarray) -> float:
    """P(a score of ``higher`` > a score of ``lower``), ties counted half (the Mann-Whitney statistic)."""
    ordered = np.sort(lower)
    below = np.searchsorted(ordered, higher, side="left")
    below_or_equal = np.searchsorted(ordered, higher, side="right")
    return float((below + below_or_equal).sum() / (2.0 * len(higher) * len(lower)))


def describe(scores: Dict[str, np.ndarray]) -> Dict[str, object]:
    """The count, the mean log-likelihood and, at its 5th, 50th and 95th percentiles, the log-likelihood and
    the bits/dim of that image (bits/dim fall as the log-likelihood rises: its 95th percentile of bits/dim)."""
    ll, bits = scores["ll_nats"], scores["bits_per_dim"]
    return dict(images=len(ll), mean_ll_nats=round(float(ll.mean()), 2),
                percentiles={str(p): dict(ll_nats=round(float(np.percentile(ll, p)), 2),
                                          bits_per_dim=round(float(np.percentile(bits, 100 - p)), 4))
                             for p in PERCENTILES})


def compare(own: Dict[str, np.ndarray], other: Dict[str, np.ndarray]) -> Dict[str, float]:
    own_ll, other_ll = own["ll_nats"], other["ll_nats"]
    return dict(auroc=round(auroc(own_ll, other_ll), 4),
                other_above_own_median=round(float((other_ll > np.median(own_ll)).mean()), 4),
                other_above_own_5th_percentile=round(float((other_ll > np.percentile(own_ll, 5)).mean()), 4))


def markdown(labels: List[str], described: List[Dict[str, object]], compared: Dict[str, float]) -> str:
    lines = ["| images | count | mean nats | nats, 5th / 50th / 95th percentile | bits/dim, the same images |",
             "| --- | --- | --- | --- | --- |"]
    for label, d in zip(labels, described):
        nats = " / ".join(f"{d['percentiles'][str(p)]['ll_nats']:.0f}" for p in PERCENTILES)
        bits = " / ".join(f"{d['percentiles'][str(p)]['bits_per_dim']:.2f}" for p in PERCENTILES)
        lines.append(f"| {label} | {d['images']} | {d['mean_ll_nats']:.2f} | {nats} | {bits} |")
    lines += ["", f"AUROC, {labels[0]} scored above {labels[1]}: {compared['auroc']:.4f}; "
              f"{labels[1]} above {labels[0]}'s median: {100 * compared['other_above_own_median']:.2f} %, "
              f"above its 5th percentile: {100 * compared['other_above_own_5th_percentile']:.2f} %"]
    return "\n".join(lines)


def draw(labels: List[str], scores: List[Dict[str, np.ndarray]], title: str, path: str) -> None:
    fig, ax = figure(6, 3.6)
    bits = [s["bits_per_dim"] for s in scores]
    edges = np.geomspace(min(b.min() for b in bits), max(b.max() for b in bits), 80)
    for label, values in zip(labels, bits):
        ax.hist(values, bins=edges, alpha=0.55, label=f"{label} (median {np.median(values):.2f})")
    ax.set_xscale("log")
    plain = ticker.FuncFormatter(lambda value, _: f"{value:g}")
    ax.xaxis.set_major_formatter(plain)  # 6 and 20, not 6 x 10^0 and 2 x 10^1
    ax.xaxis.set_minor_formatter(ticker.FuncFormatter(
        lambda value, _: f"{value:g}" if f"{value:e}"[0] in "25" else ""))
    ax.set_xlabel("bits/dim of each image (log axis; lower is more likely)")
    ax.set_ylabel("images")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/compare_scores.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("own", help="scores of the model's own test images (.csv of evaluate --scores)")
    p.add_argument("other", help="scores of the other images (.csv of evaluate --scores)")
    p.add_argument("--labels", nargs=2, default=["own", "other"], metavar=("OWN", "OTHER"))
    p.add_argument("--title", default="", help="the figure's title (e.g. the model)")
    p.add_argument("--out", metavar="FIG.png", help="draw both histograms of bits/dim to this image")
    p.add_argument("--json", metavar="FILE", help="also write the numbers, with the command, commit and date")
    args = p.parse_args(argv)
    commit = provenance.source_commit()
    scores = [read_scores(args.own), read_scores(args.other)]
    described = [describe(s) for s in scores]
    compared = compare(*scores)
    print(markdown(args.labels, described, compared))
    if args.out:
        draw(args.labels, scores, args.title, args.out)
        print(f"wrote {args.out}")
    if args.json:
        command = "python benchmarks/compare_scores.py " + shlex.join(sys.argv[1:] if argv is None else argv)
        record = dict(title=args.title, files=dict(zip(args.labels, (args.own, args.other))),
                      **dict(zip(args.labels, described)), **compared, commit=commit,
                      date=datetime.date.today().isoformat(), command=command)
        write_bytes((json.dumps(record, indent=1) + "\n").encode(), args.json)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
