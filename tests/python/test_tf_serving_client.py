"""Compatibility tests: modelgate driven by the official TensorFlow Serving client.

Uses tensorflow_serving.apis (tensorflow-serving-api), tf.make_tensor_proto /
tf.make_ndarray and grpc, exactly as a TF Serving user would.  The session
fixture starts the real server binary on ephemeral ports:

    MODELGATE_BIN          server binary (default: target/debug/modelgate)
    MODELGATE_TEST_MODELS  fixture repository (default: target/test-models)

Missing model repositories are generated with models/generate.py (needs torch
in the running interpreter).  Install: see requirements.txt beside this file.
"""

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    inference_pb2,
    model_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
    regression_pb2,
)

try:  # grpcio-health-checking; optional, GetModelStatus polling is the fallback
    from grpc_health.v1 import health_pb2, health_pb2_grpc
except ImportError:  # pragma: no cover
    health_pb2 = health_pb2_grpc = None

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_MODELS = REPO_ROOT / "models"
FIXTURE_MODELS = Path(os.environ.get("MODELGATE_TEST_MODELS", REPO_ROOT / "target" / "test-models"))
if not FIXTURE_MODELS.is_absolute():
    FIXTURE_MODELS = REPO_ROOT / FIXTURE_MODELS
# AOTInductor packages made by the export command (models/pt2_fixtures.py).
PT2_MODELS = REPO_ROOT / "target" / "pt2-models"
MODELGATE_BIN = Path(os.environ.get("MODELGATE_BIN", REPO_ROOT / "target" / "debug" / "modelgate"))
if not MODELGATE_BIN.is_absolute():
    MODELGATE_BIN = REPO_ROOT / MODELGATE_BIN

TIMEOUT = 30  # seconds, deadline of every RPC
PORT_WAIT = 60  # seconds to wait for the gRPC port to be announced
READY_WAIT = 120  # seconds to wait for every model to become AVAILABLE
CHANNEL_OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]

AVAILABLE = get_model_status_pb2.ModelVersionStatus.AVAILABLE

LISTEN_RE = re.compile(r"\b(gRPC|REST)\b.*?listening on ([0-9.]+):(\d+)")
ANSI_RE = re.compile(r"\x1b\[[0-9;]*m")

# name -> (base path, extra ModelConfig text)
SERVED_MODELS = {
    "tiny": (DEMO_MODELS / "tiny", ""),
    "mlp": (
        DEMO_MODELS / "mlp",
        'model_version_policy { all {} }\n'
        'version_labels { key: "stable" value: 1 }\n'
        'version_labels { key: "canary" value: 2 }',
    ),
    "echo": (FIXTURE_MODELS / "echo", ""),
    "scaled": (
        FIXTURE_MODELS / "scaled",
        'model_version_policy { all {} }\nversion_labels { key: "stable" value: 1 }',
    ),
    "faulty": (FIXTURE_MODELS / "faulty", ""),
    "multi": (FIXTURE_MODELS / "multi", ""),
    "regressor": (FIXTURE_MODELS / "regressor", ""),
    "pair": (PT2_MODELS / "pair", ""),
}


# ---------------------------------------------------------------------------
# Server process
# ---------------------------------------------------------------------------


class ServerProcess:
    """The modelgate binary, its merged stdout/stderr kept in memory."""

    def __init__(self, args):
        env = dict(os.environ, NO_COLOR="1")
        self.proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO_ROOT,
            start_new_session=True,  # own process group: teardown also reaches wrapper children
        )
        self.lines = []
        self.ports = {}
        self._events = queue.Queue()
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, name="modelgate-log", daemon=True)
        self._reader.start()

    def _read(self):
        for raw in iter(self.proc.stdout.readline, b""):
            line = ANSI_RE.sub("", raw.decode("utf-8", "replace").rstrip("\n"))
            with self._lock:
                self.lines.append(line)
            m = LISTEN_RE.search(line)
            if m:
                self._events.put((m.group(1), m.group(2), int(m.group(3))))
        self._events.put(None)  # EOF: the process closed its output

    def log(self, last=200):
        with self._lock:
            return "\n".join(self.lines[-last:])

    def wait_for_ports(self, timeout):
        deadline = time.monotonic() + timeout
        while "gRPC" not in self.ports:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no 'gRPC server listening on' line within {timeout}s")
            try:
                event = self._events.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            if event is None:
                self.proc.wait(timeout=5)
                raise RuntimeError(f"server exited with code {self.proc.returncode} before listening")
            kind, host, port = event
            self.ports[kind] = (host, port)
        # The REST line is usually printed right next to the gRPC one.
        try:
            while "REST" not in self.ports:
                event = self._events.get(timeout=2)
                if event is None:
                    break
                self.ports[event[0]] = (event[1], event[2])
        except queue.Empty:
            pass
        return self.ports

    def _signal_group(self, sig):
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self):
        """SIGTERM, then SIGKILL after 10 s; returns the exit code."""
        if self.proc.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self.proc.wait(timeout=10)
        self._signal_group(signal.SIGKILL)  # leftovers of a wrapper script, if any
        self._reader.join(timeout=5)
        return self.proc.returncode


