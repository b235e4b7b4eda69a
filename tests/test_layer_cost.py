"""benchmarks/layer_cost.py (issue 26): the op count of a layer step against its bound, and the
benchmark's three sections end to end on tiny shapes."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import layer_cost
from syncbn import kernels


def test_a_layer_step_at_w2_dispatches_at_most_20_ops_on_the_default_cpu_path():
    """The issue's rule: forward+backward of an affine layer with running statistics in a group
    whose stand-in sums two identical ranks; every op but views and the stand-in's own."""
    rows = {row["peer"]: row for row in layer_cost.run_ops()}
    assert rows["BatchNorm2d"]["ops"] == 7, rows["BatchNorm2d"]  # the count for BatchNorm2d
    default = rows["syncbn (default path)"]
    if default["backend"] != kernels.native.__name__:
        pytest.skip(f"the default path here is {default['backend']} (the native kernels are off)")
    assert default["ops"] <= layer_cost.OPS_GOAL, default["by_op"]
    assert rows["syncbn (reference kernels)"]["backend"] == kernels.reference.__name__


def test_the_stand_in_communicator_and_its_op_are_left_out_of_the_count():
    stand_in = layer_cost.TwoIdenticalRanks()
    payload = torch.ones(3)
    assert stand_in.all_reduce_sum_(payload) is payload and torch.equal(payload, torch.full((3,), 2.0))
    with layer_cost.OpCount() as counted:
        torch.ones(2).mul_(2).view(2, 1)
    assert counted.ops == {"aten::ones": 1, "aten::mul_": 1}  # the view is not counted


def test_smoke_run_writes_every_section(tmp_path):
    results = layer_cost.main(["--smoke", "--out", str(tmp_path)])
    assert len(results["compute"]) == 2 * len(layer_cost.LAYOUTS) * len(layer_cost.DTYPES)
    for row in results["compute"]:  # compute: each step less its own stand-in time, so below the step
        assert 0 < row["syncbn_ms"] < row["syncbn_step_ms"] and row["stand_in_ms"] > 0, row
        assert row["ratio"] == row["syncbn_ms"] / row["batchnorm_ms"]
    assert [row["peer"] for row in results["ops"]] == [
        "syncbn (default path)", "syncbn (reference kernels)", "BatchNorm2d"]
    assert [row["backend"] for row in results["comm"]] == ["gloo"]
    assert results["comm"][0]["naive_vs_syncbn"] > 0
    report = (tmp_path / "layer_cost.md").read_text()
    for heading in ("Compute of a layer step", "Torch ops per layer step", "With communication"):
        assert heading in report
    assert json.loads((tmp_path / "layer_cost.json").read_text())["mode"] == "smoke"


_REUSES_PAGES = """
import resource, torch
from benchmarks import layer_cost
print(layer_cost.keep_freed_memory())
faults = []
for _ in range(12):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(5 << 20)  # 20 MiB, every page written, freed at once: a step's output
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(faults)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_the_command_keeps_freed_memory_so_steps_reuse_mapped_pages():
    """keep_freed_memory, in a child (it stays set for the life of a process): the report's
    allocator line, and a 20 MiB tensor allocated again and again mostly reuses mapped pages once
    warm (here 8-9 of the 9 allocations after the third took no fault; the kernel may still
    reclaim a page now and then). glibc's default mapped it afresh, 5120 faults, in 4-6 of them."""
    out = subprocess.run([sys.executable, "-c", _REUSES_PAGES], capture_output=True, text=True, check=True,
                         timeout=120, cwd=Path(layer_cost.__file__).parents[1]).stdout.splitlines()
    assert out[0] == "glibc malloc, tensors up to 32 MiB from its heap, freed memory kept (mallopt)"
    assert sum(faults == 0 for faults in json.loads(out[1])[3:]) >= 6, out[1]
