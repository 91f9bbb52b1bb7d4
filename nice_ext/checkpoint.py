"""Checkpoints that are never left half-written and are checked before use.

A checkpoint is written atomically (``files.atomic_file``): a crash at any moment leaves either the old
file or the new one. Loading checks that the file is ours, of a known format version, and holds
every field the tools need; any problem becomes a ``CheckpointError`` naming the file and what is wrong.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Union

import torch

from . import data as data_lib
from .files import atomic_file
from .model import NICE

FORMAT = "nice_ext.checkpoint"
VERSION = 1
REQUIRED = ("format", "version", "model_config", "model_state", "dataset", "preprocess_state")
# What --resume reads besides REQUIRED: where the run stands and its optimizer's state.
TRAINING_STATE = ("epoch", "step", "optimizer_state", "best_valid", "history", "rng_state")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, not ours, or does not fit what it is used for."""


def save_atomic(payload: Dict[str, Any], path: str) -> None:
    with atomic_file(path) as f:
        torch.save(payload, f)


def make_checkpoint(model: NICE, dataset: str, preprocess_state: Dict[str, Any], **extra: Any) -> Dict[str, Any]:
    payload = {"format": FORMAT, "version": VERSION, "model_config": dict(model.config),
               "model_state": model.state_dict(), "dataset": dataset, "preprocess_state": preprocess_state}
    payload.update(extra)
    return payload


def host_copy(value: Any) -> Any:
    """A copy of a checkpoint (or any part of one) that training can no longer change: every tensor copied to
    the host, every dict, list and tuple rebuilt; other values (numbers, strings) are immutable and kept."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {key: host_copy(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        items = [host_copy(item) for item in value]
        if isinstance(value, list):
            return items
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)  # a named tuple keeps its type
    return value


def other_checkpoint(path: str) -> str:
    """For a damaged best.pt or last.pt: the run's other checkpoint, where the folder holds one, as advice."""
    folder, name = os.path.split(path)
    other = {"best.pt": "last.pt", "last.pt": "best.pt"}.get(name)
    if other is None or not os.path.exists(os.path.join(folder, other)):
        return ""
    return f" (the run's other checkpoint, {os.path.join(folder, other)}, may be whole)"


def load_checkpoint(path: str, map_location: Optional[str] = "cpu") -> Dict[str, Any]:
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    if os.path.isdir(path):  # a run's folder given for its checkpoint
        held = [name for name in ("best.pt", "last.pt") if os.path.isfile(os.path.join(path, name))]
        advice = f": pass {' or '.join(os.path.join(path, name) for name in held)}" if held else ""
        raise CheckpointError(f"{path} is a folder, not a checkpoint file{advice}")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path}: the file is empty{other_checkpoint(path)}")
    try:
        # weights_only: a checkpoint holds tensors and plain values; nothing in it may run code on load
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # truncated zip, pickle garbage, ...
        detail = (str(error).strip().splitlines() or [""])[0][:120]  # torch.load's messages run to many lines
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupt?): "
                              f"{type(error).__name__}: {detail}{other_checkpoint(path)}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a nice_ext checkpoint")
    if payload.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {payload.get('version')} is not supported "
                              f"(this nice_ext reads version {VERSION})")
    missing = [key for key in REQUIRED if key not in payload]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {', '.join(missing)}")
    if payload["dataset"] is not None and payload["dataset"] not in data_lib.DATASETS:  # None: see save_model
        raise CheckpointError(f"{path}: its dataset {payload['dataset']!r} is none this nice_ext knows "
                              f"({', '.join(data_lib.DATASETS)})")
    # Training never writes a NaN or Inf weight (a non-finite loss stops it first), so one here means damage:
    # loaded, it would make every likelihood and sample NaN without a word.
    for part in ("model_state", "preprocess_state"):
        bad = non_finite_tensors(payload[part])
        if bad:
            raise CheckpointError(f"{path}: {part} holds NaN or infinite values in {', '.join(bad[:5])}"
                                  + (f" and {len(bad) - 5} more" if len(bad) > 5 else "") + other_checkpoint(path))
    return payload


