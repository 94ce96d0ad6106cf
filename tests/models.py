"""Small torch models shared by the tests."""

from __future__ import annotations

import torch


class MLP(torch.nn.Module):
    """Linear-ReLU stack, the paper's MNIST model shape (scaled down by default)."""

    def __init__(self, sizes: tuple[int, ...] = (40, 32, 24, 10)) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x


class WithConv(torch.nn.Module):
    """A conv (stays fp32) feeding a linear (converted)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 2, 3)
        self.fc = torch.nn.Linear(2 * 6 * 6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))
