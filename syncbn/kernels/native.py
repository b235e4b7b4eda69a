"""The native CPU backend: native.cpp's kernels as torch operators (``torch.ops.syncbn_native``).

The extension is compiled on first use, not at ``import syncbn``, and cached: one shared library
per source, torch version, compiler, flags and CPU (``-march=native`` code runs only where it was
built), under ``$SYNCBN_CACHE`` (default ``~/.cache/syncbn``). Ranks on one machine that start at
once build it once: the first takes a file lock and the others wait, then load its result; the
library is written under a temporary name and renamed into place, so nobody loads half a file.

It needs only a C++ compiler (``$SYNCBN_CXX``, else ``$CXX``, else ``c++``) and torch's headers:
no ninja, no pybind11. If the build or the load fails, :func:`available` says False after one
warning that says why, and the pure-torch reference serves instead.

The functions below are the operators themselves (resolved on first access, after the build):
``forward_payload``, ``finalize``, ``normalize``, ``backward_sums``, ``input_grad``,
``any_below_floor``, ``update_stats``, ``activated_backward_payload``, ``activated_input_grad``,
with the semantics of the kernel interface (see syncbn/kernels/reference.py);
``normalize_activate`` picks the operator that writes a new tensor or the one that writes over
x. Each operator but any_below_floor and checked_finalize (host reads, never traced:
SyncBatchNormAct runs unfused under torch.compile, and the forward's merge runs inside an operator
it does not enter) has a fake implementation, so torch.compile traces through them.
:func:`group_totals` reads the reduced payload through the ``group_checks`` operator,
:func:`checked_finalize` through ``checked_finalize``.

Beyond the kernel interface, ``synchronized_normalize(x, weight, bias, mean, var, count, eps,
comm_key, layer, debug)`` is the synchronized layer's normalize as a C++ autograd node, whose
backward is the layer's fused backward, and :func:`synchronized_batch_norm` its training forward
in one call where the group's checks pass (syncbn.functional calls them in eager mode; they call
back into syncbn.functional's operators for the all-reduce). Eager only: they have no fake.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Iterator, List, Optional, Tuple, Union

import torch

from .. import batchnorm_math as bnm

try:
    import fcntl
except ImportError:  # not POSIX: no build (the reference serves)
    fcntl = None

__all__ = ["SUPPORTED_DTYPES", "available", "forward_payload", "finalize", "normalize",
           "backward_sums", "input_grad", "group_totals", "checked_finalize", "moments_about",
           "any_below_floor", "update_stats", "normalize_activate", "activated_backward_payload",
           "activated_input_grad", "synchronized_normalize", "synchronized_batch_norm"]

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

_OPS = ("forward_payload", "finalize", "normalize", "backward_sums", "input_grad", "group_checks",
        "any_below_floor", "update_stats", "activated_backward_payload", "activated_input_grad",
        "synchronized_normalize")
_CALLED_THROUGH_WRAPPERS = ("checked_finalize", "synchronized_batch_norm")
_SOURCE = Path(__file__).with_name("native.cpp")
_LIBRARY_NAME = "syncbn_native.so"

_available: Optional[bool] = None  # None: not tried yet in this process


@torch.compiler.assume_constant_result
def available() -> bool:
    """Whether the native kernels are built and loaded (builds them on the first call).

    On failure: one warning naming the reason, then False on every call. A constant of the
    process, which torch.compile reads when it traces (it never traces the build).
    """
    global _available
    if _available is None:
        reason = _build_and_load()
        _available = reason is None
        if reason is not None:
            warnings.warn(f"syncbn: native CPU kernels unavailable ({reason}); the pure-torch "
                          "reference kernels are used instead", RuntimeWarning, stacklevel=2)
    return _available


def __getattr__(name: str):
    """The operators, bound as module attributes once the library is loaded."""
    if name in _OPS:
        if not available():
            raise RuntimeError(f"syncbn.kernels.native.{name}: the native kernels are not available")
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def group_totals(payload: torch.Tensor, channels: int, world_size: int) -> bnm.GroupTotals:
    """batchnorm_math.group_totals of the reduced forward payload (on the host), by one operator
    call instead of a dozen numpy calls: the decisions are numpy's, bitwise."""
    return _totals(group_checks(payload, world_size, bnm.SHIFT_TOLERANCE,  # noqa: F821 (bound by _bind)
                                bnm.MIXED_DTYPE_SHIFT_TOLERANCE, bnm.FP32_CONDITION_LIMIT))


def checked_finalize(payload: torch.Tensor, shift: Optional[torch.Tensor],
                     running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
                     num_batches_tracked: Optional[torch.Tensor], momentum: Optional[float],
                     world_size: int, check_finite: bool
                     ) -> Union[Tuple[torch.Tensor, torch.Tensor, torch.Tensor], bnm.GroupTotals]:
    """finalize where batchnorm_math.statistics_ready holds, else the group totals (nothing
    updated): group_totals and finalize in one operator call."""
    ready, checks, count, mean, var = _checked_finalize(  # noqa: F821 (bound by _bind)
        payload, shift, running_mean, running_var, num_batches_tracked, momentum, world_size,
        bnm.SHIFT_TOLERANCE, bnm.MIXED_DTYPE_SHIFT_TOLERANCE, bnm.FP32_CONDITION_LIMIT, check_finite)
    return (count, mean, var) if ready else _totals(checks)


