"""Export a torch.nn.Module to a version directory modelgate serves.

    PYTHONPATH=tools python -m modelgate_export mypkg.models:build \
        --input x:float32:8,784 --out models/classifier --version 1 --format pt2

`mypkg.models:build` names a callable that returns the module (imported from the current
directory). Each `--input NAME:DTYPE:SHAPE` is an example input of `forward`, in its
positional order; the first dimension is the batch, which the export keeps free. The
version directory gets:

- `model.pt2`: torch.export with a dynamic batch dimension, compiled by AOTInductor with
  `cpp.dynamic_threads=True` (without it the compile machine's thread count is baked into
  the kernels). The package's metadata carries the signature, the batch range the export
  allows, the torch version and the compiling CPU's flags (`modelgate.*` keys).
- or `model.pt` (`--format torchscript`): torch.jit.trace of the module, with the
  signature embedded as `extra/signature.json`.
- `signature.json` in both cases: inputs named after forward's parameters (the exported
  graph's placeholders for pt2), dtypes and shapes from the examples (batch dimension -1),
  outputs named `--output` (or `output_0`, ...) with dtypes and shapes from running the
  module once. A dict's outputs are its entries in the dict's order, named by its keys
  (`--output`, if given, must list those keys, in any order).
- with `--warmup`, `assets.extra/tf_serving_warmup_requests`: one Predict of the example
  inputs in TF Serving's warm-up format, which modelgate replays before the version serves
  (needs `tensorflow` and `tensorflow-serving-api`, as TF Serving's own tooling does).

The version is written into a hidden sibling directory (`.export-N-<pid>`, which the server
ignores) and renamed into place once every file is there, so a server polling the base path
never sees half a version, and a failed export leaves nothing behind. An existing version is
never replaced unless `--overwrite` is given: a version that serves is not reloaded when its
files change, so a rewrite in place would only take effect, unannounced, at the next start.

Python API: `export(module, {"x": tensor}, out_dir, version, ...)`.
"""

import argparse
import importlib
import inspect
import json
import os
import shutil
import sys
from pathlib import Path

import torch

# TF names of the dtypes modelgate serves.
TF_DTYPES = {
    torch.float16: "DT_HALF",
    torch.bfloat16: "DT_BFLOAT16",
    torch.float32: "DT_FLOAT",
    torch.float64: "DT_DOUBLE",
    torch.int8: "DT_INT8",
    torch.int16: "DT_INT16",
    torch.int32: "DT_INT32",
    torch.int64: "DT_INT64",
    torch.uint8: "DT_UINT8",
    torch.bool: "DT_BOOL",
}
NUMPY_NAMES = {
    "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
    "float64": torch.float64, "int8": torch.int8, "int16": torch.int16, "int32": torch.int32,
    "int64": torch.int64, "uint8": torch.uint8, "bool": torch.bool,
}
PREDICT = "tensorflow/serving/predict"


class ExportError(Exception):
    """What cannot be exported, said so that the user can fix it."""


def _outputs(result, names):
    """The module's outputs flattened in order, with their names."""
    if isinstance(result, torch.Tensor):
        tensors = [result]
    elif isinstance(result, (tuple, list)):
        tensors = list(result)
    elif isinstance(result, dict):
        # A dict's outputs are its entries in the dict's own order, named by its keys: the
        # package flattens it in that order (torch.export's pytree) and the server pairs the
        # package's i-th output with the signature's i-th; a TorchScript dict is looked up by
        # key. So `--output` names must be the keys (any order, kept on their own entries).
        keys = list(result.keys())
        if not all(isinstance(key, str) for key in keys):
            raise ExportError(f"forward returned a dict with keys {keys}; modelgate serves a "
                              "dict whose keys are strings")
        if names is not None and (len(names) != len(keys) or set(names) != set(keys)):
            raise ExportError(f"forward returns a dict with keys {keys}, which name its "
                              f"outputs; --output must give those keys (in any order), "
                              f"not {list(names)}")
        names = keys
        tensors = list(result.values())
    else:
        raise ExportError(f"forward returned {type(result).__name__}; modelgate serves a tensor, "
                          "a tuple of tensors or a dict of tensors")
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        raise ExportError("forward returned something that is not a tensor among its outputs")
    if names is None:
        names = ["output_0"] if len(tensors) == 1 else [f"output_{i}" for i in range(len(tensors))]
    if len(names) != len(tensors):
        raise ExportError(f"{len(names)} output name(s) for {len(tensors)} output(s)")
    return list(zip(names, tensors))


