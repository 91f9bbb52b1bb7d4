"""The fused operators of nice_ext: Python entry points and fake kernels.

The schemas live in ``csrc/ops.cpp``; the kernels in ``csrc/cpu`` and ``csrc/cuda``; each op's entry
points and autograd in ``csrc/<op>.cpp``; the pure-PyTorch reference in ``nice_ext/reference.py``.
Importing this module loads the compiled library.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
import weakref
from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor

from . import reference
from .build_support import kernel_sources_changed, extension_import_error, parse_source_digests
from .masks import check_mask, check_mask_layout, coupling_maps

try:
    from . import _C  # noqa: F401  (loading the library registers torch.ops.nice_ext.*)
except ImportError as error:  # Python's own message blames a circular import, or names only a symbol
    raise ImportError(extension_import_error(os.path.dirname(os.path.abspath(__file__)), error)) from error

PRIORS = ("logistic", "gaussian")


def stale_kernel_sources() -> List[str]:
    """In a source checkout (``pip install -e .``): the kernel sources changed since the extension was built,
    which it therefore does not run (by content; see build_support.kernel_sources_changed). Empty for an
    installed package or an extension built from the sources as they are."""
    package = os.path.dirname(os.path.abspath(__file__))
    built_from = parse_source_digests(_C.source_digests()) if hasattr(_C, "source_digests") else {}
    return kernel_sources_changed(_C.__file__, os.path.join(os.path.dirname(package), "csrc"), built_from)


def _warn_of_stale_kernels() -> None:
    changed = stale_kernel_sources()
    if changed:
        listed = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
        warnings.warn(f"nice_ext: {listed} changed after the compiled kernels ({os.path.basename(_C.__file__)}) were "
                      "built, so they run the old code: rebuild with pip install --no-build-isolation -e .",
                      RuntimeWarning, stacklevel=2)


_warn_of_stale_kernels()


def cuda_kernels_built() -> bool:
    """True when this build of nice_ext holds the CUDA kernels."""
    return bool(_C.cuda_kernels_built())


CUDA_KERNEL_VERSIONS = (1, 2)
# The ops whose CUDA row kernels come in two generations, each with its own setting (the index of each
# name is its csrc RowKernelOp).
CUDA_KERNEL_OPS = ("coupling", "scale_prior", "affine_coupling")


def cuda_kernel_version(op: str) -> int:
    """The generation of CUDA row kernels (1 or 2) that ``op`` runs: 'coupling', 'scale_prior' or
    'affine_coupling'."""
    return int(_C.cuda_kernel_version(_row_kernel_op_index(op)))


def cuda_kernel_versions() -> Dict[str, int]:
    """Each op's generation of CUDA row kernels, e.g. ``{'coupling': 2, 'scale_prior': 2, 'affine_coupling': 1}``."""
    return {op: cuda_kernel_version(op) for op in CUDA_KERNEL_OPS}


def default_cuda_kernel_versions() -> Dict[str, int]:
    """The generations a new process runs (before ``NICE_EXT_CUDA_KERNELS``): each op's faster one."""
    return {op: int(_C.default_cuda_kernel_version(i)) for i, op in enumerate(CUDA_KERNEL_OPS)}


