#!/usr/bin/env bash
# Installs what the deploy checks and the image test need that pip cannot give, from Debian's packages: Prometheus
# (prometheus, promtool), docker-compose (1.29.2, Python; its `config` needs no Docker engine), and buildah and
# debootstrap (`make image` / `make image-test` build and run the image without a daemon). Does nothing when all are
# there. Needs root (CI runs as root). hadolint and kubernetes-validate come from requirements.txt.
set -euo pipefail
packages=()
if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then packages+=(prometheus); fi
if ! command -v docker-compose >/dev/null; then packages+=(docker-compose=1.29.2-3); fi
if ! command -v buildah >/dev/null; then packages+=(buildah); fi
if ! command -v debootstrap >/dev/null; then packages+=(debootstrap); fi
if [ ${#packages[@]} -eq 0 ]; then
  echo "deploy tools present: $(promtool --version 2>&1 | head -1); $(docker-compose version --short);" \
       "$(buildah --version); debootstrap $(debootstrap --version | awk '{print $2}')"
  exit 0
fi
echo "installing ${packages[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
