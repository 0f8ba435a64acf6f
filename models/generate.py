#!/usr/bin/env python3
"""Writes the TorchScript model repositories that modelgate serves.

Layout (TF Serving style): <base>/<model>/<version>/model.pt plus, next to it,
signature.json (or the same JSON embedded in the TorchScript zip as
extra/signature.json).

    python models/generate.py demo models                      # demo repo (make run)
    python models/generate.py fixtures target/test-models      # test-suite models
    python models/generate.py bench target/bench-models         # make bench's models
    python models/generate.py verify models target/test-models # load + check

Deterministic (fixed seeds; the TorchScript debug info names a fixed source
file rather than this script's path, so the bytes do not depend on where the
checkout lives) and idempotent (everything it writes is overwritten).
"""

import argparse
import json
import linecache
import os
import shutil
import sys
import types
import zipfile

import torch

# ---------------------------------------------------------------------------
# TorchScript module definitions.
#
# They are compiled from this string under a fixed file name, so the source
# file recorded in the saved model's debug info (code/*.debug_pkl) is the same
# on every machine; torch.jit.script reads the source back through linecache.
# ---------------------------------------------------------------------------
MODEL_SOURCE_NAME = "modelgate_models.py"
MODEL_SOURCE = '''
from typing import Dict, Tuple

import torch
from torch import Tensor


class Tiny(torch.nn.Module):
    """y = 2 * x + 1, elementwise, any shape."""

    def forward(self, x: Tensor) -> Tensor:
        return 2 * x + 1


class Dense(torch.nn.Module):
    """Like torch.nn.Linear (same initialisation), minus its __constants__,
    whose order in the saved code follows Python's per-process set hashing."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        init = torch.nn.Linear(in_features, out_features)
        self.weight = torch.nn.Parameter(init.weight.detach().clone())
        self.bias = torch.nn.Parameter(init.bias.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        return torch.nn.functional.linear(x, self.weight, self.bias)


class MlpBase(torch.nn.Module):
    """784 -> 512 -> 512 -> 10 with ReLU."""

    def __init__(self):
        super().__init__()
        self.fc1 = Dense(784, 512)
        self.fc2 = Dense(512, 512)
        self.fc3 = Dense(512, 10)

    def logits(self, images: Tensor) -> Tensor:
        h = torch.relu(self.fc1(images))
        h = torch.relu(self.fc2(h))
        return self.fc3(h)

    @torch.jit.export
    def classify(self, images: Tensor) -> Tensor:
        return torch.softmax(self.logits(images), dim=1)


class MlpTuple(MlpBase):
    """Version 1: forward returns (probabilities, logits)."""

    def forward(self, images: Tensor) -> Tuple[Tensor, Tensor]:
        logits = self.logits(images)
        return torch.softmax(logits, dim=1), logits


class MlpDict(MlpBase):
    """Version 2: forward returns {"probabilities": ..., "logits": ...}."""

    def forward(self, images: Tensor) -> Dict[str, Tensor]:
        logits = self.logits(images)
        return {"probabilities": torch.softmax(logits, dim=1), "logits": logits}


class Echo(torch.nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.clone()


class Scaled(torch.nn.Module):
    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x: Tensor) -> Tensor:
        return self.factor * x


class Faulty(torch.nn.Module):
    """y = x + 1; a negative input raises, and an input of 12345 answers a tensor with no
    memory (a `meta` tensor), which the server must refuse rather than read."""

    def forward(self, x: Tensor) -> Tensor:
        if bool((x < 0).any()):
            raise RuntimeError("negative input")
        if bool((x == 12345.0).any()):
            return torch.empty(x.shape, device=torch.device("meta"))
        return x + 1


class Hungry(torch.nn.Module):
    """y = x + 0, after allocating x[0, 0] MiFloats: 2**30 of them (4 PiB) runs the host
    out of memory (libtorch's allocator fails; the server must answer, not die)."""

    def forward(self, x: Tensor) -> Tensor:
        scratch = torch.zeros([int(x[0, 0].item()), 1 << 20])
        return x + scratch.sum()


class Poisoned(torch.nn.Module):
    """y = x, but a negative input raises what CUDA raises after a device-side assert, so
    the CPU tests can drive the server's handling of a device that failed."""

    def forward(self, x: Tensor) -> Tensor:
        if bool((x < 0).any()):
            raise RuntimeError("CUDA error: device-side assert triggered")
        return x


class Multi(torch.nn.Module):
    def forward(self, a: Tensor, b: Tensor) -> Dict[str, Tensor]:
        return {"sum": a + b, "product": a * b}


class Counter(torch.nn.Module):
    """y = 2 * x[:, :1]. Counts its forwards (read with the `count` method), and is busy
    for max(x[:, 1]) rounds of a 128x128 matmul, so tests can hold a worker."""

    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros(1, dtype=torch.int64))
        self.register_buffer("identity", torch.eye(128))

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        rounds = 0
        if x.size(0) > 0:
            rounds = int(x[:, 1].max().item())
        h = torch.ones(128, 128)
        for _ in range(rounds):
            h = h @ self.identity
        return x[:, :1] * 2.0 + (h[0, 0] - 1.0)

    @torch.jit.export
    def count(self, x: Tensor) -> Tensor:
        return self.calls.clone()


class Unpacks(torch.nn.Module):
    """y = 2x. Small on disk, 4 MiB once loaded: its state is one float, and __setstate__
    builds a table from it at load (as a model that expands a lookup table would), so
    what the server measures exceeds its file's size."""

    def __init__(self):
        super().__init__()
        self.scale = 2.0
        self.table = torch.full([1024 * 1024], 2.0)

    @torch.jit.export
    def __getstate__(self) -> Tuple[float, bool]:
        return (self.scale, self.training)

    @torch.jit.export
    def __setstate__(self, state: Tuple[float, bool]) -> None:
        self.scale = state[0]
        self.training = state[1]
        self.table = torch.full([1024 * 1024], state[0])

    def forward(self, x: Tensor) -> Tensor:
        return x * self.table[0]


class Regressor(torch.nn.Module):
    """Two heads over one forward, exact in float32 for small inputs:
    outputs = x . [1, 2, 3] + 0.5 (regress) and scores = x / 2 (classify)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("weights", torch.tensor([1.0, 2.0, 3.0]))

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        return {"outputs": (x * self.weights).sum(dim=1) + 0.5, "scores": x * 0.5}

    @torch.jit.export
    def by_ids(self, ids: Tensor) -> Tensor:
        return (ids * 2).to(torch.float32)


class Bottleneck(torch.nn.Module):
    """ResNet's bottleneck block: 1x1 reduce, 3x3, 1x1 expand, plus the shortcut."""

    def __init__(self, inplanes: int, planes: int, stride: int):
        super().__init__()
        width = planes * 4
        self.conv1 = torch.nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(planes)
        self.conv2 = torch.nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(planes)
        self.conv3 = torch.nn.Conv2d(planes, width, 1, bias=False)
        self.bn3 = torch.nn.BatchNorm2d(width)
        self.shortcut = torch.nn.Sequential()
        if stride != 1 or inplanes != width:
            self.shortcut = torch.nn.Sequential(
                torch.nn.Conv2d(inplanes, width, 1, stride=stride, bias=False),
                torch.nn.BatchNorm2d(width),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + self.shortcut(x))


class ResNet50(torch.nn.Module):
    """ResNet-50 (3x224x224 images -> 1000 logits), random weights: the bench's image
    model, the size and shape of what GPU servers run."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Sequential(
            torch.nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False),
            torch.nn.BatchNorm2d(64),
            torch.nn.ReLU(),
            torch.nn.MaxPool2d(3, stride=2, padding=1),
        )
        blocks = []
        inplanes = 64
        for planes, count, stride in [(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)]:
            for i in range(count):
                blocks.append(Bottleneck(inplanes, planes, stride if i == 0 else 1))
                inplanes = planes * 4
        self.blocks = torch.nn.Sequential(*blocks)
        self.fc = torch.nn.Linear(2048, 1000)

    def forward(self, images: Tensor) -> Tensor:
        x = self.blocks(self.stem(images))
        return self.fc(torch.flatten(torch.mean(x, dim=[2, 3]), 1))


class ImageProbe(torch.nn.Module):
    """ResNet-50's signature (3x224x224 -> 1000) with next to no forward: it reads one
    pixel per channel. Serving it measures the host's work per image, all but the model."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(3, 1000))

    def forward(self, images: Tensor) -> Tensor:
        return torch.matmul(images[:, :, 0, 0], self.weight)
'''


