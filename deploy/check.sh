#!/usr/bin/env bash
# `make deploy-check`: validates everything under deploy/ that can be checked without a container engine.
# tests/deploy/ runs the same checks (and much more: the real services, a real Prometheus) in `make test`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
BIN=$(dirname "$PY")
run() { echo "+ $*"; "$@"; }
run docker-compose -f deploy/docker-compose.yml config --quiet
run docker-compose -f deploy/docker-compose.yml -f deploy/docker-compose.gpu.yml config --quiet
run docker-compose -f deploy/docker-compose.yml -f deploy/docker-compose.disaggregated.yml config --quiet
run promtool check config deploy/prometheus/prometheus.yml
run promtool check rules deploy/prometheus/rules/*.yml
run promtool test rules deploy/prometheus/tests/*.yml
run "$BIN/kubernetes-validate" --strict deploy/k8s/*.yaml deploy/k8s/disaggregated/*.yaml
run "$BIN/hadolint" deploy/Dockerfile
run "$PY" deploy/grafana/dashboard.py --check
echo "deploy-check: all passed"
