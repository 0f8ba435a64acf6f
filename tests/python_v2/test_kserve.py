"""KServe's own V2 clients (the `kserve` package) against the real modelgate binary.

A file of its own, run by a pytest of its own (make v2-test): kserve and tritonclient
register the same `inference.*` protobuf messages, and one process can hold only one.
"""

import asyncio

import numpy as np
from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig


def test_live_ready_model_ready_and_infer(server):
    def request():
        x = InferInput("x", [2, 1], "FP32")
        x.set_data_from_numpy(np.array([[1.0], [-2.0]], dtype=np.float32), binary_data=False)
        return InferRequest(model_name="tiny", infer_inputs=[x], request_id="kserve-1")

    async def grpc_calls():
        client = InferenceGRPCClient(server["grpc"])
        try:
            assert await client.is_server_live()
            assert await client.is_server_ready()
            assert await client.is_model_ready("tiny")
            response = await client.infer(request())
            return response.outputs[0].as_numpy(), response.id
        finally:
            await client.close()

    async def rest_calls():
        client = InferenceRESTClient(RESTConfig(protocol="v2"))
        url = f"http://{server['http']}"
        try:
            assert await client.is_server_live(url)
            assert await client.is_server_ready(url)
            assert await client.is_model_ready(url, "tiny")
            response = await client.infer(url, request(), model_name="tiny")
            return response.outputs[0].as_numpy(), response.id
        finally:
            await client.close()

    expected = np.array([[3.0], [-3.0]], dtype=np.float32)
    for calls in (grpc_calls, rest_calls):
        y, request_id = asyncio.run(calls())
        np.testing.assert_array_equal(y, expected)
        assert request_id == "kserve-1"