def _load_model_defs():
    linecache.cache[MODEL_SOURCE_NAME] = (
        len(MODEL_SOURCE),
        None,  # no mtime: linecache.checkcache leaves the entry alone
        MODEL_SOURCE.splitlines(True),
        MODEL_SOURCE_NAME,
    )
    mod = types.ModuleType("modelgate_models")
    mod.__file__ = MODEL_SOURCE_NAME
    sys.modules[mod.__name__] = mod
    exec(compile(MODEL_SOURCE, MODEL_SOURCE_NAME, "exec"), mod.__dict__)
    return mod


defs = _load_model_defs()

# ---------------------------------------------------------------------------
# Signatures
# ---------------------------------------------------------------------------
PREDICT = "tensorflow/serving/predict"
CLASSIFY = "tensorflow/serving/classify"
REGRESS = "tensorflow/serving/regress"

# numpy-style name -> (TF dtype name, torch dtype)
DTYPES = {
    "float32": ("DT_FLOAT", torch.float32),
    "float64": ("DT_DOUBLE", torch.float64),
    "float16": ("DT_HALF", torch.float16),
    "bfloat16": ("DT_BFLOAT16", torch.bfloat16),
    "int8": ("DT_INT8", torch.int8),
    "int16": ("DT_INT16", torch.int16),
    "int32": ("DT_INT32", torch.int32),
    "int64": ("DT_INT64", torch.int64),
    "uint8": ("DT_UINT8", torch.uint8),
    "bool": ("DT_BOOL", torch.bool),
}


