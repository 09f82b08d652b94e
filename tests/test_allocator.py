"""The CPU allocator setting: freed activation memory is reused, not page-faulted in again every step."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = r"""
import resource, sys
import torch
from cityseg.allocator import keep_freed_memory

def faults_per_step(steps=10):
    # a step's worth of activations: allocate, touch and free 64 MiB, as a training step does
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(steps):
        torch.empty(16 * 2**20, dtype=torch.float32).fill_(1.0)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / steps

faults_per_step()
default = faults_per_step()
applied = keep_freed_memory()
faults_per_step()  # the heap settles within a few steps after the change
print(default, faults_per_step(), applied)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_keep_freed_memory_stops_per_step_page_faults():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout
    default, kept, applied = out.split()
    pages = 64 * 2**20 / 4096
    assert applied == "True"
    assert float(default) > 0.5 * pages  # glibc maps and unmaps the block every time
    assert float(kept) < 0.02 * pages  # now the heap keeps it
