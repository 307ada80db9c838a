"""Weights from the official Deformable-DETR code and from Hugging Face transformers.

``from_official(path_or_state_dict, **kwargs)`` loads an official checkpoint (the
``checkpoint.pth`` dict with a ``"model"`` key, or a bare state dict) into a
``DeformableDetr`` whose variant is read from the tensors: number of levels, d_model,
classes, queries, encoder/decoder depth, feed-forward width, sampling points (given
the head count), box refinement, two-stage, position encoding and the ResNet depth.
What the tensors cannot tell (``dilation``, ``num_heads``, ``dropout``,
``two_stage_num_proposals``) comes from the checkpoint's saved ``args`` when present,
else from ``kwargs`` or the official defaults; ``kwargs`` always win.

``from_hf(model_or_state_dict)`` converts a transformers ``DeformableDetrModel`` or
``DeformableDetrForObjectDetection`` (timm or HF-ResNet backbone; transformers 4.x or
5.x key names), reading its config, or, for a bare state dict, inferring the variant
as ``from_official`` does.

DETR (``ddetr.Detr``, the baseline): ``detr_from_official`` loads a facebookresearch/detr
checkpoint (its keys are ``Detr``'s own; the variant is read from the tensors and the saved
``args`` as above), and ``detr_from_hf`` converts a transformers
``DetrForObjectDetection`` (or ``DetrModel``, or a state dict of either); ``from_hf``
hands a DETR model (``config.model_type == "detr"``) to ``detr_from_hf`` itself. The one
difference a conversion cannot remove: transformers' decoder with
``auxiliary_loss=True`` feeds each layer the previous layer's output after the final
norm, where the official DETR (and ``Detr``) feeds the output before it; the converted
model computes the official way.

DINO (``DeformableDetr(variant="dino")``): ``dino_from_official`` loads an
IDEA-Research/DINO checkpoint, whose keys are the model's own; the sizes are read from
the tensors as above, ``num_queries`` from ``transformer.tgt_embed``, and the heads and
the denoising settings (``dn_number``, ``dn_label_noise_ratio``, ``dn_box_noise_scale``)
from the saved ``args`` when present.

All of them check every tensor's shape (a mismatch names the tensor) and report missing and
unexpected keys: a ValueError listing them when ``strict`` (the default), a logged
warning otherwise.
"""

from __future__ import annotations

import argparse
import logging
import os
import re

from ddetr import _hf_mapping
from ddetr.models.backbone import RESNET_SPECS
from ddetr.models.deformable_detr import DeformableDetr
from ddetr.models.detr import CONFIG_KEYS as DETR_CONFIG_KEYS
from ddetr.models.detr import Detr
from ddetr.models.weights import load_torch_file, load_weights

__all__ = ["from_official", "to_official", "from_hf", "infer_official_config",
           "detr_from_official", "detr_from_hf", "infer_detr_config", "dino_from_official"]

logger = logging.getLogger(__name__)

# official argparse names -> DeformableDetr arguments (read from a checkpoint's "args")
_OFFICIAL_ARGS = {
    "hidden_dim": "d_model", "nheads": "num_heads", "enc_layers": "num_encoder_layers",
    "dec_layers": "num_decoder_layers", "dim_feedforward": "dim_feedforward",
    "dropout": "dropout", "num_queries": "num_queries", "num_feature_levels": "num_feature_levels",
    "enc_n_points": "enc_num_points", "dec_n_points": "dec_num_points",
    "two_stage_num_proposals": "two_stage_num_proposals", "dilation": "dilation",
    "position_embedding": "position_embedding", "with_box_refine": "with_box_refine",
    "two_stage": "two_stage", "backbone": "backbone", "aux_loss": "aux_loss",
}


def from_official(path_or_state_dict, strict: bool = True, **kwargs) -> DeformableDetr:
    """A ``DeformableDetr`` holding an official checkpoint's weights (see the module doc).

    Args:
        path_or_state_dict: a ``.pth`` path, the loaded checkpoint dict (``{"model": ...,
            "args": ...}``) or a state dict.
        strict: raise on missing or unexpected keys (else log them).
        kwargs: ``DeformableDetr`` arguments overriding what is inferred.
    """
    state, args = _read_official(path_or_state_dict)
    return _official_model(state, args, strict, kwargs, {}, "official checkpoint")