def check_training_state(payload: Dict[str, Any], path: str) -> None:
    """A checkpoint --resume can continue: one that holds a run's place and optimizer, not only a model."""
    missing = [key for key in TRAINING_STATE if key not in payload]
    if payload["dataset"] is None:
        missing.append("dataset")
    if missing:
        raise CheckpointError(f"{path}: holds a model but not the state of a training run (it lacks "
                              f"{', '.join(missing)}): --resume continues a run from the last.pt or best.pt "
                              f"that python -m nice_ext.train wrote")


def model_dataset_info(model: NICE, name: str, whiten: bool = False) -> data_lib.DatasetInfo:
    """dataset_info of ``name`` as ``model`` reads it: the images dataset (one's own) in the model's image
    shape, which its files must have, whitened with ``whiten``. ValueError for a model without an image
    shape."""
    if name != data_lib.IMAGES:
        return data_lib.dataset_info(name)
    if model.image_shape is None:
        raise ValueError("the images dataset's files must have the model's image shape, and this model has none "
                         "(NICE(..., image_shape=(C, H, W)))")
    return data_lib.dataset_info(name, model.image_shape, whiten)


def trained_on_whitened_images(payload: Dict[str, Any]) -> bool:
    """Whether the checkpoint ``payload``'s model was trained on one's own images whitened (``train --whiten``):
    its preprocessing holds their whitening (the named datasets are whitened or not by name)."""
    return payload["dataset"] == data_lib.IMAGES and "zca.matrix" in payload["preprocess_state"]


def trained_dataset_info(model: NICE, payload: Dict[str, Any]) -> Optional[data_lib.DatasetInfo]:
    """model_dataset_info of the dataset the checkpoint ``payload`` names (None where it names none), whitened
    as its model was trained."""
    if payload["dataset"] is None:
        return None
    return model_dataset_info(model, payload["dataset"], trained_on_whitened_images(payload))


def dataset_mismatch(model: NICE, info: data_lib.DatasetInfo) -> Optional[str]:
    """Why ``model`` cannot model ``info``'s images (None when it can): its features and data range must be the
    dataset's, or its likelihoods, bits/dim and images would be of something else."""
    if model.data_dim != info.dim:
        return f"model has {model.data_dim} features, {info.name} has {info.dim}"
    if tuple(model.data_range) != tuple(info.data_range):
        return f"model's data range is {tuple(model.data_range)}, {info.name}'s is {tuple(info.data_range)}"
    return None


def non_finite_tensors(state: Any) -> List[str]:
    """The names of the floating-point tensors of a state dict that hold a NaN or an infinity."""
    if not isinstance(state, dict):
        return []
    return [name for name, value in state.items()
            if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(value.isfinite().all())]


