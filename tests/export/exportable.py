"""The module tests/export exports: two inputs, one output, a dynamic batch."""

import torch


class Affine(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3, 2)

    def forward(self, x, scale):
        return torch.relu(self.linear(x)) * scale


def build():
    torch.manual_seed(0)
    return Affine()
