"""Offline checks of the deployment files: run by docker/k8s/validate.sh, which provides the
tools (kubectl for `kustomize`, kubernetes-validate, check-jsonschema, PyYAML).

1. Every overlay renders with `kubectl kustomize`; every object, and the example Secret,
   validates against the Kubernetes schemas (strict: unknown fields are errors).
2. What the schemas cannot see: node pool and GPU per overlay, probes, drain timing, port
   names, RBAC for the fan-out, an example of every Secret read, placeholders only in it.
   For the request-logs component (overlays/gpu-request-logs): native sidecars, the shared
   volume, Fluent Bit's config (only options Fluent Bit 4.2 has, since no Fluent Bit binary is
   installable here; its routes, simulated on modelgate's records), credentials from Secrets,
   disk bounds, and the cleanup loop run against a tail database of its own.
3. The Dockerfiles: every COPY source exists and is not .dockerignored; every target
   Cargo.toml declares is in the build stage before `cargo build` (Cargo refuses a manifest
   whose declared bench it cannot find, even to build only the binary); pins agree.
4. The workflows: GitHub's workflow schema; every action, secret and variable they name is
   documented in docker/README.md; every repository script they run exists.

Prints one line per check and closes with "N passed, N failed"; exits 1 if any failed.
"""

from __future__ import annotations

import contextlib
import fnmatch
import io
import json
import os
import re
import shlex
import sqlite3
import subprocess
import sys
import tempfile
import time
import tomllib
import types
from datetime import datetime
from pathlib import Path
from typing import Callable

import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "docker" / "k8s"
TOOLS = Path(sys.executable).parent
# Each overlay and its node pool (the gpu-request-logs overlay is overlays/gpu plus a component).
OVERLAYS = {"cpu": "cpu", "gpu": "gpu", "gpu-request-logs": "gpu"}
NAMESPACE = "modelgate"
# The oldest Kubernetes with native sidecars on by default, and the newest schemas shipped.
KUBERNETES_VERSIONS = ("1.29.0", "1.37.0")
# modelgate's own defaults that the manifests rely on (src/config/flags.rs).
KUBERNETES_API_URL_PORT = 8001
TORCH_VERSION = "2.11.0"
# Seconds a sidecar may take to stop once modelgate has (Fluent Bit's `service.grace` in
# components/request-logs/fluent-bit.yaml).
SIDECAR_GRACE = {"fluent-bit": 15}

results: list[tuple[bool, str]] = []


def check(name: str, ok: bool, detail: str = "") -> None:
    results.append((ok, name))
    print(f"{'ok  ' if ok else 'FAIL'} {name}" + (f": {detail}" if detail and not ok else ""))


def run_check(name: str, body: Callable[[], None]) -> None:
    try:
        body()
        check(name, True)
    except AssertionError as e:
        check(name, False, str(e))


# ---------------------------------------------------------------- Kubernetes


