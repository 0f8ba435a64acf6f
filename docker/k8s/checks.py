"""Offline checks of the deployment files: run by docker/k8s/validate.sh, which provides the
tools (kubectl for `kustomize`, kubernetes-validate, check-jsonschema, PyYAML).

1. Both overlays render with `kubectl kustomize`; every object, and the example Secret,
   validates against the Kubernetes schemas (strict: unknown fields are errors).
2. What the schemas cannot see: node pool and GPU per overlay, probes, drain timing, port
   names, RBAC for the fan-out, placeholders only in the example Secret.
3. The Dockerfiles: every COPY source exists and is not .dockerignored; pins agree.
4. The workflows: GitHub's workflow schema; every action, secret and variable they name is
   documented in docker/README.md; every repository script they run exists.

Prints one line per check and closes with "N passed, N failed"; exits 1 if any failed.
"""

from __future__ import annotations

import fnmatch
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Callable

import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "docker" / "k8s"
TOOLS = Path(sys.executable).parent
OVERLAYS = ("cpu", "gpu")
NAMESPACE = "modelgate"
# The oldest Kubernetes with native sidecars on by default, and the newest schemas shipped.
KUBERNETES_VERSIONS = ("1.29.0", "1.37.0")
# modelgate's own defaults that the manifests rely on (src/config/flags.rs).
KUBERNETES_API_URL_PORT = 8001
TORCH_VERSION = "2.11.0"

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


def check_overlay(overlay: str, objects: list[dict]) -> None:
    label = f"overlays/{overlay}"
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
        assert selector == {"type": f"{NAMESPACE}-{overlay}"}, f"nodeSelector {selector}"
        gpus = server["resources"].get("limits", {}).get("nvidia.com/gpu")
        if overlay == "gpu":
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
        assert ref.split(":")[0].endswith("-gpu") == (overlay == "gpu"), f"image {ref}"

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
        grace = pod["terminationGracePeriodSeconds"]
        assert grace >= int(command[1]) + 30, (
            f"terminationGracePeriodSeconds {grace} leaves under 30 s to drain after preStop"
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

    for name, body in [
        ("objects in one namespace", namespaced),
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


def check_kubernetes() -> None:
    for overlay in OVERLAYS:
        try:
            objects = render(overlay)
        except subprocess.CalledProcessError as e:
            check(f"overlays/{overlay}: kustomize renders", False, e.stderr.strip())
            continue
        check(f"overlays/{overlay}: kustomize renders", True)
        schema_check(f"overlays/{overlay}", objects)
        check_overlay(overlay, objects)
    secrets = [d for d in yaml.safe_load_all((K8S / "secret.example.yaml").read_text()) if d]
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

        def pins() -> None:
            args = dict(
                r.split("=", 1) for w, r in steps if w == "ARG" and "=" in r
            )
            assert args.get("TORCH_VERSION") == TORCH_VERSION, (
                f"TORCH_VERSION {args.get('TORCH_VERSION')}, tch needs {TORCH_VERSION}"
            )

        run_check(f"{label}: COPY sources exist, not ignored", copies)
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
