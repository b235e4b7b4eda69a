"""What one training step of a layer launches on the device path, counted without a GPU.

With small per-device batches a GPU waits on the host, so the number of kernels a layer step
launches sets its time. ``python -m benchmarks.launches`` counts them for syncbn's group path
and for torch.nn.SyncBatchNorm's synchronized path, forward + backward, all-reduces excluded.

How it counts (:class:`Launches`): on the ``meta`` device, which takes the CUDA branch of the
code (no host checks, no CPU-only re-centring round) and computes nothing, each torch op that
would launch a kernel counts once as it dispatches (views and bare allocations launch none);
each Triton kernel launch is stood in for (recorded by its exact name, not run). The same
recorder runs real launches too (Triton's interpreter on CPU, or CUDA), pausing the op count
while a kernel runs so the interpreter's own copies are not counted.

It also records what a device step must never do: tensors built from Python data on the device
(``torch.tensor``, ``torch.as_tensor``, ``Tensor.new_tensor``: each a blocking host-to-device
copy on CUDA that breaks CUDA-graph capture, and invisible on ``meta``, where building them
dispatches nothing), copies from host memory to the device, and host reads of device values.

Approximations, both stated where the figures are reported: one op counts as one launch (a few
CUDA ops launch two); torch.nn.SyncBatchNorm's CUDA-only ops get shape-only meta kernels, and
its boolean-mask indexing (a host sync on CUDA) is stood in for as the two launches it is.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import sys
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

import syncbn
from syncbn import kernels
from syncbn.comm import Communicator
from syncbn.kernels import triton as triton_backend

__all__ = ["Launches", "kernel_name", "TwoRanksNoTraffic", "layer_step", "syncbn_launches_on_meta",
           "torch_syncbn_launches_on_meta", "on_meta", "compile_for_gpu", "LAUNCH_BUDGET"]

# Issue 21's goal for one layer step on the CUDA path, forward + backward, all-reduces excluded.
LAUNCH_BUDGET = 12

# Ops that alias their input or only reserve memory: no kernel runs.
_NO_KERNEL = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided",
              "_unsafe_view", "lift_fresh", "set_"}
_HOST_READS = {"_local_scalar_dense", "item", "nonzero", "_assert_async"}


def kernel_name(kernel: Any) -> str:
    """The name a Triton kernel has on the device (and in torch.profiler): its function's."""
    return kernel.fn.__name__


class Launches(TorchDispatchMode):
    """Records the launches, host reads and host-to-device copies of the code run inside it.

    ``run_kernels=False`` stands in for every Triton launch (records it, runs nothing): the
    meta device has no Triton. Counts are kept per phase (``phase(name)``).
    """

    def __init__(self, run_kernels: bool = True):
        super().__init__()
        self.run_kernels = run_kernels
        self.current = "step"
        self.triton: Dict[str, List[str]] = collections.defaultdict(list)
        self.ops: Dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.host_reads: List[str] = []
        self.host_to_device: List[str] = []
        self.calls: List[Tuple[Any, Any, tuple, dict]] = []  # (kernel, grid, args, kwargs)
        self._paused = False

    # -- what was seen -------------------------------------------------------------------
    def count(self, phase: Optional[str] = None) -> int:
        phases = [phase] if phase else list(self.phases())
        return sum(len(self.triton[p]) + sum(self.ops[p].values()) for p in phases)

    def phases(self) -> List[str]:
        return list(dict.fromkeys(list(self.triton) + list(self.ops)))

    def kernels(self) -> List[str]:
        return [name for phase in self.phases() for name in self.triton[phase]]

    def describe(self, phase: Optional[str] = None) -> str:
        phases = [phase] if phase else self.phases()
        parts = []
        for p in phases:
            ops = ", ".join(f"{name} x{n}" if n > 1 else name for name, n in self.ops[p].items())
            parts.append(f"{p}: {self.count(p)} = Triton [{', '.join(self.triton[p])}]"
                         f" + torch [{ops}]")
        return "; ".join(parts)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        previous, self.current = self.current, name
        try:
            yield
        finally:
            self.current = previous

    # -- recording -------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self._paused:
            self._record(func, args, kwargs)
        return func(*args, **kwargs)

    def _record(self, func, args, kwargs) -> None:
        name = func.overloadpacket.__name__
        if name in _HOST_READS:
            self.host_reads.append(name)
        if func.is_view or name in _NO_KERNEL:
            return
        if name in ("copy_", "_to_copy", "_copy_from") and _from_host_to_device(func, args, kwargs):
            self.host_to_device.append(name)
        self.ops[self.current][name] += 1

    def __enter__(self):
        super().__enter__()
        self._patches = contextlib.ExitStack()
        self._patches.enter_context(_triton_launches_recorded(self))
        self._patches.enter_context(_python_data_on_device_recorded(self))
        return self

    def __exit__(self, *exc):
        self._patches.close()
        return super().__exit__(*exc)

    def _launch(self, kernel: Any, grid: Any, args: tuple, kwargs: dict) -> Any:
        self.triton[self.current].append(kernel_name(kernel))
        # Shapes, strides and dtypes only: holding the tensors themselves would keep autograd
        # from taking a gradient as it is (it would copy it), adding a launch to the count.
        self._paused = True
        try:
            self.calls.append((kernel, grid, _described(args), _described(kwargs)))
        finally:
            self._paused = False
        if not self.run_kernels:
            return None
        self._paused = True
        try:
            return kernel.run(*args, grid=grid, warmup=False, **kwargs)
        finally:
            self._paused = False