def render(overlay: str) -> list[dict]:
    out = subprocess.run(
        [str(TOOLS / "kubectl"), "kustomize", str(K8S / "overlays" / overlay)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def schema_check(label: str, objects: list[dict]) -> None:
    for version in KUBERNETES_VERSIONS:
        errors = []
        for obj in objects:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                path = ".".join(str(p) for p in e.path)
                errors.append(f"{obj['kind']}/{obj['metadata']['name']}: {path}: {e.message}")
            except kubernetes_validate.SchemaNotFoundError as e:
                errors.append(f"{obj['kind']}/{obj['metadata']['name']}: {e}")
        check(f"{label}: {len(objects)} objects valid for Kubernetes {version}", not errors,
              "; ".join(errors))


def one(objects: list[dict], kind: str, name: str) -> dict:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def container(pod: dict, name: str) -> dict:
    every = pod.get("containers", []) + pod.get("initContainers", [])
    found = [c for c in every if c["name"] == name]
    assert len(found) == 1, f"expected one container {name}"
    return found[0]


def flag(args: list[str], name: str) -> str | None:
    for arg in args:
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
    return None


def check_overlay(overlay: str, objects: list[dict], secrets: list[dict]) -> None:
    label = f"overlays/{overlay}"
    pool = OVERLAYS[overlay]
    deployment = one(objects, "Deployment", "modelgate")
    pod = deployment["spec"]["template"]["spec"]
    server = container(pod, "modelgate")
    args = server.get("args", [])

    def namespaced() -> None:
        for obj in objects:
            if obj["kind"] != "Namespace":
                ns = obj["metadata"].get("namespace")
                assert ns == NAMESPACE, f"{obj['kind']}/{obj['metadata']['name']} in {ns}"

    def node_pool() -> None:
        selector = pod.get("nodeSelector", {})
        assert selector == {"type": f"{NAMESPACE}-{pool}"}, f"nodeSelector {selector}"
        gpus = server["resources"].get("limits", {}).get("nvidia.com/gpu")
        if pool == "gpu":
            assert str(gpus) == "1", f"nvidia.com/gpu limit {gpus}"
            tolerations = [t.get("key") for t in pod.get("tolerations", [])]
            assert "nvidia.com/gpu" in tolerations, "no toleration for the GPU taint"
        else:
            assert gpus is None, "a CPU pod asks for a GPU"

    def image() -> None:
        ref = server["image"]
        assert re.fullmatch(r"[^:@]+/[^:@]+:[A-Za-z0-9_][A-Za-z0-9_.-]*", ref), (
            f"image {ref!r} is not a registry path with a tag"
        )
        assert ref.split(":")[0].endswith("-gpu") == (pool == "gpu"), f"image {ref}"

    def rollout() -> None:
        strategy = deployment["spec"]["strategy"]
        assert strategy["type"] == "RollingUpdate"
        assert strategy["rollingUpdate"]["maxUnavailable"] == 0, "maxUnavailable is not 0"
        assert "replicas" not in deployment["spec"], "replicas would fight the HPA"

    def probes() -> None:
        live, ready = server["livenessProbe"]["httpGet"], server["readinessProbe"]["httpGet"]
        assert (live["path"], live["port"]) == ("/healthz", "http"), f"liveness {live}"
        assert (ready["path"], ready["port"]) == ("/readyz", "http"), f"readiness {ready}"

    def drain() -> None:
        command = server["lifecycle"]["preStop"]["exec"]["command"]
        assert command[0] == "sleep", f"preStop {command}"
        args = server.get("args", [])
        # modelgate's longest shutdown after SIGTERM: the grace and drain flags (defaults
        # 5 s and 10 s), then unloading (at most 30 s) and the request-log flush (10 s),
        # src/app/shutdown.rs and src/app/mod.rs.
        shutdown = (int(flag(args, "shutdown_grace_seconds") or 5)
                    + int(flag(args, "shutdown_drain_seconds") or 10) + 30 + 10)
        # Sidecars stop after modelgate; Fluent Bit takes its own grace to send its buffer.
        sidecars = max([SIDECAR_GRACE.get(c["name"], 0) for c in pod.get("initContainers", [])],
                       default=0)
        needed = int(command[1]) + shutdown + sidecars
        grace = pod["terminationGracePeriodSeconds"]
        assert grace >= needed, (
            f"terminationGracePeriodSeconds {grace}: preStop, modelgate's shutdown and the "
            f"sidecars' take up to {needed} s"
        )

    def ports() -> None:
        named = {p["name"]: p["containerPort"] for p in server["ports"]}
        assert named == {"grpc": 8500, "http": 8501}, f"container ports {named}"
        service = one(objects, "Service", "modelgate")
        ports = {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]}
        assert ports == {"grpc": (8500, "grpc"), "http": (8501, "http")}, f"service {ports}"
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        for name in ("modelgate", "modelgate-headless"):
            selector = one(objects, "Service", name)["spec"]["selector"]
            assert selector.items() <= labels.items(), f"{name} selects no pod"

    def s3_and_secrets() -> None:
        config = flag(args, "model_config_file") or ""
        assert config.startswith("s3://"), f"--model_config_file={config}"
        env = {e["name"]: e for e in server["env"]}
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            ref = env[key]["valueFrom"]["secretKeyRef"]
            assert (ref["name"], ref["key"]) == ("aws-credential", key), f"{key} from {ref}"
        for key in ("AWS_REGION", "S3_USE_HTTPS", "S3_VERIFY_SSL"):
            assert env.get(key, {}).get("value"), f"no {key}"
        assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"

    def admin_and_sidecar() -> None:
        token = flag(args, "admin_token_file")
        assert token, "no --admin_token_file: the admin API and fan-out are off"
        mounts = {m["mountPath"]: m["name"] for m in server["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        mount = str(Path(token).parent)
        assert mount in mounts, f"{token} is on no mounted volume"
        assert volumes[mounts[mount]]["secret"]["secretName"] == "modelgate-admin"
        proxy = container(pod, "kubectl-proxy")
        assert proxy.get("restartPolicy") == "Always", "the proxy is not a native sidecar"
        assert f"--port={KUBERNETES_API_URL_PORT}" in proxy["args"], "proxy port"
        assert flag(args, "kubernetes_api_url") is None, "the default URL is the sidecar"
        service = flag(args, "fanout_service")
        one(objects, "Service", service)
        http = [p for p in one(objects, "Service", service)["spec"]["ports"] if p["name"] == "http"]
        assert http, f"Service {service} has no port named http for the fan-out"
        account = pod["serviceAccountName"]
        one(objects, "ServiceAccount", account)
        role = one(objects, "Role", "modelgate-endpoints-reader")
        assert any("endpoints" in r["resources"] and "get" in r["verbs"] for r in role["rules"])
        binding = one(objects, "RoleBinding", "modelgate-endpoints-reader")
        assert binding["roleRef"]["name"] == role["metadata"]["name"]
        subjects = [(s["kind"], s["name"], s.get("namespace")) for s in binding["subjects"]]
        assert ("ServiceAccount", account, NAMESPACE) in subjects, f"subjects {subjects}"

    def hardening() -> None:
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert server["securityContext"]["readOnlyRootFilesystem"] is True
        mounts = {m["mountPath"] for m in server["volumeMounts"]}
        assert "/tmp" in mounts, "read-only root with no writable /tmp for model downloads"

    def autoscaling() -> None:
        hpa = one(objects, "HorizontalPodAutoscaler", "modelgate")
        assert hpa["apiVersion"] == "autoscaling/v2"
        target = hpa["spec"]["scaleTargetRef"]
        assert (target["kind"], target["name"]) == ("Deployment", "modelgate")
        kinds = {m["type"] for m in hpa["spec"]["metrics"]}
        assert kinds == {"Resource", "Pods"}, f"metrics {kinds}"

    def ingress() -> None:
        rules = one(objects, "Ingress", "modelgate")["spec"]["rules"]
        paths = [p["path"] for r in rules for p in r["http"]["paths"]]
        assert paths == ["/v1"], f"the Ingress routes {paths}, not only TF Serving's API"

    def secrets_exemplified() -> None:
        examples = {(x["metadata"]["name"], k) for x in secrets for k in x.get("stringData", {})}
        for c in pod["containers"] + pod.get("initContainers", []):
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert (ref["name"], ref["key"]) in examples, (
                        f"{c['name']} reads {ref['name']}/{ref['key']}: not in secret.example.yaml")
        for v in pod["volumes"]:
            if "secret" in v:
                for item in v["secret"].get("items", []):
                    key = (v["secret"]["secretName"], item["key"])
                    assert key in examples, f"volume {v['name']} reads {key}: no example"

    for name, body in [
        ("objects in one namespace", namespaced),
        ("every Secret read has an example", secrets_exemplified),
        ("node pool and GPU", node_pool),
        ("image set by the overlay", image),
        ("rolling update keeps capacity", rollout),
        ("liveness /healthz, readiness /readyz", probes),
        ("preStop and grace period", drain),
        ("port names grpc/http", ports),
        ("S3 config and aws-credential", s3_and_secrets),
        ("admin token, kubectl proxy sidecar, RBAC", admin_and_sidecar),
        ("non-root, read-only root", hardening),
        ("HPA on CPU and queue depth", autoscaling),
        ("Ingress exposes only /v1", ingress),
    ]:
        run_check(f"{label}: {name}", body)


# ---------------------------------------------------------------- request-logs component

# The component's names (components/request-logs) and where modelgate's file collectors write.
REQUEST_LOG_DIR = "/var/log/modelgate/requests"
REQUEST_LOG_OVERLAYS = ("gpu-request-logs",)
# Fluent Bit has no offline binary here (not in Debian 12 nor on PyPI): instead, every key of
# its config must be an option that Fluent Bit 4.2 knows, as listed in the v4.2.3 source
# (src/flb_config.c, src/flb_{input,filter,output}.c, src/flb_parser.c, each plugin's
# config_map), lower-cased as Fluent Bit compares them.
FLUENT_BIT_SERVICE = {
    "flush", "grace", "daemon", "log_file", "log_level", "parsers_file", "plugins_file",
    "streams_file", "http_server", "http_listen", "http_port", "health_check",
    "hc_errors_count", "hc_retry_failure_count", "hc_period", "hot_reload", "dns.mode",
    "dns.resolver", "storage.path", "storage.sync", "storage.metrics", "storage.checksum",
    "storage.backlog.mem_limit", "storage.max_chunks_up", "storage.delete_irrecoverable_chunks",
    "storage.trim_files", "scheduler.cap", "scheduler.base", "coro_stack_size",
    "json.convert_nan_to_null", "sp.convert_from_str_to_num", "multiline_buffer_limit",
}
FLUENT_BIT_COMMON = {
    "input": {"name", "alias", "tag", "log_level", "log_suppress_interval", "mem_buf_limit",
              "storage.type", "storage.pause_on_chunks_overlimit", "threaded", "routable"},
    "filter": {"name", "alias", "match", "match_regex", "log_level", "log_suppress_interval"},
    "output": {"name", "alias", "match", "match_regex", "log_level", "log_suppress_interval",
               "retry_limit", "storage.total_limit_size", "workers", "tls", "tls.verify"},
}
FLUENT_BIT_PLUGINS = {
    ("input", "tail"): {
        "path", "exclude_path", "key", "read_from_head", "read_newly_discovered_files_from_head",
        "refresh_interval", "watcher_interval", "progress_check_interval", "rotate_wait",
        "docker_mode", "path_key", "offset_key", "ignore_older", "ignore_active_older_files",
        "buffer_chunk_size", "buffer_max_size", "skip_long_lines", "truncate_long_lines",
        "skip_empty_lines", "exit_on_eof", "file_cache_advise", "inotify_watcher", "parser",
        "tag_regex", "db", "db.sync", "db.locking", "db.journal_mode", "db.compare_filename",
        "multiline.parser", "unicode.encoding",
    },
    ("filter", "rewrite_tag"): {"rule", "emitter_name", "emitter_storage.type",
                                "emitter_mem_buf_limit"},
    ("filter", "record_modifier"): {"record", "remove_key", "allowlist_key", "whitelist_key",
                                    "uuid_key"},
    ("filter", "throttle"): {"rate", "window", "print_status", "interval"},
    ("filter", "parser"): {"key_name", "parser", "preserve_key", "reserve_data", "unescape_key"},
    ("output", "bigquery"): {
        "google_service_credentials", "enable_identity_federation", "aws_region",
        "project_number", "pool_id", "provider_id", "google_service_account",
        "service_account_email", "service_account_secret", "project_id", "dataset_id",
        "table_id", "skip_invalid_rows", "ignore_unknown_values",
    },
    ("output", "slack"): {"webhook"},
}
FLUENT_BIT_PARSER = {"name", "format", "regex", "time_key", "time_format", "time_keep",
                     "time_offset", "time_strict", "time_system_timezone", "types",
                     "decode_field", "decode_field_as", "skip_empty_values"}
# Records as modelgate writes them (docs/request-logging.md).
SAMPLE_OK = {
    "code": "ok", "latency_ms": 1.079, "message": "", "method": "predict", "model": "tiny",
    "protocol": "rest", "request": {"inputs": {"x": {"dtype": "DT_FLOAT", "shape": [2, 1],
                                                     "values": [1.0, 2.0]}}},
    "response": {"outputs": {"y": {"dtype": "DT_FLOAT", "shape": [2, 1],
                                   "values": [3.0, 5.0]}}},
    "signature": "serving_default", "timestamp": "2026-12-05T10:29:29.731420Z", "type": "ok",
    "values_omitted": False, "version": 1,
}
SAMPLE_ERROR = {**SAMPLE_OK, "code": "invalid_argument", "message": "input 'x': bad shape",
                "response": None, "type": "error"}


def kube_bytes(quantity: str) -> int:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "K": 10**3, "M": 10**6, "G": 10**9}
    for unit, factor in units.items():
        if str(quantity).endswith(unit):
            return int(float(str(quantity)[: -len(unit)]) * factor)
    return int(quantity)


def fluent_bit_bytes(size: str) -> int:
    """Fluent Bit's unit sizes (flb_utils_size_to_bytes): K, M, G are powers of 1000."""
    match = re.fullmatch(r"(\d+)\s*([KMG]?)B?", str(size).upper())
    assert match, f"size {size!r}"
    return int(match[1]) * {"": 1, "K": 10**3, "M": 10**6, "G": 10**9}[match[2]]


def tag_matches(pattern: str, tag: str) -> bool:
    """Fluent Bit's `match`: `*` is the only wildcard."""
    return re.fullmatch(".*".join(map(re.escape, pattern.split("*"))), tag) is not None


def route(config: dict, tag: str, record: dict) -> dict[str, list[dict]]:
    """Where a record from an input with this tag ends up: {output name: [records]}.
    Follows the filters that decide routes or fields (parser with json parsers, rewrite_tag
    re-emitting from the start of the pipeline, record_modifier's allowlist_key and
    remove_key); others (throttle) pass records through."""
    filters = config["pipeline"].get("filters", [])
    parsers = {p["name"]: p for p in config.get("parsers", [])}

    def listed(value) -> list:
        return value if isinstance(value, list) else [value]

    def on(value) -> bool:
        return str(value).lower() in ("on", "true", "yes")

    outputs = config["pipeline"]["outputs"]
    delivered: dict[str, list[dict]] = {}
    queue = [(tag, dict(record), 0)]
    while queue:
        tag, record, depth = queue.pop(0)
        assert depth < 5, "rewrite_tag loops"
        kept = True
        for f in filters:
            if not tag_matches(str(f.get("match", "")), tag):
                continue
            if f["name"] == "rewrite_tag":
                for rule in listed(f["rule"]):
                    key, regex, new_tag, keep = str(rule).split()
                    value = record.get(key.lstrip("$"))
                    if value is not None and re.search(regex, str(value)):
                        queue.append((new_tag, dict(record), depth + 1))
                        kept = keep.lower() in ("true", "on")
                        break
                if not kept:
                    break
            elif f["name"] == "parser":
                assert parsers[f["parser"]]["format"] == "json", "only json parsers simulated"
                try:
                    parsed = json.loads(record[f["key_name"]])
                except (KeyError, ValueError):
                    continue
                base = dict(record) if on(f.get("reserve_data")) else {}
                if not on(f.get("preserve_key")):
                    base.pop(f["key_name"], None)
                record = {**base, **parsed}
            elif f["name"] == "record_modifier":
                if "allowlist_key" in f:
                    allow = listed(f["allowlist_key"])
                    record = {k: v for k, v in record.items() if k in allow}
                for key in listed(f.get("remove_key", [])):
                    record.pop(key, None)
        if not kept:
            continue
        for o in outputs:
            if tag_matches(str(o.get("match", "")), tag):
                delivered.setdefault(o["name"], []).append(record)
    return delivered


def check_request_logs(overlay: str, objects: list[dict], secrets: list[dict]) -> None:
    label = f"overlays/{overlay}: request logs"
    pod = one(objects, "Deployment", "modelgate")["spec"]["template"]["spec"]
    server = container(pod, "modelgate")
    volumes = {v["name"]: v for v in pod["volumes"]}
    init = {c["name"]: c for c in pod.get("initContainers", [])}

    def mounts(c: dict) -> dict[str, dict]:
        return {m["mountPath"]: m for m in c.get("volumeMounts", [])}

    def on_mount(c: dict, path: str) -> tuple[dict, str]:
        """The mount a file path lies on (the deepest), and the path inside the volume."""
        best = max((m for m in mounts(c) if path.startswith(m.rstrip("/") + "/")),
                   key=len, default=None)
        assert best, f"{path} is on no volume of {c['name']}"
        return mounts(c)[best], path[len(best.rstrip("/")) + 1:]

    def configmap_file(c: dict, path: str) -> str:
        mount, key = on_mount(c, path)
        name = volumes[mount["name"]]["configMap"]["name"]
        data = one(objects, "ConfigMap", name)["data"]
        assert key in data, f"ConfigMap {name} has no {key}"
        return data[key]

    fluent = init.get("fluent-bit") or {}
    cleanup = init.get("log-cleanup") or {}
    config_path = (fluent.get("args") or ["", ""])[-1]

    def config() -> dict:
        return yaml.safe_load(configmap_file(fluent, config_path))

    def sidecars() -> None:
        for name in ("fluent-bit", "log-cleanup"):
            assert name in init, f"no {name} init container"
            assert init[name].get("restartPolicy") == "Always", f"{name} is not a native sidecar"
            assert name not in {c["name"] for c in pod["containers"]}, f"{name} is a container"
        args = fluent.get("args", [])
        assert args[:1] == ["-c"] and len(args) == 2, f"fluent-bit args {args}"

    def images() -> None:
        image = fluent["image"]
        assert re.fullmatch(r"fluent/fluent-bit:[34]\.\d+\.\d+", image), (
            f"{image}: not a pinned Fluent Bit 3.x/4.x release")
        image = cleanup["image"]
        assert re.fullmatch(r"python:3\.\d+\.\d+-alpine3\.\d+", image), f"{image} not pinned"

    def hardened() -> None:
        for c in pod.get("initContainers", []) + pod["containers"]:
            sc = c.get("securityContext", {})
            assert sc.get("readOnlyRootFilesystem") is True, f"{c['name']}: writable root"
            assert sc.get("allowPrivilegeEscalation") is False, f"{c['name']}: escalation"
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], f"{c['name']}: caps"
            user = sc.get("runAsUser", pod["securityContext"].get("runAsUser"))
            assert user and user != 0, f"{c['name']}: runs as root"
            resources = c.get("resources", {})
            assert resources.get("requests") and resources.get("limits", {}).get("memory"), (
                f"{c['name']}: no requests or memory limit")

    def shared_volume() -> None:
        volume = volumes.get("request-logs", {})
        assert kube_bytes(volume.get("emptyDir", {}).get("sizeLimit", 0)) > 0, (
            "request-logs is not an emptyDir with a sizeLimit")
        for c, writable in ((server, True), (fluent, False), (cleanup, True)):
            mount = mounts(c).get(REQUEST_LOG_DIR)
            assert mount and mount["name"] == "request-logs", (
                f"{c['name']} does not mount request-logs at {REQUEST_LOG_DIR}")
            if writable:
                assert not mount.get("readOnly"), f"{c['name']} mounts the logs read-only"
        (tail,) = [i for i in config()["pipeline"]["inputs"] if i["name"] == "tail"]
        assert str(Path(tail["path"]).parent) == REQUEST_LOG_DIR, f"tail path {tail['path']}"
        assert Path(tail["path"]).name == "*.jsonl", f"tail path {tail['path']}"

    def fluent_bit_options() -> None:
        cfg = config()
        assert set(cfg) <= {"service", "parsers", "pipeline", "env"}, f"sections {set(cfg)}"
        unknown = {k.lower() for k in cfg.get("service", {})} - FLUENT_BIT_SERVICE
        assert not unknown, f"service: unknown {sorted(unknown)}"
        for parser in cfg.get("parsers", []):
            unknown = set(parser) - FLUENT_BIT_PARSER
            assert not unknown, f"parser {parser.get('name')}: unknown {sorted(unknown)}"
        for kind in ("input", "filter", "output"):
            for plugin in cfg["pipeline"].get(f"{kind}s", []):
                known = FLUENT_BIT_PLUGINS.get((kind, plugin["name"]))
                assert known is not None, f"{kind} {plugin['name']}: not one this check knows"
                unknown = {k.lower() for k in plugin} - known - FLUENT_BIT_COMMON[kind]
                assert not unknown, f"{kind} {plugin['name']}: unknown {sorted(unknown)}"

    def parses_records() -> None:
        cfg = config()
        (tail,) = [i for i in cfg["pipeline"]["inputs"] if i["name"] == "tail"]
        (step,) = [f for f in cfg["pipeline"]["filters"] if f["name"] == "parser"]
        assert step["key_name"] == tail.get("key", "log"), "the parser filter parses no line"
        (parser,) = [p for p in cfg["parsers"] if p["name"] == step["parser"]]
        assert parser["format"] == "json", f"parser format {parser['format']}"
        key = parser["time_key"]
        assert key in SAMPLE_OK, f"time_key {key} is no field of modelgate's records"
        # Fluent Bit's %L (fractional seconds) is strptime's %f.
        datetime.strptime(SAMPLE_OK[key], parser["time_format"].replace("%L", "%f"))
        assert str(parser.get("time_keep")).lower() in ("on", "true"), (
            f"time_keep is off: BigQuery would get no {key}")
        assert tail["buffer_max_size"] and str(tail.get("skip_long_lines")).lower() in (
            "on", "true"), "a long line would stop the tail of its file"

    def routes() -> None:
        cfg = config()
        (tail,) = [i for i in cfg["pipeline"]["inputs"] if i["name"] == "tail"]
        key = tail.get("key", "log")
        # What tail makes of a line: the line under `key` (or the parsed line, with `parser`).
        line = {sample["type"]: json.dumps(sample) for sample in (SAMPLE_OK, SAMPLE_ERROR)}
        raw = {t: ({key: text} if "parser" not in tail else json.loads(text))
               for t, text in line.items()}
        ok, error = route(cfg, tail["tag"], raw["ok"]), route(cfg, tail["tag"], raw["error"])
        for sample, where in ((SAMPLE_OK, ok), (SAMPLE_ERROR, error)):
            (row,) = where.get("bigquery", [None])
            assert row, f"a {sample['type']} record misses BigQuery: it goes to {sorted(where)}"
            scalars = {k: v for k, v in sample.items() if not isinstance(v, (dict, type(None)))}
            assert scalars.items() <= row.items(), f"BigQuery row {row} lacks fields"
            whole = row.get("record", row)
            whole = json.loads(whole) if isinstance(whole, str) else whole
            assert whole == sample, "BigQuery does not get the whole record"
        assert "slack" not in ok, "an ok record alerts"
        (alert,) = error.get("slack", [None])
        assert alert and alert["type"] == "error" and alert["model"] == "tiny", (
            f"an error record's alert: {alert}")
        assert not {"request", "response", key} & set(alert), "alerts carry the tensors"

    def credentials() -> None:
        cfg = config()
        (bigquery,) = [o for o in cfg["pipeline"]["outputs"] if o["name"] == "bigquery"]
        for key in ("project_id", "dataset_id", "table_id"):
            assert bigquery.get(key), f"bigquery {key} not set"
        assert "service_account_secret" not in bigquery, "a private key in the config"
        mount, key = on_mount(fluent, bigquery["google_service_credentials"])
        assert mount.get("readOnly"), "credentials mounted writable"
        secret = volumes[mount["name"]].get("secret", {})
        assert secret.get("secretName") == "modelgate-bigquery", f"credentials from {secret}"
        assert key in [i["path"] for i in secret.get("items", [])], f"{key} not in the Secret"
        (slack,) = [o for o in cfg["pipeline"]["outputs"] if o["name"] == "slack"]
        variable = re.fullmatch(r"\$\{(\w+)\}", str(slack["webhook"]))
        assert variable, "the Slack webhook is written in the config"
        env = {e["name"]: e for e in fluent.get("env", [])}
        ref = env.get(variable[1], {}).get("valueFrom", {}).get("secretKeyRef", {})
        assert ref.get("name") == "modelgate-alerts", f"{variable[1]} from {ref}"
        text = configmap_file(fluent, config_path)
        assert not re.search(r"https?://", text), "a URL written in the Fluent Bit config"
        examples = {(s["metadata"]["name"], k) for s in secrets for k in s.get("stringData", {})}
        for needed in (("modelgate-bigquery", key), ("modelgate-alerts", ref.get("key"))):
            assert needed in examples, f"secret.example.yaml lacks {needed}"

    def state_and_disk() -> None:
        cfg = config()
        (tail,) = [i for i in cfg["pipeline"]["inputs"] if i["name"] == "tail"]
        sizes = {}
        for path in (tail["db"], cfg["service"]["storage.path"].rstrip("/") + "/x"):
            mount, _ = on_mount(fluent, path)
            assert not mount.get("readOnly"), f"{path} is on a read-only mount"
            assert mount["name"] != "request-logs", f"{path} is on the logs volume"
            sizes[mount["name"]] = kube_bytes(volumes[mount["name"]]["emptyDir"]["sizeLimit"])
        (state,) = set(sizes)
        assert str(tail.get("db.locking", "false")).lower() in ("false", "off"), (
            "db.locking hides the offsets from log-cleanup")
        queued = sum(fluent_bit_bytes(o.get("storage.total_limit_size", "0"))
                     for o in cfg["pipeline"]["outputs"])
        assert all("storage.total_limit_size" in o for o in cfg["pipeline"]["outputs"]), (
            "an output with an unbounded queue on disk")
        assert queued < sizes[state] * 0.8, f"queues {queued} bytes in {sizes[state]}"
        env = {e["name"]: e.get("value") for e in cleanup.get("env", [])}
        assert env.get("TAIL_DB") == tail["db"], f"log-cleanup reads {env.get('TAIL_DB')}"
        # The same path in both: the tail database holds the paths Fluent Bit saw.
        assert env.get("LOG_DIR") == REQUEST_LOG_DIR, f"log-cleanup sweeps {env.get('LOG_DIR')}"
        assert mounts(cleanup).get(str(Path(tail["db"]).parent), {}).get("name") == state
        logs = kube_bytes(volumes["request-logs"]["emptyDir"]["sizeLimit"])
        rotate = int(flag(server.get("args", []), "prediction_log_file_rotate_bytes") or 128 << 20)
        limit = int(env.get("MAX_BYTES") or 0)
        assert 0 < limit + 2 * rotate <= logs, (
            f"MAX_BYTES {limit} + two files of {rotate} do not fit the volume's {logs}")
        assert "--log_all_errors" in server.get("args", []), "sampled-out errors never alert"

    def cleanup_deletes_only_shipped() -> None:
        script = configmap_file(cleanup, cleanup["command"][-1])
        with tempfile.TemporaryDirectory() as tmp:
            logs, db_path = Path(tmp) / "logs", Path(tmp) / "tail.db"
            logs.mkdir()
            # m-00003 is the file being written; m-00002 was closed a moment ago.
            files = ["m-00000.jsonl", "m-00001.jsonl", "m-00002.jsonl", "m-00003.jsonl",
                     "n-00007.jsonl", "other.txt"]
            for age, name in enumerate(reversed(files)):
                (logs / name).write_bytes(b"x" * 99 + b"\n")
                old = time.time() - 3600 * age
                os.utime(logs / name, (old, old))
            db = sqlite3.connect(db_path)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("CREATE TABLE in_tail_files (id INTEGER PRIMARY KEY, name TEXT NOT NULL,"
                       " offset INTEGER, inode INTEGER, created INTEGER, rotated INTEGER"
                       " DEFAULT 0)")
            read = {"m-00000.jsonl": 100, "m-00001.jsonl": 40, "m-00002.jsonl": 100,
                    "m-00003.jsonl": 100, "n-00007.jsonl": 100}
            os.utime(logs / "m-00002.jsonl")
            for name, offset in read.items():
                path = logs / name
                db.execute("INSERT INTO in_tail_files (name, offset, inode, created) VALUES"
                           " (?, ?, ?, 0)", (str(path), offset, path.stat().st_ino))
            db.commit()
            module = types.ModuleType("cleanup")
            saved = dict(os.environ)
            os.environ.update(LOG_DIR=str(logs), TAIL_DB=str(db_path), MAX_BYTES="1000000")
            try:
                exec(compile(script, "cleanup.py", "exec"), module.__dict__)
            finally:
                os.environ.clear()
                os.environ.update(saved)
            with contextlib.redirect_stdout(io.StringIO()):
                module.sweep()
            left = sorted(p.name for p in logs.iterdir())
            assert left == ["m-00001.jsonl", "m-00002.jsonl", "m-00003.jsonl", "n-00007.jsonl",
                            "other.txt"], f"after a sweep: {left}"
            module.MAX_BYTES = 250
            with contextlib.redirect_stdout(io.StringIO()):
                module.sweep()
            left = sorted(p.name for p in logs.iterdir())
            assert left == ["m-00003.jsonl", "n-00007.jsonl", "other.txt"], (
                f"over MAX_BYTES: {left}")
            db.close()

    def own_image() -> None:
        kustomization = yaml.safe_load(
            (K8S / "overlays" / overlay / "kustomization.yaml").read_text())
        assert "images" not in kustomization, (
            "an images: entry the release workflow does not update")
        assert kustomization.get("resources") == [f"../{OVERLAYS[overlay]}"], (
            f"resources {kustomization.get('resources')}")
        assert "../../components/request-logs" in kustomization.get("components", [])

    for name, body in [
        ("fluent-bit and log-cleanup are native sidecars", sidecars),
        ("sidecar images pinned", images),
        ("every container non-root, read-only root, no capabilities, resources", hardened),
        ("shared emptyDir: written by modelgate, read by Fluent Bit", shared_volume),
        ("Fluent Bit config: known 4.2 options only", fluent_bit_options),
        ("Fluent Bit parses modelgate's records (time, long lines)", parses_records),
        ("errors to Slack, every record to BigQuery", routes),
        ("credentials from Secrets only, examples in secret.example.yaml", credentials),
        ("offsets and queues on their own volume; disk bounded", state_and_disk),
        ("log-cleanup deletes only fully read, closed files", cleanup_deletes_only_shipped),
        ("image from overlays/gpu (set-image.sh gpu)", own_image),
    ]:
        run_check(f"{label}: {name}", body)


def check_kubernetes() -> None:
    secrets = [d for d in yaml.safe_load_all((K8S / "secret.example.yaml").read_text()) if d]
    for overlay in OVERLAYS:
        try:
            objects = render(overlay)
        except subprocess.CalledProcessError as e:
            check(f"overlays/{overlay}: kustomize renders", False, e.stderr.strip())
            continue
        check(f"overlays/{overlay}: kustomize renders", True)
        schema_check(f"overlays/{overlay}", objects)
        check_overlay(overlay, objects, secrets)
        if overlay in REQUEST_LOG_OVERLAYS:
            check_request_logs(overlay, objects, secrets)
    schema_check("secret.example.yaml", secrets)

    def placeholders() -> None:
        for secret in secrets:
            for key, value in secret.get("stringData", {}).items():
                assert str(value).startswith("REPLACE_"), f"{key} holds a value"
            assert "data" not in secret, "base64 data could hide a real value"

    run_check("secret.example.yaml: placeholders only", placeholders)

    def example_not_applied() -> None:
        for kustomization in K8S.glob("**/kustomization.yaml"):
            listed = yaml.safe_load(kustomization.read_text()).get("resources", [])
            assert not any("secret.example" in r for r in listed), (
                f"{kustomization.relative_to(ROOT)} applies the example Secrets over the real ones"
            )

    run_check("secret.example.yaml: not in the kustomization", example_not_applied)


# ---------------------------------------------------------------- Dockerfiles


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined, current = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        joined.append(current + stripped)
        current = ""
    out = []
    for text in joined:
        word, _, rest = text.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def dockerignored(relative: str, patterns: list[str]) -> bool:
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/").removeprefix("**/")
        parts = relative.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(p, pattern) or fnmatch.fnmatch(p.split("/")[-1], pattern)
               for p in prefixes):
            ignored = not negate
    return ignored


