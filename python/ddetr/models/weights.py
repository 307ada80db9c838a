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
import pickle
import re
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
                 source: str = "state_dict", unexpected_ok: bool = False) -> LoadResult:
    """Loads ``state`` into ``model`` after checking every shape.

    Raises ValueError naming the tensor on a shape mismatch, naming the keys when a
    shared tensor is given differing copies, and, with ``strict``, listing missing and
    unexpected keys. Without ``strict`` those are logged as a warning and returned.
    ``unexpected_ok`` (with ``strict``): only missing keys raise; unexpected ones are
    logged and ignored. ``num_batches_tracked`` entries (batch-norm counters) are ignored.
    """
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    own = model.state_dict()
    for key, value in state.items():
        if not isinstance(value, Tensor):
            raise ValueError(f"{source}: {key!r} is a {type(value).__name__}, not a tensor")
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
    _report(missing, unexpected, strict, source, unexpected_ok)
    model.load_state_dict(to_load, strict=False)
    return LoadResult(missing, unexpected)


def _report(missing: list[str], unexpected: list[str], strict: bool, source: str,
            unexpected_ok: bool = False) -> None:
    if not missing and not unexpected:
        return
    text = (f"{source}: {len(missing)} missing keys {_short(missing)}, "
            f"{len(unexpected)} unexpected keys {_short(unexpected)}")
    if strict and unexpected_ok and missing:
        raise ValueError(text + " (the model needs every missing tensor)")
    if strict and not unexpected_ok:
        raise ValueError(text + " (pass strict=False to load the rest)")
    logger.warning(text + (" (ignored)" if unexpected_ok else ""))


def _short(keys: list[str], limit: int = 10) -> str:
    return str(keys[:limit])[:-1] + (", ...]" if len(keys) > limit else "]")


def save_pretrained(model: nn.Module, directory, safe_serialization: bool = True) -> None:
    """Writes ``config.json`` and ``model.safetensors`` (``pytorch_model.bin`` when
    safetensors is not installed or ``safe_serialization`` is False)."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump({"format": FORMAT, "config": model.config,
                   "compression": list(getattr(model, "compression", []))}, f, indent=2)
    state = {k: v.detach().cpu() for k, v in unique_state_dict(model).items()}
    if safe_serialization and _has_safetensors():
        from safetensors.torch import save_file
        save_file(state, os.path.join(directory, SAFETENSORS_NAME))
    else:
        torch.save(state, os.path.join(directory, TORCH_NAME))


def read_pretrained(directory) -> tuple[dict, dict]:
    """Returns ``(config, state_dict)`` from a ``save_pretrained`` directory."""
    config = _read_config(os.path.join(directory, CONFIG_NAME), directory)
    safe = os.path.join(directory, SAFETENSORS_NAME)
    if os.path.isfile(safe):
        return config, load_safetensors(safe, "directory")
    pt = os.path.join(directory, TORCH_NAME)
    if not os.path.isfile(pt):
        raise ValueError(f"directory: neither {SAFETENSORS_NAME} nor {TORCH_NAME} in {directory!r}")
    state = load_torch_file(pt, "directory")
    if not isinstance(state, dict):
        raise ValueError(f"directory: {pt} holds a {type(state).__name__}, not a state dict")
    return config, state


def read_compression(directory) -> list[dict]:
    """What ``ddetr.compress`` applied to a ``save_pretrained`` model ([] for none)."""
    with open(os.path.join(directory, CONFIG_NAME), encoding="utf-8") as f:
        records = json.load(f).get("compression", [])
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise ValueError(f"directory: {directory}/{CONFIG_NAME} has a 'compression' entry "
                         "that is not a list of objects")
    return records


def _read_config(path: str, directory) -> dict:
    if not os.path.isfile(path):
        raise ValueError(f"directory: no {CONFIG_NAME} in {directory!r}")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (ValueError, OSError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"directory: {path} is not valid JSON ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"directory: {path} is not a ddetr DeformableDetr config")
    if not isinstance(meta.get("config"), dict):
        raise ValueError(f"directory: {path} has no 'config' object")
    return meta["config"]


def load_safetensors(path: str, source: str) -> dict:
    """A safetensors file's tensors; ValueError naming ``path`` if it cannot be read."""
    from safetensors.torch import load_file
    if not os.path.isfile(path):
        raise ValueError(f"{source}: {path!r} does not exist")
    try:
        return load_file(path)
    except Exception as err:  # SafetensorError, OSError, ... for a corrupt or missing file
        raise ValueError(f"{source}: {path} is not a readable safetensors file "
                         f"({type(err).__name__}: {err})") from None


def load_torch_file(path: str, source: str, allowed: tuple = (), opt_in: str = "") -> object:
    """``torch.load`` of ``path`` on the CPU with ``weights_only``: tensors and plain data
    (and the classes in ``allowed``), so no code from the file runs. ValueError naming
    ``path`` when it is missing, truncated or not a torch file, or holds other Python
    objects (then ``opt_in`` says how a user who trusts the file can load it anyway)."""
    if not os.path.isfile(path):
        raise ValueError(f"{source}: {path!r} does not exist")
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        refused = re.search(r"GLOBAL (\S+) (was not an allowed|whose module)", str(err))
        if refused is None:
            raise ValueError(f"{source}: {path} cannot be read: truncated or not a torch file "
                             f"({_unpickler_reason(err)})") from None
        raise ValueError(f"{source}: {path} was refused: it holds the Python object "
                         f"{refused.group(1)}, and loading objects beyond tensors and plain "
                         f"data can run code from the file. {opt_in or 'Re-save it as tensors.'}"
                         ) from None
    except Exception as err:  # torch raises many types for a truncated or foreign file
        raise ValueError(f"{source}: {path} cannot be read: truncated or not a torch file "
                         f"({type(err).__name__}: {str(err) or 'unexpected end of file'})") from None


def _unpickler_reason(err: Exception) -> str:
    """The unpickler's own words, without torch's advice to load unsafely."""
    text = str(err).split("WeightsUnpickler error:")[-1].split("Check the documentation")[0]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__


def _has_safetensors() -> bool:
    try:
        import safetensors.torch  # noqa: F401
    except ImportError:
        return False
    return True
