#!/usr/bin/env bash
# Builds llama.cpp's llama-server for side-by-side benchmarks (scripts/load.sh) and
# prints the binary's path. The llama.cpp inside llama-cpp-sys-2's crate lacks the
# server's sources (crates.io packaging keeps only the library), so this builds the
# llama.cpp that the PyPI source package llama-cpp-python==0.3.36 vendors (fetched
# with pip, as the default model is). Needs cmake and a C++ compiler.
set -euo pipefail
version=0.3.36
root=${LLAMA_BUILD_DIR:-$HOME/.cache/kvsharer/llama-server-$version}
bin="$root/build/bin/llama-server"
if [ ! -x "$bin" ]; then
  command -v cmake >/dev/null || { echo "error: cmake is needed to build llama-server (hint: apt-get install cmake)" >&2; exit 1; }
  mkdir -p "$root"
  if [ ! -d "$root/src" ]; then
    python3 -m pip download "llama-cpp-python==$version" --no-deps --no-binary :all: -d "$root/dl" -q >&2
    tar xzf "$root/dl/llama_cpp_python-$version.tar.gz" -C "$root"
    mv "$root/llama_cpp_python-$version/vendor/llama.cpp" "$root/src"
    rm -rf "$root/llama_cpp_python-$version" "$root/dl"
  fi
  cmake -S "$root/src" -B "$root/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DGGML_NATIVE=ON >&2
  cmake --build "$root/build" --target llama-server -j "$(nproc)" >&2
fi
echo "$bin"