def cargo_target_paths() -> list[str]:
    """The source file of every target Cargo.toml declares (at Cargo's default path where it
    names none), and build.rs. Targets Cargo would discover by itself are not counted: it
    does not miss those when they are absent."""
    manifest = tomllib.loads((ROOT / "Cargo.toml").read_text())
    defaults = {"lib": "src/lib.rs", "bin": "src/bin/{}.rs", "bench": "benches/{}.rs",
                "test": "tests/{}.rs", "example": "examples/{}.rs"}
    targets = [("lib", manifest["lib"])] if "lib" in manifest else []
    targets += [(kind, t) for kind in defaults if kind != "lib" for t in manifest.get(kind, [])]
    paths = [t.get("path", defaults[kind].format(t.get("name"))) for kind, t in targets]
    if (ROOT / "build.rs").exists():
        paths.append("build.rs")
    return paths


def check_dockerfiles() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for name in ("Dockerfile", "Dockerfile.gpu"):
        path = ROOT / "docker" / name
        steps = instructions(path)
        label = f"docker/{name}"

        def copies() -> None:
            for word, rest in steps:
                if word != "COPY" or "--from=" in rest:
                    continue
                sources = shlex.split(rest)[:-1]
                for source in sources:
                    assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
                    assert not dockerignored(source, patterns), f"COPY {source}: .dockerignored"

        def runtime() -> None:
            final = max(i for i, (w, _) in enumerate(steps) if w == "FROM")
            tail = steps[final:]
            words = {w: r for w, r in tail}
            assert set(words.get("EXPOSE", "").split()) == {"8500", "8501"}, "EXPOSE"
            user = words.get("USER", "0").split(":")[0]
            assert user.isdigit() and user != "0", f"USER {user}"
            assert "healthcheck.sh" in words.get("HEALTHCHECK", ""), "HEALTHCHECK"
            assert "entrypoint.sh" in words.get("ENTRYPOINT", ""), "ENTRYPOINT"
            env = words.get("ENV", "")
            assert "LD_LIBRARY_PATH=/opt/libtorch/torch/lib" in env, "LD_LIBRARY_PATH"
            copied = " ".join(r for w, r in tail if w == "COPY")
            assert "/staging/libtorch /opt/libtorch" in copied, "libtorch not at /opt/libtorch"

        def cargo_targets() -> None:
            build = next(i for i, (w, r) in enumerate(steps)
                         if w == "RUN" and "cargo build" in r)
            copied = [
                source.rstrip("/")
                for word, rest in steps[:build]
                if word == "COPY" and "--from=" not in rest
                for source in shlex.split(rest)[:-1]
            ]
            for path in cargo_target_paths():
                assert any(path == c or path.startswith(c + "/") for c in copied), (
                    f"{path} (declared in Cargo.toml) is not copied before cargo build"
                )

        def pins() -> None:
            args = dict(
                r.split("=", 1) for w, r in steps if w == "ARG" and "=" in r
            )
            assert args.get("TORCH_VERSION") == TORCH_VERSION, (
                f"TORCH_VERSION {args.get('TORCH_VERSION')}, tch needs {TORCH_VERSION}"
            )

        run_check(f"{label}: COPY sources exist, not ignored", copies)
        run_check(f"{label}: Cargo.toml's targets in the build stage", cargo_targets)
        run_check(f"{label}: run stage (ports, user, healthcheck, libraries)", runtime)
        run_check(f"{label}: torch {TORCH_VERSION}", pins)

    def scripts() -> None:
        for script in ("entrypoint.sh", "healthcheck.sh", "stage-libtorch.sh"):
            path = ROOT / "docker" / script
            assert path.exists() and path.stat().st_mode & 0o111, f"{script} not executable"
        path = K8S / "set-image.sh"
        assert path.stat().st_mode & 0o111, "set-image.sh not executable"

    run_check("docker/*.sh: present and executable", scripts)


