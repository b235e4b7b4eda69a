"""The GPU fast path: parity, no host sync, CUDA graphs, torch.compile.

Tests marked ``gpu`` need CUDA and skip cleanly without it; ``python -m benchmarks.gpu_validate``
runs them on a GPU machine. The unmarked tests are their CPU stand-ins:

- a training step on the ``meta`` device takes the same branch as on CUDA (payload not on the
  CPU) and fails on any read of a device value (.item(), bool(), .tolist(), a data-dependent
  shape), so it passing means the step never syncs the host;
- torch.compile of a model with SyncBatchNorm runs forward and backward, matches eager and
  has no graph break (torch._dynamo.explain), in a group of one and on the group path (the
  collectives and host checks live in custom operators dynamo does not enter).

The simulated second rank of these tests (scenarios.IdenticalPeers) holds this rank's batch,
so ``own_batch=0`` makes the whole group empty.
"""
from __future__ import annotations

import copy
import shutil
from typing import Iterator, List, Tuple

import pytest
import torch

import syncbn
from syncbn import batchnorm_math as bnm
from scenarios import IdenticalPeers, Scenario, StepRecord, assert_matches_oracle, make_layer, run_steps

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _model(device: str, process_group=None, channels_last: bool = False) -> torch.nn.Module:
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


def compiled_vs_eager(device: str, channels_last: bool = False) -> Tuple[int, List[str]]:
    """torch.compile of conv + SyncBatchNorm + ReLU against eager, over two training steps.

    Returns the graph breaks torch._dynamo.explain counts in one forward, and their reasons.
    """
    eager, compiled = (_model(device, channels_last=channels_last) for _ in range(2))
    step = torch.compile(compiled)
    for seed in range(2):
        x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(seed)).to(device)
        x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
        for model in (eager, compiled):
            model.zero_grad(set_to_none=True)
        torch.testing.assert_close(_loss(step, x), _loss(eager, x), rtol=1e-5, atol=1e-5)
    _assert_same_state(compiled, eager, tol=1e-5)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(_model(device, channels_last=channels_last))(x)
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
def test_compile_matches_eager_on_cpu(meta_kernels) -> None:
    breaks, reasons = compiled_vs_eager("cpu")
    assert breaks == 0, reasons
    # The group path, on CPU (host checks) and on the device branch (traced on meta).
    for device in ("cpu", "meta"):
        torch._dynamo.reset()
        explained = torch._dynamo.explain(_model(device, IdenticalPeers(2)))(
            torch.empty(4, 3, 8, 8, device=device))
        assert explained.graph_break_count == 0, explained.break_reasons
    torch._dynamo.reset()


# --- on a GPU --------------------------------------------------------------------------------


class _OnCuda(syncbn.SyncBatchNorm):
    """SyncBatchNorm on the GPU, fed and read on the CPU, so scenarios.run_steps can drive it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, device="cuda", **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.cuda()).cpu()


def _run_cuda_rank(scenario: Scenario) -> StepRecord:
    rank = syncbn.resolve_communicator().rank
    record = run_steps(make_layer(_OnCuda, scenario), scenario, scenario.rank_slice(rank))
    record.dweight = [g.cpu() for g in record.dweight]
    record.dbias = [g.cpu() for g in record.dbias]
    record.buffers = {name: value.cpu() for name, value in record.buffers.items()}
    return record


GPU_SCENARIOS = [  # (backend, scenario, tolerance)
    ("nccl", Scenario(sizes=(5,), dtype=torch.float32), 1e-4),
    ("nccl", Scenario(sizes=(4,), dtype=torch.float64), 1e-9),
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
    # nccl: world size 1 (one GPU); gloo: 2-4 ranks reducing CUDA tensors, all on this GPU.
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

    Runs on each rank of a pool (the default group is the communicator); returns
    num_batches_tracked, read after the checked steps.
    """
    model = _model("cuda", channels_last=channels_last)
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
def test_compile_matches_eager_on_cuda(channels_last) -> None:
    breaks, reasons = compiled_vs_eager("cuda", channels_last)
    assert breaks == 0, reasons
