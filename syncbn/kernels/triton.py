"""Triton kernels for CUDA: the backend interface of :mod:`syncbn.kernels`, same semantics.

One layer step launches seven kernels, plus the two all-reduces between them:

- forward_payload: ``_stats_kernel`` makes one pass over x, a Welford (count, mean, M2) per
  program merged tile by tile (Chan's formula), each tile centred on its own mean, the values
  taken about a pivot (the program's first tile's mean, never a single element); then
  ``_payload_kernel`` merges the partials in fp64 (mean, then M2 = sum of partial M2 +
  n (partial mean - mean)^2: no E[x^2] - mean^2 anywhere) and writes the whole payload, 4C+3
  fp64 values, the shift and the flags included.
- finalize: ``_finalize_kernel``, one program: the group's mean and biased variance from the
  reduced sums, the running statistics and num_batches_tracked updated in place (momentum None:
  the cumulative average), nothing read on the host.
- normalize: ``_normalize_activate_kernel`` with the identity, one pass.
- backward_sums: ``_grad_stats_kernel`` (one pass over dy and x: per-program partial sums of dy
  and dy * xhat), then ``_grad_fold_kernel`` folds the partials in fp64 into the 2C result.
- input_grad: ``_input_grad_kernel``, one pass, dx in centred form.
- normalize_activate, activated_backward_payload, activated_input_grad: the same passes for
  in-place activated BatchNorm (syncbn.activated); the backward reads the output y instead of
  x and inverts the activation to get xhat.

Layout. Every input is read as [rows, C] through its strides: contiguous input has rows
(n, s) with the positions s contiguous, channels_last input (and (N, C) input) has the channels
contiguous. A program owns BLOCK_C channels and walks ``tiles`` tiles of BLOCK_S rows (its
chunk); with few positions per sample (7x7) a tile spans several samples, so no lane idles at
the end of each sample. The programs form a 1-D grid, channels fastest, sized from the SM count
(``_PROGRAMS_PER_SM``); ``num_warps`` follows the tile's size (``_NUM_WARPS``). Offsets are
32-bit unless the tensor passes 2^31 elements. Half and bfloat16 input is accumulated in fp32,
written back in its own dtype and layout.

Rounding. On NVIDIA GPUs fp32 ``/``, ``tl.rsqrt`` and ``tl.exp`` are approximate (Triton's
interpreter computes them exactly): divisions that set a statistic use ``div_rn``, per-channel
values (invstd, 1 / weight, group means of the gradient sums) are computed in fp64 once per
program, and ELU uses expm1 and log1p (libdevice; the interpreter has no libdevice, so there
they are written from exp and log, accurate to a few ulps). The elementwise passes subtract the
fp64 mean as two fp32 parts (hi, then lo): x - hi is exact for x near the mean, so xhat keeps
fp32 precision relative to the spread even at mean 1e4.

Never in the way. Nothing here reads a device value on the host in a training step: grids and
empty inputs follow from shapes alone (CUDA graphs, torch.compile). Importing this module never
fails: any exception while importing Triton leaves ``TRITON_AVAILABLE`` False. Before a CUDA
device first takes these kernels, :func:`usable` runs a small self-test there against the
reference kernels; a failure to compile or a disagreement switches that device to the reference
for good, with one warning. A kernel that fails later (a new shape's compile) does the same,
and the call is served by the reference.
"""
from __future__ import annotations

import contextlib
import functools
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from . import reference

Tensor = torch.Tensor

__all__ = [
    "TRITON_AVAILABLE",
    "INTERPRETED",
    "SUPPORTED_DTYPES",
    "usable",
    "self_test",
    "forward_payload",
    "finalize",
    "normalize",
    "backward_sums",
    "input_grad",
    "group_totals",
    "checked_finalize",
    "moments_about",
    "any_below_floor",
    "update_stats",
    "normalize_activate",
    "activated_backward_payload",
    "activated_input_grad",
]


