"""The official Triton clients (tritonclient.grpc and tritonclient.http, the V2 / Open
Inference Protocol) against the real modelgate binary (conftest.py starts it)."""

import json
import os
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException


@pytest.fixture(scope="module")
def grpc_client(server):
    return grpcclient.InferenceServerClient(server["grpc"])


@pytest.fixture(scope="module")
def http_client(server):
    return httpclient.InferenceServerClient(server["http"])


def both(server):
    return [(grpcclient, grpcclient.InferenceServerClient(server["grpc"])),
            (httpclient, httpclient.InferenceServerClient(server["http"]))]


def test_health_and_server_metadata(server):
    for _, client in both(server):
        assert client.is_server_live()
        assert client.is_server_ready()
        assert client.is_model_ready("tiny")
        assert client.is_model_ready("scaled", "2")
        assert not client.is_model_ready("scaled", "9")
        # A model the server does not have is not ready, and no error (as Triton answers).
        assert not client.is_model_ready("nope")
    metadata = grpcclient.InferenceServerClient(server["grpc"]).get_server_metadata()
    assert metadata.name == "modelgate"
    assert "binary_tensor_data" in metadata.extensions
    rest = httpclient.InferenceServerClient(server["http"]).get_server_metadata()
    assert rest["name"] == "modelgate"
    with urllib.request.urlopen(f"http://{server['http']}/v2/health/live") as answer:
        assert answer.status == 200 and answer.read() == b'{"live":true}'
    # Over HTTP, not ready is a 400 whether the model is loading or unknown (Triton's answer).
    for path in ("/v2/models/nope/ready", "/v2/models/scaled/versions/9/ready"):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"http://{server['http']}{path}")
        assert refused.value.code == 400, path
        assert json.loads(refused.value.read())["ready"] is False


def test_model_metadata_and_config(grpc_client, http_client):
    metadata = grpc_client.get_model_metadata("scaled", as_json=True)
    assert metadata["name"] == "scaled"
    assert metadata["versions"] == ["1", "2", "3"]
    assert metadata["platform"] == "pytorch_libtorch"
    assert metadata["inputs"] == [{"name": "x", "datatype": "FP32", "shape": ["-1", "-1"]}]
    rest = http_client.get_model_metadata("multi")
    assert [i["name"] for i in rest["inputs"]] == ["a", "b"]
    assert rest["outputs"][0] == {"name": "sum", "datatype": "FP32", "shape": [-1, 3]}

    config = grpc_client.get_model_config("multi", as_json=True)["config"]
    assert config["name"] == "multi"
    assert config["input"][0]["data_type"] == "TYPE_FP32"
    # No batching: max_batch_size 0 and the full shape, batch dimension included.
    assert config["input"][0]["dims"] == ["-1", "3"]
    assert http_client.get_model_config("multi")["input"][1]["name"] == "b"


def tiny_input(module, values):
    x = module.InferInput("x", list(values.shape), "FP32")
    x.set_data_from_numpy(values)
    return x


def test_infer_on_both_protocols(server):
    x = np.array([[1.0], [2.5], [-4.0]], dtype=np.float32)
    for module, client in both(server):
        result = client.infer("tiny", [tiny_input(module, x)], request_id="req-7")
        np.testing.assert_array_equal(result.as_numpy("y"), 2 * x + 1)
        assert result.get_response(as_json=True)["id"] == "req-7" if module is grpcclient \
            else result.get_response()["id"] == "req-7"


def test_http_json_and_binary_tensors(http_client):
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.full((2, 3), 0.5, dtype=np.float32)
    for binary in (True, False):
        inputs = [httpclient.InferInput("a", [2, 3], "FP32"), httpclient.InferInput("b", [2, 3], "FP32")]
        inputs[0].set_data_from_numpy(a, binary_data=binary)
        inputs[1].set_data_from_numpy(b, binary_data=not binary)
        outputs = [httpclient.InferRequestedOutput("product", binary_data=binary)]
        result = http_client.infer("multi", inputs, outputs=outputs)
        np.testing.assert_array_equal(result.as_numpy("product"), a * b)
        assert result.as_numpy("sum") is None  # only what was asked for