def synchronized_batch_norm(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                            running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
                            num_batches_tracked: Optional[torch.Tensor], momentum: Optional[float],
                            update: bool, eps: float, comm_key: int, layer: str, debug: bool,
                            world_size: int, check_finite: bool
                            ) -> Tuple[Optional[torch.Tensor], torch.Tensor, bool]:
    """The synchronized layer's training forward in one operator call where the reduced payload's
    checks all pass (batchnorm_math.statistics_ready): (y, the reduced payload, whether this rank's
    payload was finite); y's autograd node is ``synchronized_normalize``'s. The all-reduce is
    called back through syncbn.functional's operator. Where the checks do not pass, y is None and
    nothing is updated: the caller raises or merges again from the payload."""
    return _synchronized_batch_norm(  # noqa: F821 (bound by _bind)
        x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, update, eps, comm_key,
        layer, debug, world_size, check_finite, bnm.SHIFT_TOLERANCE, bnm.MIXED_DTYPE_SHIFT_TOLERANCE,
        bnm.FP32_CONDITION_LIMIT)


def moments_about(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """[n, sum (x - shift), sum (x - shift)^2] (2C+1, fp64): the forward payload's moments, whose
    local mean (a double-double) enters them unrounded, so they are nearly exact about a shift
    close to the mean."""
    return forward_payload(x, shift)[:bnm.moments_numel(x.shape[1])]  # noqa: F821 (bound by _bind)


def _totals(checks: torch.Tensor) -> bnm.GroupTotals:
    """GroupTotals from native.cpp's checks: [count, invalid ranks, fp64 ranks, finite,
    ill-conditioned, differing channels...]."""
    count, invalid_ranks, fp64_ranks, finite, ill_conditioned, *differing = checks.tolist()
    return bnm.GroupTotals(count, int(invalid_ranks), int(fp64_ranks),
                           tuple(map(int, differing)) if differing else (), finite != 0,
                           ill_conditioned != 0)


def normalize_activate(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                       weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float,
                       activation: int, parameter: float, inplace: bool) -> torch.Tensor:
    """act(weight * (x - mean) * invstd + bias), in one pass; written over x when ``inplace``."""
    if not available():
        raise RuntimeError("syncbn.kernels.native.normalize_activate: the native kernels are not available")
    if inplace:
        torch.ops.syncbn_native.normalize_activate_.default(x, mean, var, weight, bias, eps,
                                                            activation, parameter)
        return x
    return torch.ops.syncbn_native.normalize_activate.default(x, mean, var, weight, bias, eps,
                                                              activation, parameter)


def compiler() -> str:
    """The compiler command: ``$SYNCBN_CXX``, else ``$CXX``, else ``c++`` (may hold words, e.g. ccache)."""
    return os.environ.get("SYNCBN_CXX") or os.environ.get("CXX") or "c++"


def cache_dir() -> Path:
    root = os.environ.get("SYNCBN_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "syncbn"


def _arch_flags() -> List[str]:
    """Code for this CPU (the cache key holds its features); AVX-512 at full width where present."""
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        return ["-march=native", "-mprefer-vector-width=512"]
    if machine in ("aarch64", "arm64"):
        return ["-mcpu=native"]
    return []


def _flags() -> List[str]:
    """Compile flags of both parts (see _build)."""
    # -ffp-contract=fast: a * b + c may be one fused multiply-add (ISO mode would forbid it).
    return ["-O3", "-std=c++20", "-fPIC", "-fopenmp", "-ffp-contract=fast", "-fno-math-errno", "-Wno-psabi",
            f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}", *_arch_flags()]


def _cpu_features() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor()


def library_path() -> Path:
    """Where this source, torch, compiler, flags and CPU's build lives in the cache."""
    key = hashlib.sha256()
    for part in (_SOURCE.read_bytes(), torch.__version__.encode(), compiler().encode(),
                 " ".join(_flags()).encode(), _cpu_features().encode()):
        key.update(part)
        key.update(b"\0")
    return cache_dir() / f"native-torch{torch.__version__}-{key.hexdigest()[:16]}" / _LIBRARY_NAME


def _build_and_load() -> Optional[str]:
    """Builds (if not cached) and loads the library; the reason it failed, or None."""
    try:
        path = library_path()
        if not path.exists():
            reason = _build(path)
            if reason is not None:
                return reason
        torch.ops.load_library(str(path))
        _bind()
    except Exception as error:  # a failure here must leave the reference in charge, never crash
        return f"{type(error).__name__}: {error}".splitlines()[0]
    return None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _build(path: Path) -> Optional[str]:
    """Compiles native.cpp's two parts (the kernels; the operators, whose torch headers take most of
    the time) at once, then links them: about half the time of one compilation on two cores."""
    cxx = shlex.split(compiler())
    if fcntl is None:
        return "no POSIX file locking on this platform"
    if not cxx or shutil.which(cxx[0]) is None:
        return f"no C++ compiler: {compiler()!r} not found; set SYNCBN_CXX or CXX"
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path.with_suffix(".lock")):
        if path.exists():  # another process built it while this one waited
            return None
        from torch.utils import cpp_extension  # only here: it is slow to import

        stem = path.with_name(f"{path.stem}.{os.getpid()}")
        log = path.with_name("build.log")
        log.write_bytes(b"")
        includes = [f"-I{p}" for p in cpp_extension.include_paths()]
        libraries = cpp_extension.library_paths()
        objects = [stem.with_suffix(f".part{part}.o") for part in (1, 2)]
        partial = stem.with_suffix(".tmp.so")
        compiles = [[*cxx, *_flags(), f"-DSYNCBN_NATIVE_PART={part}", "-c", str(_SOURCE), "-o", str(obj),
                     *includes] for part, obj in zip((1, 2), objects)]
        link = [*cxx, "-shared", "-fopenmp", *map(str, objects), "-o", str(partial),
                *[f"-L{p}" for p in libraries], *[f"-Wl,-rpath,{p}" for p in libraries],
                "-lc10", "-ltorch_cpu"]
        try:
            failure = _run_all(compiles, log) or _run_all([link], log)
        finally:
            for obj in objects:
                obj.unlink(missing_ok=True)
        if failure is not None:
            partial.unlink(missing_ok=True)
            return failure
        os.replace(partial, path)
    return None


def _run_all(commands: List[List[str]], log: Path) -> Optional[str]:
    """Runs the commands at once; their output appended to ``log``; the first failure, or None."""
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            for command in commands]
    failure = None
    with open(log, "ab") as out:
        for command, run in zip(commands, runs):
            output, _ = run.communicate()
            out.write(" ".join(command).encode() + b"\n" + output)
            if run.returncode != 0 and failure is None:
                failure = f"{command[0]} failed with exit status {run.returncode}, see {log}"
    return failure