def _described(values: Any) -> Any:
    """``values`` (a tuple or a dict) with each tensor replaced by a meta tensor of its shape,
    strides and dtype."""
    def describe(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="meta")
        return value
    if isinstance(values, dict):
        return {key: describe(value) for key, value in values.items()}
    return tuple(describe(value) for value in values)


def _from_host_to_device(func, args, kwargs) -> bool:
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if func.overloadpacket.__name__ == "copy_":
        target, source = tensors[0], tensors[1] if len(tensors) > 1 else None
        return source is not None and source.device.type == "cpu" and target.device.type != "cpu"
    device = kwargs.get("device")
    return bool(tensors) and tensors[0].device.type == "cpu" and device is not None and \
        torch.device(device).type != "cpu"


try:  # Triton is optional: without it nothing launches Triton kernels
    from triton.runtime.jit import KernelInterface
except Exception:  # CPU installs without triton, or a broken one
    KernelInterface = None


@contextlib.contextmanager
def _triton_launches_recorded(launches: Launches) -> Iterator[None]:
    """``kernel[grid](...)`` goes through ``launches._launch`` (JIT and interpreted kernels)."""
    if KernelInterface is None:
        yield
        return
    original = KernelInterface.__getitem__

    def getitem(kernel, grid):
        return lambda *args, **kwargs: launches._launch(kernel, grid, args, kwargs)

    KernelInterface.__getitem__ = getitem
    try:
        yield
    finally:
        KernelInterface.__getitem__ = original


@contextlib.contextmanager
def _python_data_on_device_recorded(launches: Launches) -> Iterator[None]:
    """torch.tensor / torch.as_tensor / Tensor.new_tensor that land off the CPU are recorded."""
    originals = {"tensor": torch.tensor, "as_tensor": torch.as_tensor}
    original_new_tensor = torch.Tensor.new_tensor

    def watched(name: str, make: Callable) -> Callable:
        def build(*args, **kwargs):
            out = make(*args, **kwargs)
            if isinstance(out, torch.Tensor) and out.device.type != "cpu":
                launches.host_to_device.append(f"torch.{name}")
            return out
        return build

    def new_tensor(self, *args, **kwargs):
        out = original_new_tensor(self, *args, **kwargs)
        if out.device.type != "cpu":
            launches.host_to_device.append("Tensor.new_tensor")
        return out

    torch.tensor, torch.as_tensor = (watched(n, f) for n, f in originals.items())
    torch.Tensor.new_tensor = new_tensor
    try:
        yield
    finally:
        torch.tensor, torch.as_tensor = originals["tensor"], originals["as_tensor"]
        torch.Tensor.new_tensor = original_new_tensor