def tensor(name, dtype="DT_FLOAT", shape=None):
    t = {"name": name, "dtype": dtype}
    if shape is not None:
        t["shape"] = list(shape)
    return t


def signature(inputs, outputs, method="forward", method_name=PREDICT, **extra):
    sig = {"method_name": method_name, "method": method, "inputs": inputs, "outputs": outputs}
    sig.update(extra)
    return sig


def signature_json(signatures):
    return json.dumps({"signatures": signatures}, indent=2) + "\n"


TINY_SIGNATURES = {
    "serving_default": signature([tensor("x", shape=[-1, 1])], [tensor("y", shape=[-1, 1])]),
}

MLP_SIGNATURES = {
    "serving_default": signature(
        [tensor("images", shape=[-1, 784])],
        [tensor("probabilities", shape=[-1, 10]), tensor("logits", shape=[-1, 10])],
    ),
    "classify": signature(
        [tensor("images", shape=[-1, 784])],
        [tensor("scores", shape=[-1, 10])],
        method="classify",
        method_name=CLASSIFY,
        classes=[str(i) for i in range(10)],
    ),
}


def echo_signatures():
    sigs = {}
    for np_name, (tf_name, _) in DTYPES.items():
        sigs[np_name] = signature([tensor("x", tf_name)], [tensor("y", tf_name)])
    sigs["serving_default"] = dict(sigs["float32"])
    return sigs


SCALED_SIGNATURES = {
    "serving_default": signature([tensor("x", shape=[-1, -1])], [tensor("y", shape=[-1, -1])]),
}
FAULTY_SIGNATURES = {
    "serving_default": signature([tensor("x", shape=[-1, 2])], [tensor("y", shape=[-1, 2])]),
}
COUNTER_SIGNATURES = {
    "serving_default": signature([tensor("x", shape=[-1, 2])], [tensor("y", shape=[-1, 1])]),
    "count": signature([tensor("x", shape=[1])], [tensor("calls", "DT_INT64", shape=[1])], method="count"),
}
MULTI_SIGNATURES = {
    "serving_default": signature(
        [tensor("a", shape=[-1, 3]), tensor("b", shape=[-1, 3])],
        [tensor("sum", shape=[-1, 3]), tensor("product", shape=[-1, 3])],
    ),
}

# Classify and Regress over tf.Example features: the regress signature is the
# default; "classify" shares its forward (so MultiInference runs it once);
# "classify_ids" reads an int64 feature and lists no class labels.
REGRESSOR_SIGNATURES = {
    "serving_default": signature(
        [tensor("x", shape=[-1, 3])], [tensor("outputs", shape=[-1])], method_name=REGRESS
    ),
    "classify": signature(
        [tensor("x", shape=[-1, 3])],
        [tensor("scores", shape=[-1, 3])],
        method_name=CLASSIFY,
        classes=["a", "b", "c"],
    ),
    "classify_ids": signature(
        [tensor("ids", "DT_INT64", shape=[-1, 2])],
        [tensor("scores", shape=[-1, 2])],
        method="by_ids",
        method_name=CLASSIFY,
    ),
    "predict": signature(
        [tensor("x", shape=[-1, 3])],
        [tensor("outputs", shape=[-1]), tensor("scores", shape=[-1, 3])],
    ),
}

