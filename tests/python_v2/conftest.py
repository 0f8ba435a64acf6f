"""The real modelgate binary for the V2 client tests, serving the test fixtures that the TF
Serving client's tests use. No client library is imported here: tritonclient and kserve
cannot share a process (test_kserve.py).

    MODELGATE_BIN          server binary (default: target/debug/modelgate)
    MODELGATE_TEST_MODELS  fixture repository (default: target/test-models)
"""

import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
MODELGATE_BIN = Path(os.environ.get("MODELGATE_BIN", REPO_ROOT / "target" / "debug" / "modelgate"))
if not MODELGATE_BIN.is_absolute():
    MODELGATE_BIN = REPO_ROOT / MODELGATE_BIN
MODELS = Path(os.environ.get("MODELGATE_TEST_MODELS", REPO_ROOT / "target" / "test-models"))
READY_WAIT = 120


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ready(http):
    try:
        with urllib.request.urlopen(f"http://{http}/v2/health/ready", timeout=5) as answer:
            return answer.status == 200
    except (urllib.error.URLError, OSError):
        return False


@pytest.fixture(scope="module")
def start_modelgate(tmp_path_factory):
    """Starts modelgate with `flags` (on the fixtures' config unless they name one), waits
    until it is ready, and stops every server it started at the end of the module."""
    started = []

    def start(*flags):
        config = MODELS / "fixtures.config"
        if not MODELGATE_BIN.exists() or not config.exists():
            pytest.fail(f"need {MODELGATE_BIN} (cargo build) and {config} (make setup)", pytrace=False)
        grpc_port, rest_port = free_port(), free_port()
        log = tmp_path_factory.mktemp("modelgate") / "server.log"
        if not any(flag.startswith("--model_config_file=") for flag in flags):
            flags = (f"--model_config_file={config}", *flags)
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [str(MODELGATE_BIN), f"--port={grpc_port}", f"--rest_api_port={rest_port}",
                 "--bind_address=127.0.0.1", *flags],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env=dict(os.environ, NO_COLOR="1"),
            )
        started.append(proc)
        http = f"127.0.0.1:{rest_port}"
        deadline = time.monotonic() + READY_WAIT
        while not ready(http):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"modelgate did not become ready:\n{log.read_text()}", pytrace=False)
            time.sleep(0.2)
        return {"grpc": f"127.0.0.1:{grpc_port}", "http": http, "log": log}

    yield start
    for proc in started:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(start_modelgate):
    return start_modelgate()
