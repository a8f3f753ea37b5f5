#!/usr/bin/env bash
# Set up agxguard on a fresh machine: the Objective-C runtime and libffi (Debian: apt),
# Python packages (pip), and the C extension built in place.
# macOS needs only the Xcode command line tools (xcode-select --install):
# Apple's Objective-C runtime and Metal come with the system.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

apt_install() {
    command -v apt-get >/dev/null 2>&1 || return 1
    local SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get install -y -q "$@" >/dev/null ||
        { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q "$@" >/dev/null; }
}

have_objc() {
    printf '#include <objc/runtime.h>\nint main(void){return 0;}\n' |
        ${CC:-cc} -x c - -o /dev/null -lobjc >/dev/null 2>&1
}

if [ "$(uname -s)" = Linux ] && ! have_objc; then
    echo "setup: installing GCC's Objective-C runtime (gobjc, libobjc-12-dev) with apt"
    apt_install gobjc libobjc-12-dev ||
        echo "setup: could not install the Objective-C runtime; building without swizzling and the driver model"
fi
have_ffi() {
    printf '#include <ffi.h>\nint main(void){return 0;}\n' |
        ${CC:-cc} -x c - -o /dev/null -lffi >/dev/null 2>&1
}

# libffi: the swizzle engine's general forwarder (methods with no typed wrapper); macOS ships it
if [ "$(uname -s)" = Linux ] && ! have_ffi; then
    echo "setup: installing libffi (libffi-dev) with apt"
    apt_install libffi-dev ||
        echo "setup: could not install libffi; methods with no typed wrapper will not be guardable"
fi
# qemu-user: the tests run the forwarder's arm64 trampoline (the Apple path's architecture)
# under emulation (tests/test_forwarder_trampoline.py); without it that test skips, saying so
if [ "$(uname -s)" = Linux ] && [ "$(uname -m)" != aarch64 ] && ! command -v qemu-aarch64 >/dev/null 2>&1; then
    echo "setup: installing qemu-user with apt (the arm64 trampoline test)"
    apt_install qemu-user || echo "setup: could not install qemu-user; the arm64 trampoline test will skip"
fi
# a distribution's Python may lack pip or its C headers
$PYTHON -m pip --version >/dev/null 2>&1 || $PYTHON -m ensurepip --upgrade >/dev/null 2>&1 ||
    apt_install python3-pip || { echo "setup: pip is missing and could not be installed"; exit 1; }
$PYTHON -c "import sysconfig, os, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()['include'], 'Python.h')))" ||
    apt_install python3-dev || { echo "setup: Python's C headers are missing (Debian: python3-dev)"; exit 1; }
# Debian's own Python refuses pip installs outside a venv (PEP 668); this script installs on purpose
export PIP_BREAK_SYSTEM_PACKAGES=1
pip_install() { $PYTHON -m pip install -q --disable-pip-version-check "$@"; }
# torch: keep one that is already there (e.g. a CUDA build); else the pinned CPU build
$PYTHON -c "import torch" 2>/dev/null || pip_install "torch==2.13.0"
$PYTHON -c "import pytest" 2>/dev/null || pip_install "pytest>=7"
$PYTHON -c "import setuptools, wheel" 2>/dev/null || pip_install setuptools wheel
# the macOS cross-build check (make macos-check, part of the tests): Apple's headers
# come with the pinned ziglang, and macholib reads the bundle's symbols
$PYTHON -c "import ziglang, macholib" 2>/dev/null || pip_install -r scripts/macos-check-requirements.txt
# the import-graph check of the tests (tests/test_layout.py: no import circles, the
# product never imports the lab) reads the sources with the pinned grimp
$PYTHON -c "import grimp" 2>/dev/null || pip_install -r scripts/layout-check-requirements.txt
# the suites' tradeoff plot (a PNG beside each --json report) and its tests draw with matplotlib
$PYTHON -c "import matplotlib" 2>/dev/null || pip_install -r scripts/plot-requirements.txt
# the HTTP example on the Batcher (examples/http_server.py) and its test
$PYTHON -c "import aiohttp" 2>/dev/null || pip_install -r scripts/example-requirements.txt
# compiler command lines go to a log, shown only when the build fails
BUILD_LOG=$(mktemp)
quiet() { "$@" >"$BUILD_LOG" 2>&1 || { cat "$BUILD_LOG"; echo "setup: failed: $*"; exit 1; }; }
quiet pip_install --no-build-isolation --no-deps -e .
quiet $PYTHON setup.py build_ext --inplace -q
grep -h "^agxguard: " "$BUILD_LOG" || true
rm -f "$BUILD_LOG"
$PYTHON -c "import agxguard; print('setup: agxguard', agxguard.__version__, '| swizzling:', agxguard.status()['runtime'] or 'unavailable')"