def _spec(name, tensor):
    if tensor.dtype not in TF_DTYPES:
        raise ExportError(f"'{name}' is {tensor.dtype}, which modelgate does not serve")
    shape = list(tensor.shape)
    if shape:
        shape[0] = -1
    return {"name": name, "dtype": TF_DTYPES[tensor.dtype], "shape": shape}


def _signature(inputs, outputs):
    return {"signatures": {"serving_default": {
        "method_name": PREDICT,
        "method": "forward",
        "inputs": [_spec(name, t) for name, t in inputs],
        "outputs": [_spec(name, t) for name, t in outputs],
    }}}


def _input_names(module, examples):
    """forward's positional parameter names, which the given examples must match."""
    parameters = [p for p in inspect.signature(module.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    names = [p.name for p in parameters]
    if list(examples) != names[:len(examples)] or len(examples) != len(names):
        raise ExportError(f"forward takes {names}; give one --input for each, in that order "
                          f"(got {list(examples)})")
    return names


def _export_pt2(module, examples, path, signature, min_batch, max_batch, freeze=False):
    batch = torch.export.Dim("batch", min=min_batch, max=max_batch)
    dynamic = {name: ({0: batch} if t.dim() > 0 else None) for name, t in examples.items()}
    program = torch.export.export(module, tuple(examples.values()), dynamic_shapes=dynamic)
    # The placeholders of the exported graph are the names the package's inputs take.
    graph_inputs = list(program.graph_signature.user_inputs)
    if graph_inputs != list(examples):
        raise ExportError(f"the exported graph takes {graph_inputs}, not {list(examples)}")
    low, high = _batch_range(program, min_batch, max_batch)
    metadata = {
        "modelgate.signature": json.dumps(signature, separators=(",", ":")),
        "modelgate.batch_min": str(low),
        "modelgate.batch_max": str(high),
        "modelgate.torch_version": torch.__version__,
        # AOTInductor compiles with -march=native: the package may use any instruction this
        # CPU has, beyond the vector ISA in AOTI_CPU_ISA. The server checks it has them all.
        "modelgate.cpu_flags": " ".join(_cpu_flags()),
    }
    configs = {
        "cpp.dynamic_threads": True,
        "aot_inductor.metadata": metadata,
    }
    if freeze:
        # The weights become constants the compiler may fold and pre-pack (oneDNN layouts
        # on the CPU): faster convolutions, and a package whose weights cannot be swapped.
        configs["freezing"] = True
    with torch.no_grad():
        torch._inductor.aoti_compile_and_package(
            program,
            package_path=str(path),
            inductor_configs=configs,
        )
    return low, high


def _cpu_flags():
    """This CPU's feature flags as /proc/cpuinfo names them (`flags` on x86, `Features` on
    ARM); empty where there is no /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return value.split()
    except OSError:
        pass
    return []


def _batch_range(program, min_batch, max_batch):
    """The batch range the export allows, within the one asked for: the range constraint of
    the batch dimension's own symbol (dim 0 of the first user input that has a dimension).
    Other symbols can come first in `range_constraints`: the unbacked ones of data-dependent
    sizes (`torch.nonzero`, ...), whose ranges say nothing of the batch."""
    batch = _batch_dim(program)
    if batch is None:
        # No input has a dimension: nothing in the graph bounds a batch.
        return min_batch, max_batch
    expr = batch.node.expr if isinstance(batch, torch.SymInt) else None
    if expr is None or expr.is_number:
        # A static batch of N: the package takes exactly N rows.
        rows = int(batch) if expr is None else int(expr)
        if not min_batch <= rows <= max_batch:
            raise ExportError(f"the export fixed the batch at {rows}, outside "
                              f"{min_batch}..{max_batch}")
        return rows, rows
    bounds = program.range_constraints.get(expr)
    if bounds is None:
        # No constraint recorded for it: the Dim the export was given bounds it.
        return min_batch, max_batch
    low = int(bounds.lower) if bounds.lower.is_finite else min_batch
    high = int(bounds.upper) if bounds.upper.is_finite else max_batch
    return max(low, min_batch), min(high, max_batch)


def _batch_dim(program):
    """Dim 0 of the exported graph's first user input that has one (an int or a SymInt),
    or None. Parameters and buffers, lifted to placeholders too, are skipped."""
    user_inputs = set(program.graph_signature.user_inputs)
    for node in program.graph.nodes:
        if node.op != "placeholder" or node.name not in user_inputs:
            continue
        value = node.meta.get("val")
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    return None


def _export_torchscript(module, examples, path, signature):
    traced = torch.jit.trace(module, tuple(examples.values()), strict=False)
    traced.save(str(path), _extra_files={"signature.json": json.dumps(signature)})


WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")


def _warmup_writer():
    """TensorFlow's TFRecord writer and the TF Serving protos warm-up records are made with."""
    try:
        import tensorflow as tf
        from tensorflow_serving.apis import predict_pb2, prediction_log_pb2
    except ImportError:
        raise ExportError("warm-up records are written with TensorFlow's own writer: "
                          "pip install tensorflow tensorflow-serving-api") from None
    return tf, predict_pb2, prediction_log_pb2


def write_warmup(version_dir, requests, signature="", model_name=""):
    """Writes TF Serving's warm-up file into `version_dir`: one PredictionLog record (in a
    TFRecord file) per dict of named inputs (numpy arrays or tensors) in `requests`."""
    tf, predict_pb2, prediction_log_pb2 = _warmup_writer()
    path = os.path.join(version_dir, WARMUP_FILE)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tf.io.TFRecordWriter(path) as writer:
        for inputs in requests:
            request = predict_pb2.PredictRequest()
            request.model_spec.name = model_name
            request.model_spec.signature_name = signature
            for name, value in inputs.items():
                if isinstance(value, torch.Tensor):
                    value = value.numpy()
                request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
            log = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request))
            writer.write(log.SerializeToString())
    return path