# ---------------------------------------------------------------- workflows


def check_workflows() -> None:
    docs = (ROOT / "docker" / "README.md").read_text()
    workflows = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
    check("workflows: ci.yml and release.yml exist",
          {w.name for w in workflows} >= {"ci.yml", "release.yml"})
    schema = subprocess.run(
        [str(TOOLS / "check-jsonschema"), "--builtin-schema", "vendor.github-workflows",
         *map(str, workflows)],
        capture_output=True,
        text=True,
    )
    check("workflows: GitHub workflow schema", schema.returncode == 0,
          (schema.stdout + schema.stderr).strip()[-2000:])
    for workflow in workflows:
        text = workflow.read_text()
        label = f"workflows/{workflow.name}"

        def parses() -> None:
            data = yaml.safe_load(text)
            # PyYAML reads the key `on` as True (YAML 1.1).
            assert data.get(True) or data.get("on"), "no trigger"
            assert data.get("jobs"), "no jobs"

        def documented() -> None:
            actions = set(re.findall(r"uses:\s*([\w.-]+/[\w.-]+@[\w.-]+)", text))
            for action in actions:
                assert f"`{action}`" in docs, f"{action} not listed in docker/README.md"
            names = set(re.findall(r"\b(secrets|vars)\.([A-Z0-9_]+)", text))
            for kind, name in names:
                if (kind, name) == ("secrets", "GITHUB_TOKEN"):
                    continue
                assert f"`{name}`" in docs, f"{kind}.{name} not documented in docker/README.md"

        def scripts_exist() -> None:
            for script in set(re.findall(r"(?<![\w/])((?:docker|models)/[\w./-]+\.(?:sh|py))", text)):
                assert (ROOT / script).exists(), f"{script} does not exist"

        run_check(f"{label}: valid YAML with triggers and jobs", parses)
        run_check(f"{label}: actions, secrets, variables documented", documented)
        run_check(f"{label}: scripts it runs exist", scripts_exist)


def main() -> int:
    check_kubernetes()
    check_dockerfiles()
    check_workflows()
    failed = sum(1 for ok, _ in results if not ok)
    print(f"deploy: {len(results) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
