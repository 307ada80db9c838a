"""ResNet backbones with frozen batch norm, written here (no torchvision dependency).

Module and parameter names are torchvision's (``conv1``, ``bn1``, ``layer1``..``layer4``,
``downsample.0/1``), so a torchvision ImageNet state dict loads into ``ResNet`` and an
official Deformable-DETR checkpoint's ``backbone.0.body.*`` keys load into
``Backbone.body``. As in the official recipe, batch norm is frozen (statistics and
affine terms are buffers), the stem and ``layer1`` never train, and the body returns
``layer2``-``layer4`` (strides 8, 16, 32) or only ``layer4`` (stride 32), with an
optional dilated ``layer4`` (DC5: stride 16).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ddetr.models import weights
from ddetr.models.size_cache import tracing
from ddetr.ops.bf16_cpu import conv2d

# name -> (block, blocks per stage); widths follow torchvision (64 stem channels).
RESNET_SPECS = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
}


# images of at least this many pixels run the backbone channels-last (NHWC)
CHANNELS_LAST_MIN_PIXELS = 256 * 256


class FrozenBatchNorm2d(nn.Module):
    """Batch norm with fixed statistics and affine terms (all buffers, never trained)."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # torchvision's BatchNorm2d counts its updates; a frozen norm has none to count.
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def scale_shift(self) -> tuple[Tensor, Tensor]:
        """(C,) ``scale`` and ``shift`` with ``forward(x) == x * scale + shift`` per channel."""
        return norm_scale_shift(self.weight, self.bias, self.running_mean, self.running_var,
                                self.eps)

    def forward(self, x: Tensor) -> Tensor:
        scale, shift = self.scale_shift()
        # (C,) -> (1, C, 1, 1)
        return x * scale[None, :, None, None] + shift[None, :, None, None]


def _foldable(norm: nn.Module) -> bool:
    """A frozen norm, or a BatchNorm2d in eval mode with running statistics and affine
    terms: a per-channel ``x * scale + shift`` that can go into the convolution."""
    if isinstance(norm, FrozenBatchNorm2d):
        return True
    return (isinstance(norm, nn.BatchNorm2d) and not norm.training and norm.affine
            and norm.running_mean is not None)


def norm_scale_shift(weight: Tensor, bias: Tensor, mean: Tensor, var: Tensor,
                     eps: float) -> tuple[Tensor, Tensor]:
    """(C,) ``scale`` and ``shift`` of a batch norm with fixed statistics: it computes
    ``x * scale + shift`` per channel."""
    scale = weight * (var + eps).rsqrt()
    return scale, torch.addcmul(bias, mean, scale, value=-1)


def _fold(weight: Tensor, norm_weight: Tensor, norm_bias: Tensor, mean: Tensor, var: Tensor,
          eps: float) -> tuple[Tensor, Tensor]:
    """(conv weight with the norm's scale per output channel, the norm's shift as bias)."""
    scale, shift = norm_scale_shift(norm_weight, norm_bias, mean, var, eps)
    return weight * scale.to(weight.dtype).view(-1, 1, 1, 1), shift.to(weight.dtype)


def conv_norm(conv: nn.Conv2d, norm: nn.Module, x: Tensor) -> Tensor:
    """``norm(conv(x))``. A frozen norm, or a batch norm in eval mode, is a per-channel
    ``x * scale + shift`` applied where it costs least. Folded into the convolution
    (weights scaled per output channel, shift as the bias) when the output is larger
    than a filter, as everywhere on large images: one pass over the output instead of
    three, and no extra full-size tensors. Otherwise (the later stages of a small image,
    where a 256x256x3x3 weight is 144 times a 256x4x4 output) one inference batch norm
    over the output: a single op where folding takes seven. The folded weights are made
    on every call: a cache of them went stale when weights changed without moving their
    version counter (torch's fused AdamW, writes through ``.data``). A batch norm that
    trains runs as is. bfloat16 on a CPU without oneDNN's bfloat16 runs in float32
    (``ddetr.ops.bf16_cpu.conv2d``)."""
    if not _foldable(norm) or conv.bias is not None:
        return norm(conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation,
                           conv.groups))
    if _fold_into_weights(conv, x):
        sources = (conv.weight, norm.weight, norm.bias, norm.running_mean, norm.running_var)
        weight, shift = _fold(*sources, norm.eps)
        return conv2d(x, weight, shift, conv.stride, conv.padding, conv.dilation, conv.groups)
    out = conv2d(x, conv.weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)
    return F.batch_norm(out, norm.running_mean, norm.running_var, norm.weight, norm.bias,
                        False, 0.0, norm.eps)


def _fold_into_weights(conv: nn.Conv2d, x: Tensor) -> bool:
    """Whether ``conv(x)`` has more output pixels than a filter has weights (then the
    norm goes into the weights). An exported or traced graph always folds: one form
    whatever the (maybe symbolic) size."""
    if tracing():
        return True
    pixels = x.shape[0]
    for size, k, s, p, d in zip(x.shape[-2:], conv.kernel_size, conv.stride, conv.padding,
                                conv.dilation):
        pixels *= (size + 2 * p - d * (k - 1) - 1) // s + 1
    return pixels * conv.weight.shape[0] >= conv.weight.numel()


