"""Making collectives fail loudly instead of hanging.

:func:`all_reduce` is the one door SyncBatchNorm's collectives go through. It

- with the debug guard on (``SYNCBN_DEBUG=1`` or ``debug=True``), first cross-checks what every
  rank is about to reduce (layer, call index, channels, dtype, direction) in a small extra
  all-reduce, and raises on every rank, naming the layer and the disagreeing ranks, where a
  mismatched collective would otherwise pair with the wrong partner or deadlock;
- names the layer and the group when the collective fails (a torch.distributed timeout, say);
- labels the communicator, so a timeout (MPI's watchdog) names the layer that waits.

It is also the boundary torch.compile sees: ``torch.ops.syncbn.all_reduce`` wraps it as a custom
operator (opaque to dynamo, so no graph break) whose gradient is the all-reduce of the incoming
gradient, so a backward written with it is itself differentiable (double backward).
"""
from __future__ import annotations

import hashlib
import os
from typing import Dict, Hashable, List, Optional

import torch

from .comm import Communicator

__all__ = ["CollectiveMismatchError", "CollectiveError", "all_reduce", "debug_enabled",
           "communicator_key", "communicator_for", "all_reduce_op", "all_reduce_copy"]

_DTYPE_CODES = {torch.float64: 1, torch.float32: 2, torch.float16: 3, torch.bfloat16: 4}
_FIELDS = ("layer", "call", "channels", "dtype", "direction")

_call_counts: Dict[Hashable, int] = {}


class CollectiveError(RuntimeError):
    """A SyncBatchNorm collective failed; the message names the layer and the group."""


class CollectiveMismatchError(CollectiveError):
    """Ranks were about to issue different SyncBatchNorm collectives (debug guard)."""


# SYNCBN_DEBUG, read once, by the first call that asks (None: not yet): every training forward
# asks, and an environment lookup costs as much there as one of the layer's small ops.
_debug_by_default: Optional[bool] = None


def debug_enabled(requested: Optional[bool] = None) -> bool:
    """``requested`` if given, else whether SYNCBN_DEBUG is set to a true value (as it was when
    first asked: by the first training forward of a layer in a group)."""
    global _debug_by_default
    if requested is not None:
        return requested
    if _debug_by_default is None:
        _debug_by_default = os.environ.get("SYNCBN_DEBUG", "").lower() in ("1", "true", "yes", "on")
    return _debug_by_default


# Texts behind the codes this process has sent: ranks running the same model know each
# other's layer names and directions, so the mismatch table can print them.
_texts_by_code: Dict[float, str] = {}


def _text_code(text: str) -> float:
    # 48 bits survive fp64 exactly and make accidental collisions between layers negligible.
    code = float(int.from_bytes(hashlib.sha1(text.encode()).digest()[:6], "big"))
    _texts_by_code[code] = text
    return code


for _direction in ("forward", "backward"):  # known before this rank sends them
    _text_code(_direction)


def _cross_check(comm: Communicator, layer: str, direction: str, channels: int,
                 dtype: torch.dtype, device: torch.device) -> None:
    key = comm.group_key()
    call = _call_counts.get(key, 0)
    _call_counts[key] = call + 1
    mine = [_text_code(layer), float(call), float(channels), float(_DTYPE_CODES.get(dtype, 0)),
            _text_code(direction)]
    # Each rank writes its fingerprint into its own row: the sum is every rank's fingerprint.
    table = torch.zeros(comm.size, len(mine), dtype=torch.float64, device=device)
    table[comm.rank] = torch.tensor(mine, dtype=torch.float64)
    rows: List[List[float]] = comm.all_reduce_sum_(table.view(-1)).view(comm.size, -1).tolist()
    if all(row == rows[0] for row in rows):
        return
    differing = [r for r, row in enumerate(rows) if row != rows[comm.rank]]
    described = "; ".join(
        f"rank {r}: " + ", ".join(f"{name}={_show(name, value)}" for name, value in zip(_FIELDS, row))
        for r, row in enumerate(rows))
    raise CollectiveMismatchError(
        f"{layer}: rank {comm.rank} is about to issue the {direction} all-reduce (call {call}, "
        f"{channels} channels, {dtype}) but rank(s) {differing} disagree; a rank skipped or added "
        f"a SyncBatchNorm call, or layers differ across ranks. Every rank: {described}"
    )


