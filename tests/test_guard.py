"""Failures are loud, fast and raised on every rank: the guard, group-wide errors, timeouts."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from datetime import timedelta

import pytest
import torch
import torch.utils.checkpoint

import syncbn
from conftest import ranks_over_each_backend, requires_mpi, sync_group
from scenarios import IdenticalPeers
from syncbn.comm import Communicator
from syncbn.testing import RankFailure, RecordingCommunicator, run_on_ranks


def _outcome(action) -> str:
    try:
        action()
    except Exception as error:  # the tests compare what each rank raised
        return f"{type(error).__name__}: {error}"
    return "no error"


@ranks_over_each_backend(2, timeout=60)
def test_debug_guard_turns_a_skipped_layer_into_an_error_on_every_rank(rank, backend):
    first = syncbn.SyncBatchNorm(4, name="block.bn1", debug=True, process_group=sync_group(backend))
    second = syncbn.SyncBatchNorm(4, name="block.bn2", debug=True, process_group=sync_group(backend))
    with pytest.raises(syncbn.CollectiveMismatchError) as info:
        y = first(torch.randn(3, 4, 2, 2, requires_grad=True))
        if rank == 0:  # a data-dependent branch taken on one rank only
            y = second(y)
        y.sum().backward()
    message = str(info.value)
    # rank 0 waits in bn2's forward, rank 1 in bn1's backward; each names the other
    assert message.startswith(f"SyncBatchNorm(4) 'block.bn{2 - rank}'")
    assert f"rank(s) [{1 - rank}] disagree" in message
    assert "direction=forward" in message and "direction=backward" in message


@pytest.mark.ranks(2, timeout=60)
def test_debug_guard_names_different_channel_counts_across_ranks(rank):
    channels = 4 if rank == 0 else 6
    layer = syncbn.SyncBatchNorm(channels, name="stem.bn", debug=True)
    with pytest.raises(syncbn.CollectiveMismatchError, match=r"stem\.bn") as info:
        layer(torch.randn(2, channels))
    assert "channels=4" in str(info.value) and "channels=6" in str(info.value)


@pytest.mark.ranks(2)
def test_debug_guard_adds_one_small_cross_check_before_each_collective():
    recording = RecordingCommunicator(syncbn.resolve_communicator())
    layer = syncbn.SyncBatchNorm(3, process_group=recording, debug=True)
    layer(torch.randn(2, 3, requires_grad=True)).sum().backward()
    # a (world size x 5) fingerprint table before the 4C+3 forward and 2C backward payloads
    assert recording.calls == [(10, torch.float64), (15, torch.float64), (10, torch.float64), (6, torch.float64)]


_GUARD_CALLS_SCRIPT = """
import os, sys, torch, syncbn
from syncbn.comm import Communicator
from syncbn.testing import RecordingCommunicator

class TwoIdenticalRanks(Communicator):  # one process standing in for two ranks that agree
    rank, size = 0, 2
    def all_reduce_sum_(self, tensor):
        return tensor.mul_(2)

recording = RecordingCommunicator(TwoIdenticalRanks())
layer = syncbn.SyncBatchNorm(3, process_group=recording)
for value in sys.argv[1:]:  # set before each step; read by the first
    os.environ["SYNCBN_DEBUG"] = value
    recording.calls.clear()
    try:  # the guard's cross-check cannot pass here: rank 1's fingerprint never arrives
        layer(torch.randn(2, 3, requires_grad=True)).sum().backward()
    except syncbn.CollectiveMismatchError:
        pass
    print(recording.calls[0][0])  # what the step reduced first