def ensure_models():
    """Generates the demo / fixture repositories if they are missing."""
    generate = REPO_ROOT / "models" / "generate.py"
    wanted = [
        ("demo", DEMO_MODELS, [DEMO_MODELS / "mlp" / "2" / "model.pt", DEMO_MODELS / "tiny" / "1" / "model.pt"]),
        ("fixtures", FIXTURE_MODELS, [FIXTURE_MODELS / n / "1" / "model.pt" for n in ("echo", "faulty", "multi", "regressor")]
         + [FIXTURE_MODELS / "scaled" / "3" / "model.pt"]),
    ]
    for what, base, files in wanted:
        if all(f.exists() for f in files):
            continue
        result = subprocess.run(
            [sys.executable, str(generate), what, str(base)],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if result.returncode != 0:
            pytest.fail(
                f"{base} is missing and `{generate.name} {what}` failed (torch installed?):\n"
                f"{result.stdout}\n{result.stderr}",
                pytrace=False,
            )


def write_config(path):
    blocks = []
    for name, (base, extra) in SERVED_MODELS.items():
        extra_lines = "".join(f"    {line}\n" for line in extra.splitlines())
        blocks.append(
            "  config {\n"
            f'    name: "{name}"\n'
            f'    base_path: "{base.resolve()}"\n'
            '    model_platform: "pytorch"\n'
            f"{extra_lines}"
            "  }\n"
        )
    path.write_text("model_config_list {\n" + "".join(blocks) + "}\n")


def wait_until_ready(server, channel, timeout):
    """Health service "" == SERVING (when available), then every model has
    versions and all of them are AVAILABLE."""
    deadline = time.monotonic() + timeout
    health = health_pb2_grpc.HealthStub(channel) if health_pb2_grpc else None
    models = model_service_pb2_grpc.ModelServiceStub(channel)
    last = "nothing tried yet"
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"server exited with code {server.proc.returncode} while loading models")
        try:
            if health is not None:
                resp = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
                if resp.status != health_pb2.HealthCheckResponse.SERVING:
                    last = f"health status {health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)}"
                    time.sleep(0.2)
                    continue
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.UNIMPLEMENTED:
                last = f"health check: {e.code()} {e.details()}"
                time.sleep(0.2)
                continue
            health = None  # no health service: rely on GetModelStatus alone
        try:
            pending = []
            for name in SERVED_MODELS:
                req = get_model_status_pb2.GetModelStatusRequest()
                req.model_spec.name = name
                resp = models.GetModelStatus(req, timeout=5)
                states = [(v.version, v.state) for v in resp.model_version_status]
                if not states or any(s != AVAILABLE for _, s in states):
                    pending.append(f"{name}: {states}")
            if not pending:
                return
            last = "not AVAILABLE yet: " + "; ".join(pending)
        except grpc.RpcError as e:
            last = f"GetModelStatus: {e.code()} {e.details()}"
        time.sleep(0.2)
    raise TimeoutError(f"models not ready within {timeout}s ({last})")


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    if not MODELGATE_BIN.exists():
        pytest.fail(f"server binary {MODELGATE_BIN} not found (cargo build, or set MODELGATE_BIN)",
                    pytrace=False)
    ensure_models()
    config = tmp_path_factory.mktemp("modelgate") / "models.config"
    write_config(config)
    srv = ServerProcess([
        str(MODELGATE_BIN),
        "--port=0",
        "--rest_api_port=0",  # 0 turns REST off, as in TF Serving
        "--bind_address=127.0.0.1",
        f"--model_config_file={config}",
    ])
    try:
        error = None
        try:
            srv.wait_for_ports(PORT_WAIT)
            host, port = srv.ports["gRPC"]
            srv.target = f"{host}:{port}"
            with grpc.insecure_channel(srv.target, options=CHANNEL_OPTIONS) as ch:
                wait_until_ready(srv, ch, READY_WAIT)
        except (TimeoutError, RuntimeError, grpc.RpcError) as e:
            error = e
        if error is not None:
            pytest.fail(f"modelgate did not come up: {error}\n--- server log ---\n{srv.log()}", pytrace=False)
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="session")
def channel(server):
    with grpc.insecure_channel(server.target, options=CHANNEL_OPTIONS) as ch:
        yield ch


@pytest.fixture(scope="session")
def predict_stub(channel):
    return prediction_service_pb2_grpc.PredictionServiceStub(channel)


@pytest.fixture(scope="session")
def model_stub(channel):
    return model_service_pb2_grpc.ModelServiceStub(channel)


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def predict_request(model, inputs, signature=None, version=None, label=None, output_filter=()):
    spec = model_pb2.ModelSpec(name=model)
    if signature is not None:
        spec.signature_name = signature
    if version is not None:
        spec.version.value = version
    if label is not None:
        spec.version_label = label
    req = predict_pb2.PredictRequest(model_spec=spec)
    for name, value in inputs.items():
        if isinstance(value, tensor_pb2.TensorProto):
            req.inputs[name].CopyFrom(value)
        else:
            req.inputs[name].CopyFrom(tf.make_tensor_proto(value))
    req.output_filter.extend(output_filter)
    return req


