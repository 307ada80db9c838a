"""Loading and saving weights: shape-checked loading with a clear report, and the
``save_pretrained`` / ``from_pretrained`` directory format (config JSON + weights).

A model whose heads are shared across decoder layers (no box refinement) holds the same
tensor under several keys, as the official checkpoint does. Loading takes each shared
tensor from whichever of its keys the state dict has (and refuses copies that differ);
saving writes each tensor once.
"""

from __future__ import annotations

import json
import logging
import os
from typing import NamedTuple

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
TORCH_NAME = "pytorch_model.bin"
FORMAT = "ddetr.DeformableDetr"


class LoadResult(NamedTuple):
    missing_keys: list[str]     # model tensors the state dict did not provide
    unexpected_keys: list[str]  # state dict entries the model has no place for


def _alias_groups(model: nn.Module) -> dict[str, list[str]]:
    """Canonical key (first name of a tensor) -> every state-dict key of that tensor."""
    canonical = {id(t): name for name, t in model.named_parameters()}
    canonical.update({id(t): name for name, t in model.named_buffers() if id(t) not in canonical})
    groups: dict[str, list[str]] = {}
    seen: dict[int, str] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        first = seen.setdefault(id(t), canonical.get(id(t), name))
        groups.setdefault(first, []).append(name)
    return groups


def unique_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The state dict with each shared tensor once (under its first name)."""
    state = model.state_dict()
    return {key: state[key].contiguous() for key in _alias_groups(model)}


def load_weights(model: nn.Module, state: dict, strict: bool = True,
                 source: str = "state_dict") -> LoadResult:
    """Loads ``state`` into ``model`` after checking every shape.

    Raises ValueError naming the tensor on a shape mismatch, naming the keys when a
    shared tensor is given differing copies, and, with ``strict``, listing missing and
    unexpected keys. Without ``strict`` those are logged as a warning and returned.
    ``num_batches_tracked`` entries (batch-norm counters) are ignored.
    """
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    own = model.state_dict()
    for key, value in state.items():
        if key in own and tuple(value.shape) != tuple(own[key].shape):
            raise ValueError(f"{source}: tensor {key!r} has shape {tuple(value.shape)}, "
                             f"the model expects {tuple(own[key].shape)}")
    to_load, missing = {}, []
    for first, keys in _alias_groups(model).items():
        given = [k for k in keys if k in state]
        if not given:
            missing.extend(keys)
            continue
        for k in given[1:]:
            if not torch.equal(state[k], state[given[0]]):
                raise ValueError(f"{source}: {given[0]!r} and {k!r} differ, but this model "
                                 f"shares one tensor between them (a per-layer-head "
                                 f"checkpoint needs with_box_refine=True)")
        to_load[first] = state[given[0]]
    unexpected = sorted(set(state) - set(own))
    _report(missing, unexpected, strict, source)
    model.load_state_dict(to_load, strict=False)
    return LoadResult(missing, unexpected)


def _report(missing: list[str], unexpected: list[str], strict: bool, source: str) -> None:
    if not missing and not unexpected:
        return
    text = (f"{source}: {len(missing)} missing keys {_short(missing)}, "
            f"{len(unexpected)} unexpected keys {_short(unexpected)}")
    if strict:
        raise ValueError(text + " (pass strict=False to load the rest)")
    logger.warning(text)


def _short(keys: list[str], limit: int = 10) -> str:
    return str(keys[:limit])[:-1] + (", ...]" if len(keys) > limit else "]")


def save_pretrained(model: nn.Module, directory, safe_serialization: bool = True) -> None:
    """Writes ``config.json`` and ``model.safetensors`` (``pytorch_model.bin`` when
    safetensors is not installed or ``safe_serialization`` is False)."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump({"format": FORMAT, "config": model.config}, f, indent=2)
    state = {k: v.detach().cpu() for k, v in unique_state_dict(model).items()}
    if safe_serialization and _has_safetensors():
        from safetensors.torch import save_file
        save_file(state, os.path.join(directory, SAFETENSORS_NAME))
    else:
        torch.save(state, os.path.join(directory, TORCH_NAME))


def read_pretrained(directory) -> tuple[dict, dict]:
    """Returns ``(config, state_dict)`` from a ``save_pretrained`` directory."""
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        raise ValueError(f"directory: no {CONFIG_NAME} in {directory!r}")
    with open(path) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise ValueError(f"directory: {path} is not a ddetr DeformableDetr config")
    safe = os.path.join(directory, SAFETENSORS_NAME)
    if os.path.isfile(safe):
        from safetensors.torch import load_file
        return meta["config"], load_file(safe)
    pt = os.path.join(directory, TORCH_NAME)
    if not os.path.isfile(pt):
        raise ValueError(f"directory: neither {SAFETENSORS_NAME} nor {TORCH_NAME} in {directory!r}")
    return meta["config"], torch.load(pt, map_location="cpu", weights_only=True)


def _has_safetensors() -> bool:
    try:
        import safetensors.torch  # noqa: F401
    except ImportError:
        return False
    return True
