#!/usr/bin/env bash
# Offline checks of the Kubernetes manifests, the Dockerfiles and the GitHub workflows:
# renders both overlays with `kubectl kustomize`, validates every object against the
# Kubernetes schemas, and checks what schemas cannot (see docker/k8s/checks.py).
#
# The tools go into a venv of their own (default target/deploy-tools, override with
# MODELGATE_DEPLOY_TOOLS), installed from PyPI on the first run; later runs need no network.
#
# usage: docker/k8s/validate.sh
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
venv=${MODELGATE_DEPLOY_TOOLS:-$root/target/deploy-tools}
requirements=$root/docker/k8s/requirements.txt
python=${PYTHON:-python3}

# Reinstall only when the pinned requirements change.
stamp=$venv/.requirements
if ! cmp -s "$requirements" "$stamp" 2>/dev/null; then
    rm -rf "$venv"
    "$python" -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$requirements"
    cp "$requirements" "$stamp"
fi

exec "$venv/bin/python" "$root/docker/k8s/checks.py"