@contextlib.contextmanager
def use_cuda_kernels(version: Optional[int] = None, *, coupling: Optional[int] = None,
                     scale_prior: Optional[int] = None, affine_coupling: Optional[int] = None):
    """Runs the fused ops with the given generation of CUDA row kernels inside the ``with`` block:
    ``version`` for every op, or ``coupling=`` / ``scale_prior=`` / ``affine_coupling=`` for one (these win
    over ``version``).

    Version 1 gives a row to a block and moves one element per thread and access; version 2 (the
    bandwidth-tuned design of ``benchmarks/NOTES.md``) gives a row to a warp and moves 16 bytes per access
    where the layout allows it. Both compute the same values (version 2 may sum a row's log-density, or
    an affine layer's log|det|, in another order). The setting is process-wide and read at each launch (a CUDA graph keeps the kernels
    it captured); ``NICE_EXT_CUDA_KERNELS`` sets it at import. CPU kernels are unaffected. By default every
    op runs version 2, the faster where timed (``benchmarks/NOTES.md``): the scaling + prior's forward
    1.6-2.2x on an H100, the coupling's and the affine coupling's one pass 1.25x and 1.38x on an H200
    (geometric means over their benchmark entries).
    """
    wanted = {op: version for op in CUDA_KERNEL_OPS} if version is not None else {}
    per_op = (("coupling", coupling), ("scale_prior", scale_prior), ("affine_coupling", affine_coupling))
    wanted.update({op: v for op, v in per_op if v is not None})
    if not wanted:
        raise ValueError("use_cuda_kernels needs a version, or coupling= / scale_prior= / affine_coupling=")
    for v in wanted.values():
        _check_cuda_kernel_version(v)
    previous = cuda_kernel_versions()
    _set_cuda_kernel_versions(wanted)
    try:
        yield
    finally:
        _set_cuda_kernel_versions(previous)


def _row_kernel_op_index(op: str) -> int:
    if op not in CUDA_KERNEL_OPS:
        raise ValueError(f"the ops with two generations of CUDA kernels are {CUDA_KERNEL_OPS}, got {op!r}")
    return CUDA_KERNEL_OPS.index(op)


def _check_cuda_kernel_version(version) -> None:
    if isinstance(version, bool) or not isinstance(version, int) or version not in CUDA_KERNEL_VERSIONS:
        raise ValueError(f"the CUDA kernel version must be one of {CUDA_KERNEL_VERSIONS}, got {version!r}")


def _set_cuda_kernel_versions(versions: Dict[str, int]) -> None:
    for op, version in versions.items():
        _C.set_cuda_kernel_version(_row_kernel_op_index(op), version)


def parse_cuda_kernel_versions(text: str) -> Dict[str, int]:
    """Reads the form ``NICE_EXT_CUDA_KERNELS`` and ``bench_coupling.py --cuda-kernels`` take: '1' or '2'
    for every op, or per op, e.g. 'coupling=2,scale_prior=1' (an op left out keeps its version)."""
    form = "'1', '2' or per op, e.g. 'coupling=2,scale_prior=1'"
    text = text.strip()
    if text in ("1", "2"):
        return {op: int(text) for op in CUDA_KERNEL_OPS}
    versions = {}
    for item in text.split(","):
        op, sep, version = (part.strip() for part in item.partition("="))
        if not sep or op not in CUDA_KERNEL_OPS or version not in ("1", "2") or op in versions:
            raise ValueError(f"CUDA kernel versions are {form} (ops: {', '.join(CUDA_KERNEL_OPS)}), got {text!r}")
        versions[op] = int(version)
    return versions


def _cuda_kernel_versions_from_environment() -> None:
    value = os.environ.get("NICE_EXT_CUDA_KERNELS")
    if value is None or value.strip() == "":
        return
    try:
        versions = parse_cuda_kernel_versions(value)
    except ValueError as e:
        raise ValueError(f"NICE_EXT_CUDA_KERNELS: {e}") from None
    _set_cuda_kernel_versions(versions)


_cuda_kernel_versions_from_environment()