def test_versions_and_labels(grpc_client):
    x = np.ones((1, 2), dtype=np.float32)
    for version, factor in (("", 3), ("1", 1), ("2", 2), ("stable", 1)):
        result = grpc_client.infer("scaled", [tiny_input(grpcclient, x)], model_version=version)
        np.testing.assert_array_equal(result.as_numpy("y"), factor * x)
        response = result.get_response()
        assert response.model_version == str(factor)


def test_every_served_datatype_round_trips(server):
    """echo has one signature per dtype; the signature_name parameter picks it."""
    cases = [("float32", "FP32", np.float32), ("float64", "FP64", np.float64),
             ("int8", "INT8", np.int8), ("int16", "INT16", np.int16), ("int32", "INT32", np.int32),
             ("int64", "INT64", np.int64), ("uint8", "UINT8", np.uint8), ("bool", "BOOL", np.bool_),
             ("float16", "FP16", np.float16)]
    for module, client in both(server):
        for signature, datatype, dtype in cases:
            values = np.array([[1, 0, 3], [4, 5, 1]]).astype(dtype)
            x = module.InferInput("x", [2, 3], datatype)
            x.set_data_from_numpy(values)
            result = client.infer("echo", [x], parameters={"signature_name": signature})
            got = result.as_numpy("y")
            assert got.dtype == dtype, (module.__name__, datatype, got.dtype)
            np.testing.assert_array_equal(got, values)
    # And as JSON over HTTP, both ways (FP16 goes in only as binary data, as in Triton, and
    # comes back as JSON numbers, exactly).
    client = httpclient.InferenceServerClient(server["http"])
    for signature, datatype, dtype in cases:
        values = np.array([[1, 0, 3], [4, 5, 1]]).astype(dtype)
        if dtype == np.float16:
            values = np.array([[0.1, -2.5, 65504], [6e-8, 1, 0]]).astype(dtype)
        x = httpclient.InferInput("x", [2, 3], datatype)
        x.set_data_from_numpy(values, binary_data=dtype == np.float16)
        y = httpclient.InferRequestedOutput("y", binary_data=False)
        result = client.infer("echo", [x], outputs=[y], parameters={"signature_name": signature})
        assert "data" in result.get_output("y"), result.get_response()
        got = result.as_numpy("y")
        assert got.dtype == dtype, (datatype, got.dtype)
        np.testing.assert_array_equal(got, values)


def test_non_finite_floats_travel_as_json_tokens(server):
    """Triton reads and writes NaN, Infinity and -Infinity in JSON data; an infinity must
    not come back as NaN (null)."""
    client = httpclient.InferenceServerClient(server["http"])
    for signature, datatype, dtype in (("float32", "FP32", np.float32),
                                       ("float64", "FP64", np.float64)):
        values = np.array([[np.nan, np.inf, -np.inf]], dtype=dtype)
        x = httpclient.InferInput("x", [1, 3], datatype)
        x.set_data_from_numpy(values, binary_data=False)
        y = httpclient.InferRequestedOutput("y", binary_data=False)
        result = client.infer("echo", [x], outputs=[y], parameters={"signature_name": signature})
        assert "data" in result.get_output("y"), result.get_response()
        np.testing.assert_array_equal(result.as_numpy("y"), values)


def test_concurrent_async_calls_batch_into_one_forward(start_modelgate, tmp_path):
    """tritonclient's async calls, sent at once to a batching server, are one forward (the
    counter fixture counts its forwards; its `count` signature reads the count)."""
    from conftest import MODELS

    config = tmp_path / "counter.config"
    config.write_text(
        'model_config_list { config { name: "counter" base_path: "%s" model_platform: "pytorch" } }\n'
        % (MODELS / "counter"))
    params = tmp_path / "batching.config"
    params.write_text("max_batch_size { value: 8 } batch_timeout_micros { value: 10000000 } "
                      "num_batch_threads { value: 1 }\n")
    batching = start_modelgate(f"--model_config_file={config}", "--enable_batching",
                               f"--batching_parameters_file={params}")
    client = grpcclient.InferenceServerClient(batching["grpc"])

    def forwards():
        x = grpcclient.InferInput("x", [1], "FP32")
        x.set_data_from_numpy(np.zeros(1, dtype=np.float32))
        result = client.infer("counter", [x], parameters={"signature_name": "count"})
        return int(result.as_numpy("calls")[0])

    before = forwards()
    done = []
    for i in range(8):
        x = grpcclient.InferInput("x", [1, 2], "FP32")
        x.set_data_from_numpy(np.array([[i, 0]], dtype=np.float32))
        client.async_infer("counter", [x], callback=lambda result, error, i=i: done.append((i, result, error)))
    deadline = time.monotonic() + 60
    while len(done) < 8 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(done) == 8
    for i, result, error in done:
        assert error is None, error
        np.testing.assert_array_equal(result.as_numpy("y"), [[2.0 * i]])
    assert forwards() - before == 1, "8 async calls, one forward"


