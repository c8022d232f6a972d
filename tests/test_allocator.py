"""zoo.allocator: with freed memory retained, a buffer freed and taken again is not faulted in
again; the kernel's own count of page faults (getrusage) is the reference."""

import os
import subprocess
import sys

import pytest

from zoo import allocator

# Takes a 64 MiB buffer from malloc three times (written each time, freed in between, as XLA:CPU
# does with a call's buffers) and prints the page faults of the third.
PROBE = """\
import ctypes, resource
from zoo import allocator
print(allocator.retain_freed_memory())
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(64 << 20)
    ctypes.memset(block, 1, 64 << 20)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    libc.free(block)
print(faults)
"""


def third_allocation_faults(**env) -> tuple[bool, int]:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, check=False,
                         env={**os.environ, **env})
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


def test_the_zoo_command_retains_and_main_alone_does_not(monkeypatch):
    from zoo import cli

    calls = []
    monkeypatch.setattr(allocator, "retain_freed_memory", lambda: calls.append("retain") or True)
    monkeypatch.setattr(cli, "main", lambda: calls.append("main") or 0)
    with pytest.raises(SystemExit):
        cli.command()
    assert calls == ["retain", "main"]
