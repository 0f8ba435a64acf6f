#!/bin/bash
# Docker HEALTHCHECK: healthy while GET /healthz on the REST port answers 200. The runtime
# image carries no curl, so this speaks HTTP through bash's /dev/tcp. (Kubernetes ignores
# HEALTHCHECK: the Deployment's probes call /healthz and /readyz themselves.)
#
# usage: healthcheck.sh [PORT [PATH]]   (default: $MODELGATE_REST_PORT or 8501, /healthz)
set -euo pipefail

port=${1:-${MODELGATE_REST_PORT:-8501}}
path=${2:-/healthz}

exec 3<>"/dev/tcp/127.0.0.1/$port"
printf 'GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n' "$path" >&3
IFS= read -r -t 5 status <&3
exec 3<&-
# "HTTP/1.1 200 OK\r"
[[ $status =~ ^HTTP/1\.[01]\ 200 ]]
