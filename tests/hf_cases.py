"""Shared by the transformers conversion tests."""

import torch


def jittered(model):
    """``model`` in eval mode with every parameter and frozen-BN statistic moved off its
    initial value, so that each one takes part in a comparison."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        for name, b in model.named_buffers():
            if name.endswith("running_var"):
                b.uniform_(0.5, 1.5)
            elif name.endswith(("running_mean", "bias", "weight")):
                b.add_(torch.randn_like(b) * 0.1)
    return model.eval()
