#!/usr/bin/env bash
# kvsharer's one entry point for a fresh machine: installs the system packages the
# build needs (cmake, libclang for bindgen, a C++ compiler) and lavapipe for the
# wgpu backend's tests (mesa-vulkan-drivers), then either runs the
# kvsharer binary or the test suite.
#
#   bash scripts/dev.sh run -p "Once upon a time" -n 64   # any kvsharer subcommand
#   bash scripts/dev.sh test                              # the whole test suite
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
command -v cmake >/dev/null 2>&1 || need_pkgs+=(cmake)
command -v c++ >/dev/null 2>&1 || need_pkgs+=(g++)
# bindgen needs libclang itself (libclang.so / libclang-NN.so), not libclang-cpp,
# which machines with llvm-NN-dev installed already have.
have_libclang=no
for pattern in /usr/lib/llvm-*/lib/libclang.so* /usr/lib/llvm-*/lib/libclang-[0-9]*.so* \
    /usr/lib/*/libclang.so* /usr/lib/*/libclang-[0-9]*.so*; do
    [ -e "$pattern" ] && have_libclang=yes && break
done
[ "$have_libclang" = yes ] || need_pkgs+=(libclang-dev clang)
python3 -m pip --version >/dev/null 2>&1 || need_pkgs+=(python3-pip)
# serve's tests install the official openai client into a virtual environment.
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || need_pkgs+=(python3-venv)
# The wgpu backend's tests run on lavapipe (software Vulkan) where there is no GPU.
ls /usr/share/vulkan/icd.d/lvp_icd.*.json >/dev/null 2>&1 || need_pkgs+=(mesa-vulkan-drivers)

if [ ${#need_pkgs[@]} -gt 0 ]; then
    echo "dev.sh: installing ${need_pkgs[*]}" >&2
    SUDO=""
    if [ "$(id -u)" != 0 ]; then
        command -v sudo >/dev/null 2>&1 || { echo "dev.sh: need root or sudo to install ${need_pkgs[*]}" >&2; exit 1; }
        SUDO=sudo
    fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi

# Both commands share one release build, so the second is quick.
cmd="${1:-run}"
case "$cmd" in
    test)
        shift
        # The import rules of the crate's layers (no circles, no backend importing
        # a product); a violation fails the run before the long build.
        python3 scripts/check_layers.py
        exec cargo test --release "$@"
        ;;
    *)
        exec cargo run --release --quiet -- "$@"
        ;;
esac