class TwoRanksNoTraffic(Communicator):
    """A group that reports two ranks and reduces nothing: all-reduces excluded from counts.

    Only for counting on ``meta``, where no value is read: the sums it leaves are one rank's.
    """

    rank, size = 0, 2

    def all_reduce_sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor


@contextlib.contextmanager
def on_meta() -> Iterator[None]:
    """syncbn's CUDA path on ``meta``: the Triton backend serves meta input (its launches
    are stood in by :class:`Launches`), with torch's one op that has no meta kernel."""
    original = kernels.for_input
    library = torch.library.Library("aten", "IMPL")  # the reference path's one missing meta op
    library.impl("batch_norm_update_stats",
                 lambda x, mean, var, momentum: (x.new_empty(x.shape[1]), x.new_empty(x.shape[1])),
                 "Meta")

    def for_input(x: torch.Tensor):
        if x.device.type == "meta" and x.dtype in triton_backend.SUPPORTED_DTYPES:
            return triton_backend
        return original(x)

    kernels.for_input = for_input
    try:
        yield
    finally:
        kernels.for_input = original
        library._destroy()


def _input(shape: Tuple[int, ...], dtype: torch.dtype, channels_last: bool,
           device: str) -> torch.Tensor:
    x = torch.randn(shape, dtype=dtype) if device != "meta" else torch.empty(shape, dtype=dtype)
    x = x.to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return x.requires_grad_()


def layer_step(layer: Callable[[torch.Tensor], torch.Tensor], parameters: List[torch.Tensor],
               x: torch.Tensor, launches: Launches, warmup: int = 1) -> Launches:
    """``warmup`` training steps of ``layer`` (launches recorded and dropped), then one recorded
    into ``launches`` (phases "forward" and "backward"); gradients are cleared before each
    step, and the output's gradient is made beforehand, as a training loop has them."""
    dy = torch.ones_like(x).contiguous(memory_format=_format(x))
    for recorder in [type(launches)(launches.run_kernels) for _ in range(warmup)] + [launches]:
        for tensor in [x, *parameters]:
            tensor.grad = None
        with recorder:
            with recorder.phase("forward"):
                y = layer(x)
            with recorder.phase("backward"):
                y.backward(dy)
    return launches