def model_from_checkpoint(payload: Dict[str, Any], path: str = "checkpoint") -> NICE:
    config = dict(payload["model_config"])
    if config.get("coupling") == "affine":
        # written before affine log-scales were bounded: keep the function those weights were trained as
        config.setdefault("affine_log_scale", "unbounded")
    if isinstance(config.get("mask"), list):
        config["mask"] = torch.tensor(config["mask"], dtype=torch.bool)
    try:
        model = NICE(**config)
        state = payload["model_state"]
        log_scale = state.get("log_scale") if isinstance(state, dict) else None
        if isinstance(log_scale, torch.Tensor) and log_scale.is_floating_point():
            model.to(log_scale.dtype)  # the dtype it was saved in (training's is float32), before its weights
        model.load_state_dict(state)
    except (TypeError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{path}: the stored model does not load: {error}") from None
    return model


def save_model(model: NICE, path: str, dataset: Optional[str] = None,
               preprocess: Optional[data_lib.Preprocess] = None) -> None:
    """Write ``model`` to ``path`` as a checkpoint that ``load_model`` reads back: its architecture, masks and
    weights (a model trained in a loop of one's own; ``python -m nice_ext.train`` writes its own checkpoints).
    The file is written atomically (a crash leaves the old file or the new one) and holds only tensors and
    plain values, with the weights on the host. ``python -m nice_ext.sample`` takes it as it is.

    ``dataset`` names the data the model was trained on, one of ``nice_ext.data.DATASETS``, for the tools
    that read that data too (``python -m nice_ext.evaluate`` and ``inpaint``); the model must then have its
    images' features and data range. A whitened dataset (CIFAR-10, SVHN) also needs the fitted
    ``data.Preprocess`` the model was trained behind, as ``preprocess``; one's own image files
    (``"images"``) need a model built with their ``image_shape``, and their fitted ``preprocess`` where the
    model was trained on them whitened (``data.dataset_info("images", shape, whiten=True)``).

    Raises ``TypeError`` for anything but a NICE model (a ``torch.compile``d one or one wrapped in
    DistributedDataParallel is unwrapped), and ``ValueError`` for a dataset the model does not fit and for
    NaN or infinite weights (which ``load_model`` refuses); nothing is written then.
    """
    model = unwrapped_model(model)
    if dataset is None:
        if preprocess is not None:
            raise ValueError("preprocess is the preprocessing of a dataset: pass dataset= as well")
        preprocess_state: Dict[str, Any] = {}
    else:
        info = model_dataset_info(model, dataset, dataset == data_lib.IMAGES and preprocess is not None
                                  and getattr(preprocess, "zca", None) is not None)
        mismatch = dataset_mismatch(model, info)
        if mismatch:
            raise ValueError(f"the model does not fit {dataset}: {mismatch}")
        preprocess_state = fitted_preprocess_state(info, preprocess)
    payload = host_copy(make_checkpoint(model, dataset, preprocess_state))
    bad = non_finite_tensors(payload["model_state"])
    if bad:
        raise ValueError(f"the model holds NaN or infinite values in {', '.join(bad[:5])}"
                         + (f" and {len(bad) - 5} more" if len(bad) > 5 else "") + ": load_model would refuse it")
    save_atomic(payload, path)


def unwrapped_model(model: Any) -> NICE:
    """The NICE model inside ``torch.compile``'s wrapper or (Distributed)DataParallel, or ``model`` itself."""
    inner = model
    for _ in range(2):  # at most a compiled DistributedDataParallel
        if isinstance(inner, NICE) or not isinstance(inner, torch.nn.Module):
            break
        inner = getattr(inner, "_orig_mod", getattr(inner, "module", None))
    if not isinstance(inner, NICE):
        hint = " (a state dict? pass the model itself)" if isinstance(model, dict) else ""
        raise TypeError(f"model must be a nice_ext.NICE, got {type(model).__name__}{hint}")
    return inner


def fitted_preprocess_state(info: data_lib.DatasetInfo, preprocess: Optional[data_lib.Preprocess]
                            ) -> Dict[str, Any]:
    """The state of ``preprocess`` for ``info``'s data (dequantization alone needs none), checked to fit it."""
    fresh = data_lib.Preprocess(info)
    if preprocess is None:
        if info.whiten:
            raise ValueError(f"{info.name} is whitened: pass the fitted data.Preprocess the model was trained behind "
                             f"as preprocess=")
        return fresh.state_dict()
    if not isinstance(preprocess, data_lib.Preprocess):
        raise TypeError(f"preprocess must be a nice_ext.data.Preprocess, got {type(preprocess).__name__}")
    state = preprocess.state_dict()
    try:
        fresh.load_state_dict(state)  # the same buffers: whitened or not as info is, of its dimension
    except RuntimeError:
        raise ValueError(f"preprocess is not {info.name}'s: it is the preprocessing of other data") from None
    if preprocess.data_range != info.data_range:
        raise ValueError(f"preprocess dequantizes to {preprocess.data_range}, {info.name} to {info.data_range}")
    if preprocess.zca is not None and torch.equal(state["zca.matrix"].cpu(), torch.eye(info.dim, dtype=torch.float64)):
        # a ZCA's matrix is the identity until it is fitted
        raise ValueError("preprocess has not been fitted: call preprocess.fit(train_pixels), as training does")
    return state


def load_model(path: str, device: Union[str, torch.device] = "cpu") -> NICE:
    """The model of a checkpoint written by ``python -m nice_ext.train`` (its ``best.pt`` or ``last.pt``) or by
    ``save_model``, on ``device``, in the dtype it was saved in and in eval mode. A missing, corrupt or foreign
    file raises ``CheckpointError`` naming it.

    ``model.log_prob`` of the result is in the model's input space: dequantized pixels for MNIST and
    Fashion-MNIST; for the whitened datasets (CIFAR-10, SVHN) ``python -m nice_ext.evaluate`` adds the
    whitening's log-determinant to report likelihoods in pixel space.
    """
    return model_from_checkpoint(load_checkpoint(path), path).to(device).eval()
