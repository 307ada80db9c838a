"""transformers' Deformable DETR -> the official layout: state-dict keys and config.

Key renames (transformers 5.x names, with the 4.x spellings accepted):
``model.`` is dropped; ``backbone.model.`` (4.x ``backbone.conv_encoder.model.``) ->
``backbone.0.body.``; ``query_position_embeddings`` -> ``query_embed``; ``level_embed``,
``reference_points``, ``enc_output*``, ``pos_trans*``, ``encoder``, ``decoder`` go under
``transformer.``. Encoder layers: ``self_attn_layer_norm`` -> ``norm1``,
``final_layer_norm`` -> ``norm2``. Decoder layers: ``encoder_attn`` -> ``cross_attn``,
``encoder_attn_layer_norm`` -> ``norm1``, ``self_attn_layer_norm`` -> ``norm2``,
``final_layer_norm`` -> ``norm3``, ``self_attn.{q,k,v}_proj`` concatenated (q, k, v rows)
into ``self_attn.in_proj_{weight,bias}``, ``self_attn.o_proj`` (4.x ``out_proj``) ->
``self_attn.out_proj``. Both: ``mlp.fc1/fc2`` (4.x ``fc1/fc2``) -> ``linear1/linear2``.
timm ResNet keys are torchvision's already; HF ResNet keys are renamed to them.

transformers' DETR (``detr_*``) -> facebookresearch/detr's layout: the same backbone and
``query_embed`` renames; ``input_projection`` -> ``input_proj``; ``encoder``/``decoder``
under ``transformer.``, ``decoder.layernorm`` -> ``transformer.decoder.norm``;
``class_labels_classifier`` -> ``class_embed``, ``bbox_predictor`` -> ``bbox_embed``.
Encoder layers as Deformable DETR's; decoder layers: ``self_attn_layer_norm`` ->
``norm1``, ``encoder_attn_layer_norm`` -> ``norm2``, ``final_layer_norm`` -> ``norm3``,
``encoder_attn`` -> ``multihead_attn``. Every attention's ``{q,k,v}_proj`` is
concatenated into ``in_proj_{weight,bias}`` and ``o_proj`` becomes ``out_proj``.
"""

from __future__ import annotations

import re

import torch

from ddetr.models.backbone import RESNET_SPECS

_TOP_RULES = [
    (r"^backbone\.(?:conv_encoder\.)?model\.", "backbone.0.body."),
    (r"^(?:backbone\.)?position_embedding\.row_embeddings\.", "backbone.1.row_embed."),
    (r"^(?:backbone\.)?position_embedding\.column_embeddings\.", "backbone.1.col_embed."),
    (r"^query_position_embeddings\.", "query_embed."),
    (r"^level_embed$", "transformer.level_embed"),
    (r"^(reference_points|enc_output|enc_output_norm|pos_trans|pos_trans_norm)\.", r"transformer.\1."),
    (r"^(encoder|decoder)\.", r"transformer.\1."),
]
_FFN_RULES = [("mlp.fc1.", "linear1."), ("mlp.fc2.", "linear2."),
              ("fc1.", "linear1."), ("fc2.", "linear2.")]
_LAYER_RULES = {
    "encoder": [("self_attn_layer_norm.", "norm1."), ("final_layer_norm.", "norm2.")] + _FFN_RULES,
    "decoder": [("encoder_attn_layer_norm.", "norm1."), ("self_attn_layer_norm.", "norm2."),
                ("final_layer_norm.", "norm3."), ("encoder_attn.", "cross_attn."),
                ("self_attn.o_proj.", "self_attn.out_proj.")] + _FFN_RULES,
}
_LAYER_KEY = re.compile(r"^transformer\.(encoder|decoder)\.layers\.(\d+)\.(.*)$")
_RESNET_RULES = [
    (r"^embedder\.embedder\.convolution\.", lambda m: "conv1."),
    (r"^embedder\.embedder\.normalization\.", lambda m: "bn1."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.convolution\.",
     lambda m: f"layer{int(m[1]) + 1}.{m[2]}.downsample.0."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.normalization\.",
     lambda m: f"layer{int(m[1]) + 1}.{m[2]}.downsample.1."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d+)\.convolution\.",
     lambda m: f"layer{int(m[1]) + 1}.{m[2]}.conv{int(m[3]) + 1}."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d+)\.normalization\.",
     lambda m: f"layer{int(m[1]) + 1}.{m[2]}.bn{int(m[3]) + 1}."),
]


_DETR_TOP_RULES = [
    (r"^input_projection\.", "input_proj."),
    (r"^decoder\.layernorm\.", "transformer.decoder.norm."),
    (r"^class_labels_classifier\.", "class_embed."),
    (r"^bbox_predictor\.", "bbox_embed."),
]
_DETR_ATTN_RULES = [("self_attn.o_proj.", "self_attn.out_proj."),
                    ("encoder_attn.o_proj.", "multihead_attn.out_proj."),
                    ("encoder_attn.out_proj.", "multihead_attn.out_proj."),
                    ("encoder_attn.", "multihead_attn.")]
