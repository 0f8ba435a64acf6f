"""Triton's own benchmark client, perf_analyzer, against the real modelgate binary
(conftest.py starts it), run as a new user would run it: it measures, prints its report,
and reads the server's ModelStatistics before and after, which it refuses (abort, exit
134: "Server side statistics compute counts must be the same") unless compute_input,
compute_infer and compute_output count the same executions.

Run with .venv-perf's python (`make perf-analyzer-test`): the binary is the one that
tritonclient 2.40.0's wheel installs into that venv's bin/."""

import importlib.util
import os
import re
import subprocess
import sysconfig
from pathlib import Path

import pytest

PERF_ANALYZER = Path(sysconfig.get_path("data")) / "bin" / "perf_analyzer"


def perf_analyzer_env():
    """perf_analyzer links libcudart.so.12 even when it uses no GPU: the
    nvidia-cuda-runtime-cu12 wheel's copy, found where this venv installed it."""
    spec = importlib.util.find_spec("nvidia.cuda_runtime")
    if spec is None or not PERF_ANALYZER.exists():
        pytest.fail("no perf_analyzer here: run with .venv-perf/bin/python (make perf-analyzer-test)",
                    pytrace=False)
    lib = Path(next(iter(spec.submodule_search_locations))) / "lib"
    path = os.pathsep.join(filter(None, [str(lib), os.environ.get("LD_LIBRARY_PATH")]))
    return dict(os.environ, LD_LIBRARY_PATH=path)


@pytest.fixture(scope="module")
def batching_server(start_modelgate):
    # With batching on, a model's V2 config has max_batch_size > 0 and its dims without the
    # batch dimension, so perf_analyzer needs no --shape.
    return start_modelgate("--enable_batching")


@pytest.fixture(scope="module")
def plain_server(start_modelgate):
    # The server's default, no batching: the model's config keeps its free batch dimension
    # (max_batch_size 0), for which perf_analyzer asks a --shape, as it does of Triton.
    return start_modelgate()


def run_perf_analyzer(server, protocol, *extra):
    command = [
        str(PERF_ANALYZER), "-m", "tiny", "-i", protocol, "-u", server[protocol], *extra,
        "--concurrency-range", "8",
        # Short windows, and any three in a row taken as stable (-s: their latencies may
        # differ by up to 1000%): on a shared CI machine a debug build is never within the
        # default 10%, and this checks that perf_analyzer completes, not what it measures.
        "--measurement-interval", "500", "--stability-percentage", "1000", "--max-trials", "5",
    ]
    # The timeout only bounds a hang; a run takes about 2 s.
    run = subprocess.run(command, capture_output=True, text=True, timeout=120,
                         env=perf_analyzer_env())
    return run.returncode, run.stdout + run.stderr


def check_report(returncode, report):
    # perf_analyzer also needs every request's queue time: without a queue count it cannot
    # tell which version served (it looks for the version whose count grew when no -x
    # names one) and exits 99.
    assert returncode == 0, report
    assert re.search(r"^\s+Execution count: [1-9]", report, re.MULTILINE), report
    server_side = [line for line in report.splitlines() if "Avg request latency" in line]
    assert len(server_side) == 1, report
    for phase in ("queue", "compute input", "compute infer", "compute output"):
        assert re.search(rf"\+ {phase} \d+ usec", server_side[0]), report


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_perf_analyzer_reports_the_server_side_phases(batching_server, protocol):
    check_report(*run_perf_analyzer(batching_server, protocol))


def test_perf_analyzer_runs_against_the_default_server(plain_server):
    check_report(*run_perf_analyzer(plain_server, "grpc", "--shape", "x:1,1"))