def functorch_transform_active() -> bool:
    """True inside a torch.func transform (``grad``, ``vmap``, ``jacrev``, ...). The fused ops' autograd is a
    C++ ``torch::autograd::Function``, which functorch refuses, so the model takes its pure-PyTorch path
    (the same function) there. False while torch.compile traces (which would otherwise see a transform
    and trace the reference path into every compiled model)."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._functorch.peek_interpreter_stack() is not None


def forward_ad_active() -> bool:
    """True inside ``torch.autograd.forward_ad.dual_level()``: the fused ops' C++ autograd has no
    forward-mode formula (PyTorch's C++ custom Function has none), so the model takes its pure-PyTorch path
    there, as inside torch.func transforms."""
    return getattr(torch.autograd.forward_ad, "_current_level", -1) >= 0


def _half(dtype: torch.dtype) -> bool:
    return dtype in (torch.float16, torch.bfloat16)


# Higher-order gradients: a backward op recorded by autograd (create_graph=True) runs its composite twin
# (csrc/autograd.h), whose kernel is the reference backward, made of differentiable ATen ops.
_composite_backwards = torch.library.Library("nice_ext", "IMPL")
for _op, _reference_backward in (("coupling_update_backward", reference.coupling_update_backward),
                                 ("affine_coupling_update_backward", reference.affine_coupling_update_backward),
                                 ("scale_prior_backward", reference.scale_prior_backward)):
    _composite_backwards.impl(f"{_op}_composite", _reference_backward, "CompositeImplicitAutograd")


# ------------------------------------------------------------------------------------------------
# Masked additive coupling update (paper §3.2)
# ------------------------------------------------------------------------------------------------
@torch.library.register_fake("nice_ext::coupling_update")
def _coupling_update_fake(x, shift, shift_col, gather_index, inverse):
    return x.new_empty(x.shape), x.new_empty((x.shape[0], gather_index.shape[0]))


@torch.library.register_fake("nice_ext::coupling_update_backward")
def _coupling_update_backward_fake(grad_y, grad_gathered, shift_col, gather_index, updated, inverse):
    return grad_y.new_empty(grad_y.shape), grad_y.new_empty((grad_y.shape[0], updated))


# The index maps' values, checked by the wrappers where CUDA kernels will read them. The CPU kernels check
# every entry on every call, but a CUDA kernel can only assert on the device, and a device assert ends the
# process's use of the GPU. So the wrappers check a CUDA map on the host the first time they see it (one
# copy to the host) and again after it changes in place; the model's maps are buffers, so a step pays a
# lookup. Not while torch.compile traces, nor during CUDA graph capture (no copy to the host is allowed
# there): the model's eager warm-up steps have checked its maps by then. The errors are the CPU kernels'
# own, word for word. The raw torch.ops.nice_ext ops do not check on CUDA.
# (id(shift_col), id(gather_index)) -> (weak references to both, whether each is an inference tensor,
# _index_maps_state at the check)
_checked_index_maps: Dict[Tuple[int, int], tuple] = {}
# The host build of the CUDA kernels that the tests make (tests/cuda_emulation/build.py) runs them on CPU
# tensors; its copy of the package holds this marker.
_CUDA_KERNELS_READ_CPU_TENSORS = os.path.exists(os.path.join(os.path.dirname(__file__), "CUDA_EMULATION"))


def _forget_index_maps(key: Tuple[int, int], ref: weakref.ref) -> None:
    entry = _checked_index_maps.get(key)
    if entry is not None and ref in (entry[0], entry[1]):
        del _checked_index_maps[key]


def _index_maps_state(x: Tensor, shift: Tensor, shift_col: Tensor, gather_index: Tensor, inference: Tuple[bool, bool]
                      ) -> tuple:
    """What a check of the maps' values holds for: their contents (an inference tensor has no version
    counter, and changes in place only under inference_mode), x's features and shift's columns."""
    return (None if inference[0] else shift_col._version, None if inference[1] else gather_index._version,
            shift_col.data_ptr(), gather_index.data_ptr(), x.shape[-1:], shift.shape[-1:])


def _shift_col_problem(col: List[int], updated: int) -> Optional[str]:
    seen = [False] * updated
    for j, c in enumerate(col):
        if c == -1:
            continue
        if not 0 <= c < updated or seen[c]:
            return (f"shift_col must map the updated features one-to-one onto the {updated} columns of shift (and "
                    f"-1 to kept features); entry {j} is {c}")
        seen[c] = True
    count = sum(seen)
    return None if count == updated else f"the coupling mask updates {count} features but shift has {updated} columns"


def _gather_index_problem(index: List[int], features: int) -> Optional[str]:
    seen = set()
    for g, j in enumerate(index):
        if not 0 <= j < features or j in seen:
            return f"gather_index must list distinct features in [0, {features}); entry {g} is {j}"
        seen.add(j)
    return None


def _check_index_maps(x: Tensor, shift: Tensor, shift_col: Tensor, gather_index: Tensor) -> None:
    """Raises the CPU kernels' error for bad index map values, reading the maps once per change."""
    if (torch.compiler.is_compiling() or functorch_transform_active() or type(x) is not Tensor
            or type(shift) is not Tensor or type(shift_col) is not Tensor or type(gather_index) is not Tensor):
        return  # traced, transformed, or tensors this check cannot read (the op's own checks name a non-tensor)
    key = (id(shift_col), id(gather_index))
    entry = _checked_index_maps.get(key)
    if (entry is not None and entry[0]() is shift_col and entry[1]() is gather_index
            and entry[3] == _index_maps_state(x, shift, shift_col, gather_index, entry[2])):
        return
    # Only maps that pass the op's own checks of shapes, dtypes and devices have their values read here:
    # the op names any other problem itself.
    if x.dim() != 2 or shift.dim() != 2 or shift_col.dim() != 1 or gather_index.dim() != 1:
        return
    features, updated = x.shape[1], shift.shape[1]
    if (shift_col.shape[0] != features or not 1 <= updated < features or gather_index.shape[0] > features
            or shift_col.dtype != torch.int32 or gather_index.dtype != torch.int32
            or any(t.device != x.device for t in (shift, shift_col, gather_index))):
        return
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    found = _shift_col_problem(shift_col.tolist(), updated) or _gather_index_problem(gather_index.tolist(), features)
    if found is not None:
        raise RuntimeError(f"nice_ext: {found}")
    inference = (shift_col.is_inference(), gather_index.is_inference())
    forget = functools.partial(_forget_index_maps, key)
    _checked_index_maps[key] = (weakref.ref(shift_col, forget), weakref.ref(gather_index, forget), inference,
                                _index_maps_state(x, shift, shift_col, gather_index, inference))