def outputs(resp):
    return {name: tf.make_ndarray(t) for name, t in resp.outputs.items()}


def expect_error(call, req, code):
    with pytest.raises(grpc.RpcError) as info:
        call(req, timeout=TIMEOUT)
    assert info.value.code() == code, f"expected {code}, got {info.value.code()}: {info.value.details()}"
    return info.value


def softmax(logits):
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


# ---------------------------------------------------------------------------
# Predict
# ---------------------------------------------------------------------------


def test_demo_mlp_warm_up_files_were_replayed(server):
    """models/warmup.py writes the demo mlp's warm-up files with TensorFlow's TFRecord
    writer and TF Serving's PredictionLog; modelgate replays them before serving."""
    for version in (1, 2):
        assert (DEMO_MODELS / "mlp" / str(version) / "assets.extra" / "tf_serving_warmup_requests").is_file()
        assert re.search(
            rf'replayed the warm-up requests model="mlp" version={version} records=2', server.log(10_000)
        ), server.log()


def test_predict_tiny(predict_stub):
    x = tf.make_tensor_proto([[1.0], [2.0], [3.5]], dtype=tf.float32)
    resp = predict_stub.Predict(predict_request("tiny", {"x": x}), timeout=TIMEOUT)
    y = tf.make_ndarray(resp.outputs["y"])
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, np.array([[3.0], [5.0], [8.0]], dtype=np.float32))
    assert resp.model_spec.name == "tiny"
    assert resp.model_spec.version.value == 1


def test_predict_tiny_typed_value_field(predict_stub):
    # Clients in other languages often fill float_val instead of tensor_content.
    x = tensor_pb2.TensorProto(
        dtype=types_pb2.DT_FLOAT,
        tensor_shape=tensor_shape_pb2.TensorShapeProto(
            dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=3), tensor_shape_pb2.TensorShapeProto.Dim(size=1)]
        ),
        float_val=[1.0, 2.0, 3.5],
    )
    resp = predict_stub.Predict(predict_request("tiny", {"x": x}), timeout=TIMEOUT)
    np.testing.assert_array_equal(tf.make_ndarray(resp.outputs["y"]), [[3.0], [5.0], [8.0]])


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(1234).standard_normal((4, 784)).astype(np.float32)


def test_predict_mlp_latest(predict_stub, images):
    resp = predict_stub.Predict(predict_request("mlp", {"images": images}), timeout=TIMEOUT)
    assert resp.model_spec.name == "mlp"
    assert resp.model_spec.version.value == 2
    out = outputs(resp)
    assert set(out) == {"probabilities", "logits"}
    probs, logits = out["probabilities"], out["logits"]
    assert probs.shape == (4, 10) and probs.dtype == np.float32
    assert logits.shape == (4, 10) and logits.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), np.ones(4), atol=1e-5)
    np.testing.assert_allclose(probs, softmax(logits.astype(np.float64)), atol=1e-6)


def test_predict_mlp_version_label_and_number(predict_stub, images):
    stable = predict_stub.Predict(predict_request("mlp", {"images": images}, label="stable"), timeout=TIMEOUT)
    assert stable.model_spec.version.value == 1
    v1 = predict_stub.Predict(predict_request("mlp", {"images": images}, version=1), timeout=TIMEOUT)
    assert v1.model_spec.version.value == 1
    out_stable, out_v1 = outputs(stable), outputs(v1)
    assert set(out_stable) == set(out_v1) == {"probabilities", "logits"}
    for name in out_v1:
        np.testing.assert_array_equal(out_stable[name], out_v1[name])
    np.testing.assert_allclose(out_v1["probabilities"].sum(axis=1), np.ones(4), atol=1e-5)

    canary = predict_stub.Predict(predict_request("mlp", {"images": images}, label="canary"), timeout=TIMEOUT)
    assert canary.model_spec.version.value == 2
    # Versions 1 and 2 have different weights.
    assert not np.allclose(outputs(canary)["logits"], out_v1["logits"])


def test_predict_output_filter(predict_stub, images):
    resp = predict_stub.Predict(
        predict_request("mlp", {"images": images}, output_filter=["logits"]), timeout=TIMEOUT
    )
    assert list(resp.outputs) == ["logits"]
    assert tf.make_ndarray(resp.outputs["logits"]).shape == (4, 10)


def test_predict_mlp_classify_signature(predict_stub, images):
    resp = predict_stub.Predict(predict_request("mlp", {"images": images}, signature="classify"), timeout=TIMEOUT)
    scores = tf.make_ndarray(resp.outputs["scores"])
    full = outputs(predict_stub.Predict(predict_request("mlp", {"images": images}), timeout=TIMEOUT))
    np.testing.assert_allclose(scores, full["probabilities"], atol=1e-6)


def test_predict_multi_inputs_dict_outputs(predict_stub):
    a = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.float32)
    b = np.array([[10, 20, 30], [0.5, -1, 2]], dtype=np.float32)
    out = outputs(predict_stub.Predict(predict_request("multi", {"a": a, "b": b}), timeout=TIMEOUT))
    assert set(out) == {"sum", "product"}
    np.testing.assert_array_equal(out["sum"], a + b)
    np.testing.assert_array_equal(out["product"], a * b)