def _bind() -> None:
    """Module attributes for the operators, and their fake implementations for torch.compile."""
    ops = torch.ops.syncbn_native
    module = sys.modules[__name__]
    for name in _OPS:
        setattr(module, name, getattr(ops, name).default)
    for name in _CALLED_THROUGH_WRAPPERS:  # by the functions of the same name below
        setattr(module, f"_{name}", getattr(ops, name).default)

    @torch.library.register_fake("syncbn_native::forward_payload")
    def _(x, shift):
        return x.new_empty(4 * x.shape[1] + 3, dtype=torch.float64)

    @torch.library.register_fake("syncbn_native::finalize")
    def _(moments, shift, running_mean, running_var, num_batches_tracked, momentum):
        channels = (moments.shape[0] - 1) // 2
        options = dict(dtype=torch.float64, device=moments.device)
        return (moments.new_empty((), **options), moments.new_empty(channels, **options),
                moments.new_empty(channels, **options))

    @torch.library.register_fake("syncbn_native::normalize")
    def _(x, mean, var, weight, bias, eps):
        return torch.empty_like(x)

    @torch.library.register_fake("syncbn_native::backward_sums")
    def _(dy, x, mean, var, eps, parameter_dtype):
        channels = x.shape[1]
        return (x.new_empty(2 * channels, dtype=torch.float64), x.new_empty(channels, dtype=parameter_dtype),
                x.new_empty(channels, dtype=parameter_dtype))

    @torch.library.register_fake("syncbn_native::input_grad")
    def _(dy, x, mean, var, weight, eps, group_sums, count):
        return torch.empty_like(x)

    @torch.library.register_fake("syncbn_native::group_checks")
    def _(payload, world_size, shift_tolerance, mixed_dtype_shift_tolerance, fp32_condition_limit):
        # Five checks, then the differing channels: a length known only from the data.
        return payload.new_empty(torch.library.get_ctx().new_dynamic_size(min=5))

    @torch.library.register_fake("syncbn_native::update_stats")
    def _(x, running_mean, running_var, momentum):
        return (x.new_empty(x.shape[1], dtype=torch.float64), x.new_empty(x.shape[1], dtype=torch.float64))

    @torch.library.register_fake("syncbn_native::normalize_activate")
    def _(x, mean, var, weight, bias, eps, activation, parameter):
        return torch.empty_like(x)

    @torch.library.register_fake("syncbn_native::normalize_activate_")
    def _(x, mean, var, weight, bias, eps, activation, parameter):
        return None

    @torch.library.register_fake("syncbn_native::activated_backward_payload")
    def _(dy, y, weight, bias, activation, parameter):
        return y.new_empty(2 * y.shape[1], dtype=torch.float64)

    @torch.library.register_fake("syncbn_native::activated_input_grad")
    def _(dy, y, var, weight, bias, eps, activation, parameter, group_sums, count):
        return torch.empty_like(y)
