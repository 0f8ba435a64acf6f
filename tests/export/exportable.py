"""The modules tests/export exports: two inputs, one output, a dynamic batch (`build`); a
dict of three outputs, one sized by `torch.nonzero` (`build_picked`)."""

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


class Picked(torch.nn.Module):
    """Returns a dict whose entries differ in shape, one of them sized by `torch.nonzero`
    (a data-dependent size: torch.export gives it an unbacked symbol, listed in
    `range_constraints` before the batch's)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mask", torch.tensor([True, False, True]))

    def forward(self, x):
        picked = x[:, torch.nonzero(self.mask).squeeze(1)]
        return {"sum": x.sum(1, keepdim=True), "picked": picked, "double": x * 2}


def build_picked():
    return Picked()
