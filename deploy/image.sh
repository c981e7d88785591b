#!/usr/bin/env bash
# `make image`: builds deploy/Dockerfile as $IMAGE (default splitserve:$VARIANT; VARIANT cpu or cuda) with Docker
# when a Docker engine answers, else with Debian's buildah: no daemon, chroot isolation, as root, on the Debian base
# that deploy/base-image.sh makes (BASE_IMAGE overrides the base either way). buildah stores images with the kernel's
# overlay filesystem where it can (each layer a diff; vfs copies the whole tree per layer: ~2 GB a step here), else
# vfs; STORAGE_DRIVER=vfs forces it (e.g. inside an unprivileged container).
# With buildah, pip inside the build resolves as it does on this machine: each setting `pip config list` shows
# (index, extra index, find-links, constraint, cert, trusted host) becomes its PIP_* build arg, the files and folders
# it names are mounted read-only at the same paths, and torch comes from those settings too (TORCH_INDEX_URL, when
# set, still wins). Layers are cached between builds (--layers); NO_CACHE=1 builds from nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
VARIANT=${VARIANT:-cpu}
IMAGE=${IMAGE:-splitserve:$VARIANT}
PY=${PY:-.venv/bin/python}
args=(-f deploy/Dockerfile --build-arg "VARIANT=$VARIANT" -t "$IMAGE")
[ "${NO_CACHE:-0}" = 0 ] || args+=(--no-cache)

BUILDER=${BUILDER:-auto}   # auto: docker when its engine answers, else buildah
docker_runs() { command -v docker >/dev/null && docker info >/dev/null 2>&1; }
if [ "$BUILDER" = docker ] || { [ "$BUILDER" = auto ] && docker_runs; }; then
  [ -z "${TORCH_INDEX_URL+set}" ] || args+=(--build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL")
  [ -z "${BASE_IMAGE:-}" ] || args+=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
  exec docker build "${args[@]}" .
fi

if ! command -v buildah >/dev/null; then
  echo "neither a Docker engine nor buildah: run deploy/install-tools.sh" >&2
  exit 1
fi
BASE_IMAGE=${BASE_IMAGE:-localhost/debian-python:bookworm}
if [[ $BASE_IMAGE == localhost/* ]]; then BASE_IMAGE=$BASE_IMAGE bash deploy/base-image.sh; fi
args+=(--build-arg "BASE_IMAGE=$BASE_IMAGE")

# This machine's pip settings; the environment's (":env:.key=...") last, as pip gives them precedence.
settings=$("$PY" -m pip config list)
settings="$(grep -v '^:env:' <<<"$settings" || true)
$(grep '^:env:' <<<"$settings" || true)"
declare -A mounts=()
torch_from_pip=
while IFS= read -r line; do
  [ -n "$line" ] || continue
  key=${line%%=*}; key=${key#*.}; value=${line#*=}; value=${value#\'}; value=${value%\'}
  case $key in index-url|extra-index-url|find-links|constraint|cert|trusted-host) ;; *) continue ;; esac
  args+=(--build-arg "PIP_$(tr 'a-z-' 'A-Z_' <<<"$key")=$value")
  [[ $key == cert || $key == constraint || $key == trusted-host ]] || torch_from_pip=1
  for word in $value; do
    path=${word#file://}
    [[ $path == /* && -e $path ]] || continue
    [[ $path != */simple && $path != */simple/ ]] || path=$(dirname "$path")   # a local index: its files lie beside
    mounts[$path]=1
  done
done <<<"$settings"
for path in "${!mounts[@]}"; do args+=(-v "$path:$path:ro"); done
if [ -n "${TORCH_INDEX_URL+set}" ]; then
  args+=(--build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL")
elif [ -n "$torch_from_pip" ]; then
  args+=(--build-arg "TORCH_INDEX_URL=")
fi

echo "+ buildah bud ${args[*]} ."
buildah bud --isolation chroot --layers --ignorefile deploy/Dockerfile.dockerignore "${args[@]}" .
buildah images --format '{{.Name}}:{{.Tag}} {{.Size}}' "$IMAGE"
