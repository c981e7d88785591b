#!/usr/bin/env bash
# The base image for buildah where no registry can be reached: a local `debian:bookworm-slim` with Python, made from
# Debian's own packages (debootstrap's minimal system + python3, python3-venv, ca-certificates, ~40 s) and committed
# as $BASE_IMAGE. Does nothing when that image exists. Needs root, buildah and debootstrap (deploy/install-tools.sh).
# DEBIAN_MIRROR picks the mirror (default deb.debian.org); the image's apt uses it too.
set -euo pipefail
BASE_IMAGE=${BASE_IMAGE:-localhost/debian-python:bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
buildah() { command buildah "$@"; }

if buildah inspect --type image "$BASE_IMAGE" >/dev/null 2>&1; then
  echo "base image present: $BASE_IMAGE"
  exit 0
fi
rootfs=$(mktemp -d)
container=
cleanup() { [ -z "$container" ] || buildah rm "$container" >/dev/null; rm -rf "$rootfs"; }
trap cleanup EXIT
echo "debootstrap bookworm from $MIRROR into $rootfs"
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs" "$MIRROR" >/dev/null
# As the official slim image: the updates and security suites, applied; no package lists, caches, logs or device
# nodes (a container runtime provides /dev).
cat > "$rootfs/etc/apt/sources.list" <<SOURCES
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb ${MIRROR}-security bookworm-security main
SOURCES
chroot "$rootfs" sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get upgrade -y -qq' >/dev/null
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb \
       "$rootfs"/var/log/*.log "$rootfs"/dev/*
container=$(buildah from scratch)
mountpoint=$(buildah mount "$container")
cp -a "$rootfs"/. "$mountpoint"/
buildah umount "$container" >/dev/null
buildah config --env LANG=C.UTF-8 --cmd python3 "$container"
buildah commit --quiet "$container" "$BASE_IMAGE" >/dev/null
echo "base image built: $BASE_IMAGE"