def test_predict_pytorch2_package_answers_as_pytorch(predict_stub):
    """model.pt2 (AOTInductor, two inputs, two outputs) answers exactly what PyTorch's own
    loader answered for the same inputs, and its metadata is the exported signature."""
    import json

    case = json.loads((PT2_MODELS / "expected.json").read_text())["pair"]
    inputs = {name: np.array(t["values"], dtype=np.float32).reshape(t["shape"])
              for name, t in case["inputs"].items()}
    out = outputs(predict_stub.Predict(predict_request("pair", inputs), timeout=TIMEOUT))
    for name, want in zip(["mixed", "offset"], case["outputs"]):
        expected = np.array(want["values"], dtype=np.float32).reshape(want["shape"])
        np.testing.assert_array_equal(out[name], expected)
    req = get_model_metadata_pb2.GetModelMetadataRequest()
    req.model_spec.name = "pair"
    req.metadata_field.append("signature_def")
    resp = predict_stub.GetModelMetadata(req, timeout=TIMEOUT)
    sig_map = get_model_metadata_pb2.SignatureDefMap()
    resp.metadata["signature_def"].Unpack(sig_map)
    sig = sig_map.signature_def["serving_default"]
    assert [d.size for d in sig.inputs["a"].tensor_shape.dim] == [-1, 3]
    assert set(sig.outputs) == {"mixed", "offset"}


@pytest.mark.parametrize(
    "version,label,factor",
    [(None, None, 3), (1, None, 1), (2, None, 2), (3, None, 3), (None, "stable", 1)],
)
def test_predict_scaled_version_selection(predict_stub, version, label, factor):
    x = np.array([[1.0, -2.0], [0.5, 4.0]], dtype=np.float32)
    resp = predict_stub.Predict(predict_request("scaled", {"x": x}, version=version, label=label), timeout=TIMEOUT)
    assert resp.model_spec.version.value == factor
    np.testing.assert_array_equal(tf.make_ndarray(resp.outputs["y"]), factor * x)


# ---------------------------------------------------------------------------
# Echo: every dtype round-trips bit-exactly
# ---------------------------------------------------------------------------

_rng = np.random.default_rng(7)
ECHO_CASES = {
    "float32": _rng.standard_normal((2, 3)).astype(np.float32),
    "float64": _rng.standard_normal((2, 3)),
    "float16": _rng.standard_normal((2, 3)).astype(np.float16),
    "int8": np.array([[-128, -1, 0], [1, 42, 127]], dtype=np.int8),
    "int16": np.array([[-32768, -300, 0], [7, 300, 32767]], dtype=np.int16),
    "int32": np.array([[-(2**31), -70000, 0], [1, 70000, 2**31 - 1]], dtype=np.int32),
    "int64": np.array([[-(2**63), -(2**40), 0], [1, 2**40 + 3, 2**63 - 1]], dtype=np.int64),
    "uint8": np.array([[0, 1, 127], [128, 200, 255]], dtype=np.uint8),
    "bool": np.array([[True, False, True], [False, False, True]]),
}
TF_DTYPES = {
    "float32": tf.float32, "float64": tf.float64, "float16": tf.float16, "bfloat16": tf.bfloat16,
    "int8": tf.int8, "int16": tf.int16, "int32": tf.int32, "int64": tf.int64, "uint8": tf.uint8, "bool": tf.bool,
}


@pytest.mark.parametrize("dtype", list(ECHO_CASES))
def test_echo_round_trip(predict_stub, dtype):
    x = ECHO_CASES[dtype]
    proto = tf.make_tensor_proto(x)
    assert proto.dtype == TF_DTYPES[dtype].as_datatype_enum
    resp = predict_stub.Predict(predict_request("echo", {"x": proto}, signature=dtype), timeout=TIMEOUT)
    assert resp.outputs["y"].dtype == TF_DTYPES[dtype].as_datatype_enum
    y = tf.make_ndarray(resp.outputs["y"])
    assert y.dtype == x.dtype
    assert y.shape == (2, 3)
    np.testing.assert_array_equal(y, x)


def test_echo_round_trip_bfloat16(predict_stub):
    values = [[1.5, -2.0, 0.25], [3.0, 100.0, -0.125]]
    proto = tf.make_tensor_proto(tf.constant(values, dtype=tf.bfloat16))
    assert proto.dtype == types_pb2.DT_BFLOAT16
    resp = predict_stub.Predict(predict_request("echo", {"x": proto}, signature="bfloat16"), timeout=TIMEOUT)
    assert resp.outputs["y"].dtype == types_pb2.DT_BFLOAT16
    y = tf.make_ndarray(resp.outputs["y"])
    assert y.dtype == tf.bfloat16.as_numpy_dtype
    np.testing.assert_array_equal(y.astype(np.float32), np.array(values, dtype=np.float32))


def _typed_proto(dtype, shape, **values):
    return tensor_pb2.TensorProto(
        dtype=dtype,
        tensor_shape=tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=s) for s in shape]),
        **values,
    )