def _official_model(state: dict, args, strict: bool, overrides: dict, implied: dict,
                    source: str) -> DeformableDetr:
    """A ``DeformableDetr`` with the config inferred from an official-layout ``state``
    (and its run's ``args``), updated by what the format implies, then by the caller's
    ``overrides``, holding ``state``."""
    config = infer_official_config(state, args, num_heads=overrides.get("num_heads"))
    config.update(implied)
    config.update(overrides)
    model = DeformableDetr(**config)
    load_weights(model, state, strict=strict, source=source)
    return model


def to_official(model: DeformableDetr) -> dict:
    """The model's state dict in the official key layout (shared heads repeated per
    layer). Save ``{"model": to_official(model)}`` to get an official-style ``.pth``."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def from_hf(model_or_state_dict, config=None, strict: bool = True, **kwargs) -> DeformableDetr:
    """A ``DeformableDetr`` equal to a transformers Deformable DETR model.

    Args:
        model_or_state_dict: a ``DeformableDetrForObjectDetection`` or
            ``DeformableDetrModel`` (its ``config`` is read), or a state dict of one.
        config: a ``DeformableDetrConfig`` to use with a bare state dict.
        strict: raise on missing or unexpected keys. A ``DeformableDetrModel`` has no
            class and box heads: load it with ``strict=False``.
        kwargs: ``DeformableDetr`` arguments overriding the config.
    """
    hf_state, config = _hf_state(model_or_state_dict, config)
    if _hf_mapping.is_detr(config):
        return detr_from_hf(hf_state, config, strict, **kwargs)
    state = _hf_mapping.convert_state_dict(hf_state, _uses_hf_resnet(hf_state, config))
    if config is not None:
        model_config = _hf_mapping.config_to_kwargs(config)
    else:
        model_config = infer_official_config(state, None, num_heads=kwargs.get("num_heads"))
    model_config.update(kwargs)
    model = DeformableDetr(**model_config)
    load_weights(model, state, strict=strict, source="transformers state dict")
    return model


def dino_from_official(path_or_state_dict, strict: bool = True, **kwargs) -> DeformableDetr:
    """A DINO (``DeformableDetr(variant="dino")``) holding an IDEA-Research/DINO
    checkpoint's weights.

    Args:
        path_or_state_dict: a ``.pth`` path, the loaded checkpoint dict (``{"model": ...,
            "args": ...}``) or a state dict.
        strict: raise on missing or unexpected keys (else log them).
        kwargs: ``DeformableDetr`` arguments overriding what is inferred.
    """
    state, args = _read_official(path_or_state_dict)
    if "transformer.tgt_embed.weight" not in state:
        raise ValueError("path_or_state_dict: no 'transformer.tgt_embed.weight' tensor; this "
                         "is not a DINO state dict")
    queries = state["transformer.tgt_embed.weight"].shape[0]
    implied = dict(variant="dino", with_box_refine=True, two_stage=True, num_queries=queries,
                   two_stage_num_proposals=queries)
    implied.update({name: args[name] for name in ("dn_number", "dn_label_noise_ratio",
                                                  "dn_box_noise_scale") if args and name in args})
    return _official_model(state, args, strict, kwargs, implied, "official DINO checkpoint")


def detr_from_official(path_or_state_dict, strict: bool = True, **kwargs) -> Detr:
    """A ``Detr`` holding a facebookresearch/detr checkpoint's weights.

    Args:
        path_or_state_dict: a ``.pth`` path, the loaded checkpoint dict (``{"model": ...,
            "args": ...}``) or a state dict.
        strict: raise on missing or unexpected keys (else log them).
        kwargs: ``Detr`` arguments overriding what is inferred.
    """
    state, args = _read_official(path_or_state_dict)
    config = infer_detr_config(state, args)
    config.update(kwargs)
    model = Detr(**config)
    load_weights(model, state, strict=strict, source="official DETR checkpoint")
    return model


def detr_from_hf(model_or_state_dict, config=None, strict: bool = True, **kwargs) -> Detr:
    """A ``Detr`` equal to a transformers DETR model (see the module doc).

    Args:
        model_or_state_dict: a ``DetrForObjectDetection`` or ``DetrModel`` (its
            ``config`` is read), or a state dict of one.
        config: a ``DetrConfig`` to use with a bare state dict (without one the variant
            is read from the tensors; pass ``num_heads`` and ``dilation`` then).
        strict: raise on missing or unexpected keys. A ``DetrModel`` has no class and box
            heads: load it with ``strict=False``.
        kwargs: ``Detr`` arguments overriding the config.
    """
    hf_state, config = _hf_state(model_or_state_dict, config)
    state = _hf_mapping.convert_detr_state_dict(hf_state, _uses_hf_resnet(hf_state, config))
    if config is not None:
        model_config = _hf_mapping.detr_config_to_kwargs(config)
        if _hf_mapping.feeds_normed_decoder_states(config):
            logger.warning("detr_from_hf: the transformers model has auxiliary_loss=True, so "
                           "its decoder layers read the previous layer's normed output; the "
                           "converted Detr computes the official way, and its outputs differ")
    else:
        model_config = infer_detr_config(state)
    model_config.update(kwargs)
    model = Detr(**model_config)
    load_weights(model, state, strict=strict, source="transformers DETR state dict")
    return model


def infer_detr_config(state: dict, args: dict | None = None) -> dict:
    """``Detr`` arguments for a facebookresearch/detr state dict: sizes from the tensors,
    ``num_heads``, ``dilation`` and ``dropout`` from ``args`` (the checkpoint's saved
    argparse namespace as a dict) when given, else ``Detr``'s defaults."""
    config = {ours: args[theirs] for theirs, ours in _OFFICIAL_ARGS.items()
              if args and theirs in args and ours in DETR_CONFIG_KEYS}
    key = "transformer.encoder.layers.0.linear1.weight"
    if key not in state or "transformer.decoder.norm.weight" not in state:
        raise ValueError("path_or_state_dict: no 'transformer.decoder.norm' or encoder "
                         "layer 0 tensors; this is not a DETR state dict")
    config.update(d_model=state[key].shape[1], dim_feedforward=state[key].shape[0],
                  num_encoder_layers=_count(state, "transformer.encoder.layers."),
                  num_decoder_layers=_count(state, "transformer.decoder.layers."),
                  position_embedding="learned" if "backbone.1.row_embed.weight" in state
                  else "sine")
    if "class_embed.weight" in state:
        config["num_classes"] = state["class_embed.weight"].shape[0] - 1
    if "query_embed.weight" in state:
        config["num_queries"] = state["query_embed.weight"].shape[0]
    backbone = _infer_backbone(state)
    if backbone is not None:
        config["backbone"] = backbone
    return config