def export(module, examples, out_dir, version, fmt="pt2", output_names=None,
           min_batch=1, max_batch=1024, warmup=False, device="cpu", freeze=False,
           overwrite=False):
    """Writes `out_dir/version/` for `module` run on `examples` (name -> tensor, in forward's
    order) on `device` (a package runs only on the device type it was compiled for, and
    AOTInductor compiles for the GPU it runs on). `freeze` compiles a package with
    inductor's freezing (weights folded in as constants). An existing version is refused
    unless `overwrite`. Returns the version directory."""
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ExportError(f"--version {version!r}: versions are whole numbers from 1 "
                          "(the server ignores any other directory name)")
    directory = Path(out_dir) / str(version)
    if directory.exists() and any(directory.iterdir()) and not overwrite:
        raise ExportError(f"{directory} already exists: export a new version number (the "
                          "server does not reload a version whose files change), or pass "
                          "--overwrite to replace it")
    if warmup:
        _warmup_writer()  # before minutes of compiling, not after
    if not isinstance(module, torch.nn.Module):
        raise ExportError("the factory must return a torch.nn.Module")
    if fmt not in ("pt2", "torchscript"):
        raise ExportError(f"--format is pt2 or torchscript, not {fmt}")
    if freeze and fmt != "pt2":
        raise ExportError("--freeze applies to pt2 packages; for TorchScript use the "
                          "server's --freeze_models")
    if not 1 <= min_batch <= max_batch:
        raise ExportError(f"the batch range {min_batch}..{max_batch} is empty")
    module = module.eval().to(device)
    examples = {name: t.to(device) for name, t in examples.items()}
    _input_names(module, examples)
    with torch.no_grad():
        result = module(*examples.values())
    outputs = _outputs(result, output_names)
    signature = _signature(list(examples.items()), outputs)
    staging = Path(out_dir) / f".export-{version}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        if fmt == "pt2":
            _export_pt2(module, examples, staging / "model.pt2", signature, min_batch,
                        max_batch, freeze)
        else:
            _export_torchscript(module, examples, staging / "model.pt", signature)
        (staging / "signature.json").write_text(json.dumps(signature, indent=2) + "\n")
        if warmup:
            write_warmup(staging, [{name: t.cpu() for name, t in examples.items()}])
        _publish(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def _publish(staging, directory):
    """Renames the complete `staging` directory to `directory`, replacing what was there."""
    replaced = None
    if directory.exists():
        replaced = directory.with_name(f".replaced-{directory.name}-{os.getpid()}")
        shutil.rmtree(replaced, ignore_errors=True)
        directory.rename(replaced)
    staging.rename(directory)
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)


