"""The extension's thread-local storage (issue 13): the hot per-thread state is
initial-exec (csrc/sync/clock.h, AGX_TLS_HOT), which puts the module's whole TLS
block into glibc's static TLS, of which only a few hundred bytes are spare for
dlopen'd objects. So the block must stay small (the region stack lives behind a
pointer), and the module must still load with dlopen after other libraries."""
from __future__ import annotations

import os
import struct
import subprocess
import sys
import textwrap

import pytest

import agxguard._C as C

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TLS_LIMIT = 256  # bytes; glibc's spare static TLS for dlopen is 512 by default, shared by every library
PT_TLS = 7


def elf_tls_size(path: str) -> int:
    """The PT_TLS segment's memory size of a 64-bit little-endian ELF file (0: none)."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError(f"{path}: not a 64-bit little-endian ELF file")
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(phnum):
        off = phoff + i * phentsize
        p_type, = struct.unpack_from("<I", data, off)
        if p_type == PT_TLS:
            return struct.unpack_from("<Q", data, off + 0x28)[0]  # p_memsz
    return 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the static TLS limit is glibc's (Linux)")
def test_the_extension_tls_block_fits_the_static_tls_spare():
    size = elf_tls_size(C.__file__)
    assert size <= TLS_LIMIT, f"{C.__file__}: {size} bytes of TLS, more than {TLS_LIMIT}"


def run_child(code: str, timeout: int = 120) -> str:
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:]
    return r.stdout


def test_loads_with_dlopen_after_torch_in_a_fresh_process():
    out = run_child("""
        import torch, agxguard
        print('loaded', agxguard._C.get_mode())
    """)
    assert "loaded" in out


def test_region_stacks_of_many_short_lived_threads():
    """Each thread's region stack is allocated on its first region and freed at
    its exit: 300 threads in turn, each three regions deep, then the main thread."""
    out = run_child("""
        import threading, agxguard
        from agxguard import _C
        _C.set_mode("op")
        g = agxguard.guard()
        depths = []
        def work():
            with g, g, g:
                depths.append(threading.get_ident())
        for _ in range(300):
            t = threading.Thread(target=work); t.start(); t.join()
        with g:
            pass
        print("ok", len(depths))
    """)
    assert "ok 300" in out, out
