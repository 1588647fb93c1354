"""The base layers the conformance suite adapts: every kind and every code path
(strided / dilated / grouped / reflect-padded convs, transposed-weight Linear-likes)."""
import torch
import torch.nn as nn

from conftest import Conv1D

# name -> (kind, factory(bias) -> module, input factory(dtype) -> tensor)
BASES = {
    "linear": ("linear", lambda b: nn.Linear(24, 20, bias=b), lambda dt: torch.randn(3, 5, 24, dtype=dt)),
    "gpt2_conv1d": ("conv1d_t", lambda b: Conv1D(20, 24, bias=b), lambda dt: torch.randn(3, 5, 24, dtype=dt)),
    "conv2d": ("conv", lambda b: nn.Conv2d(6, 10, 3, stride=2, padding=1, dilation=2, bias=b),
               lambda dt: torch.randn(2, 6, 11, 9, dtype=dt)),
    "conv2d_grouped": ("conv", lambda b: nn.Conv2d(6, 8, (3, 1), padding=(1, 0), groups=2,
                                                    padding_mode="reflect", bias=b),
                       lambda dt: torch.randn(2, 6, 7, 7, dtype=dt)),
    "conv1d": ("conv", lambda b: nn.Conv1d(8, 12, 5, stride=1, padding=2, padding_mode="circular", bias=b),
               lambda dt: torch.randn(2, 8, 13, dtype=dt)),
    "embedding": ("embedding", lambda b: nn.Embedding(30, 16, padding_idx=0),
                  lambda dt: torch.randint(0, 30, (3, 7))),
}


class Net(nn.Module):
    """Puts the base at a nested path and keeps a second, never-adapted module around."""

    def __init__(self, base):
        super().__init__()
        self.blocks = nn.ModuleList([nn.ModuleDict({"proj": base})])
        self.other = nn.LayerNorm(4)

    def forward(self, x):
        return self.blocks[0]["proj"](x)