def test_pytorch2_package_answers_as_pytorch_over_both_protocols(start_modelgate, tmp_path):
    """An AOTInductor package (model.pt2, made by the export command) with two inputs and
    two outputs: both protocols answer exactly what PyTorch's own loader answered."""
    import json
    from conftest import REPO_ROOT

    pt2 = REPO_ROOT / "target" / "pt2-models"
    config = tmp_path / "pt2.config"
    config.write_text(
        'model_config_list { config { name: "pair" base_path: "%s" model_platform: "pytorch" } }\n'
        % (pt2 / "pair"))
    served = start_modelgate(f"--model_config_file={config}")
    case = json.loads((pt2 / "expected.json").read_text())["pair"]
    arrays = {name: np.array(t["values"], dtype=np.float32).reshape(t["shape"])
              for name, t in case["inputs"].items()}
    for module, client in [(grpcclient, grpcclient.InferenceServerClient(served["grpc"])),
                           (httpclient, httpclient.InferenceServerClient(served["http"]))]:
        assert client.is_model_ready("pair")
        inputs = []
        for name, array in arrays.items():
            tensor = module.InferInput(name, list(array.shape), "FP32")
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        result = client.infer("pair", inputs)
        for name, want in zip(["mixed", "offset"], case["outputs"]):
            expected = np.array(want["values"], dtype=np.float32).reshape(want["shape"])
            np.testing.assert_array_equal(result.as_numpy(name), expected)
    metadata = grpcclient.InferenceServerClient(served["grpc"]).get_model_metadata("pair", as_json=True)
    assert [i["name"] for i in metadata["inputs"]] == ["a", "b"]
    assert [o["name"] for o in metadata["outputs"]] == ["mixed", "offset"]


def test_errors_are_clear_and_coded(server):
    x = np.ones((1, 1), dtype=np.float32)
    for module, client in both(server):
        with pytest.raises(InferenceServerException) as unknown:
            client.infer("nope", [tiny_input(module, x)])
        assert "not served here" in unknown.value.message()
        wrong = module.InferInput("x", [1, 1], "INT32")
        wrong.set_data_from_numpy(np.ones((1, 1), dtype=np.int32))
        with pytest.raises(InferenceServerException) as mistyped:
            client.infer("tiny", [wrong])
        assert "dtype" in mistyped.value.message()
        with pytest.raises(InferenceServerException) as missing:
            client.infer("tiny", [tiny_input(module, x)], model_version="7")
        assert "no available version 7" in missing.value.message()
    grpc = grpcclient.InferenceServerClient(server["grpc"])
    with pytest.raises(InferenceServerException) as status:
        grpc.infer("nope", [tiny_input(grpcclient, x)])
    assert status.value.status() == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException) as shm:
        grpc.get_system_shared_memory_status()
    assert shm.value.status() == "StatusCode.UNIMPLEMENTED"
    text = grpcclient.InferInput("x", [1], "BYTES")
    text.set_data_from_numpy(np.array([b"hi"], dtype=np.object_))
    with pytest.raises(InferenceServerException) as strings:
        grpc.infer("tiny", [text])
    assert "BYTES" in strings.value.message()
    assert strings.value.status() == "StatusCode.INVALID_ARGUMENT"


def test_v2_requests_are_counted_under_their_protocol(server, grpc_client, http_client):
    x = np.ones((1, 1), dtype=np.float32)
    grpc_client.infer("tiny", [tiny_input(grpcclient, x)])
    http_client.infer("tiny", [tiny_input(httpclient, x)])
    with urllib.request.urlopen(f"http://{server['http']}/metrics") as answer:
        metrics = answer.read().decode()
    for protocol in ("v2-grpc", "v2-rest"):
        assert any(f'protocol="{protocol}"' in line and 'model="tiny"' in line
                   for line in metrics.splitlines()), protocol


