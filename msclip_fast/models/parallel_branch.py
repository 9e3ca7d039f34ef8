"""MS-CLIP's efficient parallel branch (You et al. 2022, §3.2; official ``PARALLEL_IN_V`` with
``PARALLEL_RESNET``): a small CNN run on the (normalized) image beside the vision
transformer, injecting its features into the token sequence through lateral adapters.

Branch: stage 0 = conv3x3 stride s0 + BN + ReLU (3 -> c0); stage j >= 1 = one bottleneck
residual block (1x1 -> 3x3 stride s_j -> 1x1, mid = c_j/2, BN eps 1e-6, 1x1-conv+BN shortcut),
channels ``c_j = width / 2**(n-1-j)`` (768/16, /8, /4, /2, /1 for five stages).

Adapter j (before vision block ``adapter_layers[j]``):
    branch map (B, c_j, S, S) -> depthwise conv (kernel = stride = k_j) + BN -> 1x1 conv to
    ``width`` -> tokens t (B, h·w, width);
    transformer patch grid g -> depthwise 3x3 + BN;
    new tokens = LN_adapt([CLS; dw(g)] + [CLS; t])
so the patch tokens are replaced and the CLS token becomes LN(2·CLS).
"""
from __future__ import annotations

import torch
from torch import nn

from ..modules.layer_norm import ModalityLayerNorm


def _conv_bn(c_in, c_out, k, s, p, groups=1, bn_eps=1e-5):
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=k, stride=s, padding=p, groups=groups, bias=False),
        nn.BatchNorm2d(c_out, eps=bn_eps),
    )


class BottleneckBlock(nn.Module):
    """ReLU(conv1x1-BN-ReLU -> conv3x3(stride)-BN-ReLU -> conv1x1-BN  +  conv1x1(stride)-BN)."""

    def __init__(self, c_in: int, c_mid: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = _conv_bn(c_in, c_mid, 1, 1, 0, bn_eps=1e-6)
        self.conv2 = _conv_bn(c_mid, c_mid, 3, stride, 1, bn_eps=1e-6)
        self.conv3 = _conv_bn(c_mid, c_out, 1, 1, 0, bn_eps=1e-6)
        self.shortcut = _conv_bn(c_in, c_out, 1, stride, 0, bn_eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1(x))
        h = torch.relu(self.conv2(h))
        return torch.relu(self.conv3(h) + self.shortcut(x))


class LateralAdapter(nn.Module):
    """Fuse a branch feature map into the vision tokens (see module docstring).

    Args:
        branch_channels: ``c_j``; width: transformer width; kernel: depthwise kernel = stride.
        eps: LN_adapt epsilon.
    """

    def __init__(self, branch_channels: int, width: int, kernel: int, eps: float = 1e-12):
        super().__init__()
        self.branch_dw = _conv_bn(branch_channels, branch_channels, kernel, kernel, 0, groups=branch_channels)
        self.branch_pw = nn.Conv2d(branch_channels, width, kernel_size=1, bias=False)
        self.grid_dw = _conv_bn(width, width, 3, 1, 1, groups=width)
        self.ln_adapt = ModalityLayerNorm(width, 1, eps)

    def forward(self, branch: torch.Tensor, x: torch.Tensor, grid: int) -> torch.Tensor:
        """``branch`` (B, c_j, S, S), ``x`` (B, 1 + grid², width) -> (B, 1 + grid², width)."""
        B, L, D = x.shape
        t = self.branch_pw(self.branch_dw(branch))
        if t.shape[-2:] != (grid, grid):
            raise ValueError(f"adapter maps the branch to {tuple(t.shape[-2:])}, expected the {grid}x{grid} token grid")
        t = t.flatten(2).transpose(1, 2)  # (B, grid², D)
        cls, g = x[:, :1], x[:, 1:]
        g = self.grid_dw(g.transpose(1, 2).reshape(B, D, grid, grid)).flatten(2).transpose(1, 2)
        return self.ln_adapt(torch.cat([cls + cls, g + t.to(g.dtype)], dim=1))


class ParallelBranch(nn.Module):
    """The branch CNN stages and their adapters.

    Args:
        width: transformer width; strides: stage strides; kernels: adapter kernels.
    """

    def __init__(self, width: int, strides, kernels, eps: float = 1e-12):
        super().__init__()
        n = len(strides)
        chans = [width // 2 ** (n - 1 - j) for j in range(n)]
        stages = [nn.Sequential(_conv_bn(3, chans[0], 3, strides[0], 1), nn.ReLU())]
        for j in range(1, n):
            stages.append(BottleneckBlock(chans[j - 1], chans[j] // 2, chans[j], strides[j]))
        self.stages = nn.ModuleList(stages)
        self.adapters = nn.ModuleList(LateralAdapter(c, width, k, eps) for c, k in zip(chans, kernels))