# ---------------------------------------------------------------------------
# Writers
# ---------------------------------------------------------------------------


def clean_dir(path):
    """(Re)creates an empty directory, so a rerun leaves no stale files."""
    if os.path.isdir(path):
        shutil.rmtree(path)
    os.makedirs(path)


def write_text(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)


def save_model(version_dir, module, signatures, embed=False):
    """Scripts module into version_dir/model.pt with its signature.

    embed=False writes signature.json next to model.pt; embed=True stores it
    inside the zip (entry <archive>/extra/signature.json) and writes no file.
    """
    clean_dir(version_dir)
    scripted = torch.jit.script(module.eval())
    text = signature_json(signatures)
    path = os.path.join(version_dir, "model.pt")
    if embed:
        torch.jit.save(scripted, path, _extra_files={"signature.json": text})
    else:
        torch.jit.save(scripted, path)
        write_text(os.path.join(version_dir, "signature.json"), text)


def write_tiny(base):
    save_model(os.path.join(base, "tiny", "1"), defs.Tiny(), TINY_SIGNATURES, embed=True)


def write_mlp(base):
    for version, cls in ((1, defs.MlpTuple), (2, defs.MlpDict)):
        torch.manual_seed(1000 + version)  # different weights per version
        save_model(os.path.join(base, "mlp", str(version)), cls(), MLP_SIGNATURES)


def model_config(name, base_path, all_versions=False, labels=None):
    lines = [
        "  config {",
        f'    name: "{name}"',
        f"    base_path: {json.dumps(base_path)}",
        '    model_platform: "pytorch"',
    ]
    if all_versions:
        lines.append("    model_version_policy { all {} }")
    for key, value in (labels or {}).items():
        lines.append(f'    version_labels {{ key: "{key}" value: {value} }}')
    lines.append("  }")
    return "\n".join(lines)


def server_config(configs, comment):
    return (
        f"# {comment}\n"
        "# Written by models/generate.py; ModelServerConfig in protobuf text format.\n"
        "model_config_list {\n" + "\n".join(configs) + "\n}\n"
    )


def generate_demo(base):
    torch.manual_seed(0)
    os.makedirs(base, exist_ok=True)
    write_tiny(base)
    write_mlp(base)
    configs = [
        model_config("tiny", "models/tiny"),
        model_config("mlp", "models/mlp", all_versions=True, labels={"stable": 1, "canary": 2}),
    ]
    write_text(
        os.path.join(base, "models.config"),
        server_config(configs, "Demo repository; base paths are relative to the repo root (make run)."),
    )


IMAGE_SIGNATURES = {
    "serving_default": signature(
        [tensor("images", shape=[-1, 3, 224, 224])], [tensor("logits", shape=[-1, 1000])]
    ),
}


def generate_bench(base):
    """make bench's image models: a ResNet-50 and a probe with its signature."""
    torch.manual_seed(50)
    save_model(os.path.join(base, "resnet50", "1"), defs.ResNet50(), IMAGE_SIGNATURES)
    save_model(os.path.join(base, "imageprobe", "1"), defs.ImageProbe(), IMAGE_SIGNATURES)


