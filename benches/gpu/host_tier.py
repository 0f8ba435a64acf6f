#!/usr/bin/env python3
"""Facts for the host tier of the residency issue, measured in PyTorch itself: how long a
version takes to come back to the GPU from host memory against a reload from disk, and
whether it comes back whole. The server has no host tier yet; these numbers size it.

    python benches/gpu/host_tier.py cuda   # after the formats step (its ResNet-50 models)
    python benches/gpu/host_tier.py cpu    # the bench's CNN on the CPU, to try the script

It uses table 6's models (`models/bench_pt2.py export`, seed 0, so the module is rebuilt
with the same weights): ResNet-50 on cuda, the small CNN on cpu. For the TorchScript file:
reload (torch.jit.load onto the device + one forward) against demotion to pageable or
pinned host memory and promotion back (`.to`), the device memory each frees, and whether
outputs survive the round trip; a traced constant, which `.to` does not move. For the
package: a reload (aoti_load_package + one forward) against loading its constants from
host copies (`load_constants`), and the outputs after. Median of 5 runs each; prints JSON
lines.
"""

import json
import os
import statistics
import sys
import time

import torch

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "models"))
import bench_pt2  # noqa: E402

RUNS = 5


def report(**fields):
    print(json.dumps(fields), flush=True)


def main(device):
    on_gpu = device == "cuda"
    name, base = ("resnet50", "target/bench-pt2-cuda") if on_gpu else ("cnn", "target/bench-pt2")
    base = os.path.join(ROOT, base)
    cls, inputs = bench_pt2.models_on(device)[name]
    x = torch.randn(1, *next(iter(inputs.values())), device=device)

    def sync():
        if on_gpu:
            torch.cuda.synchronize()

    def allocated():
        return torch.cuda.memory_allocated() if on_gpu else 0

    def timed(step):
        """Median seconds of `step()` (which ends with a forward) over RUNS runs."""
        times = []
        for _ in range(RUNS):
            sync()
            started = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - started)
        return statistics.median(times)

    torch.manual_seed(0)
    module = cls().eval()
    tensor_bytes = sum(t.numel() * t.element_size()
                       for t in list(module.parameters()) + list(module.buffers()))

    # TorchScript: reload against demote/promote.
    path = f"{base}/{name}_ts/1/model.pt"
    with torch.no_grad():
        scripted = torch.jit.load(path, map_location=device).eval()
        want = scripted(x)
        reload_s = timed(lambda: torch.jit.load(path, map_location=device)(x))
        before = allocated()
        demote_s = timed(lambda: scripted.to("cpu"))
        freed = before - allocated()
        promote_s = timed(lambda: (scripted.to(device), scripted(x)))
        same = torch.allclose(scripted(x), want)

        def pin():
            for tensors in (scripted.parameters(), scripted.buffers()):
                for t in tensors:
                    t.data = t.data.pin_memory() if on_gpu else t.data

        def promote_pinned():
            scripted.to("cpu")
            pin()
            sync()
            started = time.perf_counter()
            scripted.to(device, non_blocking=True)
            scripted(x)
            sync()
            return time.perf_counter() - started

        pinned_s = statistics.median(promote_pinned() for _ in range(RUNS))
        same_pinned = torch.allclose(scripted(x), want)
    report(model=name, form="torchscript", device=device, tensor_bytes=tensor_bytes,
           reload_s=reload_s, demote_s=demote_s, device_bytes_freed_by_demotion=freed,
           promote_pageable_s=promote_s, promote_pinned_s=pinned_s,
           outputs_equal_after_round_trip=same and same_pinned)

    # A traced constant stays where it was traced: `.to` moves parameters and buffers only.
    class WithConstant(torch.nn.Module):
        def forward(self, v):
            return v + torch.arange(3.0, device=v.device)

    traced = torch.jit.trace(WithConstant(), torch.zeros(2, 3, device=device))
    traced.to("cpu")
    try:
        traced(torch.zeros(2, 3))
        constant_follows = True
    except RuntimeError:
        constant_follows = False
    report(model="traced_constant", device=device, runs_on_cpu_after_to_cpu=constant_follows)

    # The package: reload against loading its constants from host copies.
    path = f"{base}/{name}_aoti/1/model.pt2"
    package = torch._inductor.aoti_load_package(path)
    with torch.no_grad():
        want = package(x)
        reload_s = timed(lambda: torch._inductor.aoti_load_package(path)(x))
        fqns = package.get_constant_fqns()
        state = module.state_dict()
        host = {fqn: state[fqn].contiguous() for fqn in fqns if fqn in state}
        if on_gpu:
            host = {fqn: t.pin_memory() for fqn, t in host.items()}

        def swap_in():
            on_device = {fqn: t.to(device, non_blocking=True) for fqn, t in host.items()}
            package.load_constants(on_device, check_full_update=True)
            package(x)

        complete = len(host) == len(fqns)
        swap_s = timed(swap_in) if complete else float("nan")
        same = complete and torch.allclose(package(x), want, rtol=1e-4, atol=1e-5)
    report(model=name, form="aoti", device=device, constants=len(fqns),
           constants_from_the_module=len(host), reload_s=reload_s,
           load_constants_from_host_s=swap_s, outputs_equal_after_swap=same)


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in ("cpu", "cuda"):
        sys.exit(__doc__)
    main(sys.argv[1])
