#!/usr/bin/env python3
"""Writes the PyTorch 2 test fixtures with the project's own export command
(tools/modelgate_export.py), and what PyTorch's own loader answers for them.

    python models/pt2_fixtures.py target/pt2-models

- `small/1` TorchScript and `small/2` an AOTInductor package of the same module (4 -> 3,
  batch 1..64): a model that mixes formats, for hot swaps in both directions.
- `pair/1` an AOTInductor package with two inputs and two outputs (batch 1..1024), which
  must keep their order.
- `expected.json`: inputs and the outputs `torch._inductor.aoti_load_package` gives for
  them, which the server must give too.
- `broken/<case>/model.pt2`: `small/2` spoiled the ways a package arrives broken or
  foreign: `truncated` (the file cut in half), `cut_so` (a whole zip whose compiled `.so`
  is cut short), `cuda` (compiled for another device), `isa` (for an instruction set this
  host lacks), `unsigned` (no signature anywhere).

Compiling a package takes 30-60 s on 2 cores; make rebuilds this only when the export
command or this file changes.
"""

import json
import os
import platform
import shutil
import sys
import zipfile

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools"))
import modelgate_export  # noqa: E402


class Small(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden = torch.nn.Linear(4, 16)
        self.out = torch.nn.Linear(16, 3)

    def forward(self, x):
        return self.out(torch.relu(self.hidden(x)))


class Pair(torch.nn.Module):
    """Two inputs, two outputs of different widths: order mistakes show."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3, 2)

    def forward(self, a, b):
        return self.linear(a) * b, (a.sum(dim=1, keepdim=True) - b)


def rewrite(package, out, change):
    """Copies the zip `package` to `out`, passing each entry's (name, bytes) through
    `change`, which returns the bytes to keep or None to drop the entry."""
    with zipfile.ZipFile(package) as source, zipfile.ZipFile(out, "w") as target:
        for info in source.infolist():
            data = change(info.filename, source.read(info.filename))
            if data is not None:
                target.writestr(info, data)


def with_metadata(**fields):
    """A `rewrite` change that sets (or, for None, removes) metadata fields."""
    def change(name, data):
        if not name.endswith("_metadata.json"):
            return data
        metadata = json.loads(data)
        for key, value in fields.items():
            if value is None:
                metadata.pop(key, None)
            else:
                metadata[key] = value
        return json.dumps(metadata).encode()
    return change


def write_broken(version_dir, base):
    package = os.path.join(version_dir, "model.pt2")
    signature = os.path.join(version_dir, "signature.json")
    # An instruction set no host of this architecture has.
    foreign = "NEON" if platform.machine() in ("x86_64", "AMD64") else "AVX2"
    cases = {
        "cut_so": lambda name, data: data[: len(data) // 3] if name.endswith(".so") else data,
        "cuda": with_metadata(AOTI_DEVICE_KEY="cuda"),
        "isa": with_metadata(AOTI_CPU_ISA=foreign),
        "unsigned": with_metadata(**{"modelgate.signature": None}),
    }
    for case, change in cases.items():
        os.makedirs(os.path.join(base, case))
        rewrite(package, os.path.join(base, case, "model.pt2"), change)
        if case != "unsigned":
            shutil.copy(signature, os.path.join(base, case))
    os.makedirs(os.path.join(base, "truncated"))
    with open(package, "rb") as whole:
        data = whole.read()
    with open(os.path.join(base, "truncated", "model.pt2"), "wb") as cut:
        cut.write(data[: len(data) // 2])
    shutil.copy(signature, os.path.join(base, "truncated"))


def main(base):
    torch.manual_seed(7)
    torch.set_num_threads(1)
    shutil.rmtree(base, ignore_errors=True)
    small, pair = Small(), Pair()
    small_inputs = {"x": torch.zeros(2, 4)}
    pair_inputs = {"a": torch.zeros(2, 3), "b": torch.zeros(2, 1)}
    export = modelgate_export.export
    export(small, small_inputs, f"{base}/small", 1, "torchscript", ["scores"])
    export(small, small_inputs, f"{base}/small", 2, "pt2", ["scores"], max_batch=64)
    export(pair, pair_inputs, f"{base}/pair", 1, "pt2", ["mixed", "offset"])

    generator = torch.Generator().manual_seed(11)
    cases = {}
    for name, inputs, package in [
        ("small", {"x": (5, 4)}, f"{base}/small/2/model.pt2"),
        ("pair", {"a": (3, 3), "b": (3, 1)}, f"{base}/pair/1/model.pt2"),
    ]:
        tensors = {k: torch.randn(*shape, generator=generator) for k, shape in inputs.items()}
        runner = torch._inductor.aoti_load_package(package)
        outputs = runner(*tensors.values())
        if isinstance(outputs, torch.Tensor):
            outputs = [outputs]
        cases[name] = {
            "inputs": {k: {"shape": list(t.shape), "values": t.flatten().tolist()}
                       for k, t in tensors.items()},
            "outputs": [{"shape": list(t.shape), "values": t.flatten().tolist()} for t in outputs],
        }
    with open(os.path.join(base, "expected.json"), "w") as f:
        json.dump(cases, f)
    write_broken(f"{base}/small/2", f"{base}/broken")
    print(f"wrote the PyTorch 2 fixtures to {base}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