def generate_fixtures(base):
    torch.manual_seed(0)
    base = os.path.abspath(base)
    os.makedirs(base, exist_ok=True)

    save_model(os.path.join(base, "echo", "1"), defs.Echo(), echo_signatures())
    for version in (1, 2, 3):
        save_model(os.path.join(base, "scaled", str(version)), defs.Scaled(float(version)), SCALED_SIGNATURES)
    save_model(os.path.join(base, "faulty", "1"), defs.Faulty(), FAULTY_SIGNATURES)
    save_model(os.path.join(base, "hungry", "1"), defs.Hungry(), TINY_SIGNATURES)
    save_model(os.path.join(base, "poisoned", "1"), defs.Poisoned(), TINY_SIGNATURES)
    save_model(os.path.join(base, "multi", "1"), defs.Multi(), MULTI_SIGNATURES)
    save_model(os.path.join(base, "counter", "1"), defs.Counter(), COUNTER_SIGNATURES)
    save_model(os.path.join(base, "regressor", "1"), defs.Regressor(), REGRESSOR_SIGNATURES)
    save_model(os.path.join(base, "unpacks", "1"), defs.Unpacks(), TINY_SIGNATURES)
    write_tiny(base)

    # Not a zip archive: loading must fail cleanly (model ends up in state END
    # with an error, the server keeps running).
    corrupt = os.path.join(base, "corrupt", "1")
    clean_dir(corrupt)
    garbage = bytes((i * 37 + 11) % 251 for i in range(64))
    assert not garbage.startswith(b"PK")
    with open(os.path.join(corrupt, "model.pt"), "wb") as f:
        f.write(garbage)
    write_text(os.path.join(corrupt, "signature.json"), signature_json(TINY_SIGNATURES))

    # A TensorFlow SavedModel: the server must refuse it with a clear error.
    saved = os.path.join(base, "savedmodel", "1")
    clean_dir(saved)
    with open(os.path.join(saved, "saved_model.pb"), "wb") as f:
        f.write(b"\x08\x01\x12\x04fake")
    os.makedirs(os.path.join(saved, "variables"))

    configs = [
        model_config("echo", os.path.join(base, "echo")),
        model_config("scaled", os.path.join(base, "scaled"), all_versions=True, labels={"stable": 1}),
        model_config("faulty", os.path.join(base, "faulty")),
        model_config("multi", os.path.join(base, "multi")),
        model_config("regressor", os.path.join(base, "regressor")),
        model_config("tiny", os.path.join(base, "tiny")),
    ]
    write_text(
        os.path.join(base, "fixtures.config"),
        server_config(configs, "Test fixtures (corrupt/ and savedmodel/ are deliberately not listed)."),
    )


# ---------------------------------------------------------------------------
# Verification: load every model.pt and run each signature's method.
# ---------------------------------------------------------------------------