def _show(field: str, value: float) -> str:
    if field == "dtype":
        return next((str(d) for d, code in _DTYPE_CODES.items() if code == value), "other")
    if field in ("layer", "direction"):
        return _texts_by_code.get(value, f"#{int(value):012x}")
    return str(int(value))


def all_reduce(comm: Communicator, payload: torch.Tensor, layer: str, direction: str,
               channels: int, debug: Optional[bool] = None) -> torch.Tensor:
    """Sum ``payload`` over ``comm`` in place, failing loudly rather than silently hanging.

    The fingerprint's dtype is the payload's, which every rank shares whatever its input's
    dtype, so a rank joining with an invalid input's flag matches the others.
    """
    dtype = payload.dtype
    if comm.size == 1:
        return comm.all_reduce_sum_(payload)
    label = f"{direction} all-reduce of {layer}"
    comm.label = label
    try:
        if debug_enabled(debug):
            _cross_check(comm, layer, direction, channels, dtype, payload.device)
        return comm.all_reduce_sum_(payload)
    except CollectiveError:
        raise
    except Exception as error:  # timeouts and broken peers, surfaced with the layer's name
        raise CollectiveError(f"{label} over {comm.describe()} failed: {error}") from error


# Communicators by key, so that the custom operators below, which take only tensors and
# scalars, can reach them. Held for the life of the process: a key baked into a compiled graph
# must stay valid (functional.resolve_once keeps their number to one per group).
_communicators: Dict[int, Communicator] = {}


@torch.compiler.assume_constant_result
def communicator_key(comm: Communicator) -> int:
    """Register ``comm`` and return the key that :func:`communicator_for` maps back to it."""
    key = id(comm)
    _communicators[key] = comm
    return key


def communicator_for(key: int) -> Communicator:
    return _communicators[key]


def _all_reduce_copy(payload: torch.Tensor, comm_key: int, layer: str, direction: str,
                     channels: int, debug: bool) -> torch.Tensor:
    """:func:`all_reduce` of a copy of ``payload``, the communicator given by its key."""
    return all_reduce(communicator_for(comm_key), payload.clone(), layer, direction, channels, debug)


# The same, as an operator torch.compile does not enter and autograd can differentiate.
all_reduce_op = torch.library.custom_op("syncbn::all_reduce", mutates_args=())(_all_reduce_copy)


def all_reduce_copy(payload: torch.Tensor, comm_key: int, layer: str, direction: str,
                    channels: int, debug: bool) -> torch.Tensor:
    """``all_reduce_op`` where torch.compile traces or autograd records it, else its body.

    Called directly, the body skips the operator's dispatch (about 10 µs a call on CPU, more
    than the rest of a small layer's all-reduce bookkeeping); the result is the same.
    """
    if torch.compiler.is_compiling() or (payload.requires_grad and torch.is_grad_enabled()):
        return all_reduce_op(payload, comm_key, layer, direction, channels, debug)
    return _all_reduce_copy(payload, comm_key, layer, direction, channels, debug)


@all_reduce_op.register_fake
def _(payload, comm_key, layer, direction, channels, debug):
    return torch.empty_like(payload)


# Real meta tensors run the real body (the meta device stands in for CUDA in host-sync tests).
all_reduce_op.register_kernel("meta")(_all_reduce_copy)


def _all_reduce_backward(ctx, grad: torch.Tensor):
    # d(sum over ranks of p_r) / d p_mine, applied to the incoming gradients of every rank:
    # the gradient of an all-reduce-sum is the all-reduce-sum of the gradients.
    reduced = all_reduce_copy(grad.contiguous(), ctx.comm_key, ctx.layer,
                            f"gradient of the {ctx.direction}", ctx.channels, ctx.debug)
    return reduced, None, None, None, None, None


def _all_reduce_setup(ctx, inputs, output) -> None:
    _, ctx.comm_key, ctx.layer, ctx.direction, ctx.channels, ctx.debug = inputs


all_reduce_op.register_autograd(_all_reduce_backward, setup_context=_all_reduce_setup)
