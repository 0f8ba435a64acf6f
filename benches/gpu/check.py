#!/usr/bin/env python3
"""The device checks of the PyTorch 2 and residency issues, against the release binary.

    python benches/gpu/check.py cuda   # on a GPU machine (benches/gpu/run.sh runs it)
    python benches/gpu/check.py cpu    # the same checks here, to try the script itself

With the project's export command it writes, for DEVICE: `pair` (two inputs, two outputs)
as an AOTInductor package compiled for DEVICE, `small` as TorchScript, and an mlp as
TorchScript and as a package. Then, over REST on 127.0.0.1:

1. outputs equal PyTorch's own (`aoti_load_package`, `torch.jit.load`) on DEVICE, the two
   outputs in order, and concurrent 1-row requests each get their own row's answer;
2. every version's measured resident bytes on DEVICE, next to its parameters' bytes;
3. a package kept unpacked while loaded (CUDA packages need their directory) is removed
   when its version unloads;
4. a hot swap of `small` from TorchScript to a package under load: no failed request, and
   then the package's answers;
5. three mlp copies on demand in a DEVICE budget that holds two: every request answered,
   resident bytes never above the budget, evictions counted.

Prints one line per check and exits 1 if any failed.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

import torch

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BINARY = os.environ.get("MODELGATE_BINARY", os.path.join(ROOT, "target/release/modelgate"))
# V2 repository load and unload need the admin token (they are off without one).
ADMIN_TOKEN = "gpu-check"
FAILED = []


def check(ok, what):
    print(f"{'PASS' if ok else 'FAIL'} {what}", flush=True)
    if not ok:
        FAILED.append(what)


def export(factory, inputs, out, fmt, device, outputs=()):
    """The documented export command, as a user runs it."""
    command = [sys.executable, os.path.join(ROOT, "tools/modelgate_export.py"), factory,
               "--out", out, "--format", fmt, "--device", device]
    for spec in inputs:
        command += ["--input", spec]
    for name in outputs:
        command += ["--output", name]
    started = time.time()
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    print(f"     exported {os.path.basename(out)} ({fmt}, {device}) in {time.time() - started:.1f} s")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, work, models, device, flags=()):
        self.rest = free_port()
        config = os.path.join(work, f"models-{self.rest}.config")
        with open(config, "w") as f:
            f.write("model_config_list {\n")
            for name in models:
                f.write(f'  config {{ name: "{name}" base_path: "{work}/{name}" '
                        f'model_platform: "pytorch" }}\n')
            f.write("}\n")
        self.log_path = os.path.join(work, f"server-{self.rest}.log")
        self.log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            [BINARY, f"--model_config_file={config}", f"--port={free_port()}",
             f"--rest_api_port={self.rest}", f"--device={device}",
             f"--admin_token={ADMIN_TOKEN}", *flags],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"the server exited: see {self.log_path}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.rest}/readyz", timeout=2)
                return
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.3)
        raise SystemExit(f"the server was not ready in 300 s: see {self.log_path}")

    def call(self, method, path, body=None):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{self.rest}{path}", data=data,
                                         method=method,
                                         headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        with urllib.request.urlopen(request, timeout=120) as response:
            text = response.read().decode()
        return json.loads(text) if text.startswith("{") else text

    def predict(self, model, inputs):
        body = {"inputs": {name: t.tolist() for name, t in inputs.items()}}
        outputs = self.call("POST", f"/v1/models/{model}:predict", body)["outputs"]
        return outputs if isinstance(outputs, dict) else {"": outputs}

    def metric(self, name, **labels):
        """Every sample of `name` whose labels include `labels`: {label text: value}."""
        found = {}
        for line in self.call("GET", "/metrics").splitlines():
            if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
                text, value = line.rsplit(" ", 1)
                found[text[len(name):]] = float(value)
        return found

    def stop(self):
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=60)
        check(code == 0, f"the server exits 0 on SIGTERM (got {code})")
        self.log.close()


def close(got, want):
    got = torch.tensor(got, dtype=torch.float32)
    return got.shape == want.shape and torch.allclose(got, want.cpu(), rtol=1e-4, atol=1e-5)


def param_bytes(module):
    return sum(t.numel() * t.element_size()
               for t in list(module.parameters()) + list(module.buffers()))


def kept_unpack_dirs(pid):
    """The package directories a server with `pid` keeps, as runtime marks them."""
    kept = []
    for entry in os.listdir("/tmp"):
        marker = os.path.join("/tmp", entry, ".modelgate-owner")
        try:
            with open(marker) as f:
                if f.read().split()[0] == str(pid):
                    kept.append(entry)
        except (OSError, IndexError):
            pass
    return kept


def main(device):
    torch.manual_seed(0)
    work = tempfile.mkdtemp(prefix="modelgate-device-check-")
    os.chmod(work, 0o755)
    print(f"device {device}; torch {torch.__version__}; work {work}", flush=True)
    export("models.pt2_fixtures:Pair", ["a:float32:2,3", "b:float32:2,2"], f"{work}/pair", "pt2",
           device, outputs=("scaled", "residual"))
    export("models.pt2_fixtures:Small", ["x:float32:2,4"], f"{work}/small", "torchscript", device)
    export("models.pt2_fixtures:Small", ["x:float32:2,4"], f"{work}/staged", "pt2", device)
    export("models.bench_pt2:Mlp", ["x:float32:2,784"], f"{work}/mlp_a", "torchscript", device)
    shutil.copytree(f"{work}/mlp_a", f"{work}/mlp_b")
    export("models.bench_pt2:Mlp", ["x:float32:2,784"], f"{work}/mlp_c", "pt2", device)
    package = torch._inductor.aoti_load_package(f"{work}/pair/1/model.pt2")
    scripted = torch.jit.load(f"{work}/small/1/model.pt", map_location=device).eval()

    # 1-3: one server, every model resident.
    server = Server(work, ["pair", "small", "mlp_a", "mlp_c"], device,
                    ["--enable_batching", "--file_system_poll_wait_seconds=1"])
    a, b = torch.randn(3, 3), torch.randn(3, 2)
    with torch.no_grad():
        want = package(a.to(device), b.to(device))
    got = server.predict("pair", {"a": a, "b": b})
    check(list(got) == ["scaled", "residual"] and close(got["scaled"], want[0])
          and close(got["residual"], want[1]),
          "pair (.pt2): both outputs equal aoti_load_package's, in order")
    x = torch.randn(5, 4)
    with torch.no_grad():
        want = scripted(x.to(device))
    check(close(next(iter(server.predict("small", {"x": x}).values())), want),
          "small (TorchScript): outputs equal torch.jit.load's")

    wrong = []

    def client(seed):
        generator = torch.Generator().manual_seed(seed)
        for _ in range(8):
            a, b = torch.randn(1, 3, generator=generator), torch.randn(1, 2, generator=generator)
            with torch.no_grad():
                want = package(a.to(device), b.to(device))
            got = server.predict("pair", {"a": a, "b": b})
            if not (close(got["scaled"], want[0]) and close(got["residual"], want[1])):
                wrong.append(seed)
    clients = [threading.Thread(target=client, args=(seed,)) for seed in range(32)]
    for t in clients:
        t.start()
    for t in clients:
        t.join()
    check(not wrong, f"32 concurrent clients x 8 one-row requests, batched: each its own answer "
                     f"({len(wrong)} wrong)")

    modules = {"pair": package, "small": scripted,
               "mlp_a": torch.jit.load(f"{work}/mlp_a/1/model.pt", map_location=device)}
    resident = {}
    for model in ["pair", "small", "mlp_a", "mlp_c"]:
        samples = server.metric("modelgate_model_resident_bytes", model=model)
        on_device = {k: v for k, v in samples.items() if device in k}
        resident[model] = sum(on_device.values())
        params = param_bytes(modules[model]) if model in ("small", "mlp_a") else None
        print(f"     {model}: resident {samples}; parameters+buffers {params}")
        check(resident[model] > 0, f"{model}: resident bytes measured on {device}")
        if params is not None:
            check(resident[model] >= params,
                  f"{model}: resident {resident[model]:.0f} B >= its tensors' {params} B")

    kept = kept_unpack_dirs(server.process.pid)
    print(f"     unpacked package directories kept while loaded: {kept}")
    server.call("POST", "/v2/repository/models/pair/unload", {})
    time.sleep(2)
    left = kept_unpack_dirs(server.process.pid)
    check(len(left) < len(kept) or (device == "cpu" and not kept),
          f"unloading pair removes what it unpacked (kept {len(kept)}, then {len(left)})")

    stop, answered, failures = threading.Event(), [0], []

    def load():
        x = torch.randn(1, 4)
        while not stop.is_set():
            try:
                server.predict("small", {"x": x})
                answered[0] += 1
            except (urllib.error.URLError, ConnectionError) as error:
                failures.append(str(error))
    clients = [threading.Thread(target=load) for _ in range(8)]
    for t in clients:
        t.start()
    time.sleep(1)
    # A version appears whole: copied beside, then renamed into place.
    shutil.copytree(f"{work}/staged/1", f"{work}/small/.2")
    os.rename(f"{work}/small/.2", f"{work}/small/2")
    deadline, states, swapped = time.time() + 120, [], False
    while time.time() < deadline and not swapped:
        states = [(v["version"], v["state"])
                  for v in server.call("GET", "/v1/models/small")["model_version_status"]]
        swapped = sorted(states) == [("1", "END"), ("2", "AVAILABLE")]
        time.sleep(0.2)
    time.sleep(1)
    stop.set()
    for t in clients:
        t.join()
    check(swapped and not failures,
          f"TorchScript -> package hot swap under load: {answered[0]} answered, "
          f"{len(failures)} failed {failures[:3]}; versions then {states}")
    package_v2 = torch._inductor.aoti_load_package(f"{work}/small/2/model.pt2")
    x = torch.randn(3, 4)
    with torch.no_grad():
        want = package_v2(x.to(device))
    check(close(next(iter(server.predict("small", {"x": x}).values())), want),
          "small after the swap: outputs equal aoti_load_package's")
    server.stop()

    # 5: three mlp copies on demand in a budget for two.
    sizes = sorted([resident["mlp_a"], resident["mlp_a"], resident["mlp_c"]], reverse=True)
    budget_kib = int((sizes[0] + sizes[1]) * 1.05 / 1024) + 1
    budget_device = "cuda:0" if device == "cuda" else "cpu"
    server = Server(work, ["mlp_a", "mlp_b", "mlp_c"], device, [
        "--on_demand_models=mlp_a,mlp_b,mlp_c",
        f"--model_memory_budget={budget_device}={budget_kib}KiB"])
    x = torch.randn(2, 784)
    answered, peak = 0, 0.0
    for model in ["mlp_a", "mlp_b", "mlp_c"] * 4:
        try:
            server.predict(model, {"x": x})
            answered += 1
        except urllib.error.HTTPError as error:
            print(f"     {model}: HTTP {error.code} {error.read().decode()[:200]}")
        held = server.metric("modelgate_model_resident_bytes", device=budget_device)
        peak = max(peak, sum(held.values()))
    evictions = sum(server.metric("modelgate_model_evictions_total").values())
    check(answered == 12, f"on demand, budget {budget_kib} KiB on {budget_device}: "
                          f"{answered} of 12 requests answered")
    check(peak <= budget_kib * 1024, f"resident bytes peaked at {peak:.0f} <= budget "
                                     f"{budget_kib * 1024}")
    check(evictions >= 9, f"evictions counted: {evictions:.0f} (round robin over three in "
                          f"room for two evicts on every load after the second)")
    server.stop()

    if FAILED:
        print(f"{len(FAILED)} check(s) failed; logs in {work}")
        return 1
    shutil.rmtree(work, ignore_errors=True)
    print("all device checks passed")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in ("cpu", "cuda"):
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1]))