TYPED_VALUE_CASES = [
    ("float64", _typed_proto(types_pb2.DT_DOUBLE, [3], double_val=[0.1, -2.5, 1e300]),
     np.array([0.1, -2.5, 1e300])),
    ("int32", _typed_proto(types_pb2.DT_INT32, [2, 2], int_val=[1, -2, 3, 2**31 - 1]),
     np.array([[1, -2], [3, 2**31 - 1]], dtype=np.int32)),
    ("int64", _typed_proto(types_pb2.DT_INT64, [2], int64_val=[-(2**62), 5]),
     np.array([-(2**62), 5], dtype=np.int64)),
    ("int8", _typed_proto(types_pb2.DT_INT8, [3], int_val=[-128, 0, 127]), np.array([-128, 0, 127], np.int8)),
    ("uint8", _typed_proto(types_pb2.DT_UINT8, [2], int_val=[0, 255]), np.array([0, 255], np.uint8)),
    ("float16", _typed_proto(types_pb2.DT_HALF, [2],
                             half_val=np.array([1.5, -0.25], np.float16).view(np.uint16).tolist()),
     np.array([1.5, -0.25], np.float16)),
    ("bool", _typed_proto(types_pb2.DT_BOOL, [1, 3], bool_val=[True, False, True]),
     np.array([[True, False, True]])),
]


@pytest.mark.parametrize("signature,proto,expected", [pytest.param(*c, id=c[0]) for c in TYPED_VALUE_CASES])
def test_echo_typed_value_fields(predict_stub, signature, proto, expected):
    # Tensors in the typed *_val fields (as hand-built or non-Python clients
    # send them) instead of tensor_content.
    resp = predict_stub.Predict(predict_request("echo", {"x": proto}, signature=signature), timeout=TIMEOUT)
    y = tf.make_ndarray(resp.outputs["y"])
    assert y.dtype == expected.dtype
    np.testing.assert_array_equal(y, expected)


# ---------------------------------------------------------------------------
# Model service / metadata
# ---------------------------------------------------------------------------


def test_get_model_metadata_mlp(predict_stub):
    req = get_model_metadata_pb2.GetModelMetadataRequest()
    req.model_spec.name = "mlp"
    req.metadata_field.append("signature_def")
    resp = predict_stub.GetModelMetadata(req, timeout=TIMEOUT)
    assert resp.model_spec.name == "mlp"
    assert resp.model_spec.version.value == 2
    assert "signature_def" in resp.metadata
    sig_map = get_model_metadata_pb2.SignatureDefMap()
    assert resp.metadata["signature_def"].Unpack(sig_map), resp.metadata["signature_def"].type_url
    sig = sig_map.signature_def["serving_default"]
    assert sig.method_name == "tensorflow/serving/predict"
    assert sig.inputs["images"].dtype == types_pb2.DT_FLOAT
    assert [d.size for d in sig.inputs["images"].tensor_shape.dim] == [-1, 784]
    assert "probabilities" in sig.outputs
    assert "logits" in sig.outputs
    assert sig.outputs["probabilities"].dtype == types_pb2.DT_FLOAT
    assert [d.size for d in sig.outputs["probabilities"].tensor_shape.dim] == [-1, 10]
    assert sig_map.signature_def["classify"].method_name == "tensorflow/serving/classify"


def test_get_model_status_mlp(model_stub):
    req = get_model_status_pb2.GetModelStatusRequest()
    req.model_spec.name = "mlp"
    resp = model_stub.GetModelStatus(req, timeout=TIMEOUT)
    by_version = {v.version: v for v in resp.model_version_status}
    assert set(by_version) == {1, 2}
    for version, status in by_version.items():
        assert status.state == AVAILABLE, (version, status)
        assert status.status.error_code == 0, (version, status.status)  # tensorflow.error.OK


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------

TINY_X = np.array([[1.0], [2.0]], dtype=np.float32)


def test_error_unknown_model(predict_stub):
    expect_error(predict_stub.Predict, predict_request("no_such_model", {"x": TINY_X}), grpc.StatusCode.NOT_FOUND)


def test_error_unknown_version(predict_stub):
    expect_error(predict_stub.Predict, predict_request("tiny", {"x": TINY_X}, version=99), grpc.StatusCode.NOT_FOUND)


def test_error_unknown_signature(predict_stub):
    expect_error(
        predict_stub.Predict,
        predict_request("tiny", {"x": TINY_X}, signature="no_such_signature"),
        grpc.StatusCode.FAILED_PRECONDITION,
    )


def test_error_wrong_dtype(predict_stub):
    x = tf.make_tensor_proto(np.array([[1], [2]], dtype=np.int32))
    expect_error(predict_stub.Predict, predict_request("tiny", {"x": x}), grpc.StatusCode.INVALID_ARGUMENT)


def test_error_missing_input(predict_stub):
    # Input under a name the signature does not have, and "x" absent.
    expect_error(predict_stub.Predict, predict_request("tiny", {"wrong": TINY_X}), grpc.StatusCode.INVALID_ARGUMENT)
    # One of two inputs missing.
    a = np.ones((1, 3), dtype=np.float32)
    expect_error(predict_stub.Predict, predict_request("multi", {"a": a}), grpc.StatusCode.INVALID_ARGUMENT)


