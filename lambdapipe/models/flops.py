"""Forward multiply-accumulates counted with hooks: the numerator of MFU in `bench`.

Counted: every Conv2d and Linear (MACs of the dense product) and each lambda layer's own
contractions (`LambdaLayer.macs`, for the implementation it actually runs; its 1x1
projections are Conv2d and counted as such). Not counted: BN, activations, pooling, softmax,
residual adds, which are memory-bound and a few percent of the total.
"""

from __future__ import annotations

import torch
from torch import nn

from lambdapipe.models.lambda_layer import LambdaLayer


def estimate_macs(model: nn.Module, image_size: int) -> int:
    """Forward MACs for one image_size x image_size RGB image."""
    total = 0

    def conv_hook(m: nn.Conv2d, inputs, out):
        nonlocal total
        kh, kw = m.kernel_size
        total += out[0].numel() * (m.in_channels // m.groups) * kh * kw

    def linear_hook(m: nn.Linear, inputs, out):
        nonlocal total
        total += m.in_features * m.out_features

    def lambda_hook(m: LambdaLayer, inputs, out):
        nonlocal total
        total += m.macs(*inputs[0].shape[-2:])

    hooks = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(linear_hook))
        elif isinstance(m, LambdaLayer):
            hooks.append(m.register_forward_hook(lambda_hook))
    param = next(model.parameters())
    was_training = model.training
    try:
        model.eval()  # batch 1 with 1x1 maps would upset train-mode BN
        with torch.no_grad():
            model(torch.zeros(1, 3, image_size, image_size, device=param.device,
                              dtype=param.dtype))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return total


def estimate_flops(model: nn.Module, image_size: int) -> int:
    """Forward FLOPs per image (2 x MACs); a training step is about 3x this."""
    return 2 * estimate_macs(model, image_size)