def _add_relu(out: Tensor, identity: Tensor) -> Tensor:
    # in place: ``out`` is a fresh convolution output that autograd does not keep
    return F.relu(out.add_(identity), inplace=True)


def _conv(in_ch: int, out_ch: int, kernel: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    padding = dilation * (kernel // 2)
    return nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=padding,
                     dilation=dilation, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions (ResNet-18/34)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv(in_ch, out_ch, 3, stride, dilation)
        self.bn1 = FrozenBatchNorm2d(out_ch)
        self.conv2 = _conv(out_ch, out_ch, 3, 1, dilation)
        self.bn2 = FrozenBatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else conv_norm(*self.downsample, x)
        out = self.relu(conv_norm(self.conv1, self.bn1, x))
        return _add_relu(conv_norm(self.conv2, self.bn2, out), identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided: ResNet v1.5 as torchvision), 1x1 expand (x4)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        inner = out_ch // 4
        self.conv1 = _conv(in_ch, inner, 1)
        self.bn1 = FrozenBatchNorm2d(inner)
        self.conv2 = _conv(inner, inner, 3, stride, dilation)
        self.bn2 = FrozenBatchNorm2d(inner)
        self.conv3 = _conv(inner, out_ch, 1)
        self.bn3 = FrozenBatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else conv_norm(*self.downsample, x)
        out = self.relu(conv_norm(self.conv1, self.bn1, x))
        out = self.relu(conv_norm(self.conv2, self.bn2, out))
        return _add_relu(conv_norm(self.conv3, self.bn3, out), identity)


class ResNet(nn.Module):
    """A ResNet trunk (no pooling head) returning the outputs of chosen stages.

    Args:
        block: ``"basic"`` or ``"bottleneck"``.
        depths: blocks per stage (four stages).
        widths: output channels of each stage; default torchvision's
            (64, 128, 256, 512) for basic and (256, 512, 1024, 2048) for bottleneck.
        stem_width: channels of the 7x7 stem convolution (64 in torchvision).
        dilate_last: replace the stride of ``layer4`` by dilation (DC5).
        return_layers: stage indices (1-4) whose outputs ``forward`` returns.
    """

    def __init__(self, block: str = "bottleneck", depths=(3, 4, 6, 3), widths=None,
                 stem_width: int = 64, dilate_last: bool = False, return_layers=(2, 3, 4)):
        super().__init__()
        if block not in ("basic", "bottleneck"):
            raise ValueError(f"block: expected 'basic' or 'bottleneck', got {block!r}")
        if block == "basic" and dilate_last:
            raise ValueError("dilate_last: a dilated last stage needs bottleneck blocks "
                             "(torchvision's BasicBlock has no dilation either)")
        widths = widths or ((64, 128, 256, 512) if block == "basic" else (256, 512, 1024, 2048))
        if len(depths) != 4 or len(widths) != 4:
            raise ValueError(f"depths, widths: expected 4 stages, got {len(depths)} and {len(widths)}")
        self.return_layers = tuple(return_layers)
        self.conv1 = nn.Conv2d(3, stem_width, 7, stride=2, padding=3, bias=False)
        self.bn1 = FrozenBatchNorm2d(stem_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        unit = BasicBlock if block == "basic" else Bottleneck
        in_ch = stem_width
        for i, (depth, width) in enumerate(zip(depths, widths)):
            stride = 1 if i == 0 else 2
            dilate = dilate_last and i == 3
            setattr(self, f"layer{i + 1}", _make_stage(unit, in_ch, width, depth, stride, dilate))
            in_ch = width
        self.widths = tuple(widths)

    def forward(self, x: Tensor, count: int | None = None) -> list[Tensor]:
        """The outputs of the return layers, or of the first ``count`` of them (the later
        stages are not run)."""
        # channels-last (NHWC) activations on large images: the convolution kernels run
        # without layout reorders (1.5x faster at 800x1333 on the CPU); on small ones
        # torch sends most convolutions to its reference kernel, which copies NHWC to
        # NCHW and back (1.45x slower at 128x128), so they stay NCHW, all but the stem on
        # the CPU (see _stem); results are the same. An exported graph (dynamic sizes,
        # ONNX) has no layout: no guard on the size there
        exporting = torch.compiler.is_exporting()
        large = not exporting and x.shape[-2] * x.shape[-1] >= CHANNELS_LAST_MIN_PIXELS
        if large:
            x = x.contiguous(memory_format=torch.channels_last)
        x = self._stem(x, channels_last=not exporting and not large and x.device.type == "cpu")
        wanted = self.return_layers[:count] if count is not None else self.return_layers
        outs = []
        for i in range(1, 5):
            if i > max(wanted):
                break
            x = getattr(self, f"layer{i}")(x)
            if i in wanted:
                outs.append(x)
        return outs

    def _stem(self, x: Tensor, channels_last: bool) -> Tensor:
        """conv1, norm, ReLU and the 3x3 max pool. On small NCHW images the stem alone
        runs channels-last: torch's NCHW max pool is 10x slower than its NHWC one there
        (1.4 ms against 0.1 ms for 32x64x64 at one thread), and the result returns to
        NCHW for the stages, whose small convolutions prefer it."""
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.maxpool(self.relu(conv_norm(self.conv1, self.bn1, x)))
        return x.contiguous() if channels_last else x


def _make_stage(unit, in_ch: int, out_ch: int, depth: int, stride: int, dilate: bool) -> nn.Sequential:
    # torchvision's replace_stride_with_dilation: the first block keeps the previous
    # dilation (1) with stride 1; the following blocks use dilation 2.
    dilation = 2 if dilate else 1
    if dilate:
        stride = 1
    downsample = None
    if stride != 1 or in_ch != out_ch:
        downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                                   FrozenBatchNorm2d(out_ch))
    blocks = [unit(in_ch, out_ch, stride, 1, downsample)]
    blocks += [unit(out_ch, out_ch, 1, dilation) for _ in range(depth - 1)]
    return nn.Sequential(*blocks)


class Backbone(nn.Module):
    """The official ``Backbone``: a frozen-BN ResNet ``body`` plus the padding masks.

    ``forward(images, mask)`` returns a list of ``(feature (N, C_l, H_l, W_l), mask (N, H_l,
    W_l) bool)`` per returned stage, the mask (True on padding) resized by nearest
    interpolation. Attributes ``strides`` and ``num_channels`` describe the levels.
    """

    def __init__(self, name="resnet50", multi_scale: bool = True, dilation: bool = False,
                 train_backbone: bool = True):
        super().__init__()
        spec = resnet_spec(name)
        layers = (2, 3, 4) if multi_scale else (4,)
        self.body = ResNet(spec["block"], spec["depths"], spec.get("widths"),
                           spec.get("stem_width", 64), dilation, layers)
        self.strides = [8, 16, 32][-len(layers):]
        if dilation:
            self.strides[-1] //= 2
        self.num_channels = [self.body.widths[i - 1] for i in layers]
        for pname, param in self.body.named_parameters():
            trainable = train_backbone and pname.split(".")[0] in ("layer2", "layer3", "layer4")
            param.requires_grad_(trainable)

    def forward(self, images: Tensor, mask: Tensor, count: int | None = None
                ) -> list[tuple[Tensor, Tensor]]:
        """``count``: only the first ``count`` levels (the later stages are not run)."""
        feats = self.body(images, count)
        return [(f, resize_mask(mask, f.shape[-2:])) for f in feats]


def resize_mask(mask: Tensor, size) -> Tensor:
    """Nearest-resizes a (N, H, W) bool padding mask to ``size`` (the official rule)."""
    # (N, H, W) -> (1, N, H, W) -> interpolate -> (N, h, w)
    return F.interpolate(mask[None].float(), size=tuple(size)).to(torch.bool)[0]


def resnet_spec(name) -> dict:
    """``{"block", "depths", "widths"?, "stem_width"?}`` for a name or a custom spec dict."""
    if isinstance(name, dict):
        missing = {"block", "depths"} - set(name)
        if missing:
            raise ValueError(f"backbone: a custom spec needs keys {sorted(missing)}")
        return dict(name)
    if name not in RESNET_SPECS:
        raise ValueError(f"backbone: expected one of {sorted(RESNET_SPECS)} or a spec dict, "
                         f"got {name!r}")
    block, depths = RESNET_SPECS[name]
    return {"block": block, "depths": depths}


def load_backbone_weights(body: ResNet, path_or_state_dict) -> None:
    """Loads a torchvision ResNet state dict (a file path or a dict) into ``body``.

    The classifier (``fc.*``) and ``num_batches_tracked`` entries are ignored; any other
    missing or unexpected key, or a tensor of the wrong shape, raises ValueError.
    """
    state = path_or_state_dict
    if isinstance(state, (str, os.PathLike)):
        state = _read_weights(os.fspath(state))
    if not isinstance(state, dict):
        raise ValueError(f"backbone_weights: expected a path or a state dict, got {type(state).__name__}")
    state = {k: v for k, v in state.items()
             if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    own = body.state_dict()
    for key, value in state.items():
        if key in own and tuple(own[key].shape) != tuple(value.shape):
            raise ValueError(f"backbone_weights: {key} has shape {tuple(value.shape)}, "
                             f"this backbone needs {tuple(own[key].shape)}")
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"backbone_weights: missing keys {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                         f"unexpected keys {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}")
    body.load_state_dict(state)


def _read_weights(path: str) -> dict:
    if path.endswith(".safetensors"):
        return weights.load_safetensors(path, "backbone_weights")
    state = weights.load_torch_file(path, "backbone_weights")
    return state.get("state_dict", state) if isinstance(state, dict) else state