def test_error_model_exception_is_internal_and_server_survives(predict_stub):
    ok = predict_stub.Predict(
        predict_request("faulty", {"x": np.array([[1.0, 2.0]], dtype=np.float32)}), timeout=TIMEOUT
    )
    np.testing.assert_array_equal(tf.make_ndarray(ok.outputs["y"]), [[2.0, 3.0]])

    bad = predict_request("faulty", {"x": np.array([[1.0, -2.0]], dtype=np.float32)})
    expect_error(predict_stub.Predict, bad, grpc.StatusCode.INTERNAL)

    resp = predict_stub.Predict(predict_request("tiny", {"x": TINY_X}), timeout=TIMEOUT)
    np.testing.assert_array_equal(tf.make_ndarray(resp.outputs["y"]), [[3.0], [5.0]])


# ---------------------------------------------------------------------------
# Classify / Regress / MultiInference with tf.train.Example inputs
# ---------------------------------------------------------------------------

CLASSIFY = "tensorflow/serving/classify"
REGRESS = "tensorflow/serving/regress"


def example(**features):
    """A tf.train.Example: float lists for floats, int64 lists for ints."""
    feature = {}
    for name, values in features.items():
        values = np.atleast_1d(values)
        if np.issubdtype(values.dtype, np.integer):
            feature[name] = tf.train.Feature(int64_list=tf.train.Int64List(value=values.tolist()))
        else:
            feature[name] = tf.train.Feature(float_list=tf.train.FloatList(value=values.tolist()))
    return tf.train.Example(features=tf.train.Features(feature=feature))


def classes_of(result):
    return [[(c.label, c.score) for c in cl.classes] for cl in result.classifications]


def test_classify_examples(predict_stub):
    req = classification_pb2.ClassificationRequest()
    req.model_spec.name = "regressor"
    req.model_spec.signature_name = "classify"
    req.input.example_list.examples.extend([example(x=[1.0, 2.0, 3.0]), example(x=[0.5, 0.0, -1.0])])
    resp = predict_stub.Classify(req, timeout=TIMEOUT)
    assert classes_of(resp.result) == [
        [("a", 0.5), ("b", 1.0), ("c", 1.5)],
        [("a", 0.25), ("b", 0.0), ("c", -0.5)],
    ]
    assert resp.model_spec.name == "regressor"
    assert resp.model_spec.version.value == 1
    assert resp.model_spec.signature_name == "classify"


def test_classify_int64_features_without_labels(predict_stub):
    req = classification_pb2.ClassificationRequest()
    req.model_spec.name = "regressor"
    req.model_spec.signature_name = "classify_ids"
    req.input.example_list.examples.extend([example(ids=np.array([1, 2])), example(ids=np.array([-3, 0]))])
    resp = predict_stub.Classify(req, timeout=TIMEOUT)
    assert classes_of(resp.result) == [[("", 2.0), ("", 4.0)], [("", -6.0), ("", 0.0)]]


def test_classify_mlp_images_matches_predict(predict_stub, images):
    req = classification_pb2.ClassificationRequest()
    req.model_spec.name = "mlp"
    req.model_spec.signature_name = "classify"
    req.input.example_list.examples.extend([example(images=row) for row in images])
    resp = predict_stub.Classify(req, timeout=TIMEOUT)
    assert resp.model_spec.version.value == 2
    classes = classes_of(resp.result)
    assert [[label for label, _ in row] for row in classes] == [[str(i) for i in range(10)]] * 4
    scores = np.array([[score for _, score in row] for row in classes], dtype=np.float32)
    probs = outputs(predict_stub.Predict(predict_request("mlp", {"images": images}), timeout=TIMEOUT))
    np.testing.assert_array_equal(scores, probs["probabilities"])


def test_regress_examples(predict_stub):
    req = regression_pb2.RegressionRequest()
    req.model_spec.name = "regressor"  # serving_default is the regress signature
    req.input.example_list.examples.extend([example(x=[1.0, 2.0, 3.0]), example(x=[0.5, 0.0, 1.0])])
    resp = predict_stub.Regress(req, timeout=TIMEOUT)
    assert [r.value for r in resp.result.regressions] == [14.5, 4.0]
    assert resp.model_spec.signature_name == "serving_default"
    assert resp.model_spec.version.value == 1


def test_regress_example_list_with_context(predict_stub):
    req = regression_pb2.RegressionRequest()
    req.model_spec.name = "regressor"
    req.model_spec.version.value = 1
    ctx = req.input.example_list_with_context
    ctx.context.CopyFrom(example(x=[1.0, 1.0, 1.0]))
    ctx.examples.extend([tf.train.Example(), example(x=[0.0, 0.0, 0.0])])
    resp = predict_stub.Regress(req, timeout=TIMEOUT)
    assert [r.value for r in resp.result.regressions] == [6.5, 0.5]