def _hf_state(model_or_state_dict, config) -> tuple[dict, object]:
    """``(state dict, config)`` of a transformers model or a bare state dict."""
    if hasattr(model_or_state_dict, "state_dict"):
        config = config if config is not None else getattr(model_or_state_dict, "config", None)
        return model_or_state_dict.state_dict(), config
    if isinstance(model_or_state_dict, dict):
        return model_or_state_dict, config
    raise ValueError(f"model_or_state_dict: expected a transformers model or a state dict, "
                     f"got {type(model_or_state_dict).__name__}")


def _uses_hf_resnet(hf_state: dict, config) -> bool:
    if config is not None:
        return _hf_mapping.uses_hf_resnet(config)
    # an HF ResNet's stem is the only "embedder.embedder" in the model
    return any(".embedder.embedder." in k for k in hf_state)


def _read_official(source) -> tuple[dict, dict | None]:
    if isinstance(source, (str, os.PathLike)):
        source = _load_pth(os.fspath(source))
    if not isinstance(source, dict):
        raise ValueError(f"path_or_state_dict: expected a path or a dict, got {type(source).__name__}")
    args = source.get("args")
    state = source["model"] if isinstance(source.get("model"), dict) else source
    # DataParallel prefixes and a FLOP counter's leftovers are not weights
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()
             if k not in ("total_ops", "total_params") and not k.endswith((".total_ops", ".total_params"))}
    return state, (vars(args) if isinstance(args, argparse.Namespace) else args)