def _format(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous():
        return torch.channels_last_3d
    return torch.contiguous_format


def syncbn_launches_on_meta(shape: Tuple[int, ...] = (4, 8, 5, 5), dtype=torch.float32,
                            channels_last: bool = False,
                            layer_type: type = syncbn.SyncBatchNorm, **layer_kwargs: Any) -> Launches:
    """One training step of syncbn's group path (two ranks reported) on meta, Triton stood in."""
    with on_meta():
        layer = layer_type(shape[1], process_group=TwoRanksNoTraffic(), **layer_kwargs).to("meta")
        x = _input(shape, dtype, channels_last, "meta")
        return layer_step(layer, list(layer.parameters()), x, Launches(run_kernels=False))


def compile_for_gpu(kernel: Any, args: tuple, kwargs: dict, capability: int) -> Any:
    """Compile one recorded launch for an NVIDIA GPU of compute ``capability`` (80, 90, ...)
    down to its cubin, without a GPU: Triton's own binder specializes the arguments (stood in
    by host tensors of the same dtype, shape and strides), then its compiler runs (ptxas ships
    with Triton). What Triton's interpreter cannot show shows here: a kernel that does not
    type-check or lower for the device. Uses Triton's internals (3.x)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile, make_backend
    from triton.runtime.jit import create_function_from_signature

    def on_host(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype)
        return value

    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    args = [on_host(a) for a in args]
    kwargs = {k: on_host(v) for k, v in kwargs.items()}
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization,
                                                              options)
    return compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                   options=options.__dict__)


# ----- torch.nn.SyncBatchNorm on meta --------------------------------------------------------

class _FakeGroup:
    """What torch.nn.SyncBatchNorm's Function asks of its process group on the NCCL branch."""

    def _get_backend_name(self) -> str:
        return "nccl"


def _meta_kernels_of_torch_syncbn(library: torch.library.Library) -> None:
    """Shape-only meta kernels for the five CUDA ops of torch.nn.SyncBatchNorm's Function."""
    def channels(x):
        return x.new_empty(x.shape[1], dtype=torch.float32 if x.dtype != torch.float64 else x.dtype)

    library.impl("batch_norm_stats", lambda x, eps: (channels(x), channels(x)), "Meta")
    library.impl("batch_norm_gather_stats_with_counts",
                 lambda x, mean, invstd, rm, rv, momentum, eps, counts:
                 (mean.new_empty(mean.shape[-1]), mean.new_empty(mean.shape[-1])), "Meta")
    library.impl("batch_norm_elemt", lambda x, w, b, mean, invstd, eps: torch.empty_like(x), "Meta")
    library.impl("batch_norm_backward_reduce",
                 lambda dy, x, mean, invstd, w, ig, wg, bg:
                 tuple(mean.new_empty(mean.shape) for _ in range(4)), "Meta")
    library.impl("batch_norm_backward_elemt",
                 lambda dy, x, mean, invstd, w, sum_dy, sum_dy_xmu, count: torch.empty_like(x), "Meta")


class _TorchSyncBatchNormLaunches(Launches):
    """Launches, with the boolean-mask indexing of torch's Function stood in for on meta (the
    data-dependent shape has no meta form): two launches (nonzero, index) and one host read,
    as on CUDA, keeping every row (every rank saw values)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.index.Tensor and any(
                i is not None and i.dtype == torch.bool for i in args[1]):
            self.ops[self.current]["nonzero"] += 1
            self.ops[self.current]["index"] += 1
            self.host_reads.append("nonzero")
            return args[0]
        return super().__torch_dispatch__(func, types, args, kwargs)


def torch_syncbn_launches_on_meta(shape: Tuple[int, ...] = (4, 8, 5, 5), dtype=torch.float32,
                                  channels_last: bool = False) -> Launches:
    """One training step of torch.nn.SyncBatchNorm's synchronized path (its autograd Function
    with a group of two) on meta, collectives stood in for."""
    from torch.nn.modules._functions import SyncBatchNorm as TorchSyncFunction

    library = torch.library.Library("aten", "IMPL")
    _meta_kernels_of_torch_syncbn(library)
    originals = dist.all_gather_single, dist.all_reduce
    dist.all_gather_single = lambda *args, **kwargs: None
    dist.all_reduce = lambda *args, **kwargs: None
    try:
        module = torch.nn.SyncBatchNorm(shape[1]).to("meta")
        group = _FakeGroup()

        def layer(x):
            return TorchSyncFunction.apply(x, module.weight, module.bias, module.running_mean,
                                           module.running_var, module.eps, module.momentum, group, 2)

        x = _input(shape, dtype, channels_last, "meta")
        return layer_step(layer, list(module.parameters()), x,
                          _TorchSyncBatchNormLaunches(run_kernels=False))
    finally:
        dist.all_gather_single, dist.all_reduce = originals
        library._destroy()


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    print(f"Launches per layer step (forward + backward, all-reduces excluded), counted on meta "
          f"(goal for syncbn: <= {LAUNCH_BUDGET}):")
    for label, shape, dtype, channels_last in [
            ("fp32 contiguous (4, 8, 5, 5)", (4, 8, 5, 5), torch.float32, False),
            ("bf16 channels_last (4, 8, 5, 5)", (4, 8, 5, 5), torch.bfloat16, True)]:
        ours = syncbn_launches_on_meta(shape, dtype, channels_last)
        theirs = torch_syncbn_launches_on_meta(shape, dtype, channels_last)
        print(f"  {label}: syncbn {ours.count()} ({ours.describe()})")
        print(f"  {label}: torch.nn.SyncBatchNorm {theirs.count()} ({theirs.describe()}); "
              f"host reads: {len(theirs.host_reads)}")
        if ours.host_reads or ours.host_to_device:
            print(f"  syncbn host traffic: reads {ours.host_reads}, copies {ours.host_to_device}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
