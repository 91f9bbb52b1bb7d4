import os
import signal
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# tests/test_cuda_emulation.py runs the op tests in a copy of the package whose compiled library runs the
# CUDA kernels, compiled for the host, for CPU tensors (tests/cuda_emulation/build.py marks that copy).
# There the CPU is the device the CUDA kernels take, and the only device the library serves.
CUDA_KERNELS_EMULATED = os.path.exists(os.path.join(ROOT, "nice_ext", "CUDA_EMULATION"))
CUDA_KERNEL_DEVICE = "cpu" if CUDA_KERNELS_EMULATED else "cuda"
needs_cuda_kernels = pytest.mark.skipif(not (CUDA_KERNELS_EMULATED or torch.cuda.is_available()),
                                        reason="needs a CUDA GPU (or the CUDA emulation)")

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(CUDA_KERNELS_EMULATED or not torch.cuda.is_available(),
                                                              reason="needs a CUDA GPU"))]


@pytest.fixture(autouse=True)
def seeded_global_random_state():
    """Every test starts from the same global random state. torch seeds each process anew, so a check on
    unseeded draws could pass in one run and fail in the next (one did: about 1 run in 7)."""
    torch.manual_seed(0)


def run_python(code: str, cwd: str = ROOT, pythonpath: str = None, env: dict = None,
               timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -c code`` in a fresh interpreter, its output captured as text: for what only a process's
    start shows (an import, a library's state at load, environment variables read then, a memory peak).
    ``env`` adds to this process's environment; ``pythonpath`` sets PYTHONPATH."""
    env = dict(os.environ, **(env or {}))
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def needed_shared_libraries(path: str):
    """The NEEDED entries of an ELF shared object (readelf -d), or None where readelf is not installed."""
    import shutil

    readelf = shutil.which("readelf")
    if readelf is None:
        return None
    dynamic = subprocess.run([readelf, "-d", path], capture_output=True, text=True, timeout=60, check=True).stdout
    return [line.rsplit("[", 1)[1].rstrip("]") for line in dynamic.splitlines() if "(NEEDED)" in line]


# The coupling networks' speed settings (nice_ext.mlp), alone and together: none may change a number.
NETWORK_SETTINGS = {"overlap": dict(overlap_weight_grads=True), "fuse": dict(fuse_bias_relu=True),
                    "overlap-fuse": dict(overlap_weight_grads=True, fuse_bias_relu=True)}


def with_network_settings(model, setting: str):
    """``model`` (a NICE or a CouplingMLP) with ``NETWORK_SETTINGS[setting]`` (None: as it is) switched on."""
    for name, value in NETWORK_SETTINGS.get(setting, {}).items():
        setattr(model, name, value)
    return model


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64; NaN anywhere is an infinite error."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    if not torch.isfinite(actual).all():
        return float("inf")
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-300))


def sliced(t: torch.Tensor, pad_rows: int = 2, pad_cols: int = 3) -> torch.Tensor:
    """The same values as ``t``, as a view into a larger buffer (row offset and a row stride != D)."""
    big = torch.randn(t.shape[0] + 2 * pad_rows, t.shape[1] + 2 * pad_cols, dtype=t.dtype, device=t.device)
    view = big[pad_rows:pad_rows + t.shape[0], pad_cols:pad_cols + t.shape[1]]
    view.copy_(t)
    return view


def column_offset(t: torch.Tensor) -> torch.Tensor:
    """The same values as ``t``, as a view one column into a wider buffer: its rows no longer start on a
    16-byte boundary, while a tensor beside it may."""
    wide = torch.zeros(t.shape[0], t.shape[1] + 1, dtype=t.dtype, device=t.device)
    wide[:, 1:] = t
    return wide[:, 1:]


# Mask pairs (a layer's mask, the next layer's) for the coupling ops' tests. The CPU kernels (additive and
# affine) and both couplings' CUDA version 2 kernels take their stride-2 path for odd/even masks whose next
# layer keeps the other parity (odd-even, even-odd), the same parity (odd-even-same-next) or is absent
# (odd-even-last); a next mask that keeps only a prefix of one parity, a random next mask or a random mask
# take the general one.
MASK_KINDS = ["odd-even", "even-odd", "odd-even-same-next", "odd-even-last", "odd-even-prefix-next",
              "odd-even-random-next", "random"]


def random_mask(d, generator):
    while True:
        mask = torch.rand(d, generator=generator) < 0.4
        if 0 < int(mask.sum()) < d:
            return mask


def coupling_masks(features, mask_kind, generator):
    """(mask, next_mask) of the kind named (one of MASK_KINDS); next_mask may be None."""
    from nice_ext.masks import odd_even_mask

    if mask_kind == "odd-even":
        return odd_even_mask(features, True), odd_even_mask(features, False)
    if mask_kind == "even-odd":
        return odd_even_mask(features, False), odd_even_mask(features, True)
    if mask_kind == "odd-even-same-next":
        return odd_even_mask(features, True), odd_even_mask(features, True)
    if mask_kind == "odd-even-last":
        return odd_even_mask(features, True), None
    if mask_kind == "odd-even-prefix-next":
        return odd_even_mask(features, True), (torch.arange(features) % 2 == 0) & (torch.arange(features) <= features // 2)
    if mask_kind == "odd-even-random-next":
        return odd_even_mask(features, True), random_mask(features, generator)
    assert mask_kind == "random", mask_kind
    return random_mask(features, generator), random_mask(features, generator)


def data_dir():
    """The shared MNIST / Fashion-MNIST files, or None when absent."""
    for candidate in (os.environ.get("NICE_EXT_DATA_DIR"), os.path.join(ROOT, "..", "shared", "data"),
                      os.path.join(ROOT, "data")):
        if candidate and os.path.exists(os.path.join(candidate, "mnist", "train-images-idx3-ubyte.gz")):
            return candidate
    return None


def write_images(folder, images, prefix="img", ext=".png"):
    """uint8 images (N, C, H, W), C = 1 or 3, as image files ``folder/prefix0000.png``, ... (the images
    dataset's layout: DIR/train/ and DIR/test/)."""
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    for i, image in enumerate(images):
        array = image.permute(1, 2, 0).numpy()  # C, H, W -> H, W, C
        Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).save(
            os.path.join(folder, f"{prefix}{i:04d}{ext}"))


def make_first_epoch_unbeatable(checkpoint_path: str) -> None:
    """Rewrite a checkpoint as if its first epoch had scored a validation log-likelihood no later epoch
    can reach: every epoch after it is then one without a gain (to test --patience deterministically)."""
    state = torch.load(checkpoint_path, weights_only=True)
    state["history"][0]["valid_ll_nats"] = state["best_valid"] = 1e9
    torch.save(state, checkpoint_path)


def signal_mid_run(args, stop: signal.Signals, *, to_group: bool = False, timeout: float = 300, **popen):
    """Start a training command as from a terminal, wait until its second epoch is done (the signal then
    lands in the middle of a run) and send it ``stop``: to the process alone, as a job scheduler does, or
    with ``to_group`` to its whole process group, as Ctrl-C in a terminal does. Returns (returncode,
    stdout, stderr).

    SIGINT is reset to its default in the child: a runner that started these tests in the background
    passes it on ignored, and training rightly leaves an inherited ignored signal alone."""
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=to_group,  # a group of its own: the terminal's foreground group
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **popen)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("epoch 2:"):
            break
    if to_group:
        os.killpg(proc.pid, stop)
    else:
        proc.send_signal(stop)
    stdout, stderr = proc.communicate(timeout=timeout)
    return proc.returncode, "".join(seen) + stdout, stderr