def _interpreting(triton: Any) -> bool:
    """Whether Triton runs kernels in its interpreter (TRITON_INTERPRET=1 when they were
    decorated). triton.knobs is Triton 3.3+; older releases read the variable directly."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")


try:
    import triton
    import triton.language as tl

    INTERPRETED: bool = _interpreting(triton)
    try:  # expm1 and log1p as compiled for the device
        from triton.language.extra import libdevice as _libdevice
    except Exception:  # Triton 2.x: tl.math held libdevice's functions
        _libdevice = tl.math if hasattr(tl.math, "expm1") else None
    # constexpr globals: the kernels' branch not taken is never compiled.
    _DEVICE_MATH = tl.constexpr(_libdevice is not None and not INTERPRETED)
    _HAS_DIV_RN = tl.constexpr(hasattr(tl.math, "div_rn"))
    TRITON_AVAILABLE = True
except Exception:  # not installed, or a broken install: the reference kernels serve
    triton = tl = None
    TRITON_AVAILABLE = INTERPRETED = False

# fp64 input keeps the reference (fp64 statistics end to end).
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Launch configuration: first guesses, measured and tuned on a GPU by
# `python -m benchmarks.gpu_validate --tune` (it sweeps all three).
_TILE = 2048  # elements per tile (BLOCK_C * BLOCK_S)
_PROGRAMS_PER_SM = 8  # the grid aims at this many programs per SM
_NUM_WARPS = {256: 1, 512: 2, 1024: 4, 2048: 4, 4096: 8}  # by tile elements
_TARGET_PROGRAMS = 1024  # off the GPU (interpreter, meta): no SM count to read
# A sample with fewer positions than this shares its tiles with the next samples.
_SPAN_SAMPLES_BELOW = 512
_FOLD_BLOCK_C = 16
_FOLD_BLOCK_P = 128
_FINALIZE_BLOCK_C = 256
_INT32_LIMIT = 2**31

def _compile_options() -> Dict[str, Any]:
    """Options every launch passes: fp32 multiply-adds fused into FMAs, said explicitly (Triton
    3.9 warns that its default turns to unfused in 3.10; the bounds of the tests hold with
    fusion), where this Triton knows the option."""
    try:
        from triton.backends.nvidia.compiler import CUDAOptions

        return {"enable_fp_fusion": True} if "enable_fp_fusion" in CUDAOptions.__dataclass_fields__ else {}
    except Exception:  # no NVIDIA backend, or a Triton without the option
        return {}


_OPTIONS: Dict[str, Any] = _compile_options() if TRITON_AVAILABLE else {}

# Kernels whose decoration failed (a Triton too old or too new for them): none may run then.
_undecorated: List[str] = []


def _jit(fn):
    """triton.jit, or ``fn`` itself where Triton is missing or cannot take it."""
    if not TRITON_AVAILABLE:
        return fn
    try:
        return triton.jit(fn)
    except Exception as error:
        _undecorated.append(f"{fn.__name__}: {type(error).__name__}: {error}")
        return fn


@_jit
def _div_rn(a, b):
    """a / b rounded to nearest (fp32 ``/`` is approximate on NVIDIA GPUs)."""
    if _HAS_DIV_RN:
        return tl.math.div_rn(a, b)
    else:
        return a / b


@_jit
def _expm1(z):
    """exp(z) - 1 without the cancellation near 0."""
    if _DEVICE_MATH:
        return _libdevice.expm1(z)
    else:
        # Kahan's expm1 from exp and log: accurate to a few ulps with exact exp and log.
        u = tl.exp(z)
        log_u = tl.where(u == 1.0, 1.0, tl.log(u))  # no 0 / 0 where the ratio is not used
        shrink = _div_rn(u - 1.0, log_u)
        return tl.where(u == 1.0, z, tl.where(u == 0.0, -1.0, shrink * z))


@_jit
def _log1p(w):
    """log(1 + w) without the rounding of 1 + w."""
    if _DEVICE_MATH:
        return _libdevice.log1p(w)
    else:
        u = 1.0 + w
        step = tl.where(u == 1.0, 1.0, u - 1.0)  # no 0 / 0 where the ratio is not used
        ratio = _div_rn(tl.log(u), step)
        return tl.where(u == 1.0, w, w * ratio)


@_jit
def _coords(C, BLOCK_C: tl.constexpr):
    """This program's channels, their mask, and its chunk (the index of its partial)."""
    pid = tl.program_id(0)
    c_blocks = tl.cdiv(C, BLOCK_C)
    c = (pid % c_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    return c, c < C, pid // c_blocks


@_jit
def _tile(c, c_mask, chunk, t, R, S, stride_n, stride_c, stride_s, chunks, tiles,
          BLOCK_S: tl.constexpr, LAYOUT: tl.constexpr, INDEX_64: tl.constexpr):
    """Offsets and mask of tile ``t`` of ``chunk`` (see _Grid for the LAYOUT codes), and the
    mask of its rows. 64-bit offsets only where the tensor passes 2^31 elements.

    (Callers name every value they get, used or not: Triton types each name of a kernel, so a
    ``_`` taking an fp32 vector and then a mask would not compile.)"""
    if INDEX_64:
        chunk = chunk.to(tl.int64)
        cc = c.to(tl.int64)
    else:
        cc = c
    if LAYOUT == 1:  # per sample: this chunk's sample, and its rows within the sample
        s = ((chunk % chunks) * tiles + t) * BLOCK_S + tl.arange(0, BLOCK_S)
        rows = (chunk // chunks) * stride_n + s * stride_s
        r_mask = s < S
    elif LAYOUT == 2:  # spanning samples: row r is position r % S of sample r // S
        r = (chunk * tiles + t) * BLOCK_S + tl.arange(0, BLOCK_S)
        rows = (r // S) * stride_n + (r % S) * stride_s
        r_mask = r < R
    else:  # uniform rows
        r = (chunk * tiles + t) * BLOCK_S + tl.arange(0, BLOCK_S)
        rows = r * stride_s
        r_mask = r < R
    offsets = cc[:, None] * stride_c + rows[None, :]
    return offsets, c_mask[:, None] & r_mask[None, :], r_mask


@_jit
def _channel_scale(mean_ptr, var_ptr, weight_ptr, c, c_mask, eps):
    """Per channel, in fp32: the mean as hi + lo, invstd and invstd * weight (or invstd),
    invstd computed in fp64 (tl.rsqrt is approximate on the GPU)."""
    mean = tl.load(mean_ptr + c, mask=c_mask, other=0.0).to(tl.float64)
    mean_hi = mean.to(tl.float32)
    mean_lo = (mean - mean_hi.to(tl.float64)).to(tl.float32)
    var = tl.load(var_ptr + c, mask=c_mask, other=1.0).to(tl.float64)
    invstd = 1.0 / tl.sqrt(var + eps)
    scale = invstd
    if weight_ptr is not None:
        scale = invstd * tl.load(weight_ptr + c, mask=c_mask, other=0.0).to(tl.float64)
    return mean_hi, mean_lo, invstd.to(tl.float32), scale.to(tl.float32)


@_jit
def _centered(x, mean_hi, mean_lo):
    return (x - mean_hi[:, None]) - mean_lo[:, None]


@_jit
def _tile_moments(x, mask, tile_count, pivot):
    """(mean, M2) of one tile's x - pivot, M2 centred on the tile's own mean."""
    x = tl.where(mask, x - pivot[:, None], 0.0)
    mean = _div_rn(tl.sum(x, axis=1), tl.maximum(tile_count, 1.0))
    centered = tl.where(mask, x - mean[:, None], 0.0)
    return mean, tl.sum(centered * centered, axis=1)


@_jit
def _stats_kernel(x_ptr, part_ptr, P, C, R, S, stride_n, stride_c, stride_s, chunks, tiles,
                  BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, LAYOUT: tl.constexpr,
                  INDEX_64: tl.constexpr):
    """Partials [4, C, P] (count, pivot, mean - pivot, M2) of each program's chunk.

    The pivot is the mean of the chunk's first tile, in fp32. Values are taken as x - pivot,
    which rounds relative to |x - pivot|: an element as pivot (an outlier, say) would round
    every value to its ulp. The mean is kept as pivot + offset because one fp32 mean rounds
    to ulp(|mean|), which the fp64 merge would then read as spread between partials: 1e-3
    of the variance and more at std = 1e-6 |mean|. Tiles are merged with Chan's formula,
    each tile centred on its own mean, so M2 never holds a square of the pivot's distance.
    """
    c, c_mask, chunk = _coords(C, BLOCK_C)
    offsets, mask, r_mask = _tile(c, c_mask, chunk, 0, R, S, stride_n, stride_c, stride_s,
                                  chunks, tiles, BLOCK_S, LAYOUT, INDEX_64)
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    count = tl.zeros([BLOCK_C], dtype=tl.float32) + tl.sum(r_mask.to(tl.float32), axis=0)
    pivot = _div_rn(tl.sum(x, axis=1), tl.maximum(count, 1.0))
    mean, m2 = _tile_moments(x, mask, count, pivot)
    for t in range(1, tiles):
        offsets, mask, r_mask = _tile(c, c_mask, chunk, t, R, S, stride_n, stride_c,
                                      stride_s, chunks, tiles, BLOCK_S, LAYOUT, INDEX_64)
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        tile_count = tl.sum(r_mask.to(tl.float32), axis=0)
        tile_mean, tile_m2 = _tile_moments(x, mask, tile_count, pivot)
        delta = tile_mean - mean
        count += tile_count
        share = _div_rn(tile_count + tl.zeros([BLOCK_C], dtype=tl.float32),
                        tl.maximum(count, 1.0))
        mean += delta * share
        m2 += tile_m2 + delta * delta * (count - tile_count) * share
    out = part_ptr + c * P + chunk
    tl.store(out, count, mask=c_mask)
    tl.store(out + C * P, pivot, mask=c_mask)
    tl.store(out + 2 * C * P, mean, mask=c_mask)
    tl.store(out + 3 * C * P, m2, mask=c_mask)


@_jit
def _partials(part_ptr, c, p0, C, P, BLOCK_P: tl.constexpr):
    """(count, mean, M2) in fp64 of partials p0 .. p0 + BLOCK_P of channels c; zeros past
    P. pivot + offset is exact in fp64 (two fp32 values): each partial's mean keeps what
    the kernel knew of it."""
    p = p0 + tl.arange(0, BLOCK_P)
    mask = (c < C)[:, None] & (p < P)[None, :]
    ptr = part_ptr + c[:, None] * P + p[None, :]
    n = tl.load(ptr, mask=mask, other=0.0).to(tl.float64)
    pivot = tl.load(ptr + C * P, mask=mask, other=0.0).to(tl.float64)
    offset = tl.load(ptr + 2 * C * P, mask=mask, other=0.0).to(tl.float64)
    m2 = tl.load(ptr + 3 * C * P, mask=mask, other=0.0).to(tl.float64)
    return n, pivot + offset, m2


@_jit
def _payload_kernel(part_ptr, shift_ptr, payload_ptr, C, P, count,
                    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """Partials -> this rank's forward payload (fp64, 4C+3): [n, S1, S2, K, K^2, 0, 0].

    The local mean, then M2 = sum of M2_p + n_p (mean_p - mean)^2 (two passes over the
    partials: no sum of squares minus a square cancels); S1 = n (mean - K), S2 = M2 +
    n (mean - K)^2 about the shift K (zeros when shift_ptr is None). ``count`` (n) comes
    from the shape, on the host; P = 0 (an empty batch) gives n = S1 = S2 = 0.
    """
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    weight = tl.zeros([BLOCK_C], dtype=tl.float64)
    total = tl.zeros([BLOCK_C], dtype=tl.float64)
    for p0 in range(0, P, BLOCK_P):
        n, part_mean, m2_unused = _partials(part_ptr, c, p0, C, P, BLOCK_P)
        weight += tl.sum(n, axis=1)
        total += tl.sum(n * part_mean, axis=1)
    mean = total / tl.maximum(weight, 1.0)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float64)
    for p0 in range(0, P, BLOCK_P):
        n, part_mean, part_m2 = _partials(part_ptr, c, p0, C, P, BLOCK_P)
        spread = part_mean - mean[:, None]
        m2 += tl.sum(part_m2 + n * spread * spread, axis=1)
    shift = tl.zeros([BLOCK_C], dtype=tl.float64)
    if shift_ptr is not None:
        shift = tl.load(shift_ptr + c, mask=c_mask, other=0.0).to(tl.float64)
    # Broadcast, not count.to(): Triton passes an int argument equal to 1 as a constexpr.
    n_local = tl.zeros([BLOCK_C], dtype=tl.float64) + count
    offset = tl.where(n_local > 0, mean - shift, 0.0)
    tl.store(payload_ptr + 1 + c, n_local * offset, mask=c_mask)
    tl.store(payload_ptr + 1 + C + c, m2 + n_local * offset * offset, mask=c_mask)
    tl.store(payload_ptr + 1 + 2 * C + c, shift, mask=c_mask)
    tl.store(payload_ptr + 1 + 3 * C + c, shift * shift, mask=c_mask)
    # The scalars, by the lane of channel 0 (program 0): n, then the two flags, 0 here (no
    # invalid input; fp64 input takes the reference kernels).
    first = c == 0
    tl.store(payload_ptr + c, n_local, mask=first)
    tl.store(payload_ptr + 1 + 4 * C + c, tl.zeros([BLOCK_C], dtype=tl.float64), mask=first)
    tl.store(payload_ptr + 2 + 4 * C + c, tl.zeros([BLOCK_C], dtype=tl.float64), mask=first)


@_jit
def _finalize_kernel(moments_ptr, shift_ptr, count_ptr, mean_ptr, var_ptr, running_mean_ptr,
                     running_var_ptr, tracked_ptr, momentum, C, CUMULATIVE: tl.constexpr,
                     BLOCK_C: tl.constexpr):
    """One program: the group's count M, mean (C) and biased var (C) from the reduced
    [M, S1, S2] about the shift, and the running statistics updated in place
    (num_batches_tracked += M > 0; factor momentum, or 1 / num_batches_tracked when
    CUMULATIVE; 0 when M == 0). One program, so num_batches_tracked is read before it is
    written."""
    total = tl.load(moments_ptr).to(tl.float64)
    safe = tl.maximum(total, 1.0)
    has_values = total > 0
    factor = momentum
    if tracked_ptr is not None:
        tracked = tl.load(tracked_ptr) + has_values.to(tl.int64)
        tl.store(tracked_ptr, tracked)
        if CUMULATIVE:
            factor = 1.0 / tl.maximum(tracked, 1).to(tl.float64)
    factor = tl.where(has_values, factor, 0.0)
    bessel = total / tl.maximum(total - 1.0, 1.0)
    tl.store(count_ptr, total)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_mask = c < C
        offset = tl.load(moments_ptr + 1 + c, mask=c_mask, other=0.0) / safe
        square = tl.load(moments_ptr + 1 + C + c, mask=c_mask, other=0.0) / safe
        shift = tl.zeros([BLOCK_C], dtype=tl.float64)
        if shift_ptr is not None:
            shift = tl.load(shift_ptr + c, mask=c_mask, other=0.0).to(tl.float64)
        mean = shift + offset
        var = tl.maximum(square - offset * offset, 0.0)
        tl.store(mean_ptr + c, mean, mask=c_mask)
        tl.store(var_ptr + c, var, mask=c_mask)
        if running_mean_ptr is not None:
            old = tl.load(running_mean_ptr + c, mask=c_mask, other=0.0)
            new = old.to(tl.float64) + factor * (mean - old.to(tl.float64))
            tl.store(running_mean_ptr + c, new.to(old.dtype), mask=c_mask)
            old = tl.load(running_var_ptr + c, mask=c_mask, other=0.0)
            new = old.to(tl.float64) + factor * (var * bessel - old.to(tl.float64))
            tl.store(running_var_ptr + c, new.to(old.dtype), mask=c_mask)


@_jit
def _grad_stats_kernel(dy_ptr, x_ptr, mean_ptr, var_ptr, part_ptr, eps, P,
                       C, R, S, stride_n, stride_c, stride_s, chunks, tiles,
                       BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
                       LAYOUT: tl.constexpr, INDEX_64: tl.constexpr):
    """Partials [2, C, P]: sum dy and sum dy * xhat of each program's chunk."""
    c, c_mask, chunk = _coords(C, BLOCK_C)
    mean_hi, mean_lo, invstd, scale_unused = _channel_scale(mean_ptr, var_ptr, None, c, c_mask, eps)
    sum_dy = tl.zeros([BLOCK_C], dtype=tl.float32)
    sum_dy_xmu = tl.zeros([BLOCK_C], dtype=tl.float32)
    for t in range(tiles):
        offsets, mask, rows_in = _tile(c, c_mask, chunk, t, R, S, stride_n, stride_c, stride_s,
                                 chunks, tiles, BLOCK_S, LAYOUT, INDEX_64)
        dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        sum_dy += tl.sum(dy, axis=1)
        sum_dy_xmu += tl.sum(dy * _centered(x, mean_hi, mean_lo), axis=1)  # dy 0 if masked
    out = part_ptr + c * P + chunk
    tl.store(out, sum_dy, mask=c_mask)
    tl.store(out + C * P, sum_dy_xmu * invstd, mask=c_mask)


@_jit
def _grad_fold_kernel(part_ptr, out_ptr, C, P, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """Partials [2, C, P] -> the 2C sums in fp64 (zeros when P = 0: an empty batch)."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    first = tl.zeros([BLOCK_C], dtype=tl.float64)
    second = tl.zeros([BLOCK_C], dtype=tl.float64)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        mask = c_mask[:, None] & (p < P)[None, :]
        ptr = part_ptr + c[:, None] * P + p[None, :]
        first += tl.sum(tl.load(ptr, mask=mask, other=0.0).to(tl.float64), axis=1)
        second += tl.sum(tl.load(ptr + C * P, mask=mask, other=0.0).to(tl.float64), axis=1)
    tl.store(out_ptr + c, first, mask=c_mask)
    tl.store(out_ptr + C + c, second, mask=c_mask)


@_jit
def _group_grad_means(sums_ptr, count_ptr, c, c_mask, C):
    """(mean dy, mean dy * xhat) over the group per channel, from the all-reduced sums,
    divided in fp64."""
    count = tl.maximum(tl.load(count_ptr).to(tl.float64), 1.0)
    mean_dy = tl.load(sums_ptr + c, mask=c_mask, other=0.0).to(tl.float64) / count
    mean_dy_xhat = tl.load(sums_ptr + C + c, mask=c_mask, other=0.0).to(tl.float64) / count
    return mean_dy.to(tl.float32), mean_dy_xhat.to(tl.float32)


@_jit
def _input_grad_kernel(dy_ptr, x_ptr, dx_ptr, mean_ptr, var_ptr, weight_ptr, sums_ptr,
                       count_ptr, eps, C, R, S, stride_n, stride_c, stride_s, chunks, tiles,
                       BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
                       LAYOUT: tl.constexpr, INDEX_64: tl.constexpr):
    c, c_mask, chunk = _coords(C, BLOCK_C)
    mean_hi, mean_lo, invstd, scale = _channel_scale(mean_ptr, var_ptr, weight_ptr, c,
                                                     c_mask, eps)
    mean_dy, mean_dy_xhat = _group_grad_means(sums_ptr, count_ptr, c, c_mask, C)
    for t in range(tiles):
        offsets, mask, rows_in = _tile(c, c_mask, chunk, t, R, S, stride_n, stride_c, stride_s,
                                 chunks, tiles, BLOCK_S, LAYOUT, INDEX_64)
        dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        xhat = _centered(x, mean_hi, mean_lo) * invstd[:, None]
        dx = scale[:, None] * (dy - mean_dy[:, None] - xhat * mean_dy_xhat[:, None])
        tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# ----- In-place activated BatchNorm (syncbn.activated): ACTIVATION 0 identity, 1 leaky_relu
# (PARAMETER: slope), 2 elu (PARAMETER: alpha). The backward reads the output y, not x.


@_jit
def _activate(z, parameter, ACTIVATION: tl.constexpr):
    if ACTIVATION == 1:
        z = tl.where(z < 0, z * parameter, z)
    elif ACTIVATION == 2:
        z = tl.where(z < 0, parameter * _expm1(tl.minimum(z, 0.0)), z)
    return z


@_jit
def _preactivation(y, dy, parameter, ACTIVATION: tl.constexpr):
    """(z, dL/dz): the activation inverted from y, its derivative written in y."""
    z = y
    dz = dy
    if ACTIVATION == 1:
        z = tl.where(y < 0, _div_rn(y, parameter + tl.zeros_like(y)), y)
        dz = tl.where(y < 0, dy * parameter, dy)
    elif ACTIVATION == 2:
        # y > -alpha in exact arithmetic; the floor keeps log finite where y rounded onto
        # -alpha.
        ratio = tl.maximum(_div_rn(tl.minimum(y, 0.0), parameter + tl.zeros_like(y)),
                           -1.0 + 1.1920929e-07)
        z = tl.where(y < 0, _log1p(ratio), y)
        dz = tl.where(y < 0, dy * (y + parameter), dy)
    return z, dz


@_jit
def _affine_inverse(weight_ptr, bias_ptr, c, c_mask):
    """Per channel 1 / weight (in fp64) and bias (1 and 0 without affine), for
    xhat = (z - bias) / weight."""
    inv_weight = tl.full(c.shape, 1.0, tl.float32)
    shift = tl.zeros(c.shape, dtype=tl.float32)
    if weight_ptr is not None:
        weight = tl.load(weight_ptr + c, mask=c_mask, other=1.0).to(tl.float64)
        inv_weight = (1.0 / weight).to(tl.float32)
        shift = tl.load(bias_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    return inv_weight, shift


@_jit
def _normalize_activate_kernel(x_ptr, y_ptr, mean_ptr, var_ptr, weight_ptr, bias_ptr, eps,
                               parameter, C, R, S, stride_n, stride_c, stride_s, chunks, tiles,
                               ACTIVATION: tl.constexpr, BLOCK_C: tl.constexpr,
                               BLOCK_S: tl.constexpr, LAYOUT: tl.constexpr,
                               INDEX_64: tl.constexpr):
    """y = act((x - mean) * invstd * weight + bias); y_ptr may be x_ptr (each value is read
    and written by the same program, read first)."""
    c, c_mask, chunk = _coords(C, BLOCK_C)
    mean_hi, mean_lo, invstd_unused, scale = _channel_scale(mean_ptr, var_ptr, weight_ptr, c, c_mask,
                                                eps)
    shift = tl.zeros([BLOCK_C], dtype=tl.float32)
    if bias_ptr is not None:
        shift = tl.load(bias_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    for t in range(tiles):
        offsets, mask, rows_in = _tile(c, c_mask, chunk, t, R, S, stride_n, stride_c, stride_s,
                                 chunks, tiles, BLOCK_S, LAYOUT, INDEX_64)
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        # (x - mean) first: x * scale + (bias - mean * scale) would cancel for large means.
        z = _centered(x, mean_hi, mean_lo) * scale[:, None] + shift[:, None]
        y = _activate(z, parameter, ACTIVATION)
        tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)


@_jit
def _activated_grad_stats_kernel(dy_ptr, y_ptr, weight_ptr, bias_ptr, part_ptr, parameter,
                                 P, C, R, S, stride_n, stride_c, stride_s, chunks, tiles,
                                 ACTIVATION: tl.constexpr, BLOCK_C: tl.constexpr,
                                 BLOCK_S: tl.constexpr, LAYOUT: tl.constexpr,
                                 INDEX_64: tl.constexpr):
    """Partials [2, C, P]: sum dz and sum dz * xhat of each program's chunk, from y."""
    c, c_mask, chunk = _coords(C, BLOCK_C)
    inv_weight, shift = _affine_inverse(weight_ptr, bias_ptr, c, c_mask)
    sum_dz = tl.zeros([BLOCK_C], dtype=tl.float32)
    sum_dz_xhat = tl.zeros([BLOCK_C], dtype=tl.float32)
    for t in range(tiles):
        offsets, mask, rows_in = _tile(c, c_mask, chunk, t, R, S, stride_n, stride_c, stride_s,
                                 chunks, tiles, BLOCK_S, LAYOUT, INDEX_64)
        dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        z, dz = _preactivation(y, dy, parameter, ACTIVATION)
        xhat = (z - shift[:, None]) * inv_weight[:, None]
        sum_dz += tl.sum(dz, axis=1)
        sum_dz_xhat += tl.sum(dz * xhat, axis=1)  # dz is 0 where masked
    out = part_ptr + c * P + chunk
    tl.store(out, sum_dz, mask=c_mask)
    tl.store(out + C * P, sum_dz_xhat, mask=c_mask)


@_jit
def _activated_input_grad_kernel(dy_ptr, y_ptr, dx_ptr, var_ptr, weight_ptr, bias_ptr,
                                 sums_ptr, count_ptr, eps, parameter, C, R, S, stride_n,
                                 stride_c, stride_s, chunks, tiles, ACTIVATION: tl.constexpr,
                                 BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
                                 LAYOUT: tl.constexpr, INDEX_64: tl.constexpr):
    """dx = weight * invstd * (dz - mean(dz) - xhat * mean(dz * xhat)), from y."""
    c, c_mask, chunk = _coords(C, BLOCK_C)
    inv_weight, shift = _affine_inverse(weight_ptr, bias_ptr, c, c_mask)
    var = tl.load(var_ptr + c, mask=c_mask, other=1.0).to(tl.float64)
    scale = 1.0 / tl.sqrt(var + eps)
    if weight_ptr is not None:
        scale = scale * tl.load(weight_ptr + c, mask=c_mask, other=0.0).to(tl.float64)
    scale = scale.to(tl.float32)
    mean_dz, mean_dz_xhat = _group_grad_means(sums_ptr, count_ptr, c, c_mask, C)
    for t in range(tiles):
        offsets, mask, rows_in = _tile(c, c_mask, chunk, t, R, S, stride_n, stride_c, stride_s,
                                 chunks, tiles, BLOCK_S, LAYOUT, INDEX_64)
        dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        z, dz = _preactivation(y, dy, parameter, ACTIVATION)
        xhat = (z - shift[:, None]) * inv_weight[:, None]
        dx = scale[:, None] * (dz - mean_dz[:, None] - xhat * mean_dz_xhat[:, None])
        tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)



if _undecorated:  # the reference kernels serve everything
    TRITON_AVAILABLE = INTERPRETED = False


# ----- launch geometry ---------------------------------------------------------------------------

_UNIFORM_ROWS, _PER_SAMPLE, _SPANNING = 0, 1, 2  # the kernels' LAYOUT


@dataclass(frozen=True)
class _Grid:
    """How the kernels walk a dense x as [rows, channels] (see the module docstring).

    ``layout``: _UNIFORM_ROWS (channels contiguous, or one sample: row r at r * stride_s),
    _PER_SAMPLE (a chunk stays within one sample: few, long samples) or _SPANNING (a tile spans
    samples: many short ones, row r at (r // S) * stride_n + (r % S) * stride_s).
    ``chunks``: chunks per sample (_PER_SAMPLE), else all of them.
    """

    channels: int
    rows: int
    positions: int
    strides: Tuple[int, int, int]
    block_c: int
    block_s: int
    tiles: int
    chunks: int
    partials: int
    layout: int
    index_64: bool
    num_warps: int

    @property
    def programs(self) -> Tuple[int]:
        return (triton.cdiv(self.channels, self.block_c) * self.partials,)

    @property
    def args(self) -> Tuple[int, ...]:
        return (self.channels, self.rows, self.positions, *self.strides, self.chunks, self.tiles)

    @property
    def meta(self) -> Dict[str, Any]:
        return {"BLOCK_C": self.block_c, "BLOCK_S": self.block_s, "LAYOUT": self.layout,
                "INDEX_64": self.index_64, "num_warps": self.num_warps, **_OPTIONS}


_sm_counts: Dict[int, int] = {}


def _target_programs(device: torch.device) -> int:
    """Programs the grid aims at: _PROGRAMS_PER_SM per SM of the device (read once per
    device); off the GPU (interpreter, meta) a fixed number."""
    if device.type != "cuda":
        return _TARGET_PROGRAMS
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _sm_counts:
        _sm_counts[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _sm_counts[index] * _PROGRAMS_PER_SM


def _num_warps(tile_elements: int) -> int:
    """From _NUM_WARPS: the entry of the largest tile size not above this one."""
    fitting = [size for size in _NUM_WARPS if size <= tile_elements]
    return _NUM_WARPS[max(fitting)] if fitting else _NUM_WARPS[min(_NUM_WARPS)]


def _dense_format(x: Tensor) -> Optional[torch.memory_format]:
    """The memory format x is dense in (contiguous or channels_last(_3d)), or None."""
    formats = [torch.contiguous_format]
    if x.dim() == 4:
        formats.append(torch.channels_last)
    if x.dim() == 5:
        formats.append(torch.channels_last_3d)
    return next((f for f in formats if x.is_contiguous(memory_format=f)), None)


def _dense(x: Tensor) -> Tuple[Tensor, torch.memory_format]:
    """x itself when contiguous or channels_last(_3d), else a contiguous copy; and its format."""
    memory_format = _dense_format(x)
    if memory_format is None:
        return x.contiguous(), torch.contiguous_format
    return x, memory_format


def _grid(x: Tensor) -> _Grid:
    """The walk for a dense, non-empty x (from its shape, strides and device only)."""
    batch, channels = x.shape[0], x.shape[1]
    positions = x.numel() // (batch * channels)
    if x.stride(1) == 1:  # channels innermost: channels_last, or no positions at all
        layout, rows, strides = _UNIFORM_ROWS, batch * positions, (0, 1, channels)
        block_c = min(triton.next_power_of_2(channels), 64)
        block_s = min(triton.next_power_of_2(rows), max(_TILE // block_c, 1))
    else:
        spanning = batch > 1 and positions < _SPAN_SAMPLES_BELOW
        layout = _SPANNING if spanning else _PER_SAMPLE
        rows = batch * positions if spanning else positions
        strides = (x.stride(0), positions, 1)
        block_s = min(triton.next_power_of_2(rows), _TILE)
        block_c = min(triton.next_power_of_2(channels), max(_TILE // block_s, 1))
    samples = batch if layout == _PER_SAMPLE else 1
    tiles_per_sample = triton.cdiv(rows, block_s)
    c_blocks = triton.cdiv(channels, block_c)
    programs_if_one_tile = c_blocks * samples * tiles_per_sample
    # Several tiles per program keep the partials few; enough programs keep the GPU busy.
    tiles = min(max(programs_if_one_tile // _target_programs(x.device), 1), tiles_per_sample)
    chunks = triton.cdiv(tiles_per_sample, tiles)
    tiles = triton.cdiv(tiles_per_sample, chunks)  # spread the tiles evenly over the chunks
    return _Grid(channels, rows, positions, strides, block_c, block_s, tiles, chunks,
                 samples * chunks, layout, x.numel() >= _INT32_LIMIT, _num_warps(block_c * block_s))


def _fold_geometry(channels: int, partials: int) -> Tuple[Tuple[int], Dict[str, int]]:
    """Grid and blocks of the kernels that fold partials per channel."""
    return ((triton.cdiv(channels, _FOLD_BLOCK_C),),
            {"BLOCK_C": _FOLD_BLOCK_C,
             "BLOCK_P": max(1, min(triton.next_power_of_2(max(partials, 1)), _FOLD_BLOCK_P))})


def _per_channel(t: Optional[Tensor]) -> Optional[Tensor]:
    """A per-channel input (weight, bias, mean, var, shift) as the kernels read it: contiguous."""
    return None if t is None else t.detach().contiguous()


def _on(device: torch.device):
    """Launch on ``device`` (Triton launches on the current CUDA device)."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


# ----- the interface ---------------------------------------------------------------------------

def _forward_payload(x: Tensor, shift: Optional[Tensor]) -> Tensor:
    channels = x.shape[1]
    payload = torch.empty(4 * channels + 3, dtype=torch.float64, device=x.device)
    count = x.numel() // channels if channels else 0
    with _on(x.device):
        partials, num_partials = payload, 0  # an empty batch: the merge reads no partial
        if x.numel():
            x, _ = _dense(x)
            grid = _grid(x)
            num_partials = grid.partials
            partials = torch.empty((4, channels, num_partials), dtype=torch.float32, device=x.device)
            _stats_kernel[grid.programs](x, partials, num_partials, *grid.args, **grid.meta)
        programs, blocks = _fold_geometry(channels, num_partials)
        _payload_kernel[programs](partials, _per_channel(shift), payload, channels, num_partials,
                                  count, **blocks, **_OPTIONS)
    return payload


def _finalize(moments: Tensor, shift: Optional[Tensor], running_mean: Optional[Tensor],
              running_var: Optional[Tensor], num_batches_tracked: Optional[Tensor],
              momentum: Optional[float]) -> Tuple[Tensor, Tensor, Tensor]:
    channels = (moments.numel() - 1) // 2
    if running_mean is not None and momentum is None and num_batches_tracked is None:
        raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
    if running_mean is not None and not (running_mean.is_contiguous() and running_var.is_contiguous()):
        raise ValueError("syncbn's Triton finalize updates contiguous running statistics only")
    # Three tensors, not views of one: a custom operator's outputs may not alias each other.
    count = torch.empty((), dtype=torch.float64, device=moments.device)
    mean, var = (torch.empty(channels, dtype=torch.float64, device=moments.device) for _ in range(2))
    tracked = num_batches_tracked if running_mean is not None else None
    with _on(moments.device):
        _finalize_kernel[(1,)](moments.contiguous(), _per_channel(shift), count, mean, var,
                               running_mean, running_var, tracked,
                               0.0 if momentum is None else float(momentum), channels,
                               CUMULATIVE=momentum is None,
                               BLOCK_C=min(triton.next_power_of_2(max(channels, 1)), _FINALIZE_BLOCK_C),
                               **_OPTIONS)
    return count, mean, var


def _normalize(x: Tensor, mean: Tensor, var: Tensor, weight: Optional[Tensor],
               bias: Optional[Tensor], eps: float) -> Tensor:
    # The activated kernel with ACTIVATION 0 (identity), a compile-time constant: the same code.
    return _normalize_activate(x, mean, var, weight, bias, eps, 0, 0.0, inplace=False)


def _backward_sums(dy: Tensor, x: Tensor, mean: Tensor, var: Tensor, eps: float) -> Tensor:
    return _gradient_sums(_grad_stats_kernel, dy, x, _per_channel(mean), _per_channel(var), eps)


def _input_grad(dy: Tensor, x: Tensor, mean: Tensor, var: Tensor, weight: Optional[Tensor],
                eps: float, group_sums: Tensor, count: Tensor) -> Tensor:
    return _gradient_pass(_input_grad_kernel, dy, x, _per_channel(mean), _per_channel(var),
                          _per_channel(weight), group_sums.contiguous(), count, eps)


def _normalize_activate(x: Tensor, mean: Tensor, var: Tensor, weight: Optional[Tensor],
                        bias: Optional[Tensor], eps: float, activation: int, parameter: float,
                        inplace: bool) -> Tensor:
    dense, _ = _dense(x)
    # Not dense: the kernel works on a copy, then the result goes back into x.
    y = dense if inplace else torch.empty_like(dense)
    if x.numel() != 0:
        grid = _grid(dense)
        with _on(x.device):
            _normalize_activate_kernel[grid.programs](
                dense, y, _per_channel(mean), _per_channel(var), _per_channel(weight),
                _per_channel(bias), eps, parameter, *grid.args, ACTIVATION=activation, **grid.meta)
    return x.copy_(y) if inplace and y is not x else y


def _activated_backward_payload(dy: Tensor, y: Tensor, weight: Optional[Tensor],
                                bias: Optional[Tensor], activation: int, parameter: float) -> Tensor:
    return _gradient_sums(_activated_grad_stats_kernel, dy, y, _per_channel(weight),
                          _per_channel(bias), parameter, ACTIVATION=activation)


def _activated_input_grad(dy: Tensor, y: Tensor, var: Tensor, weight: Optional[Tensor],
                          bias: Optional[Tensor], eps: float, activation: int, parameter: float,
                          global_payload: Tensor, count: Tensor) -> Tensor:
    return _gradient_pass(_activated_input_grad_kernel, dy, y, _per_channel(var),
                          _per_channel(weight), _per_channel(bias), global_payload.contiguous(),
                          count, eps, parameter, ACTIVATION=activation)


def _gradient_sums(kernel, dy: Tensor, data: Tensor, first: Optional[Tensor],
                   second: Optional[Tensor], scalar: float, **constants: int) -> Tensor:
    """The two per-channel gradient sums (fp64, 2C) from ``kernel``'s partials, folded by
    _grad_fold_kernel (zeros for an empty batch).

    ``data`` is what the kernel reads besides dy (x, or the output y); ``first``, ``second`` and
    ``scalar`` are its per-channel inputs and scalar, in its argument order.
    """
    channels = data.shape[1]
    sums = torch.empty(2 * channels, dtype=torch.float64, device=data.device)
    with _on(data.device):
        partials, num_partials = sums, 0  # an empty batch: the fold reads no partial
        if data.numel():
            data, memory_format = _dense(data)
            dy = dy.contiguous(memory_format=memory_format)
            grid = _grid(data)
            num_partials = grid.partials
            partials = torch.empty((2, channels, num_partials), dtype=torch.float32, device=data.device)
            kernel[grid.programs](dy, data, first, second, partials, scalar, num_partials,
                                  *grid.args, **constants, **grid.meta)
        programs, blocks = _fold_geometry(channels, num_partials)
        _grad_fold_kernel[programs](partials, sums, channels, num_partials, **blocks, **_OPTIONS)
    return sums


def _gradient_pass(kernel, dy: Tensor, data: Tensor, *args, **constants: int) -> Tensor:
    """dx from ``kernel``, in the layout of ``data`` (x, or the output y); ``args`` in its order."""
    data, memory_format = _dense(data)
    dx = torch.empty_like(data)
    if data.numel() == 0:
        return dx
    dy = dy.contiguous(memory_format=memory_format)
    grid = _grid(data)
    with _on(data.device):
        kernel[grid.programs](dy, data, dx, *args, *grid.args, **constants, **grid.meta)
    return dx


# ----- never in the way: self-test, fallback, one warning ----------------------------------------

SWITCH = "SYNCBN_TRITON=0"
# (device type, index) -> whether the Triton kernels serve it (absent: not yet self-tested).
_usable: Dict[Tuple[str, int], bool] = {}


def _device_key(device: torch.device) -> Tuple[str, int]:
    if device.index is not None:
        return device.type, device.index
    return device.type, torch.cuda.current_device() if device.type == "cuda" else 0


def _recovers_on(device: torch.device) -> bool:
    """Where a failing kernel hands the call to the reference: CUDA. In the interpreter (tests)
    a failure is a bug to see, not to hide."""
    return device.type == "cuda"


def _switch_off(device: torch.device, problem: str) -> None:
    """The reference serves ``device`` from now on; one warning says why and how to choose it."""
    key = _device_key(device)
    first = _usable.get(key, True)
    _usable[key] = False
    if first:
        warnings.warn(f"syncbn: the Triton kernels are off on {device} for the rest of this "
                      f"process ({problem}); syncbn's torch kernels serve it, with the same "
                      f"results. {SWITCH} turns Triton off from the start.", RuntimeWarning,
                      stacklevel=3)


def _falls_back_to(reference_fn: Callable[..., Any]):
    """The kernel function, handing the call to ``reference_fn`` (same arguments, same
    semantics) if it fails on CUDA."""
    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            device = args[0].device
            if torch.compiler.is_compiling() or not _recovers_on(device):
                return fn(*args, **kwargs)
            try:
                return fn(*args, **kwargs)
            except Exception as error:
                problem = f"{fn.__name__.lstrip('_')} failed: {type(error).__name__}: {error}"
                _switch_off(device, problem)
                return reference_fn(*args, **kwargs)
        return run
    return wrap


def _opaque_to_compile(name: str, fake: Callable[..., Tensor]):
    """The function, called directly in eager; under torch.compile a custom operator the
    compiler does not enter (``fake`` gives its output's shape), so grids, launches and the
    fallback stay out of the graph."""
    def wrap(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        operator = torch.library.custom_op(f"syncbn::triton_{name}", mutates_args=())(fn)
        operator.register_fake(fake)

        @functools.wraps(fn)
        def run(*args: Any) -> Tensor:
            return operator(*args) if torch.compiler.is_compiling() else fn(*args)
        return run
    return wrap


def _like_dense(x: Tensor, *_: Any) -> Tensor:
    return torch.empty_like(x) if _dense_format(x) is not None else x.new_empty(x.shape)


def _two_sums(dy: Tensor, x: Tensor, *_: Any) -> Tensor:
    return x.new_empty(2 * x.shape[1], dtype=torch.float64)


def _grad_like_dense(dy: Tensor, x: Tensor, *_: Any) -> Tensor:
    return _like_dense(x)


forward_payload = _falls_back_to(reference.forward_payload)(_forward_payload)
finalize = _falls_back_to(reference.finalize)(_finalize)
normalize = _opaque_to_compile("normalize", _like_dense)(
    _falls_back_to(reference.normalize)(_normalize))
backward_sums = reference.backward_sums_from(_opaque_to_compile("backward_sums", _two_sums)(
    _falls_back_to(reference.gradient_sums)(_backward_sums)))
input_grad = _opaque_to_compile("input_grad", _grad_like_dense)(
    _falls_back_to(reference.input_grad)(_input_grad))
# The reduced payload's checks run on the host: the reference's (read only under the debug guard
# or check_finite, as the read is a sync).
group_totals = reference.group_totals
checked_finalize = reference.checked_finalize_from(group_totals, finalize)
moments_about = reference.moments_about  # the CPU's re-centring round: not taken on a GPU
# Host-side helpers of syncbn.activated (the floor check, a group of one's statistics): torch's.
any_below_floor = reference.any_below_floor
update_stats = reference.update_stats
normalize_activate = _falls_back_to(reference.normalize_activate)(_normalize_activate)
activated_backward_payload = _falls_back_to(reference.activated_backward_payload)(
    _activated_backward_payload)
activated_input_grad = _falls_back_to(reference.activated_input_grad)(_activated_input_grad)


def self_test(device: torch.device) -> Optional[str]:
    """None if the kernels compile on ``device`` and agree with the reference kernels on a small
    batch (fp32 contiguous and bf16 channels_last), else what went wrong. Reads results on the
    host: run it once per device, outside CUDA-graph capture."""
    try:
        with _on(device):
            for dtype, memory_format in [(torch.float32, torch.contiguous_format),
                                         (torch.bfloat16, torch.channels_last)]:
                problem = _agrees_with_reference(device, dtype, memory_format)
                if problem:
                    return problem
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    return None


def _agrees_with_reference(device: torch.device, dtype: torch.dtype,
                           memory_format: torch.memory_format) -> Optional[str]:
    generator = torch.Generator().manual_seed(0)
    channels = 5

    def made(*shape: int, scale: float = 1.0, offset: float = 0.0) -> Tensor:
        return (torch.randn(shape, generator=generator, dtype=torch.float64) * scale + offset)

    x, dy = (made(3, channels, 6, 7, scale=scale, offset=offset).to(device, dtype)
             .contiguous(memory_format=memory_format) for scale, offset in [(2.0, 3.0), (1.0, 0.0)])
    weight, bias = made(channels, offset=1.0).to(device), made(channels).to(device)
    shift = torch.full((channels,), 2.5, device=device)
    group_sums = made(2 * channels).to(device)
    count = torch.full((), 300.0, dtype=torch.float64, device=device)
    state = [torch.zeros(channels, device=device), torch.ones(channels, device=device),
             torch.zeros((), dtype=torch.long, device=device)]
    state_ref = [t.clone() for t in state]
    ours = {"forward_payload": _forward_payload(x, shift)}
    theirs = {"forward_payload": reference.forward_payload(x, shift)}
    moments = theirs["forward_payload"][:2 * channels + 1]
    found = _finalize(moments, shift, *state, 0.1)
    expected = reference.finalize(moments, shift, *state_ref, 0.1)
    ours["finalize"] = torch.cat([t.reshape(-1) for t in (*found, *state[:2])])
    theirs["finalize"] = torch.cat([t.reshape(-1) for t in (*expected, *state_ref[:2])])
    _, mean, var = reference.finalize(moments, shift, None, None, None, 0.1)
    ours["normalize"] = _normalize(x, mean, var, weight, bias, 1e-5)
    theirs["normalize"] = reference.normalize(x, mean, var, weight, bias, 1e-5)
    ours["backward_sums"] = _backward_sums(dy, x, mean, var, 1e-5)
    theirs["backward_sums"] = reference.gradient_sums(dy, x, mean, var, 1e-5)
    ours["input_grad"] = _input_grad(dy, x, mean, var, weight, 1e-5, group_sums, count)
    theirs["input_grad"] = reference.input_grad(dy, x, mean, var, weight, 1e-5, group_sums, count)
    ours["normalize_activate"] = _normalize_activate(x, mean, var, weight, bias, 1e-5, 2, 1.0, False)
    theirs["normalize_activate"] = torch.nn.functional.elu(theirs["normalize"].float()).to(dtype)
    y = theirs["normalize"]
    ours["activated_backward_payload"] = _activated_backward_payload(dy, y, weight, bias, 0, 0.0)
    theirs["activated_backward_payload"] = theirs["backward_sums"]
    ours["activated_input_grad"] = _activated_input_grad(dy, y, var, weight, bias, 1e-5, 0, 0.0,
                                                         group_sums, count)
    theirs["activated_input_grad"] = theirs["input_grad"]
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    for name, value in ours.items():
        expected = theirs[name].double()
        error = (value.double() - expected).abs().max().item()
        if not error <= tolerance * (1.0 + expected.abs().max().item()):
            return f"{name} ({dtype}) disagrees with the reference kernels by {error:.3g}"
    return None


@torch.compiler.assume_constant_result
def usable(device: torch.device) -> bool:
    """Whether the Triton kernels serve ``device``. A CUDA device is self-tested at its first
    use (once per process; never inside CUDA-graph capture, where the call takes the reference
    and the test waits for the next call); a failure warns once and keeps the reference there
    for good. Off CUDA (the interpreter) untested, until a kernel fails there."""
    key = _device_key(device)
    state = _usable.get(key)
    if state is None:
        if device.type != "cuda":
            return True
        if torch.cuda.is_current_stream_capturing():
            return False
        cuda = torch.device(*key)
        problem = self_test(cuda)
        _usable[key] = True
        if problem is not None:
            _switch_off(cuda, f"self-test: {problem}")
        state = _usable[key]
    return state