def _parse_input(text):
    try:
        name, dtype, shape = text.split(":")
        dims = [int(d) for d in shape.split(",") if d]
        return name, torch.zeros(dims, dtype=NUMPY_NAMES[dtype])
    except (ValueError, KeyError):
        raise ExportError(f"--input {text!r}: expected NAME:DTYPE:SHAPE, e.g. x:float32:8,784 "
                          f"(dtypes: {', '.join(NUMPY_NAMES)})") from None


def main(argv=None):
    parser = argparse.ArgumentParser(prog="modelgate_export", description=__doc__.split("\n\n")[0])
    parser.add_argument("factory", help="module:callable returning the torch.nn.Module")
    parser.add_argument("--input", action="append", required=True, metavar="NAME:DTYPE:SHAPE")
    parser.add_argument("--output", action="append",
                        help="output names, in order; for a forward that returns a dict, its "
                             "keys (in any order: the outputs follow the dict's order)")
    parser.add_argument("--out", required=True, help="the model's base path")
    parser.add_argument("--version", type=int, default=1)
    parser.add_argument("--format", choices=["pt2", "torchscript"], default="pt2")
    parser.add_argument("--min-batch", type=int, default=1)
    parser.add_argument("--max-batch", type=int, default=1024)
    parser.add_argument("--device", default="cpu",
                        help="where the model will run: cpu (default) or cuda; a pt2 package "
                             "for cuda must be compiled on a machine with that GPU")
    parser.add_argument("--freeze", action="store_true",
                        help="compile the pt2 package with inductor's freezing: weights folded "
                             "in as constants (faster convolutions on the CPU)")
    parser.add_argument("--warmup", action="store_true",
                        help="also write the example inputs as TF Serving warm-up records")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the version if it exists (a server that already serves "
                             "it keeps the old files loaded until it restarts)")
    args = parser.parse_args(argv)
    sys.path.insert(0, os.getcwd())
    try:
        module_name, _, attribute = args.factory.partition(":")
        if not attribute:
            raise ExportError(f"{args.factory!r}: expected module:callable")
        factory = getattr(importlib.import_module(module_name), attribute)
        examples = dict(_parse_input(text) for text in args.input)
        directory = export(factory(), examples, args.out, args.version, args.format, args.output,
                           args.min_batch, args.max_batch, args.warmup, args.device,
                           args.freeze, args.overwrite)
    except ExportError as error:
        parser.exit(2, f"modelgate_export: {error}\n")
    print(directory)


if __name__ == "__main__":
    main()