def test_multi_inference_classify_and_regress(predict_stub):
    req = inference_pb2.MultiInferenceRequest()
    task = req.tasks.add()
    task.model_spec.name = "regressor"
    task.model_spec.signature_name = "classify"
    task.method_name = CLASSIFY
    task = req.tasks.add()
    task.model_spec.name = "regressor"
    task.method_name = REGRESS
    req.input.example_list.examples.extend([example(x=[1.0, 2.0, 3.0]), example(x=[2.0, 0.0, 0.0])])
    resp = predict_stub.MultiInference(req, timeout=TIMEOUT)
    assert len(resp.results) == 2
    first, second = resp.results
    assert first.model_spec.signature_name == "classify"
    assert first.model_spec.version.value == 1
    assert classes_of(first.classification_result) == [
        [("a", 0.5), ("b", 1.0), ("c", 1.5)],
        [("a", 1.0), ("b", 0.0), ("c", 0.0)],
    ]
    assert second.model_spec.signature_name == "serving_default"
    assert [r.value for r in second.regression_result.regressions] == [14.5, 2.5]


def test_classify_and_regress_errors(predict_stub):
    # A predict signature cannot classify.
    req = classification_pb2.ClassificationRequest()
    req.model_spec.name = "mlp"
    req.input.example_list.examples.append(example(images=np.zeros(784, dtype=np.float32)))
    err = expect_error(predict_stub.Classify, req, grpc.StatusCode.INVALID_ARGUMENT)
    assert "tensorflow/serving/predict" in err.details()
    # A feature missing, or with the wrong number of values.
    req = regression_pb2.RegressionRequest()
    req.model_spec.name = "regressor"
    req.input.example_list.examples.append(example(y=[1.0, 2.0, 3.0]))
    err = expect_error(predict_stub.Regress, req, grpc.StatusCode.INVALID_ARGUMENT)
    assert "no feature 'x'" in err.details()
    req = regression_pb2.RegressionRequest()
    req.model_spec.name = "regressor"
    req.input.example_list.examples.append(example(x=[1.0, 2.0]))
    expect_error(predict_stub.Regress, req, grpc.StatusCode.INVALID_ARGUMENT)
    # No examples at all.
    req = regression_pb2.RegressionRequest()
    req.model_spec.name = "regressor"
    expect_error(predict_stub.Regress, req, grpc.StatusCode.INVALID_ARGUMENT)
    # MultiInference: tasks on different models, or an unknown method.
    req = inference_pb2.MultiInferenceRequest()
    for name in ("regressor", "mlp"):
        task = req.tasks.add()
        task.model_spec.name = name
        task.method_name = REGRESS
    req.input.example_list.examples.append(example(x=[1.0, 2.0, 3.0]))
    expect_error(predict_stub.MultiInference, req, grpc.StatusCode.INVALID_ARGUMENT)
    # A method MultiInference does not run: UNIMPLEMENTED, as TF Serving answers it.
    del req.tasks[1]
    req.tasks[0].method_name = "tensorflow/serving/predict"
    expect_error(predict_stub.MultiInference, req, grpc.StatusCode.UNIMPLEMENTED)
    # The same signature twice.
    req.tasks[0].method_name = REGRESS
    req.tasks.add().CopyFrom(req.tasks[0])
    err = expect_error(predict_stub.MultiInference, req, grpc.StatusCode.INVALID_ARGUMENT)
    assert "evaluated twice" in err.details()
    # An unknown signature: INVALID_ARGUMENT for Classify and Regress, as in TF Serving
    # (Predict answers FAILED_PRECONDITION).
    req = regression_pb2.RegressionRequest()
    req.model_spec.name = "regressor"
    req.model_spec.signature_name = "nope"
    req.input.example_list.examples.append(example(x=[1.0, 2.0, 3.0]))
    err = expect_error(predict_stub.Regress, req, grpc.StatusCode.INVALID_ARGUMENT)
    assert "no signature 'nope'" in err.details()
    # Unknown model: NOT_FOUND, as for Predict.
    req = regression_pb2.RegressionRequest()
    req.model_spec.name = "no_such_model"
    req.input.example_list.examples.append(example(x=[1.0, 2.0, 3.0]))
    expect_error(predict_stub.Regress, req, grpc.StatusCode.NOT_FOUND)


@pytest.mark.skipif(health_pb2_grpc is None, reason="grpcio-health-checking not installed")
def test_health_per_model(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "regressor", "mlp", "tensorflow.serving.PredictionService", "ModelService"):
        resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING, service
    with pytest.raises(grpc.RpcError) as info:
        health.Check(health_pb2.HealthCheckRequest(service="no_such_model"), timeout=TIMEOUT)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


# ---------------------------------------------------------------------------
# Request logging: TFRecord files of PredictionLog, read with TensorFlow and the official protos
# ---------------------------------------------------------------------------


