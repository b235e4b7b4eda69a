"""The GPU fast path: parity, no host sync, few launches, CUDA graphs, torch.compile.

Every test here runs syncbn's *group* path: a group of one would be torch's own batch_norm
(cuDNN on a GPU), not syncbn's kernels. Tests marked ``gpu`` need CUDA and skip cleanly without
it; ``python -m benchmarks.gpu_validate`` runs them on a GPU machine. The unmarked tests are
their CPU stand-ins:

- a training step on the ``meta`` device takes the same branch as on CUDA (payload not on the
  CPU) and fails on any read of a device value (.item(), bool(), .tolist(), a data-dependent
  shape), so it passing means the step never syncs the host;
- the same step, with the Triton kernels stood in for (benchmarks.launches), counts what the
  CUDA path launches per layer step and catches tensors built from Python data on the device
  (a blocking host-to-device copy on CUDA, which building them on ``meta`` does not show);
- torch.compile of a model with SyncBatchNorm runs forward and backward, matches eager and
  has no graph break (torch._dynamo.explain), on the group path and in a group of one (the
  collectives and host checks live in custom operators dynamo does not enter).

The simulated second rank of these tests (scenarios.IdenticalPeers) holds this rank's batch,
so ``own_batch=0`` makes the whole group empty. On a GPU, benchmarks.gpu_validate.TwoRankStandIn
does the same over a real NCCL group of one process.
"""
from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import Iterator, List, Tuple

import pytest
import torch
import torch.distributed as dist

