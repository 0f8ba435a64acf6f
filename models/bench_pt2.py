#!/usr/bin/env python3
"""make bench's format comparison: the same models as TorchScript and as AOTInductor
packages, made by the export command, and their raw forwards in PyTorch.

    python models/bench_pt2.py export BASE [DEVICE]       # every model, every form
    python models/bench_pt2.py raw BASE THREADS [DEVICE]  # JSON: raw rows/s per model

DEVICE is cpu (the default) or cuda. `export` writes BASE/{model}_{ts,aoti,aotifrozen}/1
(aotifrozen: a package compiled with inductor's freezing, the export command's --freeze)
for mlp and cnn (on cuda: mlp and resnet50; a CUDA package compiles only on the GPU it will
run on, so the GPU's bench makes its own). `raw` loads each with PyTorch itself
(torch.jit.load; the same frozen and optimized for inference; aoti_load_package) and prints
its rows per second at batch 1 and 64 on THREADS intra-op threads, one forward at a time,
its inputs already on DEVICE (on cuda, each forward waits for the GPU to finish).
"""

import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tools"))
sys.path.insert(0, HERE)
import modelgate_export  # noqa: E402
from generate import defs  # noqa: E402  (ResNet-50, as the image bench serves it)

BATCHES = (1, 64)


class Mlp(torch.nn.Module):
    """The demo mlp's shape: 784-512-512-10."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(784, 512), torch.nn.ReLU(),
            torch.nn.Linear(512, 512), torch.nn.ReLU(),
            torch.nn.Linear(512, 10))

    def forward(self, x):
        return torch.softmax(self.layers(x), dim=1)


class Block(torch.nn.Module):
    def __init__(self, channels, stride):
        super().__init__()
        out = channels * stride
        self.conv1 = torch.nn.Conv2d(channels, out, 3, stride, 1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(out)
        self.conv2 = torch.nn.Conv2d(out, out, 3, 1, 1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(out)
        self.down = None if stride == 1 else torch.nn.Sequential(
            torch.nn.Conv2d(channels, out, 1, stride, bias=False), torch.nn.BatchNorm2d(out))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + (x if self.down is None else self.down(x)))


class Cnn(torch.nn.Module):
    """A small ResNet-like CNN on 3x64x64 images (conv, batch norm, residual blocks)."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Sequential(
            torch.nn.Conv2d(3, 32, 3, 1, 1, bias=False), torch.nn.BatchNorm2d(32), torch.nn.ReLU())
        self.blocks = torch.nn.Sequential(Block(32, 1), Block(32, 2), Block(64, 2))
        self.head = torch.nn.Linear(128, 10)

    def forward(self, images):
        return self.head(self.blocks(self.stem(images)).mean(dim=(2, 3)))


MODELS = {"mlp": (Mlp, {"x": (784,)}), "cnn": (Cnn, {"images": (3, 64, 64)})}
# On a GPU, ResNet-50 is the ResNet-class CNN (the small one would measure launch overhead).
GPU_MODELS = {"mlp": MODELS["mlp"], "resnet50": (defs.ResNet50, {"images": (3, 224, 224)})}


def models_on(device):
    return GPU_MODELS if device == "cuda" else MODELS


def export(base, device):
    for name, (cls, inputs) in models_on(device).items():
        torch.manual_seed(0)
        module = cls().eval()
        examples = {k: torch.randn(2, *shape) for k, shape in inputs.items()}
        # Rebuilt in place when this file or the exporter changes.
        modelgate_export.export(module, examples, f"{base}/{name}_ts", 1, "torchscript",
                                overwrite=True)
        for form, freeze in (("aoti", False), ("aotifrozen", True)):
            modelgate_export.export(module, examples, f"{base}/{name}_{form}", 1, "pt2",
                                    max_batch=256, device=device, freeze=freeze,
                                    overwrite=True)
    print(f"wrote the format benchmark's models for {device} to {base}")


def rows_per_second(forward, inputs, seconds=2.0):
    on_gpu = inputs[0].is_cuda
    with torch.no_grad():
        for _ in range(3):
            forward(*inputs)
        calls, started = 0, time.perf_counter()
        while calls < 3 or time.perf_counter() - started < seconds:
            forward(*inputs)
            if on_gpu:
                torch.cuda.synchronize()
            calls += 1
    return calls * inputs[0].shape[0] / (time.perf_counter() - started)


def raw(base, threads, device):
    torch.set_num_threads(threads)
    # As modelgate runs TorchScript (runtime::configure_executor): the legacy executor,
    # which does not re-profile each new batch size.
    torch._C._jit_set_profiling_executor(False)
    results = {}
    for name, (_, inputs) in models_on(device).items():
        scripted = torch.jit.load(f"{base}/{name}_ts/1/model.pt", map_location=device).eval()
        frozen = torch.jit.optimize_for_inference(torch.jit.freeze(scripted))
        package = torch._inductor.aoti_load_package(f"{base}/{name}_aoti/1/model.pt2")
        frozen_package = torch._inductor.aoti_load_package(
            f"{base}/{name}_aotifrozen/1/model.pt2")
        forms = (("ts", scripted), ("frozen", frozen), ("aoti", package),
                 ("aotifrozen", frozen_package))
        for form, forward in forms:
            for batch in BATCHES:
                examples = [torch.randn(batch, *shape, device=device)
                            for shape in inputs.values()]
                results[f"{name}_{form}/{batch}"] = rows_per_second(forward, examples)
    print(json.dumps(results))


if __name__ == "__main__":
    if len(sys.argv) in (3, 4) and sys.argv[1] == "export":
        export(sys.argv[2], (sys.argv[3:] or ["cpu"])[0])
    elif len(sys.argv) in (4, 5) and sys.argv[1] == "raw":
        raw(sys.argv[2], int(sys.argv[3]), (sys.argv[4:] or ["cpu"])[0])
    else:
        sys.exit(__doc__)
