#!/usr/bin/env bash
# Set up agxguard on a fresh machine: the Objective-C runtime (Debian: apt),
# Python packages (pip), and the C extension built in place.
# macOS needs only the Xcode command line tools (xcode-select --install):
# Apple's Objective-C runtime and Metal come with the system.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

have_objc() {
    printf '#include <objc/runtime.h>\nint main(void){return 0;}\n' |
        ${CC:-cc} -x c - -o /dev/null -lobjc >/dev/null 2>&1
}

if [ "$(uname -s)" = Linux ] && ! have_objc; then
    if command -v apt-get >/dev/null 2>&1; then
        SUDO=""
        [ "$(id -u)" -ne 0 ] && SUDO="sudo"
        echo "setup: installing GCC's Objective-C runtime (gobjc, libobjc-12-dev) with apt"
        $SUDO apt-get install -y -q gobjc libobjc-12-dev >/dev/null ||
            { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q gobjc libobjc-12-dev >/dev/null; } ||
            echo "setup: could not install the Objective-C runtime; building without swizzling and the driver model"
    else
        echo "setup: no apt-get and no Objective-C runtime; building without swizzling and the driver model"
    fi
fi

$PYTHON -m pip --version >/dev/null 2>&1 || $PYTHON -m ensurepip --upgrade
pip_install() { $PYTHON -m pip install -q --disable-pip-version-check "$@"; }
# torch: keep one that is already there (e.g. a CUDA build); else the pinned CPU build
$PYTHON -c "import torch" 2>/dev/null || pip_install "torch==2.13.0"
$PYTHON -c "import pytest" 2>/dev/null || pip_install "pytest>=7"
$PYTHON -c "import setuptools, wheel" 2>/dev/null || pip_install setuptools wheel
pip_install --no-build-isolation --no-deps -e .
$PYTHON setup.py build_ext --inplace -q
$PYTHON -c "import agxguard; print('setup: agxguard', agxguard.__version__, '| swizzling:', agxguard.swizzle_available())"
