"""tools/modelgate_export.py, the export command, as a user runs it: from a factory of a
torch.nn.Module to a version directory. The TorchScript directory is served by the real
modelgate binary and answers as the module does; the AOTInductor package loads with
PyTorch's own loader, answers as the module does at several batch sizes, carries the
signature, batch range and torch version in its metadata, and is served by modelgate,
which replays the warm-up record the export wrote. A module returning a dict is labelled by
its keys in both formats, whatever the order `--output` gives them in, and the recorded
batch range is the batch's even where `torch.nonzero` adds a symbol. Its own pytest run (`make
export-test`): it needs torch and a C++ compiler, not the TF Serving client.

    MODELGATE_BIN   server binary (default: target/debug/modelgate)
"""

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("MODELGATE_BIN", REPO / "target" / "debug" / "modelgate"))
if not BIN.is_absolute():
    BIN = REPO / BIN
FACTORY = "exportable:build"


def run_export(tmp_path, *args, factory=FACTORY):
    """The documented command: PYTHONPATH=tools python -m modelgate_export FACTORY ..."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "tools"), str(Path(__file__).parent)]))
    return subprocess.run([sys.executable, "-m", "modelgate_export", factory, *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


def module(factory="build"):
    sys.path.insert(0, str(Path(__file__).parent))
    import exportable
    return getattr(exportable, factory)().eval()


def export_tool():
    sys.path.insert(0, str(REPO / "tools"))
    import modelgate_export
    return modelgate_export


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url, body):
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(request, timeout=10) as answer:
        return json.load(answer)


def test_torchscript_export_is_served_as_the_module_answers(tmp_path):
    run = run_export(tmp_path, "--input", "x:float32:4,3", "--input", "scale:float32:4,1",
                     "--output", "y", "--out", "models/affine", "--format", "torchscript")
    assert run.returncode == 0, run.stderr
    version = tmp_path / "models" / "affine" / "1"
    signature = json.loads((version / "signature.json").read_text())["signatures"]["serving_default"]
    assert signature["inputs"] == [
        {"name": "x", "dtype": "DT_FLOAT", "shape": [-1, 3]},
        {"name": "scale", "dtype": "DT_FLOAT", "shape": [-1, 1]},
    ]
    assert signature["outputs"] == [{"name": "y", "dtype": "DT_FLOAT", "shape": [-1, 2]}]
    assert (version / "model.pt").is_file()

    with serve(version.parent, "affine") as port:
        x = [[1.0, 2.0, 3.0], [-1.0, 0.5, 4.0]]
        scale = [[2.0], [0.5]]
        answer = post(f"http://127.0.0.1:{port}/v1/models/affine:predict",
                      {"inputs": {"x": x, "scale": scale}})
        with torch.no_grad():
            expected = module()(torch.tensor(x), torch.tensor(scale))
        torch.testing.assert_close(torch.tensor(answer["outputs"]), expected)


@contextlib.contextmanager
def serve(base_path, name, log=None):
    """The real modelgate serving `base_path` as `name` until the block ends; yields its
    REST port. Its log lines are appended to `log` when given."""
    if not BIN.exists():
        pytest.fail(f"need {BIN} (cargo build)", pytrace=False)
    port = free_port()
    server = subprocess.Popen([str(BIN), "--port", str(free_port()), "--rest_api_port", str(port),
                               "--model_name", name, "--model_base_path", str(base_path),
                               "--shutdown_grace_seconds=0"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as answer:
                    if answer.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            assert server.poll() is None, server.stderr.read()
            assert time.monotonic() < deadline, "modelgate did not get ready"
            time.sleep(0.2)
        yield port
    finally:
        server.terminate()
        _, stderr = server.communicate(timeout=30)
        if log is not None:
            log.extend(stderr.splitlines())


def test_pt2_export_loads_answers_and_is_served_with_its_warm_up(tmp_path):
    run = run_export(tmp_path, "--input", "x:float32:4,3", "--input", "scale:float32:4,1",
                     "--output", "y", "--out", "models/affine", "--max-batch", "64", "--warmup")
    assert run.returncode == 0, run.stderr
    version = tmp_path / "models" / "affine" / "1"
    package = torch._inductor.aoti_load_package(str(version / "model.pt2"))
    reference = module()
    for batch in (1, 7, 64):
        x, scale = torch.randn(batch, 3), torch.randn(batch, 1)
        with torch.no_grad():
            torch.testing.assert_close(package(x, scale), reference(x, scale))
    metadata = package.get_metadata()
    assert (metadata["modelgate.batch_min"], metadata["modelgate.batch_max"]) == ("1", "64")
    assert metadata["modelgate.torch_version"] == torch.__version__
    # The compiling CPU's flags (the package is built with -march=native), which a server
    # must have: on the machine that compiled it, all of them.
    with open("/proc/cpuinfo") as cpuinfo:
        here = next(line for line in cpuinfo if line.split(":")[0].strip() in ("flags", "Features"))
    assert metadata["modelgate.cpu_flags"].split() == here.split(":", 1)[1].split()
    signature = json.loads((version / "signature.json").read_text())
    assert json.loads(metadata["modelgate.signature"]) == signature

    # Served by modelgate, which replays the example as warm-up before the version serves.
    log = []
    with serve(version.parent, "affine", log) as port:
        x, scale = torch.randn(5, 3), torch.randn(5, 1)
        answer = post(f"http://127.0.0.1:{port}/v1/models/affine:predict",
                      {"inputs": {"x": x.tolist(), "scale": scale.tolist()}})
        torch.testing.assert_close(torch.tensor(answer["outputs"]), package(x, scale))
    assert any("replayed the warm-up requests" in line and "records=1" in line for line in log), log


def test_a_frozen_pt2_export_answers_as_the_module_and_is_served(tmp_path):
    run = run_export(tmp_path, "--input", "x:float32:4,3", "--input", "scale:float32:4,1",
                     "--output", "y", "--out", "models/affine", "--max-batch", "16",
                     "--freeze")
    assert run.returncode == 0, run.stderr
    version = tmp_path / "models" / "affine" / "1"
    package = torch._inductor.aoti_load_package(str(version / "model.pt2"))
    reference = module()
    for batch in (1, 16):
        x, scale = torch.randn(batch, 3), torch.randn(batch, 1)
        with torch.no_grad():
            torch.testing.assert_close(package(x, scale), reference(x, scale))
    with serve(version.parent, "affine", []) as port:
        x, scale = torch.randn(3, 3), torch.randn(3, 1)
        answer = post(f"http://127.0.0.1:{port}/v1/models/affine:predict",
                      {"inputs": {"x": x.tolist(), "scale": scale.tolist()}})
        torch.testing.assert_close(torch.tensor(answer["outputs"]), package(x, scale))
    # Freezing is a package's: TorchScript is frozen by the server (--freeze_models).
    refused = run_export(tmp_path, "--input", "x:float32:4,3", "--input", "scale:float32:4,1",
                         "--out", "models/other", "--format", "torchscript", "--freeze")
    assert refused.returncode == 2 and "--freeze_models" in refused.stderr, refused.stderr


def test_mistakes_are_refused_saying_what_to_fix(tmp_path):
    wrong_order = run_export(tmp_path, "--input", "scale:float32:4,1", "--input", "x:float32:4,3",
                             "--out", "m", "--format", "torchscript")
    assert wrong_order.returncode == 2
    assert "forward takes ['x', 'scale']" in wrong_order.stderr
    bad_input = run_export(tmp_path, "--input", "x:float99:4", "--out", "m")
    assert bad_input.returncode == 2 and "NAME:DTYPE:SHAPE" in bad_input.stderr
    # A dict's outputs are named by its keys: other names would label the wrong tensors.
    renamed = run_export(tmp_path, "--input", "x:float32:4,3", "--output", "sum",
                         "--output", "picked", "--output", "twice", "--out", "m",
                         "--format", "torchscript", factory="exportable:build_picked")
    assert renamed.returncode == 2, renamed.stderr
    assert "keys ['sum', 'picked', 'double']" in renamed.stderr, renamed.stderr


def test_a_version_is_published_whole_and_never_replaced_unasked(tmp_path):
    args = ["--input", "x:float32:4,3", "--input", "scale:float32:4,1", "--out", "m",
            "--format", "torchscript"]
    first = run_export(tmp_path, *args)
    assert first.returncode == 0, first.stderr
    version = tmp_path / "m" / "1"
    model = (version / "model.pt").read_bytes()
    # A served version is not reloaded when its files change: rewriting it is refused.
    again = run_export(tmp_path, *args)
    assert again.returncode == 2
    assert "already exists" in again.stderr and "--overwrite" in again.stderr
    assert (version / "model.pt").read_bytes() == model
    replaced = run_export(tmp_path, *args, "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    assert sorted(p.name for p in version.iterdir()) == ["model.pt", "signature.json"]
    # Nothing but version directories is left in the base path.
    assert [p.name for p in (tmp_path / "m").iterdir()] == ["1"]
    bad = run_export(tmp_path, *args, "--version", "0")
    assert bad.returncode == 2 and "whole numbers from 1" in bad.stderr
    assert not (tmp_path / "m" / "0").exists()


def test_a_failed_export_leaves_no_version_behind(tmp_path, monkeypatch):
    tool = export_tool()

    def no_room(*_args, **_kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(tool, "_export_torchscript", no_room)
    with pytest.raises(OSError):
        tool.export(module(), {"x": torch.zeros(4, 3), "scale": torch.zeros(4, 1)},
                    tmp_path / "m", 3, "torchscript")
    assert list((tmp_path / "m").iterdir()) == []


def test_the_batch_range_is_the_batch_symbols_not_an_unbacked_ones():
    # torch.nonzero's size is an unbacked symbol, which range_constraints lists first; its
    # range (0..3, the mask's length) is not the batch's.
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(module("build_picked"), (torch.randn(4, 3),),
                                  dynamic_shapes={"x": {0: batch}})
    first = next(iter(program.range_constraints))
    assert str(first).startswith("u"), program.range_constraints
    assert program.range_constraints[first].upper == 3
    tool = export_tool()
    assert tool._batch_range(program, 1, 64) == (1, 64)
    assert tool._batch_range(program, 2, 32) == (2, 32)


# The dict's keys in another order than forward returns them.
PICKED_NAMES = ["--output", "double", "--output", "sum", "--output", "picked"]
PICKED_OUTPUTS = [  # the dict's order, what a package flattens to
    {"name": "sum", "dtype": "DT_FLOAT", "shape": [-1, 1]},
    {"name": "picked", "dtype": "DT_FLOAT", "shape": [-1, 2]},
    {"name": "double", "dtype": "DT_FLOAT", "shape": [-1, 3]},
]


def assert_served_as_the_module(version, name):
    """modelgate serving `version` answers each named output as the module's own entry."""
    reference = module("build_picked")
    with serve(version.parent, name, []) as port:
        x = torch.randn(5, 3)
        answer = post(f"http://127.0.0.1:{port}/v1/models/{name}:predict",
                      {"inputs": {"x": x.tolist()}})
        with torch.no_grad():
            expected = reference(x)
        assert sorted(answer["outputs"]) == sorted(expected)
        for key, tensor in expected.items():
            torch.testing.assert_close(torch.tensor(answer["outputs"][key]), tensor, msg=key)


