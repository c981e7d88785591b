#!/usr/bin/env bash
# Builds llama.cpp's own `llama-server` from the llama.cpp sources vendored in the pinned llama-cpp-python sdist
# (the same llama.cpp the batch-1 peer runs), with CMake and native CPU flags: nothing but the sdist is downloaded
# (this llama.cpp has no curl dependency; its own downloader only runs when asked for a model by URL, and the bench
# passes a file). Idempotent: does nothing when the binary exists. Called by `make bench-peers`.
#
# usage: [VERSION=0.3.36] [PIP=...] bench/build_llama_server.sh [DEST]
#        (DEST defaults to .bench-llama; the binary is DEST/bin/llama-server)
set -euo pipefail

VERSION=${VERSION:-0.3.36}
DEST=${1:-.bench-llama}
PIP=${PIP:-python3 -m pip}
BINARY="$DEST/bin/llama-server"

if [ -x "$BINARY" ]; then
    echo "llama-server already built: $BINARY"
    exit 0
fi

mkdir -p "$DEST"
DEST=$(cd "$DEST" && pwd)
SRC="$DEST/src"
SDIST="$DEST/sdist/llama_cpp_python-$VERSION.tar.gz"
if [ ! -f "$SDIST" ]; then
    # only the peer as source; the tools pip prepares its metadata with may come as wheels
    $PIP download --quiet --no-binary llama-cpp-python --no-deps --dest "$DEST/sdist" "llama-cpp-python==$VERSION"
fi
if [ ! -d "$SRC/vendor/llama.cpp" ]; then
    rm -rf "$SRC"
    mkdir -p "$SRC"
    tar -xzf "$SDIST" -C "$SRC" --strip-components=1
fi

GENERATOR=()
if command -v ninja >/dev/null; then GENERATOR=(-G Ninja); fi
cmake -S "$SRC/vendor/llama.cpp" -B "$DEST/build" "${GENERATOR[@]}" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DBUILD_SHARED_LIBS=OFF
cmake --build "$DEST/build" --target llama-server -j "$(nproc)"
mkdir -p "$DEST/bin"
cp "$DEST/build/bin/llama-server" "$BINARY"
echo "llama-server built: $BINARY"