def test_request_logs_are_prediction_logs_tensorflow_reads(tmp_path):
    """A `file` collector with a `.tfrecord` prefix writes TF Serving's PredictionLog:
    TensorFlow's own TFRecord reader reads the files (checking every CRC) and the official
    protos parse each record, with the request and the answer the client saw."""
    from tensorflow_serving.apis import prediction_log_pb2

    logs = tmp_path / "logs"
    blocks = []
    for name, base in (("mlp", DEMO_MODELS / "mlp"), ("regressor", FIXTURE_MODELS / "regressor")):
        blocks.append(
            "  config {\n"
            f'    name: "{name}" base_path: "{base.resolve()}" model_platform: "pytorch"\n'
            f'    logging_config {{ log_collector_config {{ type: "file" filename_prefix: "{logs / name}.tfrecord" }}\n'
            "      sampling_config { sampling_rate: 1.0 } }\n"
            "  }\n"
        )
    config = tmp_path / "models.config"
    config.write_text("model_config_list {\n" + "".join(blocks) + "}\n")
    srv = ServerProcess([
        str(MODELGATE_BIN), "--port=0", "--rest_api_port=0", "--bind_address=127.0.0.1",
        f"--model_config_file={config}",
        "--prediction_log_file_rotate_bytes=10000",
    ])
    try:
        srv.wait_for_ports(PORT_WAIT)
        host, port = srv.ports["gRPC"]
        with grpc.insecure_channel(f"{host}:{port}", options=CHANNEL_OPTIONS) as ch:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(ch)
            deadline = time.monotonic() + READY_WAIT

            def once_loaded(call, request):
                while True:
                    try:
                        return call(request, timeout=TIMEOUT)
                    except grpc.RpcError as e:
                        if e.code() != grpc.StatusCode.NOT_FOUND or time.monotonic() > deadline:
                            raise
                        time.sleep(0.2)

            images = np.random.default_rng(7).random((1, 784), dtype=np.float32)
            answer = once_loaded(stub.Predict, predict_request("mlp", {"images": images}))
            for _ in range(4):
                stub.Predict(predict_request("mlp", {"images": images}), timeout=TIMEOUT)
            req = regression_pb2.RegressionRequest()
            req.model_spec.name = "regressor"
            req.input.example_list.examples.append(example(x=[1.0, 2.0, 3.0]))
            regressed = once_loaded(stub.Regress, req)
    finally:
        assert srv.stop() == 0, srv.log()

    def read(name):
        files = sorted(str(p) for p in logs.glob(f"{name}-*.tfrecord"))
        records = [prediction_log_pb2.PredictionLog.FromString(r.numpy())
                   for r in tf.data.TFRecordDataset(files)]
        return files, records

    files, records = read("mlp")
    # Each mlp record holds a 784-float request: about 3.4 KB, so 10 KB files rotate.
    assert len(files) >= 2, files
    assert len(records) == 5  # the warm-up replay is not logged
    for record in records:
        assert record.log_metadata.model_spec.name == "mlp"
        assert record.log_metadata.sampling_config.sampling_rate == 1.0
        assert record.WhichOneof("log_type") == "predict_log"
        logged_in = tf.make_ndarray(record.predict_log.request.inputs["images"])
        np.testing.assert_array_equal(logged_in, images)
        logged_out = tf.make_ndarray(record.predict_log.response.outputs["probabilities"])
        np.testing.assert_array_equal(logged_out, tf.make_ndarray(answer.outputs["probabilities"]))
    _, records = read("regressor")
    assert [r.WhichOneof("log_type") for r in records] == ["regress_log"]
    assert records[0].regress_log.response.result == regressed.result
    assert records[0].regress_log.request.input == req.input


def test_on_demand_models_with_the_tf_serving_client(tmp_path, images):
    """--on_demand_models: every model is listed AVAILABLE and answers metadata from its
    files before anything loads; the first Predict loads the version (its warm-up files
    replayed first) and answers as a resident one would."""
    config = tmp_path / "models.config"
    write_config(config)
    srv = ServerProcess([
        str(MODELGATE_BIN), "--port=0", "--rest_api_port=0", "--bind_address=127.0.0.1",
        f"--model_config_file={config}", "--on_demand_models=*",
        "--model_memory_budget=cpu=512MiB",
    ])
    try:
        srv.wait_for_ports(PORT_WAIT)
        host, port = srv.ports["gRPC"]
        with grpc.insecure_channel(f"{host}:{port}", options=CHANNEL_OPTIONS) as ch:
            wait_until_ready(srv, ch, READY_WAIT)
            assert "available on demand" in srv.log(10_000)
            assert "replayed the warm-up requests" not in srv.log(10_000)
            stub = prediction_service_pb2_grpc.PredictionServiceStub(ch)
            req = get_model_metadata_pb2.GetModelMetadataRequest()
            req.model_spec.name = "mlp"
            req.metadata_field.append("signature_def")
            sig_map = get_model_metadata_pb2.SignatureDefMap()
            stub.GetModelMetadata(req, timeout=TIMEOUT).metadata["signature_def"].Unpack(sig_map)
            assert "serving_default" in sig_map.signature_def
            resp = stub.Predict(predict_request("mlp", {"images": images}), timeout=TIMEOUT)
            assert resp.model_spec.version.value == 2
            np.testing.assert_allclose(outputs(resp)["probabilities"].sum(axis=1), np.ones(4), atol=1e-5)
            assert re.search(r'replayed the warm-up requests model="mlp" version=2', srv.log(10_000))
            x = tf.make_tensor_proto([[1.0]], dtype=tf.float32)
            tiny = stub.Predict(predict_request("tiny", {"x": x}), timeout=TIMEOUT)
            np.testing.assert_array_equal(tf.make_ndarray(tiny.outputs["y"]), [[3.0]])
    finally:
        srv.stop()