def test_statistics_count_what_each_version_answered(server):
    x = np.ones((1, 2), dtype=np.float32)
    grpc = grpcclient.InferenceServerClient(server["grpc"])
    rest = httpclient.InferenceServerClient(server["http"])
    before = grpc.get_inference_statistics("scaled", "2", as_json=True)["model_stats"][0]
    for _ in range(3):
        grpc.infer("scaled", [tiny_input(grpcclient, x)], model_version="2")
    after = grpc.get_inference_statistics("scaled", "2", as_json=True)["model_stats"]
    assert [(s["name"], s["version"]) for s in after] == [("scaled", "2")]
    success = lambda stats: int(stats["inference_stats"]["success"].get("count", 0))
    assert success(after[0]) == success(before) + 3
    assert int(after[0]["execution_count"]) >= 3
    assert int(after[0]["inference_stats"]["compute_infer"]["ns"]) > 0
    assert int(after[0]["last_inference"]) > 0
    every = rest.get_inference_statistics("scaled")["model_stats"]
    assert [s["version"] for s in every] == ["1", "2", "3"]
    assert success(every[1]) == success(after[0])
    with pytest.raises(InferenceServerException) as unknown:
        rest.get_inference_statistics("nope")
    assert "not served here" in unknown.value.message()


def index_entry(index, name, version):
    return next(e for e in index if e["name"] == name and e.get("version") == version)


def test_repository_index_lists_configured_versions(server):
    grpc = grpcclient.InferenceServerClient(server["grpc"])
    index = grpc.get_model_repository_index(as_json=True)["models"]
    scaled = index_entry(index, "scaled", "2")
    assert scaled["state"] == "READY"
    # A ready version's reason says what it holds.
    assert scaled["reason"].startswith("resident: ") and scaled["reason"].endswith(" on cpu")
    rest = httpclient.InferenceServerClient(server["http"]).get_model_repository_index()
    assert index_entry(rest, "tiny", "1")["state"] == "READY"


def test_on_demand_models_load_on_their_first_infer(start_modelgate):
    on_demand = start_modelgate("--on_demand_models=*", "--pinned_models=tiny",
                                "--model_memory_budget=cpu=64MiB")
    grpc = grpcclient.InferenceServerClient(on_demand["grpc"])
    rest = httpclient.InferenceServerClient(on_demand["http"])
    # Listed and ready from their files; nothing but the pinned model is resident.
    assert grpc.is_model_ready("scaled", "2")
    index = grpc.get_model_repository_index(as_json=True)["models"]
    assert "not resident" in index_entry(index, "scaled", "2")["reason"]
    assert index_entry(index, "tiny", "1")["reason"].startswith("resident: ")
    assert [i["name"] for i in rest.get_model_metadata("scaled", "2")["inputs"]] == ["x"]
    x = np.array([[1.0, 2.0]], dtype=np.float32)
    for module, client in ((grpcclient, grpc), (httpclient, rest)):
        result = client.infer("scaled", [tiny_input(module, x)], model_version="2")
        np.testing.assert_array_equal(result.as_numpy("y"), 2 * x)
    index = rest.get_model_repository_index()
    assert index_entry(index, "scaled", "2")["reason"].startswith("on demand, resident: ")
    with urllib.request.urlopen(f"http://{on_demand['http']}/metrics") as answer:
        metrics = answer.read().decode()
    assert 'modelgate_model_loads_total{model="scaled",outcome="success",reason="on_demand"} 1' \
        in metrics


def test_repository_load_and_unload_are_off_without_an_admin_token(server):
    for _, client in both(server):
        for call in (client.unload_model, client.load_model):
            with pytest.raises(InferenceServerException) as refused:
                call("tiny", headers={"authorization": "Bearer anything"})
            assert "--admin_token" in refused.value.message()
        assert client.is_model_ready("tiny")