import syncbn
from benchmarks import launches
from benchmarks.gpu_validate import TwoRankStandIn
from syncbn import batchnorm_math as bnm
from syncbn.kernels import triton as tk
from scenarios import IdenticalPeers, Scenario, StepRecord, assert_matches_oracle, make_layer, run_steps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _model(device: str, process_group=None, channels_last: bool = False) -> torch.nn.Module:
    """conv + SyncBatchNorm + ReLU; ``process_group`` of two ranks or more for the group path."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1, bias=False),
        syncbn.SyncBatchNorm(8, process_group=process_group),
        torch.nn.ReLU(),
    ).to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def _loss(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    y = model(x)
    loss = y.float().square().mean() if y.numel() else y.sum()
    loss.backward()
    return y


def _assert_same_state(actual: torch.nn.Module, expected: torch.nn.Module, tol: float) -> None:
    for (name, a), (_, e) in zip(actual.named_parameters(), expected.named_parameters()):
        torch.testing.assert_close(a, e, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")
        torch.testing.assert_close(a.grad, e.grad, rtol=tol, atol=tol, msg=lambda m: f"{name}.grad: {m}")
    for (name, a), (_, e) in zip(actual.named_buffers(), expected.named_buffers()):
        torch.testing.assert_close(a, e, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")


def compiled_vs_eager(device: str, channels_last: bool = False,
                      process_group=None) -> Tuple[int, List[str]]:
    """torch.compile of conv + SyncBatchNorm + ReLU against eager, over two training steps, in
    ``process_group`` (None: a group of one).

    Returns the graph breaks torch._dynamo.explain counts in one forward, and their reasons.
    """
    eager, compiled = (_model(device, process_group, channels_last) for _ in range(2))
    step = torch.compile(compiled)
    for seed in range(2):
        x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(seed)).to(device)
        x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
        for model in (eager, compiled):
            model.zero_grad(set_to_none=True)
        torch.testing.assert_close(_loss(step, x), _loss(eager, x), rtol=1e-5, atol=1e-5)
    _assert_same_state(compiled, eager, tol=1e-5)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(_model(device, process_group, channels_last))(x)
    torch._dynamo.reset()
    return explained.graph_break_count, [b.reason.splitlines()[0] for b in explained.break_reasons]


# --- CPU stand-ins ---------------------------------------------------------------------------


@pytest.fixture
def meta_kernels() -> Iterator[None]:
    """The one op of the torch path without a meta kernel, for the length of a test."""
    library = torch.library.Library("aten", "IMPL")
    library.impl("batch_norm_update_stats",
                 lambda x, mean, var, momentum: (x.new_empty(x.shape[1]), x.new_empty(x.shape[1])), "Meta")
    yield
    library._destroy()


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("group_size", [1, 2])
@pytest.mark.parametrize("shape,dtype,channels_last", [
    ((4, 3, 5, 5), torch.float32, False), ((4, 3, 5, 5), torch.bfloat16, True),
    ((0, 3, 5, 5), torch.float32, False), ((2, 3, 4), torch.float16, False),
    ((2, 3, 2, 2, 2), torch.float32, True), ((1, 3), torch.float32, False)])
def test_training_step_reads_no_device_value(meta_kernels, shape, dtype, channels_last,
                                             group_size, momentum) -> None:
    comm = syncbn.SingleProcessCommunicator() if group_size == 1 else IdenticalPeers(group_size)
    layer = syncbn.SyncBatchNorm(3, momentum=momentum, process_group=comm).to("meta")
    x = torch.empty(shape, device="meta", dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    x.requires_grad_()
    if bnm.local_count(x) == 1 and group_size == 1:
        # A group of one: the host knows the single value from the shape and raises, no sync.
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            layer(x)
        return
    if group_size == 1 and momentum is None and x.numel():
        # A group of one is torch's BatchNorm, which reads num_batches_tracked on the host for
        # the cumulative average (1 / num_batches_tracked); the group path reads it on the device.
        with pytest.raises(RuntimeError, match="meta"):
            layer(x)
        return
    for _ in range(2):
        y = layer(x)
        y.sum().backward()
    assert y.shape == x.shape and y.dtype == dtype and x.grad.shape == x.shape


def test_meta_device_catches_a_host_read(meta_kernels) -> None:
    # The stand-in is sensitive: check_finite reads the payload on the host, and fails there.
    layer = syncbn.SyncBatchNorm(3, check_finite=True, process_group=IdenticalPeers(2)).to("meta")
    with pytest.raises((RuntimeError, NotImplementedError)):
        layer(torch.empty(4, 3, device="meta"))


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                    reason="torch.compile (inductor) needs a C++ compiler on CPU")
def test_compile_matches_eager_on_the_group_path_on_cpu(meta_kernels) -> None:
    breaks, reasons = compiled_vs_eager("cpu", process_group=IdenticalPeers(2))
    assert breaks == 0, reasons
    # The device branch of the group path (no host checks), traced on meta.
    torch._dynamo.reset()
    explained = torch._dynamo.explain(_model("meta", IdenticalPeers(2)))(
        torch.empty(4, 3, 8, 8, device="meta"))
    torch._dynamo.reset()
    assert explained.graph_break_count == 0, explained.break_reasons


# The Triton kernels one layer step launches on the CUDA path, in order.
FORWARD_KERNELS = [launches.kernel_name(k) for k in (
    tk._stats_kernel, tk._payload_kernel, tk._finalize_kernel, tk._normalize_activate_kernel)]
BACKWARD_KERNELS = [launches.kernel_name(k) for k in (
    tk._grad_stats_kernel, tk._grad_fold_kernel, tk._input_grad_kernel)]


@pytest.mark.parametrize("shape,dtype,channels_last", [
    ((4, 8, 5, 5), torch.float32, False), ((4, 8, 5, 5), torch.bfloat16, True),
    ((2, 8, 3), torch.float16, False), ((4, 8), torch.float32, False),
    ((2, 8, 2, 3, 4), torch.float32, True), ((0, 8, 5, 5), torch.float32, False)])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_layer_step_launches_at_most_12_kernels_on_the_cuda_path(shape, dtype, channels_last,
                                                                momentum) -> None:
    # Counted on meta with the Triton kernels stood in (benchmarks.launches): meta takes the
    # CUDA branch, so no CPU-only op is counted; all-reduces are excluded (they reduce nothing).
    counted = launches.syncbn_launches_on_meta(shape, dtype, channels_last, momentum=momentum)
    if shape[0] == 0:  # an empty rank launches nothing over x, yet joins both all-reduces
        assert counted.count() <= launches.LAUNCH_BUDGET, counted.describe()
        return
    assert counted.triton["forward"] == FORWARD_KERNELS, counted.describe()
    assert counted.triton["backward"] == BACKWARD_KERNELS, counted.describe()
    assert counted.count() <= launches.LAUNCH_BUDGET, counted.describe()
    assert not counted.host_reads and not counted.host_to_device, counted.describe()


@pytest.mark.parametrize("kernels", ["reference", "triton"])
@pytest.mark.parametrize("layer_type", [syncbn.SyncBatchNorm, syncbn.SyncBatchNormAct],
                         ids=["SyncBatchNorm", "SyncBatchNormAct"])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_training_step_builds_no_tensor_from_python_data_on_the_device(meta_kernels, kernels,
                                                                      layer_type, momentum) -> None:
    # torch.tensor(data, device=...) and friends are a blocking host-to-device copy on CUDA and
    # break CUDA-graph capture; on meta they dispatch nothing, so the meta test above misses them.
    if kernels == "triton":
        counted = launches.syncbn_launches_on_meta((4, 8, 5, 5), layer_type=layer_type,
                                                   momentum=momentum)
    else:
        layer = layer_type(8, momentum=momentum, process_group=IdenticalPeers(2)).to("meta")
        x = torch.empty(4, 8, 5, 5, device="meta", requires_grad=True)
        counted = launches.layer_step(layer, list(layer.parameters()), x, launches.Launches())
    assert counted.host_to_device == [] and counted.host_reads == [], counted.describe()


def test_launch_counter_sees_ops_kernels_and_python_data(meta_kernels) -> None:
    # The counter itself can fail: a torch op, a stood-in Triton kernel and a tensor built from
    # Python data on the device are each seen.
    x = torch.empty(4, 8, device="meta")
    with launches.Launches(run_kernels=False) as counted:
        x.mul(2)
        tk._payload_kernel[(1,)](x)
        x.new_tensor([1.0, 2.0])
        torch.tensor([1.0], device="meta")
        x.view(8, 4).t()  # views launch nothing
    assert counted.ops["step"] == {"mul": 1}
    assert counted.triton["step"] == [launches.kernel_name(tk._payload_kernel)]
    assert counted.host_to_device == ["Tensor.new_tensor", "torch.tensor"]
    assert counted.count() == 2


# --- on a GPU --------------------------------------------------------------------------------


class _OnCuda(syncbn.SyncBatchNorm):
    """SyncBatchNorm on the GPU, fed and read on the CPU, so scenarios.run_steps can drive it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, device="cuda", **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.cuda()).cpu()