def cuda_kernels_run_on_cpu_tensors() -> bool:
    """True only in the tests' host build of the CUDA kernels (tests/cuda_emulation), whose ops run the CUDA
    kernels, and so each op's CUDA kernel version, for CPU tensors."""
    return _CUDA_KERNELS_READ_CPU_TENSORS


def _cuda_kernels_read(shift_col: Tensor) -> bool:
    return isinstance(shift_col, Tensor) and (shift_col.is_cuda or _CUDA_KERNELS_READ_CPU_TENSORS)


def coupling_update_indexed(x: Tensor, shift: Tensor, shift_col: Tensor, gather_index: Tensor,
                            inverse: bool = False) -> Tuple[Tensor, Tensor]:
    """The fused op on precomputed index maps (see ``masks.coupling_maps``): returns (y, gathered).

    The maps' values are checked as the CPU kernels check them; on CUDA the first time a map tensor is seen
    (and after it changes in place)."""
    if _cuda_kernels_read(shift_col):
        _check_index_maps(x, shift, shift_col, gather_index)
    return torch.ops.nice_ext.coupling_update(x, shift, shift_col, gather_index, inverse)


def _index_maps(x: Tensor, shift: Tensor, mask: Tensor, next_mask: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """Checks a coupling update's x, shift and masks and returns the index maps (shift_col, gather_index) on
    x's device."""
    if not isinstance(x, Tensor) or x.dim() != 2:
        raise ValueError(f"x must be a (batch, features) tensor, got {getattr(x, 'shape', type(x))}")
    features = x.shape[1]
    mask_bytes = check_mask_layout(mask, features).numpy().tobytes()
    next_bytes = None if next_mask is None else check_mask_layout(next_mask, features, "next_mask").numpy().tobytes()
    shift_col, gather_index, updated = _device_index_maps(mask_bytes, next_bytes, x.device)
    if not isinstance(shift, Tensor) or tuple(shift.shape) != (x.shape[0], updated):
        raise ValueError(f"shift must have shape ({x.shape[0]}, {updated}): one column per updated feature of each "
                         f"row of x, got {tuple(getattr(shift, 'shape', ())) or type(shift).__name__}")
    return shift_col, gather_index


@functools.lru_cache(maxsize=128)
def _device_index_maps(mask_bytes: bytes, next_bytes: Optional[bytes], device: torch.device
                       ) -> Tuple[Tensor, Tensor, int]:
    """(shift_col, gather_index) of a mask pair, given as the masks' bytes, on ``device``, and the number of
    updated features. Built once per mask pair and device: rebuilt, they cost the mask-level API about
    150 µs a call on a CPU, and a host-to-device copy on a GPU. The masks' contents are checked on the
    way; a check that fails raises, and nothing is cached."""
    mask = check_mask(_mask_from_bytes(mask_bytes), len(mask_bytes))
    next_mask = None if next_bytes is None else check_mask(_mask_from_bytes(next_bytes), len(next_bytes), "next_mask")
    shift_col, gather_index = coupling_maps(mask, next_mask)
    return shift_col.to(device), gather_index.to(device), int((~mask).sum())


def _mask_from_bytes(mask_bytes: bytes) -> Tensor:
    if not mask_bytes:  # torch.frombuffer refuses an empty buffer; check_mask names the problem
        return torch.zeros(0, dtype=torch.bool)
    return torch.frombuffer(bytearray(mask_bytes), dtype=torch.bool)


def coupling_update(x: Tensor, shift: Tensor, mask: Tensor, *, inverse: bool = False,
                    next_mask: Optional[Tensor] = None) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Additive coupling update y_I1 = x_I1, y_I2 = x_I2 + shift (or - shift with ``inverse``).

    ``mask`` (bool, D) marks the kept features I1; ``shift`` (B, |I2|) is the coupling network's output
    for the updated features, in order. With ``next_mask`` also returns y[:, next_mask] contiguous (the
    next layer's network input), written in the same pass. The index maps are built once per mask pair
    (by content) and device and kept; ``coupling_update_indexed`` takes them precomputed
    (``masks.coupling_maps``) and skips the masks' checks.
    """
    shift_col, gather_index = _index_maps(x, shift, mask, next_mask)
    y, gathered = coupling_update_indexed(x, shift, shift_col, gather_index, inverse)
    return (y, gathered) if next_mask is not None else y


# ------------------------------------------------------------------------------------------------
# Masked affine coupling update (paper §3.2.2)
# ------------------------------------------------------------------------------------------------
AFFINE_LOG_SCALE_LAWS = ("tanh", "unbounded")


@torch.library.register_fake("nice_ext::affine_coupling_update")
def _affine_coupling_update_fake(x, log_scale_raw, shift, shift_col, gather_index, log_scale_law, inverse):
    log_det_dtype = torch.float32 if _half(x.dtype) else x.dtype
    return (x.new_empty(x.shape), x.new_empty((x.shape[0], gather_index.shape[0])),
            x.new_empty((x.shape[0],), dtype=log_det_dtype))


@torch.library.register_fake("nice_ext::affine_coupling_update_backward")
def _affine_coupling_update_backward_fake(grad_y, grad_gathered, grad_log_det, x, log_scale_raw, shift, shift_col,
                                          gather_index, log_scale_law, inverse):
    return x.new_empty(x.shape), shift.new_empty(shift.shape), shift.new_empty(shift.shape)


def affine_coupling_update_indexed(x: Tensor, log_scale_raw: Tensor, shift: Tensor, shift_col: Tensor,
                                   gather_index: Tensor, log_scale_law: str = "tanh",
                                   inverse: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
    """The fused affine op on precomputed index maps (see ``masks.coupling_maps``): returns
    (y, gathered, log_det). The maps are checked as ``coupling_update_indexed`` checks them."""
    _check_affine_log_scale_law(log_scale_law)
    if _cuda_kernels_read(shift_col):
        _check_index_maps(x, shift, shift_col, gather_index)
    return torch.ops.nice_ext.affine_coupling_update(x, log_scale_raw, shift, shift_col, gather_index, log_scale_law,
                                                     inverse)


def _check_affine_log_scale_law(log_scale_law: str) -> None:
    if log_scale_law not in AFFINE_LOG_SCALE_LAWS:
        raise ValueError(f"log_scale_law must be one of {AFFINE_LOG_SCALE_LAWS}, got {log_scale_law!r}")


def affine_coupling_update(x: Tensor, log_scale_raw: Tensor, shift: Tensor, mask: Tensor, *,
                           log_scale_law: str = "tanh", inverse: bool = False, next_mask: Optional[Tensor] = None
                           ) -> Union[Tuple[Tensor, Tensor], Tuple[Tensor, Tensor, Tensor]]:
    """Affine coupling update y_I1 = x_I1, y_I2 = x_I2 * exp(a) + shift, or with ``inverse``
    y_I2 = (x_I2 - shift) * exp(-a), where a = tanh(log_scale_raw) (``log_scale_law="tanh"``) or
    a = log_scale_raw (``"unbounded"``).

    ``mask`` (bool, D) marks the kept features I1; ``log_scale_raw`` and ``shift`` (B, |I2|) are the
    coupling network's outputs for the updated features, in order. Returns (y, log_det) with
    log_det = +/- sum a per row (the log|det| of the map applied; float32 for half inputs), and with
    ``next_mask`` (y, y[:, next_mask] contiguous, log_det), written in the same pass.
    """
    shift_col, gather_index = _index_maps(x, shift, mask, next_mask)
    if not isinstance(log_scale_raw, Tensor) or log_scale_raw.shape != shift.shape:
        raise ValueError(f"log_scale_raw must have the shape of shift {tuple(shift.shape)}, "
                         f"got {tuple(getattr(log_scale_raw, 'shape', ())) or type(log_scale_raw).__name__}")
    y, gathered, log_det = affine_coupling_update_indexed(x, log_scale_raw, shift, shift_col, gather_index,
                                                          log_scale_law, inverse)
    return (y, gathered, log_det) if next_mask is not None else (y, log_det)


# ------------------------------------------------------------------------------------------------
# Diagonal scaling + prior log-density (paper §3.3, §3.4)
# ------------------------------------------------------------------------------------------------
@torch.library.register_fake("nice_ext::scale_prior")
def _scale_prior_fake(h, log_scale, prior, compute_z):
    z = h.new_empty(h.shape) if compute_z else h.new_empty((0,))
    log_prob = h.new_empty((h.shape[0],), dtype=torch.float32 if _half(h.dtype) else h.dtype)
    return z, log_prob


@torch.library.register_fake("nice_ext::scale_prior_backward")
def _scale_prior_backward_fake(grad_log_prob, grad_z, h, log_scale, prior):
    return h.new_empty(h.shape), log_scale.new_empty(log_scale.shape)


@torch.library.register_fake("nice_ext::scale_inverse")
def _scale_inverse_fake(z, log_scale):
    return z.new_empty(z.shape)


def _check_prior(prior: str) -> None:
    if prior not in PRIORS:
        raise ValueError(f"prior must be one of {PRIORS}, got {prior!r}")


def scale_prior(h: Tensor, log_scale: Tensor, prior: str = "logistic", *,
                compute_z: bool = True) -> Tuple[Tensor, Tensor]:
    """z = exp(log_scale) * h and log_prob = sum_d log p_H(z_d) + sum_d log_scale_d, in one pass.

    Returns (z, log_prob); z is an empty tensor when ``compute_z`` is False (training needs only the
    log-probability). log_prob is float32 for half-precision inputs.
    """
    _check_prior(prior)
    return torch.ops.nice_ext.scale_prior(h, log_scale, prior, compute_z)


def scale_inverse(z: Tensor, log_scale: Tensor) -> Tensor:
    """h = exp(-log_scale) * z: the inverse of the scaling layer (used for sampling)."""
    return torch.ops.nice_ext.scale_inverse(z, log_scale)
