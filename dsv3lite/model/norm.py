"""RMSNorm, as every DeepSeek-V3 norm is (no mean subtraction, no bias)."""

import torch
from torch import nn


class RMSNorm(nn.Module):
    """y = w · x / sqrt(mean(x²) + eps), computed in fp32 and cast back.

    The statistics are taken in fp32 because bf16 sums over 7168 channels lose the small
    channels; the weight multiplies after the cast back, as transformers and the release do.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)