def read_signatures(version_dir):
    path = os.path.join(version_dir, "signature.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            return json.load(f)["signatures"], "signature.json"
    with zipfile.ZipFile(os.path.join(version_dir, "model.pt")) as z:
        names = [n for n in z.namelist() if n.endswith("extra/signature.json")]
        if len(names) != 1:
            raise AssertionError(f"{version_dir}: no signature.json and no embedded one")
        return json.loads(z.read(names[0]))["signatures"], "embedded " + names[0]


def sample_input(spec, batch=2, gen=None):
    _, dtype = next(v for v in DTYPES.values() if v[0] == spec["dtype"])
    shape = [batch if i == 0 and d == -1 else (3 if d == -1 else d) for i, d in enumerate(spec.get("shape", [batch, 3]))]
    x = torch.randn(shape, generator=gen) * 10
    if dtype == torch.bool:
        return x > 0
    if dtype == torch.uint8:
        return x.abs().to(dtype)
    return x.to(dtype)


def outputs_by_name(sig, result):
    names = [o["name"] for o in sig["outputs"]]
    if isinstance(result, torch.Tensor):
        assert len(names) == 1, names
        return {names[0]: result}
    if isinstance(result, tuple):
        assert len(result) == len(names), (len(result), names)
        return dict(zip(names, result))
    if isinstance(result, dict):
        # A dict may hold more heads than one signature lists (regressor).
        assert set(names) <= set(result), (sorted(result), names)
        return {name: result[name] for name in names}
    raise AssertionError(f"unexpected result type {type(result)}")


def expected(model, version, sig_name, inputs, got):
    """Reference values for each model (None = no fixed expectation)."""
    if model == "tiny":
        return {"y": 2 * inputs[0] + 1}
    if model == "echo":
        return {"y": inputs[0]}
    if model == "scaled":
        return {"y": version * inputs[0]}
    if model == "faulty":
        return {"y": inputs[0] + 1}
    if model in ("hungry", "poisoned"):
        return {"y": inputs[0]}
    if model == "multi":
        return {"sum": inputs[0] + inputs[1], "product": inputs[0] * inputs[1]}
    if model == "regressor":
        if sig_name == "classify_ids":
            return {"scores": (inputs[0] * 2).to(torch.float32)}
        x = inputs[0]
        heads = {"outputs": (x * torch.tensor([1.0, 2.0, 3.0])).sum(dim=1) + 0.5, "scores": x * 0.5}
        return {name: value for name, value in heads.items() if name in got}
    if model == "mlp":
        if sig_name == "serving_default":
            logits = got["logits"]
            return {"probabilities": torch.softmax(logits, dim=1), "logits": logits}
        return None
    return None


def verify(bases):
    gen = torch.Generator().manual_seed(0)
    checked = 0
    for base in bases:
        for model in sorted(os.listdir(base)):
            mdir = os.path.join(base, model)
            if not os.path.isdir(mdir):
                continue
            for version in sorted((v for v in os.listdir(mdir) if v.isdigit()), key=int):
                vdir = os.path.join(mdir, version)
                pt = os.path.join(vdir, "model.pt")
                if model == "savedmodel":
                    assert os.path.exists(os.path.join(vdir, "saved_model.pb"))
                    assert os.path.isdir(os.path.join(vdir, "variables"))
                    print(f"  {base}/{model}/{version}: SavedModel layout (server must refuse)")
                    continue
                sigs, source = read_signatures(vdir)
                if model == "corrupt":
                    assert not zipfile.is_zipfile(pt)
                    try:
                        torch.jit.load(pt)
                    except Exception as e:  # noqa: BLE001 - any load error is the point
                        print(f"  {base}/{model}/{version}: load fails as intended ({type(e).__name__})")
                        continue
                    raise AssertionError("corrupt model loaded")
                m = torch.jit.load(pt)
                for sig_name, sig in sigs.items():
                    inputs = [sample_input(spec, gen=gen) for spec in sig["inputs"]]
                    if model in ("faulty", "hungry", "poisoned"):
                        inputs = [t.abs() for t in inputs]
                    result = getattr(m, sig["method"])(*inputs)
                    got = outputs_by_name(sig, result)
                    assert [o["name"] for o in sig["outputs"]] == list(got) or isinstance(result, dict)
                    for spec in sig["outputs"]:
                        t = got[spec["name"]]
                        want_dtype = next(v[1] for v in DTYPES.values() if v[0] == spec["dtype"])
                        assert t.dtype == want_dtype, (model, sig_name, spec, t.dtype)
                        if "shape" in spec:
                            assert t.dim() == len(spec["shape"]), (model, sig_name, spec, t.shape)
                            for d, s in zip(spec["shape"], t.shape):
                                assert d == -1 or d == s, (model, sig_name, spec, t.shape)
                    want = expected(model, int(version), sig_name, inputs, got)
                    for name, value in (want or {}).items():
                        assert torch.equal(got[name], value) or torch.allclose(got[name], value, atol=1e-6), (
                            model, version, sig_name, name)
                    if model == "mlp":
                        probs = got.get("probabilities", got.get("scores"))
                        assert torch.allclose(probs.sum(dim=1), torch.ones(probs.shape[0]), atol=1e-5)
                        x = inputs[0]
                        assert torch.allclose(m.classify(x), torch.softmax(m.logits(x), dim=1))
                    checked += 1
                if model == "faulty":
                    try:
                        m(torch.tensor([[-1.0, 2.0]]))
                    except torch.jit.Error as e:
                        assert "negative input" in str(e)
                    else:
                        raise AssertionError("faulty did not raise")
                    assert m(torch.tensor([[12345.0]])).device.type == "meta"
                print(f"  {base}/{model}/{version}: {len(sigs)} signature(s) from {source}: ok")
    for base in bases:
        if os.path.exists(os.path.join(base, "mlp", "2", "model.pt")):
            x = torch.randn(2, 784, generator=gen)
            m1 = torch.jit.load(os.path.join(base, "mlp", "1", "model.pt"))
            m2 = torch.jit.load(os.path.join(base, "mlp", "2", "model.pt"))
            assert not torch.allclose(m1.classify(x), m2.classify(x)), "mlp versions should differ"
    print(f"verified {checked} signature calls")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["demo", "fixtures", "bench", "verify"])
    parser.add_argument("dirs", nargs="+", metavar="DIR")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.what == "verify":
        with torch.no_grad():
            verify(args.dirs)
        return
    if len(args.dirs) != 1:
        parser.error(f"{args.what} takes exactly one DIR")
    generate = {"demo": generate_demo, "fixtures": generate_fixtures, "bench": generate_bench}
    generate[args.what](args.dirs[0])
    print(f"wrote {args.what} models to {args.dirs[0]}")


if __name__ == "__main__":
    main()
