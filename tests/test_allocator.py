"""zoo.allocator: with freed memory retained, a buffer freed and taken again is not faulted in
again; the kernel's own count of page faults (getrusage) is the reference."""

import os
import subprocess
import sys

import pytest

from zoo import allocator

# Takes a buffer from malloc three times (its last 64 MiB written each time, freed in between, as
# XLA:CPU does with a call's buffers) and prints the page faults of the third. argv: the size in MiB.
PROBE = """\
import ctypes, resource, sys
from zoo import allocator
print(allocator.retain_freed_memory())
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size, tail = int(sys.argv[1]) << 20, 64 << 20
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(size)
    ctypes.memset(block + size - tail, 1, tail)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    libc.free(block)
print(faults)
"""


def third_allocation_faults(mib: int = 64, **env) -> tuple[bool, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, str(mib)], capture_output=True, text=True, timeout=120,
                         check=False, env={**os.environ, **env})
    assert out.returncode == 0, out.stderr
    took, faults = out.stdout.split()[-2:]
    return took == "True", int(faults)


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's mallopt: Linux only")
def test_freed_memory_is_reused_without_page_faults():
    took, faults = third_allocation_faults()
    assert took and faults < 16  # no new pages: the freed block came back
    took, faults = third_allocation_faults(FCNZOO_ALLOCATOR="glibc")
    # glibc's own way: returned, then faulted in again, a fault per 4 KiB page (or per 2 MiB where
    # the kernel gives every mapping huge pages: transparent_hugepage "always")
    assert not took and faults >= 30


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's mallopt: Linux only")
def test_a_freed_heap_top_beyond_2_gib_is_kept():
    # mallopt's int cannot say a trim threshold of 2 GiB or more: only "never" (-1) keeps a free
    # top this large (Xception's training step frees 2.9 GB at its end). Only the last 64 MiB of
    # the 2.5 GiB block are ever touched, so this costs 64 MiB of memory.
    took, faults = third_allocation_faults(2560)
    assert took and faults < 16


def test_the_zoo_command_retains_and_main_alone_does_not(monkeypatch):
    from zoo import cli

    calls = []
    monkeypatch.setattr(allocator, "retain_freed_memory", lambda: calls.append("retain") or True)
    monkeypatch.setattr(cli, "main", lambda: calls.append("main") or 0)
    with pytest.raises(SystemExit):
        cli.command()
    assert calls == ["retain", "main"]