def _load_pth(path: str) -> dict:
    """Tensors, plain data and the official ``args`` namespace only: nothing in the file
    runs (a ValueError naming the file otherwise, or when it is not a torch file)."""
    return load_torch_file(path, "path_or_state_dict", allowed=(argparse.Namespace,),
                           opt_in="Only if you trust the file, load it yourself with "
                                  "torch.load(path, weights_only=False), which runs any code "
                                  "it holds, and pass the dict.")


def infer_official_config(state: dict, args: dict | None = None, num_heads=None) -> dict:
    """``DeformableDetr`` arguments for an official-layout state dict (see the module
    doc). ``args`` is the checkpoint's saved argparse namespace as a dict, if any."""
    config = {ours: args[theirs] for theirs, ours in _OFFICIAL_ARGS.items()
              if args and theirs in args}
    if "transformer.level_embed" not in state:
        raise ValueError("path_or_state_dict: no 'transformer.level_embed' tensor; this is "
                         "not an official Deformable-DETR state dict")
    levels, d_model = state["transformer.level_embed"].shape
    config.update(num_feature_levels=levels, d_model=d_model,
                  two_stage="transformer.enc_output.weight" in state,
                  with_box_refine=any(k.startswith("transformer.decoder.bbox_embed.") for k in state),
                  position_embedding="learned" if "backbone.1.row_embed.weight" in state else "sine",
                  num_encoder_layers=_count(state, "transformer.encoder.layers."),
                  num_decoder_layers=_count(state, "transformer.decoder.layers."),
                  dim_feedforward=state["transformer.encoder.layers.0.linear1.weight"].shape[0])
    if "class_embed.0.weight" in state:
        config["num_classes"] = state["class_embed.0.weight"].shape[0]
    if "query_embed.weight" in state:
        config["num_queries"] = state["query_embed.weight"].shape[0]
    heads = num_heads or config.get("num_heads", 8)
    config["num_heads"] = heads
    for side, key in (("enc", "encoder.layers.0.self_attn"), ("dec", "decoder.layers.0.cross_attn")):
        rows = state[f"transformer.{key}.attention_weights.weight"].shape[0]
        if rows % (heads * levels):
            raise ValueError(f"num_heads: {key}.attention_weights has {rows} rows, not a multiple "
                             f"of num_heads ({heads}) x levels ({levels}); pass num_heads")
        config[f"{side}_num_points"] = rows // (heads * levels)
    backbone = _infer_backbone(state)
    if backbone is not None:
        config["backbone"] = backbone
    return config


def _count(state: dict, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({m.group(1) for k in state if (m := pattern.match(k))})


def _infer_backbone(state: dict):
    """A ResNet name (or a custom spec dict) from the ``backbone.0.body.*`` tensors."""
    prefix = "backbone.0.body."
    if prefix + "conv1.weight" not in state:
        return None
    block = "bottleneck" if prefix + "layer1.0.conv3.weight" in state else "basic"
    last = "conv3" if block == "bottleneck" else "conv2"
    depths = tuple(_count(state, f"{prefix}layer{i}.") for i in range(1, 5))
    widths = tuple(state[f"{prefix}layer{i}.0.{last}.weight"].shape[0] for i in range(1, 5))
    stem = state[prefix + "conv1.weight"].shape[0]
    for name, (kind, named_depths) in RESNET_SPECS.items():
        standard = (64, 128, 256, 512) if kind == "basic" else (256, 512, 1024, 2048)
        if (kind, named_depths, widths, stem) == (block, depths, standard, 64):
            return name
    return {"block": block, "depths": list(depths), "widths": list(widths), "stem_width": stem}