_DETR_LAYER_RULES = {
    "encoder": _LAYER_RULES["encoder"] + _DETR_ATTN_RULES,
    "decoder": [("self_attn_layer_norm.", "norm1."), ("encoder_attn_layer_norm.", "norm2."),
                ("final_layer_norm.", "norm3.")] + _FFN_RULES + _DETR_ATTN_RULES,
}


def convert_state_dict(hf_state: dict, hf_resnet: bool) -> dict:
    """A transformers Deformable DETR state dict in the official key layout."""
    with_prefix = any(k.startswith("model.") for k in hf_state)
    out = {}
    for key, value in hf_state.items():
        if with_prefix and key.startswith("model."):
            key = key[len("model."):]
        out[rename(key, hf_resnet)] = value
    return _merge_qkv(out)


def convert_detr_state_dict(hf_state: dict, hf_resnet: bool) -> dict:
    """A transformers DETR state dict in facebookresearch/detr's key layout."""
    with_prefix = any(k.startswith("model.") for k in hf_state)
    out = {}
    for key, value in hf_state.items():
        if with_prefix and key.startswith("model."):
            key = key[len("model."):]
        out[rename_detr(key, hf_resnet)] = value
    return _merge_qkv(out)


def rename_detr(key: str, hf_resnet: bool = False) -> str:
    """One DETR key (without the ``model.`` prefix) in facebookresearch/detr's layout."""
    for pattern, repl in _DETR_TOP_RULES:
        key, hits = re.subn(pattern, repl, key)
        if hits:
            return key
    return rename(key, hf_resnet, _DETR_LAYER_RULES)


def rename(key: str, hf_resnet: bool = False, layer_rules: dict | None = None) -> str:
    """One key (without the ``model.`` prefix) in the official layout; ``layer_rules``
    (default Deformable DETR's) rename what follows ``{encoder,decoder}.layers.{i}.``."""
    layer_rules = layer_rules or _LAYER_RULES
    if key.startswith("decoder.bbox_embed.") or key.startswith("decoder.class_embed."):
        return "transformer." + key
    for pattern, repl in _TOP_RULES:
        key, hits = re.subn(pattern, repl, key)
        if hits:
            break
    if hf_resnet and key.startswith("backbone.0.body."):
        return "backbone.0.body." + _rename_resnet(key[len("backbone.0.body."):])
    match = _LAYER_KEY.match(key)
    if match:
        part, index, rest = match.groups()
        for old, new in layer_rules[part]:
            if rest.startswith(old):
                rest = new + rest[len(old):]
                break
        key = f"transformer.{part}.layers.{index}.{rest}"
    return key


def _rename_resnet(key: str) -> str:
    for pattern, repl in _RESNET_RULES:
        new, hits = re.subn(pattern, repl, key)
        if hits:
            return new
    return key


def _merge_qkv(state: dict) -> dict:
    """``{self_attn,multihead_attn}.{q,k,v}_proj.{weight,bias}`` ->
    ``{self_attn,multihead_attn}.in_proj_{weight,bias}`` (rows q, k, v)."""
    out = {}
    for key, value in state.items():
        match = re.match(r"^(.*\.(?:self_attn|multihead_attn)\.)([qkv])_proj\.(weight|bias)$", key)
        if not match:
            out[key] = value
            continue
        prefix, which, kind = match.groups()
        if which != "q":
            continue
        parts = [state.get(f"{prefix}{p}_proj.{kind}") for p in "qkv"]
        if any(p is None for p in parts):
            raise ValueError(f"model_or_state_dict: {prefix}{{q,k,v}}_proj.{kind} incomplete")
        out[f"{prefix}in_proj_{kind}"] = torch.cat(parts, 0)
    return out


def _get(cfg, name: str, default=None):
    if cfg is None:
        return default
    if isinstance(cfg, dict):
        return cfg.get(name, default)
    return getattr(cfg, name, default)


def is_detr(config) -> bool:
    """The config is a transformers ``DetrConfig`` (or its dict)."""
    return _get(config, "model_type") == "detr"


def feeds_normed_decoder_states(config) -> bool:
    """transformers' DETR decoder with ``auxiliary_loss`` passes each layer the previous
    layer's output after the final LayerNorm (the official DETR passes it before)."""
    return bool(_get(config, "auxiliary_loss", False))


def uses_hf_resnet(config) -> bool:
    return _get(_get(config, "backbone_config"), "model_type") == "resnet"


