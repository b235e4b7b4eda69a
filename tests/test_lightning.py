"""SyncBatchNormPlugin: Lightning's DDP strategy on 2 CPU processes trains with syncbn's layers,
a fused SyncBatchNormAct among them, and reverts them all at teardown.

Oracle: the same network with torch BatchNorm2d taking one SGD step in one process on the
4-sample global batch (what 2 ranks x 2 samples with synchronized statistics equal).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import torchvision_shim  # noqa: F401  (Lightning imports torchvision; before lightning)

import pytest
import torch

pytest.importorskip("lightning")

import lightning_ddp_script as script  # noqa: E402

TIMEOUT_S = 300


def _run_script(out_dir: str) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    for variable in ("MASTER_PORT", "MASTER_ADDR", "LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK"):
        env.pop(variable, None)  # Lightning then picks a free port itself
    process = subprocess.Popen([sys.executable, script.__file__, out_dir], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        output, _ = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # Lightning's second rank is in this group too
        output, _ = process.communicate()
        missing = [r for r in range(2) if not os.path.exists(os.path.join(out_dir, f"rank{r}.pt"))]
        pytest.fail(f"the Lightning run did not finish within {TIMEOUT_S} s; rank(s) {missing} "
                    f"never finished; all were killed. Output tail:\n{output.decode()[-3000:]}")
    assert process.returncode == 0, output.decode()[-3000:]


def _one_process_step():
    network = script.make_network()
    images, labels = script.make_data()
    optimizer = torch.optim.SGD(network.parameters(), lr=script.LEARNING_RATE)
    torch.nn.functional.cross_entropy(network(images), labels).backward()
    optimizer.step()
    return network.state_dict()


def test_ddp_on_two_cpu_processes_trains_with_syncbn_layers_that_equal_the_global_batch(tmp_path):
    _run_script(str(tmp_path))
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    expected = _one_process_step()
    for rank, result in enumerate(results):
        assert result["norm_class_in_training"] == "syncbn.module.SyncBatchNorm"
        assert result["norm_class_after_fit"] == "BatchNorm2d"  # reverted at teardown
        assert result["fused_class_in_training"] == "SyncBatchNormAct"
        assert result["fused_classes_after_fit"] == ["BatchNorm2d", "LeakyReLU"]
        for key, value in expected.items():
            torch.testing.assert_close(result["state"][key], value, rtol=1e-10, atol=1e-12,
                                       msg=lambda m: f"rank {rank}, {key}: {m}")
