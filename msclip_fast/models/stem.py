"""Vision input stems: the ViT patch embedding and MS-CLIP's early-specialization conv stem.

The conv stem (You et al. 2022, §3.2 "early specialization"; official config
``EARLY_CONV_RES`` with ``basic_v0`` blocks) replaces vision block 0:
3x3 stride-2 conv + BN + ReLU to ``width/16`` channels, four single-conv residual stages
doubling channels (``ReLU(BN(conv3x3 s)(x) + BN(conv1x1 s)(x))``), then a bias-free 1x1 conv
``width -> width``. All convs are bias-free; BNs are affine.
"""
from __future__ import annotations

import torch
from torch import nn


class PatchEmbed(nn.Module):
    """ViT patchify: bias-free conv with kernel = stride = ``patch_size``.
    ``(B, 3, H, W) -> (B, width, H/p, W/p)``."""

    def __init__(self, width: int, patch_size: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv1(x)


class ResidualConvStage(nn.Module):
    """``ReLU(BN(conv3x3 stride s)(x) + BN(conv1x1 stride s)(x))``, ``c_in -> c_out``."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.downsample = nn.Sequential(
            nn.Conv2d(c_in, c_out, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn1(self.conv1(x)) + self.downsample(x))


class ConvStem(nn.Module):
    """Early-specialization stem: ``(B, 3, H, W) -> (B, width, H/(2·∏s), W/(2·∏s))``.

    Args:
        width: output channels (the transformer width); must be a multiple of 16.
        strides: the four residual stages' strides ((2,2,2,2) for B/32, (2,2,2,1) for B/16).
    """

    def __init__(self, width: int, strides=(2, 2, 2, 2)):
        super().__init__()
        if width % 16:
            raise ValueError(f"ConvStem width must be a multiple of 16, got {width}")
        if len(strides) != 4:
            raise ValueError(f"ConvStem needs 4 stage strides, got {strides}")
        c = width // 16
        self.conv1 = nn.Conv2d(3, c, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        stages = []
        for s in strides:
            stages.append(ResidualConvStage(c, 2 * c, s))
            c *= 2
        self.stages = nn.Sequential(*stages)
        self.last_conv = nn.Conv2d(width, width, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        return self.last_conv(self.stages(x))
