"""Failures are loud, fast and raised on every rank: the guard, group-wide errors, timeouts."""
from __future__ import annotations

import time
from datetime import timedelta

import pytest
import torch
import torch.utils.checkpoint

import syncbn
from conftest import BACKENDS, requires_mpi
from scenarios import IdenticalPeers
from syncbn.comm import Communicator
from syncbn.testing import RankFailure, RecordingCommunicator, run_on_ranks


def _outcome(action) -> str:
    try:
        action()
    except Exception as error:  # the tests compare what each rank raised
        return f"{type(error).__name__}: {error}"
    return "no error"


def _rank_one_skips_a_layer() -> str:
    rank = syncbn.resolve_communicator().rank
    first = syncbn.SyncBatchNorm(4, name="block.bn1", debug=True)
    second = syncbn.SyncBatchNorm(4, name="block.bn2", debug=True)

    def step():
        y = first(torch.randn(3, 4, 2, 2, requires_grad=True))
        if rank == 0:  # a data-dependent branch taken on one rank only
            y = second(y)
        y.sum().backward()

    return _outcome(step)


@pytest.mark.parametrize("backend", BACKENDS)
def test_debug_guard_turns_a_skipped_layer_into_an_error_on_every_rank(rank_pool, backend):
    messages = rank_pool(2, backend).run(_rank_one_skips_a_layer, timeout=60)
    assert messages[0].startswith("CollectiveMismatchError: SyncBatchNorm(4) 'block.bn2'")
    assert messages[1].startswith("CollectiveMismatchError: SyncBatchNorm(4) 'block.bn1'")
    assert "rank(s) [1] disagree" in messages[0] and "rank(s) [0] disagree" in messages[1]
    assert all("direction=forward" in m and "direction=backward" in m for m in messages)


def _channel_counts_differ() -> str:
    rank = syncbn.resolve_communicator().rank
    channels = 4 if rank == 0 else 6
    layer = syncbn.SyncBatchNorm(channels, name="stem.bn", debug=True)
    return _outcome(lambda: layer(torch.randn(2, channels)))


def test_debug_guard_names_different_channel_counts_across_ranks(rank_pool):
    messages = rank_pool(2, "gloo").run(_channel_counts_differ, timeout=60)
    assert all("stem.bn" in m and "channels=4" in m and "channels=6" in m for m in messages)


def _count_guarded_collectives() -> list:
    recording = RecordingCommunicator(syncbn.resolve_communicator())
    layer = syncbn.SyncBatchNorm(3, process_group=recording, debug=True)
    layer(torch.randn(2, 3, requires_grad=True)).sum().backward()
    return recording.calls


def test_debug_guard_adds_one_small_cross_check_before_each_collective(rank_pool):
    for calls in rank_pool(2, "gloo").run(_count_guarded_collectives):
        # a (world size x 5) fingerprint table before the 4C+3 forward and 2C backward payloads
        assert calls == [(10, torch.float64), (15, torch.float64), (10, torch.float64), (6, torch.float64)]


def _rank_one_gives_bad_input() -> dict:
    rank = syncbn.resolve_communicator().rank
    layer = syncbn.SyncBatchNorm(3, name="head.bn")
    x = torch.randn(4, 3 if rank != 1 else 5, 2)
    return dict(error=_outcome(lambda: layer(x)), mean=layer.running_mean.clone(),
                tracked=layer.num_batches_tracked.item())


@pytest.mark.parametrize("backend", BACKENDS)
def test_invalid_input_on_one_rank_raises_on_every_rank_without_hanging(rank_pool, backend):
    results = rank_pool(3, backend).run(_rank_one_gives_bad_input, timeout=60)
    assert results[1]["error"].startswith("ValueError: SyncBatchNorm(3) 'head.bn': expected 3 channels")
    for rank in (0, 2):  # the healthy ranks are told which rank's input was bad
        assert results[rank]["error"].startswith(
            "CollectiveError: SyncBatchNorm(3) 'head.bn': rank 1 (1 of 3) gave this layer invalid input")
    assert all(torch.equal(r["mean"], torch.zeros(3)) and r["tracked"] == 0 for r in results)


def _nan_on_rank_zero(check_finite: bool) -> dict:
    rank = syncbn.resolve_communicator().rank
    layer = syncbn.SyncBatchNorm(2, name="bn", check_finite=check_finite)
    x = torch.randn(3, 2, 4)
    if rank == 0:
        x[0, 1, 0] = float("nan")
    return dict(error=_outcome(lambda: layer(x)), var=layer.running_var.clone(),
                tracked=layer.num_batches_tracked.item())


@pytest.mark.parametrize("backend", BACKENDS)
def test_check_finite_refuses_a_nan_batch_on_every_rank_and_keeps_running_stats(rank_pool, backend):
    results = rank_pool(2, backend).run(_nan_on_rank_zero, True)
    assert results[0]["error"].startswith("FloatingPointError: SyncBatchNorm(2) 'bn': the batch has NaN "
                                          "or Inf values (including this rank's)")
    assert "(not this rank's)" in results[1]["error"]
    assert all(torch.equal(r["var"], torch.ones(2)) and r["tracked"] == 0 for r in results)


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