def config_to_kwargs(config) -> dict:
    """``DeformableDetr`` arguments from a ``DeformableDetrConfig``."""
    _check_same_encoder_decoder(config)
    kwargs = dict(
        num_classes=_get(config, "num_labels"), num_queries=_get(config, "num_queries"),
        num_feature_levels=_get(config, "num_feature_levels"),
        with_box_refine=bool(_get(config, "with_box_refine")),
        two_stage=bool(_get(config, "two_stage")), d_model=_get(config, "d_model"),
        num_heads=_get(config, "encoder_attention_heads"),
        num_encoder_layers=_get(config, "encoder_layers"),
        num_decoder_layers=_get(config, "decoder_layers"),
        dim_feedforward=_get(config, "encoder_ffn_dim"), dropout=_get(config, "dropout"),
        activation=_get(config, "activation_function"),
        enc_num_points=_get(config, "encoder_n_points"),
        dec_num_points=_get(config, "decoder_n_points"),
        two_stage_num_proposals=_get(config, "two_stage_num_proposals"),
        position_embedding=_get(config, "position_embedding_type", "sine"))
    kwargs.update(_backbone_kwargs(config, kwargs["num_feature_levels"]))
    return kwargs


def detr_config_to_kwargs(config) -> dict:
    """``Detr`` arguments from a ``DetrConfig``."""
    _check_same_encoder_decoder(config)
    if _get(config, "position_embedding_type", "sine") not in ("sine", "learned"):
        raise ValueError(f"config: position_embedding_type "
                         f"{_get(config, 'position_embedding_type')!r} is not supported")
    kwargs = dict(
        num_classes=_get(config, "num_labels"), num_queries=_get(config, "num_queries"),
        d_model=_get(config, "d_model"), num_heads=_get(config, "encoder_attention_heads"),
        num_encoder_layers=_get(config, "encoder_layers"),
        num_decoder_layers=_get(config, "decoder_layers"),
        dim_feedforward=_get(config, "encoder_ffn_dim"), dropout=_get(config, "dropout"),
        activation=_get(config, "activation_function"),
        position_embedding=_get(config, "position_embedding_type", "sine"))
    kwargs.update(_backbone_kwargs(config, 1, last_stage_only=True))
    return kwargs


def _check_same_encoder_decoder(config) -> None:
    for enc, dec in (("encoder_attention_heads", "decoder_attention_heads"),
                     ("encoder_ffn_dim", "decoder_ffn_dim")):
        if _get(config, enc) != _get(config, dec):
            raise ValueError(f"config: {enc} ({_get(config, enc)}) != {dec} "
                             f"({_get(config, dec)}); ddetr uses one value for both")


def _backbone_kwargs(config, num_levels: int, last_stage_only: bool = False) -> dict:
    """``backbone`` and ``dilation``. ``last_stage_only``: the model reads only the last
    returned stage (DETR), which must then be stage 4; earlier ones may be returned."""
    backbone = _get(config, "backbone_config")
    kind = _get(backbone, "model_type", "timm_backbone")
    if kind == "resnet":
        return {"backbone": _hf_resnet_spec(backbone, num_levels, last_stage_only),
                "dilation": False}
    if kind != "timm_backbone":
        raise ValueError(f"config: backbone model_type {kind!r} is not supported (only ResNets)")
    name = _get(backbone, "backbone") or _get(config, "backbone") or "resnet50"
    if name not in RESNET_SPECS:
        raise ValueError(f"config: timm backbone {name!r} is not supported; "
                         f"expected one of {sorted(RESNET_SPECS)}")
    wanted = [2, 3, 4] if num_levels > 1 else [4]
    out_indices = _get(backbone, "out_indices")
    if out_indices is not None and last_stage_only:
        out_indices = list(out_indices)[-1:]
    if out_indices is not None and list(out_indices) != wanted:
        raise ValueError(f"config: backbone_config.out_indices {list(out_indices)} must be "
                         f"{wanted} for num_feature_levels={num_levels}")
    dilation = _get(backbone, "output_stride") == 16 or bool(_get(config, "dilation", False))
    return {"backbone": name, "dilation": dilation}


def _hf_resnet_spec(backbone, num_levels: int, last_stage_only: bool = False):
    wanted = ["stage2", "stage3", "stage4"] if num_levels > 1 else ["stage4"]
    out_features = list(_get(backbone, "out_features") or [])
    if last_stage_only:
        out_features = out_features[-1:]
    if out_features != wanted:
        raise ValueError(f"config: backbone_config.out_features {out_features} must be {wanted} "
                         f"for num_feature_levels={num_levels}")
    for flag in ("downsample_in_bottleneck", "downsample_in_first_stage"):
        if _get(backbone, flag):
            raise ValueError(f"config: backbone_config.{flag}=True is not the torchvision "
                             f"ResNet layout ddetr implements")
    if _get(backbone, "hidden_act", "relu") != "relu":
        raise ValueError("config: backbone_config.hidden_act must be 'relu'")
    spec = {"block": _get(backbone, "layer_type"), "depths": list(_get(backbone, "depths")),
            "widths": list(_get(backbone, "hidden_sizes")),
            "stem_width": _get(backbone, "embedding_size")}
    for name, (block, depths) in RESNET_SPECS.items():
        standard = [64, 128, 256, 512] if block == "basic" else [256, 512, 1024, 2048]
        if spec == {"block": block, "depths": list(depths), "widths": standard, "stem_width": 64}:
            return name
    return spec
