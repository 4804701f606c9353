"""spp.bench.retain_freed_memory: after it, repeated large allocations reuse pages instead of
faulting fresh ones in (each case runs in its own interpreter: the setting is process-wide)."""
import json
import platform
import subprocess
import sys

import pytest

SCRIPT = r"""
import json, resource, sys
import torch
from spp import bench
torch.set_num_threads(1)
ok = bench.retain_freed_memory() if sys.argv[1] == "retain" else None
x = torch.ones(10 << 20)  # 40 MiB: above the largest mmap threshold glibc picks by itself (32 MiB)
def step():  # four 40 MiB blocks live at once, then freed, as a layer's activations are
    a = x * 2.0
    b = a + 1.0
    c = b * a
    d = c - b
    return float(d[-1])
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(json.dumps({"ok": ok, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before,
                  "setting": bench.malloc_setting()}))
"""


def _huge_pages_always() -> bool:
    """Transparent huge pages on for every mapping: fresh blocks then fault in 2 MiB at a time."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[always]" in f.read()
    except OSError:
        return False


def run(mode):
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_retained_memory_stops_page_faults_per_allocation():
    default, retained = run("default"), run("retain")
    assert default["setting"] == "default" or default["setting"].startswith("GLIBC_TUNABLES")
    assert retained["ok"] is True and retained["setting"].startswith("retain(mmap=")
    pages = 10 * 4 * (40 << 20) // 4096  # every block of every step faulted in afresh, 4 KiB pages
    if default["setting"] == "default" and not _huge_pages_always():
        assert default["faults"] > pages // 2  # the default hands freed blocks back and faults them in again
    assert retained["faults"] < pages // 10  # at most a block or two as the heap settles


@pytest.mark.parametrize("kw", [{"mmap_threshold": 1 << 31}, {"trim_threshold": 0}, {"mmap_threshold": 2.5}])
def test_thresholds_outside_a_c_int_are_refused(kw):
    """mallopt takes a C int: a larger value would wrap silently (4 GiB -> 0, trim everything)."""
    from spp import bench

    with pytest.raises(ValueError, match="mallopt takes a C int"):
        bench.retain_freed_memory(**kw)