"""


@pytest.mark.parametrize("first, then, guarded", [("1", "0", True), ("0", "1", False), ("", "1", False)])
def test_syncbn_debug_turns_the_guard_on_as_set_at_the_first_training_step(first, then, guarded):
    env = {k: v for k, v in os.environ.items() if k != "SYNCBN_DEBUG"}
    done = subprocess.run([sys.executable, "-c", _GUARD_CALLS_SCRIPT, first, then], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    # guarded: each step first reduces the guard's fingerprints (world size x 5 values), else the
    # forward payload (4C+3); the value at the first step holds for the second
    first_reduced = "10" if guarded else "15"
    assert done.stdout.split() == [first_reduced, first_reduced]


@ranks_over_each_backend(3, timeout=60)
def test_invalid_input_on_one_rank_raises_on_every_rank_without_hanging(rank, backend):
    layer = syncbn.SyncBatchNorm(3, name="head.bn", process_group=sync_group(backend))
    if rank == 1:
        with pytest.raises(ValueError, match=r"^SyncBatchNorm\(3\) 'head\.bn': expected 3 channels"):
            layer(torch.randn(4, 5, 2))
    else:
        # the healthy ranks are told which rank's input was bad
        with pytest.raises(syncbn.CollectiveError,
                           match=r"^SyncBatchNorm\(3\) 'head\.bn': rank 1 \(1 of 3\) gave this layer invalid input"):
            layer(torch.randn(4, 3, 2))
    assert torch.equal(layer.running_mean, torch.zeros(3)) and layer.num_batches_tracked.item() == 0


@ranks_over_each_backend(2)
def test_check_finite_refuses_a_nan_batch_on_every_rank_and_keeps_running_stats(rank, backend):
    layer = syncbn.SyncBatchNorm(2, name="bn", check_finite=True, process_group=sync_group(backend))
    x = torch.randn(3, 2, 4)
    if rank == 0:
        x[0, 1, 0] = float("nan")
    whose = "(including this rank's)" if rank == 0 else "(not this rank's)"
    with pytest.raises(FloatingPointError, match=r"^SyncBatchNorm\(2\) 'bn': the batch has NaN or Inf "
                                                 r"values " + re.escape(whose)):
        layer(x)
    assert torch.equal(layer.running_var, torch.ones(2)) and layer.num_batches_tracked.item() == 0


@pytest.mark.parametrize("group", ["plain_process", "single_process_communicator"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_check_finite_refuses_a_non_finite_batch_in_a_group_of_one_and_keeps_running_stats(group, bad):
    process_group = syncbn.SingleProcessCommunicator() if group == "single_process_communicator" else None
    layer = syncbn.SyncBatchNorm(2, name="bn", check_finite=True, process_group=process_group)
    x = torch.randn(3, 2, 4)
    x[2, 0, 3] = bad
    with pytest.raises(FloatingPointError, match="'bn': the batch has NaN or Inf values"):
        layer(x)
    assert torch.equal(layer.running_mean, torch.zeros(2)) and torch.equal(layer.running_var, torch.ones(2))
    assert layer.num_batches_tracked.item() == 0
    layer(torch.randn(3, 2, 4))  # a finite batch trains on
    assert layer.num_batches_tracked.item() == 1


def test_by_default_nan_propagates_like_batchnorm():
    x = torch.randn(4, 2, 3)
    x[0, 1, 0] = float("nan")
    ours, theirs = syncbn.SyncBatchNorm(2), torch.nn.BatchNorm1d(2)
    torch.testing.assert_close(ours(x), theirs(x), equal_nan=True)
    torch.testing.assert_close(ours.running_var, theirs.running_var, equal_nan=True)


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_activation_checkpointing_updates_running_stats_once_per_step(use_reentrant):
    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), syncbn.SyncBatchNorm(3), torch.nn.ReLU())
    checkpointed = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), syncbn.SyncBatchNorm(3), torch.nn.ReLU())
    checkpointed.load_state_dict(plain.state_dict())
    for _ in range(2):
        x = torch.randn(4, 2, 6, 6, requires_grad=True)
        plain(x).square().sum().backward()
        torch.utils.checkpoint.checkpoint(checkpointed, x, use_reentrant=use_reentrant).square().sum().backward()
    for name, value in plain.state_dict().items():
        torch.testing.assert_close(checkpointed.state_dict()[name], value, msg=name)
    torch.testing.assert_close(checkpointed[0].weight.grad, plain[0].weight.grad)
    assert checkpointed[1].num_batches_tracked.item() == 2


class _CheckpointsItsBlock(torch.nn.Module):
    """A head after a conv+SyncBatchNorm+ReLU block that its forward checkpoints (or not)."""

    def __init__(self, process_group, use_reentrant=None):
        super().__init__()
        self.block = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), syncbn.SyncBatchNorm(3, process_group=process_group),
                                         torch.nn.ReLU())
        self.head = torch.nn.Conv2d(3, 3, 1)
        self.use_reentrant = use_reentrant

    def forward(self, x):
        if self.use_reentrant is None:
            return self.head(self.block(x))
        return self.head(torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=self.use_reentrant))


@pytest.mark.parametrize("group", ["alone", "two_ranks"])
@pytest.mark.parametrize("outer,inner", [(o, i) for o in (False, True) for i in (False, True)],
                         ids=lambda reentrant: "reentrant" if reentrant else "non_reentrant")
def test_nested_checkpoints_update_running_stats_once_per_step(outer, inner, group):
    # A checkpointed block whose forward checkpoints the block that holds the layer: the layer's
    # forward runs three times per step (first run, the outer recompute, the inner recompute).
    process_group = IdenticalPeers(2) if group == "two_ranks" else None
    torch.manual_seed(0)
    plain = _CheckpointsItsBlock(process_group)
    nested = _CheckpointsItsBlock(process_group, use_reentrant=inner)
    nested.load_state_dict(plain.state_dict())
    for _ in range(2):
        x = torch.randn(4, 2, 6, 6, requires_grad=True)
        plain(x).square().sum().backward()
        torch.utils.checkpoint.checkpoint(nested, x, use_reentrant=outer).square().sum().backward()
    assert nested.block[1].num_batches_tracked.item() == 2
    for name, value in plain.state_dict().items():
        torch.testing.assert_close(nested.state_dict()[name], value, msg=name)
    torch.testing.assert_close(nested.block[0].weight.grad, plain.block[0].weight.grad)


def test_input_on_another_device_than_the_layer_is_refused_with_both_devices_named():
    layer = syncbn.SyncBatchNorm(3, name="bn")
    with pytest.raises(ValueError, match="'bn': input is on meta but the layer's parameters and buffers are on cpu"):
        layer(torch.empty(2, 3, device="meta"))


class _BrokenPeer(Communicator):
    rank, size = 0, 2

    def all_reduce_sum_(self, tensor):
        raise RuntimeError("Connection closed by peer")


def test_a_failed_collective_is_reported_with_the_layer_and_the_group():
    with pytest.raises(syncbn.CollectiveError, match=r"forward all-reduce of SyncBatchNorm\(3\) 'neck' over "
                                                     r"_BrokenPeer\(rank=0, size=2\) failed: Connection closed"):
        syncbn.SyncBatchNorm(3, name="neck", process_group=_BrokenPeer())(torch.randn(2, 3))


def _wait_alone_in_a_group_with_a_short_timeout() -> str:
    rank = torch.distributed.get_rank()
    group = torch.distributed.new_group([0, 1], timeout=timedelta(seconds=2))
    if rank == 1:
        return "stayed out"
    layer = syncbn.SyncBatchNorm(3, name="lonely", process_group=group)
    return _outcome(lambda: layer(torch.randn(2, 3)))


def test_a_torch_distributed_timeout_names_the_layer_that_waited():
    started = time.monotonic()
    message = run_on_ranks(_wait_alone_in_a_group_with_a_short_timeout, 2, timeout=60)[0]
    assert message.startswith("CollectiveError: forward all-reduce of SyncBatchNorm(3) 'lonely' over "
                              "torch.distributed group (backend=gloo"), message
    assert time.monotonic() - started < 50


def _wait_alone_under_mpi() -> None:
    from mpi4py import MPI

    if MPI.COMM_WORLD.Get_rank() == 0:
        layer = syncbn.SyncBatchNorm(3, name="lonely", process_group=syncbn.MPICommunicator(MPI.COMM_WORLD, timeout=2))
        layer(torch.randn(2, 3))
    else:
        time.sleep(60)


@requires_mpi
def test_the_mpi_watchdog_aborts_a_stuck_collective_naming_the_layer():
    started = time.monotonic()
    with pytest.raises(RankFailure, match=r"(?s)mpiexec exited.*forward all-reduce of SyncBatchNorm\(3\) "
                                          r"'lonely' over .*waited longer than 2 s"):
        run_on_ranks(_wait_alone_under_mpi, 2, backend="mpi", timeout=50)
    assert time.monotonic() - started < 45
