#!/usr/bin/env bash
# Installs what the deploy checks and tests need that pip cannot give, from Debian's packages: Prometheus
# (prometheus, promtool) and docker-compose (1.29.2, Python; its `config` needs no Docker engine). Does nothing
# when both are there. Needs root (CI runs as root). hadolint and kubernetes-validate come from requirements.txt.
set -euo pipefail
packages=()
if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then packages+=(prometheus); fi
if ! command -v docker-compose >/dev/null; then packages+=(docker-compose=1.29.2-3); fi
if [ ${#packages[@]} -eq 0 ]; then
  echo "deploy tools present: $(promtool --version 2>&1 | head -1); $(docker-compose version --short)"
  exit 0
fi
echo "installing ${packages[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