def _on_cpu(record: StepRecord) -> StepRecord:
    record.dweight = [g.cpu() for g in record.dweight]
    record.dbias = [g.cpu() for g in record.dbias]
    record.buffers = {name: value.cpu() for name, value in record.buffers.items()}
    return record


def _run_cuda_rank(scenario: Scenario) -> StepRecord:
    rank = syncbn.resolve_communicator().rank
    return _on_cpu(run_steps(make_layer(_OnCuda, scenario), scenario, scenario.rank_slice(rank)))


class _OnCudaStandIn(_OnCuda):
    """_OnCuda in a group of two identical ranks over the process's NCCL group of one."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, process_group=TwoRankStandIn(dist.group.WORLD), **kwargs)


@dataclass(frozen=True)
class TwoIdenticalRanks(Scenario):
    """Two ranks holding the same batch (``sizes[0]`` samples): what TwoRankStandIn reduces."""

    def global_batch(self, step: int) -> Tuple[torch.Tensor, torch.Tensor]:
        x, dy = super().global_batch(step)
        own = slice(0, self.sizes[0])
        return torch.cat([x[own], x[own]]), torch.cat([dy[own], dy[own]])


def _run_cuda_stand_in(scenario: TwoIdenticalRanks) -> List[StepRecord]:
    """Rank 0's record, once per (identical) rank of the stand-in group."""
    record = _on_cpu(run_steps(make_layer(_OnCudaStandIn, scenario), scenario, scenario.rank_slice(0)))
    return [record, record]


GPU_SCENARIOS = [  # (backend, scenario, tolerance)
    ("nccl", TwoIdenticalRanks(sizes=(5, 5), dtype=torch.float32), 1e-4),
    ("nccl", TwoIdenticalRanks(sizes=(4, 4), dtype=torch.float64), 1e-9),
    ("nccl", TwoIdenticalRanks(sizes=(3, 3), dtype=torch.bfloat16, channels_last=True), 5e-2),
    ("gloo", Scenario(sizes=(3, 0), dtype=torch.float32, channels_last=True), 1e-4),
    ("gloo", Scenario(sizes=(2, 1, 3), dtype=torch.float32, spatial=(7,), momentum=None), 1e-4),
    ("gloo", Scenario(sizes=(1, 2, 0, 3), dtype=torch.float32, spatial=(2, 3, 4), channels_last=True), 1e-4),
    ("gloo", Scenario(sizes=(2, 3), dtype=torch.bfloat16, channels_last=True), 5e-2),
    ("gloo", Scenario(sizes=(2, 3), dtype=torch.float16), 5e-3),
    ("gloo", Scenario(sizes=(3, 2), dtype=torch.float32, mean=1e4, std=1.0), 1e-3),
    ("gloo", Scenario(sizes=(64, 64), dtype=torch.float32, channels=70, spatial=(9, 9)), 1e-4),
]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("backend,scenario,tol", GPU_SCENARIOS)
def test_gpu_parity_with_float64_batchnorm(rank_pool, backend, scenario, tol) -> None:
    # nccl: one process (one GPU) whose layer reports two identical ranks and reduces over NCCL;
    # gloo: 2-4 real ranks reducing CUDA tensors, all on this GPU.
    if isinstance(scenario, TwoIdenticalRanks):
        records = rank_pool(1, backend).run(_run_cuda_stand_in, scenario)[0]
    else:
        records = rank_pool(len(scenario.sizes), backend).run(_run_cuda_rank, scenario)
    assert_matches_oracle(records, scenario, tol=tol)