def export_picked(tmp_path, *args):
    """Exports the dict-returning module with its output names out of key order; answers
    the version directory and its signature, whose outputs follow the dict's order."""
    run = run_export(tmp_path, "--input", "x:float32:4,3", *PICKED_NAMES, "--out",
                     "models/picked", *args, factory="exportable:build_picked")
    assert run.returncode == 0, run.stderr
    version = tmp_path / "models" / "picked" / "1"
    signature = json.loads((version / "signature.json").read_text())
    signature = signature["signatures"]["serving_default"]
    assert signature["outputs"] == PICKED_OUTPUTS
    return version, signature


def test_a_torchscript_dict_export_labels_each_output_whatever_the_order_of_the_names(tmp_path):
    version, _ = export_picked(tmp_path, "--format", "torchscript")
    # The traced module returns its dict in the same order.
    traced = torch.jit.load(str(version / "model.pt"))
    assert list(traced(torch.randn(2, 3))) == [o["name"] for o in PICKED_OUTPUTS]
    assert_served_as_the_module(version, "picked")


def test_a_pt2_dict_export_labels_each_output_and_records_the_batchs_range(tmp_path):
    version, signature = export_picked(tmp_path, "--max-batch", "64")
    package = torch._inductor.aoti_load_package(str(version / "model.pt2"))
    metadata = package.get_metadata()
    # The batch's range, not nonzero's unbacked 0..3.
    assert (metadata["modelgate.batch_min"], metadata["modelgate.batch_max"]) == ("1", "64")
    assert json.loads(metadata["modelgate.signature"])["signatures"]["serving_default"] == signature
    # The package's flattened outputs (what the server pairs with the signature's outputs,
    # one by one) are the signature's outputs in its order.
    x = torch.randn(6, 3)
    with torch.no_grad():
        expected = module("build_picked")(x)
        flat = package.loader.run([x])
    assert len(flat) == len(PICKED_OUTPUTS)
    for output, tensor in zip(PICKED_OUTPUTS, flat):
        torch.testing.assert_close(tensor, expected[output["name"]], msg=output["name"])
    assert_served_as_the_module(version, "picked")