def test_repository_unload_and_load_act_on_the_running_config(start_modelgate):
    secured = start_modelgate("--admin_token=s3cret")
    x = np.ones((1, 1), dtype=np.float32)
    token = {"authorization": "Bearer s3cret"}
    for module, client in both(secured):
        client.unload_model("tiny", headers=token)
        # No longer configured: not ready over both protocols, as Triton answers a model
        # it does not have (REST's 404 reads as not ready; gRPC answers ready: false).
        assert not client.is_model_ready("tiny")
        # Still in the index, as Triton lists an unloaded model, so that it can be loaded back.
        index = client.get_model_repository_index()
        if module is grpcclient:
            index = [{"name": m.name, "version": m.version, "state": m.state, "reason": m.reason}
                     for m in index.models]
        tiny = [e for e in index if e["name"] == "tiny"]
        assert [(e["state"], e["reason"]) for e in tiny] == [("UNAVAILABLE", "unloaded")], index
        assert not tiny[0].get("version"), tiny
        with pytest.raises(InferenceServerException) as gone:
            client.infer("tiny", [tiny_input(module, x)])
        assert "not served here" in gone.value.message()
        client.load_model("tiny", headers=token)  # back from its entry in the model config file
        assert client.is_model_ready("tiny")
        index = client.get_model_repository_index()
        if module is grpcclient:
            index = [{"name": m.name, "reason": m.reason} for m in index.models]
        assert all(e.get("reason") != "unloaded" for e in index if e["name"] == "tiny"), index
        np.testing.assert_array_equal(client.infer("tiny", [tiny_input(module, x)]).as_numpy("y"), 3 * x)
        with pytest.raises(InferenceServerException) as unknown:
            client.load_model("nope", headers=token)
        assert "not in the model config" in unknown.value.message()
        with pytest.raises(InferenceServerException) as override:
            client.load_model("tiny", headers=token, config='{"max_batch_size": 8}')
        assert "takes no parameters" in override.value.message()
        with pytest.raises(InferenceServerException) as absent:
            client.unload_model("nope", headers=token)
        assert "not in the running config" in absent.value.message()


def test_a_repository_load_that_leaves_nothing_serving_fails_and_a_second_one_retries(
        start_modelgate, tmp_path):
    """Triton answers a failed load with an error; a load of a model whose entry did not
    change lists it again and retries its failed versions (no polling here to do it)."""
    import shutil
    from conftest import MODELS
    (tmp_path / "fixme" / "1").mkdir(parents=True)
    broken = tmp_path / "fixme" / "1" / "model.pt"
    broken.write_bytes(b"not a TorchScript archive")
    config = tmp_path / "models.config"
    entry = 'config {{ name: "{}" base_path: "{}" model_platform: "pytorch" }}'
    config.write_text("model_config_list { " + entry.format("tiny", MODELS / "tiny") + " }")
    secured = start_modelgate(f"--model_config_file={config}", "--admin_token=s3cret",
                              "--file_system_poll_wait_seconds=0")
    config.write_text("model_config_list { " + entry.format("tiny", MODELS / "tiny") + " "
                      + entry.format("fixme", tmp_path / "fixme") + " }")
    token = {"authorization": "Bearer s3cret"}
    for _, client in both(secured):
        with pytest.raises(InferenceServerException) as failed:
            client.load_model("fixme", headers=token)
        assert "version 1" in failed.value.message(), failed.value.message()
        assert not client.is_model_ready("fixme")
    shutil.copy(MODELS / "tiny" / "1" / "model.pt", broken)
    client = httpclient.InferenceServerClient(secured["http"])
    client.load_model("fixme", headers=token)
    assert client.is_model_ready("fixme")


def test_repository_changes_need_the_admin_token(start_modelgate):
    secured = start_modelgate("--admin_token=s3cret")
    grpc = grpcclient.InferenceServerClient(secured["grpc"])
    rest = httpclient.InferenceServerClient(secured["http"])
    for client in (grpc, rest):
        for headers in (None, {"authorization": "Bearer wrong"}):
            with pytest.raises(InferenceServerException) as refused:
                client.unload_model("tiny", headers=headers)
            assert "admin token" in refused.value.message()
        assert client.is_model_ready("tiny")
    grpc.unload_model("tiny", headers={"authorization": "Bearer s3cret"})
    assert not rest.is_model_ready("tiny")
    rest.load_model("tiny", headers={"Authorization": "Bearer s3cret"})
    assert grpc.is_model_ready("tiny")