def _train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
                autocast: bool = False) -> torch.Tensor:
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        y = _loss(model, x)
    optimizer.step()
    return y


def steps_without_host_sync(batch: int, channels_last: bool, autocast: bool, steps: int = 3) -> int:
    """Train steps under torch.cuda.set_sync_debug_mode("error"): any host sync raises.

    Runs in a pool of one NCCL process; the layer's group reports two identical ranks over it
    (the group path, with a real all-reduce). Returns num_batches_tracked, read after the
    checked steps.
    """
    model = _model("cuda", TwoRankStandIn(dist.group.WORLD), channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(batch, 3, 8, 8, device="cuda")
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    for _ in range(2):  # warm-up: Triton compiles, NCCL connects
        _train_step(model, optimizer, x, autocast)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(steps):
            _train_step(model, optimizer, x, autocast)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return int(model[1].num_batches_tracked.item())


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("batch,channels_last,autocast", [(4, False, False), (4, True, True), (0, False, False)])
def test_training_step_makes_no_host_sync(rank_pool, batch, channels_last, autocast) -> None:
    tracked = rank_pool(1, "nccl").run(steps_without_host_sync, batch, channels_last, autocast)
    assert tracked == [5 if batch else 0]


def graph_vs_eager(own_batch: int, channels_last: bool, replays: int = 4) -> None:
    """A training step captured in a CUDA graph and replayed equals the same steps in eager.

    The layer's group has a second (simulated) rank, so ``own_batch=0`` is an empty rank.
    """
    eager = _model("cuda", IdenticalPeers(2), channels_last)
    graphed = copy.deepcopy(eager)
    optimizers = {id(m): torch.optim.SGD(m.parameters(), lr=0.1) for m in (eager, graphed)}
    generator = torch.Generator().manual_seed(3)
    xs = [torch.randn(own_batch, 3, 8, 8, generator=generator).cuda() for _ in range(2 + replays)]
    xs = [x.contiguous(memory_format=torch.channels_last) if channels_last else x for x in xs]
    static_x = xs[0].clone()
    side = torch.cuda.Stream()  # warm-up on a side stream before capture, as torch's docs say
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for x in xs[:2]:
            static_x.copy_(x)
            _train_step(graphed, optimizers[id(graphed)], static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = _train_step(graphed, optimizers[id(graphed)], static_x)
    for x in xs[2:]:
        static_x.copy_(x)
        graph.replay()
    for x in xs:
        y = _train_step(eager, optimizers[id(eager)], x)
    torch.cuda.synchronize()
    torch.testing.assert_close(static_y, y, rtol=1e-5, atol=1e-5)
    _assert_same_state(graphed, eager, tol=1e-5)
    assert int(graphed[1].num_batches_tracked) == len(xs)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("own_batch", [4, 0])
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_graph_replay_equals_eager(own_batch, channels_last) -> None:
    graph_vs_eager(own_batch, channels_last)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("channels_last", [False, True])
def test_compile_matches_eager_on_the_group_path_on_cuda(channels_last) -> None:
    breaks, reasons = compiled_vs_eager("cuda", channels_last, IdenticalPeers(2))
    assert breaks == 0, reasons


def test_gpu_validate_dry_run_measures_syncbns_kernels_without_a_gpu() -> None:
    # What the GPU run would time is syncbn's group path: each layer section's syncbn step runs
    # the seven kernels (Triton's interpreter, gloo in place of NCCL), every kernel it ran has
    # a bandwidth entry, and the launch count holds; the dry run exits 1 on any of these.
    if not tk.TRITON_AVAILABLE:
        pytest.skip("triton is not installed")
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_validate", "--dry-run", "--skip-tests"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    step = ", ".join(FORWARD_KERNELS + BACKWARD_KERNELS)
    syncbn_lines = [line for line in done.stdout.splitlines()
                    if line.startswith("[layers]") and " syncbn: " in line]
    assert syncbn_lines and all(line.endswith(f"ran {step}") for line in syncbn_lines), done.stdout
    for section in ("[kernels] no CPU form", "[launches]", "[host syncs] no CPU form",
                    "[cuda graph] no CPU form", "[copy bandwidth] no CPU form", "[compile]", "[tuning]"):
        assert section in done.stdout, done.stdout
