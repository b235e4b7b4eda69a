"""Making collectives fail loudly instead of hanging.

:func:`all_reduce` is the one door SyncBatchNorm's collectives go through. It

- with the debug guard on (``SYNCBN_DEBUG=1`` or ``debug=True``), first cross-checks what every
  rank is about to reduce (layer, call index, channels, dtype, direction) in a small extra
  all-reduce, and raises on every rank, naming the layer and the disagreeing ranks, where a
  mismatched collective would otherwise pair with the wrong partner or deadlock;
- names the layer and the group when the collective fails (a torch.distributed timeout, say);
- labels the communicator, so a timeout (MPI's watchdog) names the layer that waits.
"""
from __future__ import annotations

import hashlib
import os
from typing import Dict, Hashable, List, Optional

import torch

from .comm import Communicator

__all__ = ["CollectiveMismatchError", "CollectiveError", "all_reduce", "debug_enabled"]

_DTYPE_CODES = {torch.float64: 1, torch.float32: 2, torch.float16: 3, torch.bfloat16: 4}
_DIRECTION_CODES = {"forward": 1, "backward": 2}
_FIELDS = ("layer", "call", "channels", "dtype", "direction")

_call_counts: Dict[Hashable, int] = {}


class CollectiveError(RuntimeError):
    """A SyncBatchNorm collective failed; the message names the layer and the group."""


class CollectiveMismatchError(CollectiveError):
    """Ranks were about to issue different SyncBatchNorm collectives (debug guard)."""


def debug_enabled(requested: Optional[bool] = None) -> bool:
    """``requested`` if given, else whether SYNCBN_DEBUG is set to a true value."""
    if requested is not None:
        return requested
    return os.environ.get("SYNCBN_DEBUG", "").lower() in ("1", "true", "yes", "on")


def _layer_code(layer: str) -> float:
    # 48 bits survive fp64 exactly and make accidental collisions between layers negligible.
    return float(int.from_bytes(hashlib.sha1(layer.encode()).digest()[:6], "big"))


def _group_key(comm: Communicator) -> Hashable:
    inner = getattr(comm, "inner", comm)
    handle = getattr(inner, "group", None) or getattr(inner, "comm", None)
    return type(inner).__name__, id(handle)


def _cross_check(comm: Communicator, layer: str, direction: str, channels: int,
                 dtype: torch.dtype, device: torch.device) -> None:
    key = _group_key(comm)
    call = _call_counts.get(key, 0)
    _call_counts[key] = call + 1
    mine = [_layer_code(layer), float(call), float(channels), float(_DTYPE_CODES.get(dtype, 0)),
            float(_DIRECTION_CODES[direction])]
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
    if field == "direction":
        return next((d for d, code in _DIRECTION_CODES.items() if code == value), "?")
    if field == "layer":
        return f"#{int(value):012x}"
    return str(int(value))


def all_reduce(comm: Communicator, payload: torch.Tensor, layer: str, direction: str,
               channels: int, dtype: torch.dtype, debug: Optional[bool] = None) -> torch.Tensor:
    """Sum ``payload`` over ``comm`` in place, failing loudly rather than silently hanging."""
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
