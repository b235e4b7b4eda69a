"""Triton kernels for CUDA: the backend interface of :mod:`syncbn.kernels`, same semantics.

Every input is read through a strided [N, C, S] view. Contiguous input is (N, C, S) with the
positions S contiguous; channels_last input (and (N, C) input, S == 1) is one [rows, C] matrix
read as N = 1, S = rows, with the channels contiguous. A program owns BLOCK_C channels of one
sample and walks ``tiles`` tiles of BLOCK_S positions of it (its chunk); the programs form a
1-D grid, channels fastest. Half and bfloat16 input is accumulated in fp32, written back in its
own dtype and layout.

- local_moments: one pass over x: per program a Welford (count, mean, M2) merged tile by tile
  (Chan's formula), each tile centred on its own mean, the values taken about a pivot (the
  program's first tile's mean, never a single element); then a tiny kernel merges the partials
  in fp64 into the local mean and M2 = sum of partial M2 + n (partial mean - mean)^2, with no
  E[x^2] - mean^2 anywhere.
- normalize: one pass, y = (x - mean) * weight * invstd + bias.
- backward_payload: one pass over (dy, x): partial sums of dy and dy * (x - mean) * invstd.
- input_grad: one pass, dx = weight * invstd * (dy - mean(dy) - xhat * mean(dy * xhat)).
- normalize_activate, activated_backward_payload, activated_input_grad: the same passes for
  in-place activated BatchNorm (syncbn.activated); the forward may write into x, the backward
  reads the output y instead of x and inverts the activation to get xhat.

The elementwise passes subtract the fp64 mean as two fp32 parts (hi, then lo): x - hi is exact
for x near the mean, so xhat keeps fp32 precision relative to the spread even at mean 1e4.

Nothing here reads a device value on the host: the grid and the empty-input case follow from
shapes alone, so the kernels run inside CUDA graphs. Importing this module never fails;
``TRITON_AVAILABLE`` says whether the kernels exist.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch

from . import reference

try:
    import triton
    import triton.language as tl

    TRITON_AVAILABLE = True
except ImportError:  # a CPU-only install: the reference kernels serve
    triton = tl = None
    TRITON_AVAILABLE = False

Tensor = torch.Tensor

__all__ = [
    "TRITON_AVAILABLE",
    "INTERPRETED",
    "SUPPORTED_DTYPES",
    "forward_payload",
    "finalize",
    "backward_sums",
    "local_moments",
    "normalize",
    "backward_payload",
    "input_grad",
    "normalize_activate",
    "activated_backward_payload",
    "activated_input_grad",
]

# Decided when the kernels below are decorated: TRITON_INTERPRET=1 at import runs them on CPU.
INTERPRETED: bool = TRITON_AVAILABLE and bool(triton.knobs.runtime.interpret)
# fp64 input keeps the torch path (fp64 statistics end to end).
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Elements per tile; programs to aim for (about 8 resident per SM on a 132-SM H100). First
# guesses, to be tuned on the GPU with benchmarks/gpu_validate.py.
_TILE = 2048
_TARGET_PROGRAMS = 1024
_MERGE_BLOCK_C = 16
_MERGE_BLOCK_P = 128

_jit = triton.jit if TRITON_AVAILABLE else (lambda fn: fn)


@_jit
def _coords(C, chunks, BLOCK_C: tl.constexpr):
    """This program's channels, their mask, its sample, its chunk and its partial's index."""
    pid = tl.program_id(0)
    c_blocks = tl.cdiv(C, BLOCK_C)
    part = pid // c_blocks
    c = (pid % c_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    return c, c < C, part // chunks, part % chunks, part


@_jit
def _tile(c, c_mask, n, chunk, t, S, stride_n, stride_c, stride_s, tiles, BLOCK_S: tl.constexpr):
    """Offsets (int64: tensors may pass 2**31 elements) and mask of tile ``t`` of this chunk."""
    s = (chunk * tiles + t).to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
    offsets = (n.to(tl.int64) * stride_n + c[:, None].to(tl.int64) * stride_c
               + s[None, :] * stride_s)
    return offsets, c_mask[:, None] & (s < S)[None, :], s < S


@_jit
def _channel_scale(mean_ptr, var_ptr, weight_ptr, c, c_mask, eps):
    """Per channel, in fp32: the mean as hi + lo, invstd and invstd * weight (or invstd)."""
    mean = tl.load(mean_ptr + c, mask=c_mask, other=0.0).to(tl.float64)
    mean_hi = mean.to(tl.float32)
    mean_lo = (mean - mean_hi.to(tl.float64)).to(tl.float32)
    invstd = tl.rsqrt(tl.load(var_ptr + c, mask=c_mask, other=1.0).to(tl.float32) + eps)
    scale = invstd
    if weight_ptr is not None:
        scale = invstd * tl.load(weight_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    return mean_hi, mean_lo, invstd, scale


@_jit
def _centered(x, mean_hi, mean_lo):
    return (x - mean_hi[:, None]) - mean_lo[:, None]


@_jit
def _tile_moments(x, mask, tile_count, pivot):
    """(mean, M2) of one tile's x - pivot, M2 centred on the tile's own mean."""
    x = tl.where(mask, x - pivot[:, None], 0.0)
    mean = tl.sum(x, axis=1) / tl.maximum(tile_count, 1.0)
    centered = tl.where(mask, x - mean[:, None], 0.0)
    return mean, tl.sum(centered * centered, axis=1)


@_jit
def _stats_kernel(x_ptr, part_ptr, P, C, S, stride_n, stride_c, stride_s, chunks, tiles,
                  BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """Partials [4, C, P] (count, pivot, mean - pivot, M2) of each program's chunk.

    The pivot is the mean of the chunk's first tile, in fp32. Values are taken as x - pivot,
    which rounds relative to |x - pivot|: an element as pivot (an outlier, say) would round
    every value to its ulp. The mean is kept as pivot + offset because one fp32 mean rounds to
    ulp(|mean|), which the fp64 merge would then read as spread between partials: 1e-3 of the
    variance and more at std = 1e-6 |mean|. Tiles are merged with Chan's formula, each tile
    centred on its own mean, so M2 never holds a square of the pivot's distance.
    """
    c, c_mask, n, chunk, part = _coords(C, chunks, BLOCK_C)
    offsets, mask, s_mask = _tile(c, c_mask, n, chunk, 0, S, stride_n, stride_c, stride_s,
                                  tiles, BLOCK_S)
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    count = tl.zeros([BLOCK_C], dtype=tl.float32) + tl.sum(s_mask.to(tl.float32), axis=0)
    pivot = tl.sum(x, axis=1) / tl.maximum(count, 1.0)
    mean, m2 = _tile_moments(x, mask, count, pivot)
    for t in range(1, tiles):
        offsets, mask, s_mask = _tile(c, c_mask, n, chunk, t, S, stride_n, stride_c, stride_s,
                                      tiles, BLOCK_S)
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        tile_count = tl.sum(s_mask.to(tl.float32), axis=0)
        tile_mean, tile_m2 = _tile_moments(x, mask, tile_count, pivot)
        delta = tile_mean - mean
        count += tile_count
        share = tile_count / tl.maximum(count, 1.0)
        mean += delta * share
        m2 += tile_m2 + delta * delta * (count - tile_count) * share
    out = part_ptr + c * P + part
    tl.store(out, count, mask=c_mask)
    tl.store(out + C * P, pivot, mask=c_mask)
    tl.store(out + 2 * C * P, mean, mask=c_mask)
    tl.store(out + 3 * C * P, m2, mask=c_mask)


@_jit
def _partials(part_ptr, c, p0, C, P, BLOCK_P: tl.constexpr):
    """(count, mean, M2) in fp64 of partials p0 .. p0 + BLOCK_P of channels c; zeros past P.

    pivot + offset is exact in fp64 (two fp32 values), so each partial's mean keeps what the
    kernel knew of it."""
    p = p0 + tl.arange(0, BLOCK_P)
    mask = (c < C)[:, None] & (p < P)[None, :]
    ptr = part_ptr + c[:, None] * P + p[None, :]
    n = tl.load(ptr, mask=mask, other=0.0).to(tl.float64)
    pivot = tl.load(ptr + C * P, mask=mask, other=0.0).to(tl.float64)
    offset = tl.load(ptr + 2 * C * P, mask=mask, other=0.0).to(tl.float64)
    m2 = tl.load(ptr + 3 * C * P, mask=mask, other=0.0).to(tl.float64)
    return n, pivot + offset, m2


@_jit
def _stats_merge_kernel(part_ptr, mean_ptr, m2_ptr, C, P,
                        BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """Partials -> mean and M2 per channel in fp64, in two passes over the partials: the mean,
    then M2 = sum of M2_p + n_p (mean_p - mean)^2 (no sum of squares minus a square cancels)."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    count = tl.zeros([BLOCK_C], dtype=tl.float64)
    total = tl.zeros([BLOCK_C], dtype=tl.float64)
    for p0 in range(0, P, BLOCK_P):
        n, part_mean, _ = _partials(part_ptr, c, p0, C, P, BLOCK_P)
        count += tl.sum(n, axis=1)
        total += tl.sum(n * part_mean, axis=1)
    mean = total / tl.maximum(count, 1.0)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float64)
    for p0 in range(0, P, BLOCK_P):
        n, part_mean, part_m2 = _partials(part_ptr, c, p0, C, P, BLOCK_P)
        spread = part_mean - mean[:, None]
        m2 += tl.sum(part_m2 + n * spread * spread, axis=1)
    tl.store(mean_ptr + c, mean, mask=c < C)
    tl.store(m2_ptr + c, m2, mask=c < C)


@_jit
def _grad_stats_kernel(dy_ptr, x_ptr, mean_ptr, var_ptr, part_ptr, eps, P,
                       C, S, stride_n, stride_c, stride_s, chunks, tiles,
                       BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """Partials [2, C, P]: sum dy and sum dy * xhat of each program's chunk."""
    c, c_mask, n, chunk, part = _coords(C, chunks, BLOCK_C)
    mean_hi, mean_lo, invstd, _ = _channel_scale(mean_ptr, var_ptr, None, c, c_mask, eps)
    sum_dy = tl.zeros([BLOCK_C], dtype=tl.float32)
    sum_dy_xmu = tl.zeros([BLOCK_C], dtype=tl.float32)
    for t in range(tiles):
        offsets, mask, _ = _tile(c, c_mask, n, chunk, t, S, stride_n, stride_c, stride_s,
                                 tiles, BLOCK_S)
        dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        sum_dy += tl.sum(dy, axis=1)
        sum_dy_xmu += tl.sum(dy * _centered(x, mean_hi, mean_lo), axis=1)  # dy is 0 where masked
    out = part_ptr + c * P + part
    tl.store(out, sum_dy, mask=c_mask)
    tl.store(out + C * P, sum_dy_xmu * invstd, mask=c_mask)


@_jit
def _group_grad_means(sums_ptr, count_ptr, c, c_mask, C):
    """(mean dy, mean dy * xhat) over the group per channel, from the all-reduced sums."""
    inv_count = 1.0 / tl.maximum(tl.load(count_ptr).to(tl.float32), 1.0)
    mean_dy = tl.load(sums_ptr + c, mask=c_mask, other=0.0).to(tl.float32) * inv_count
    mean_dy_xhat = tl.load(sums_ptr + C + c, mask=c_mask, other=0.0).to(tl.float32) * inv_count
    return mean_dy, mean_dy_xhat


@_jit
def _input_grad_kernel(dy_ptr, x_ptr, dx_ptr, mean_ptr, var_ptr, weight_ptr, sums_ptr, count_ptr,
                       eps, C, S, stride_n, stride_c, stride_s, chunks, tiles,
                       BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    c, c_mask, n, chunk, _ = _coords(C, chunks, BLOCK_C)
    mean_hi, mean_lo, invstd, scale = _channel_scale(mean_ptr, var_ptr, weight_ptr, c, c_mask, eps)
    mean_dy, mean_dy_xhat = _group_grad_means(sums_ptr, count_ptr, c, c_mask, C)
    for t in range(tiles):
        offsets, mask, _ = _tile(c, c_mask, n, chunk, t, S, stride_n, stride_c, stride_s,
                                 tiles, BLOCK_S)
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
        z = tl.where(z < 0, parameter * (tl.exp(z) - 1.0), z)
    return z


@_jit
def _preactivation(y, dy, parameter, ACTIVATION: tl.constexpr):
    """(z, dL/dz): the activation inverted from y, its derivative written in y."""
    z = y
    dz = dy
    if ACTIVATION == 1:
        z = tl.where(y < 0, y / parameter, y)
        dz = tl.where(y < 0, dy * parameter, dy)
    elif ACTIVATION == 2:
        # y > -alpha in exact arithmetic; the floor keeps log finite where y rounded onto -alpha.
        z = tl.where(y < 0, tl.log(tl.maximum(1.0 + y / parameter, 1.1920929e-07)), y)
        dz = tl.where(y < 0, dy * (y + parameter), dy)
    return z, dz


@_jit
def _affine_inverse(weight_ptr, bias_ptr, c, c_mask):
    """Per channel 1 / weight and bias (1 and 0 without affine), for xhat = (z - bias) / weight."""
    inv_weight = tl.full(c.shape, 1.0, tl.float32)
    shift = tl.zeros(c.shape, dtype=tl.float32)
    if weight_ptr is not None:
        inv_weight = 1.0 / tl.load(weight_ptr + c, mask=c_mask, other=1.0).to(tl.float32)
        shift = tl.load(bias_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    return inv_weight, shift


@_jit
def _normalize_activate_kernel(x_ptr, y_ptr, mean_ptr, var_ptr, weight_ptr, bias_ptr, eps,
                               parameter, C, S, stride_n, stride_c, stride_s, chunks, tiles,
                               ACTIVATION: tl.constexpr, BLOCK_C: tl.constexpr,
                               BLOCK_S: tl.constexpr):
    """y = act((x - mean) * invstd * weight + bias); y_ptr may be x_ptr (each value is read
    and written by the same program, read first)."""
    c, c_mask, n, chunk, _ = _coords(C, chunks, BLOCK_C)
    mean_hi, mean_lo, _, scale = _channel_scale(mean_ptr, var_ptr, weight_ptr, c, c_mask, eps)
    shift = tl.zeros([BLOCK_C], dtype=tl.float32)
    if bias_ptr is not None:
        shift = tl.load(bias_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    for t in range(tiles):
        offsets, mask, _ = _tile(c, c_mask, n, chunk, t, S, stride_n, stride_c, stride_s,
                                 tiles, BLOCK_S)
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        # (x - mean) first: x * scale + (bias - mean * scale) would cancel for large means.
        z = _centered(x, mean_hi, mean_lo) * scale[:, None] + shift[:, None]
        y = _activate(z, parameter, ACTIVATION)
        tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)


@_jit
def _activated_grad_stats_kernel(dy_ptr, y_ptr, weight_ptr, bias_ptr, part_ptr, parameter, P,
                                 C, S, stride_n, stride_c, stride_s, chunks, tiles,
                                 ACTIVATION: tl.constexpr, BLOCK_C: tl.constexpr,
                                 BLOCK_S: tl.constexpr):
    """Partials [2, C, P]: sum dz and sum dz * xhat of each program's chunk, from y."""
    c, c_mask, n, chunk, part = _coords(C, chunks, BLOCK_C)
    inv_weight, shift = _affine_inverse(weight_ptr, bias_ptr, c, c_mask)
    sum_dz = tl.zeros([BLOCK_C], dtype=tl.float32)
    sum_dz_xhat = tl.zeros([BLOCK_C], dtype=tl.float32)
    for t in range(tiles):
        offsets, mask, _ = _tile(c, c_mask, n, chunk, t, S, stride_n, stride_c, stride_s,
                                 tiles, BLOCK_S)
        dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        z, dz = _preactivation(y, dy, parameter, ACTIVATION)
        xhat = (z - shift[:, None]) * inv_weight[:, None]
        sum_dz += tl.sum(dz, axis=1)
        sum_dz_xhat += tl.sum(dz * xhat, axis=1)  # dz is 0 where masked
    out = part_ptr + c * P + part
    tl.store(out, sum_dz, mask=c_mask)
    tl.store(out + C * P, sum_dz_xhat, mask=c_mask)


@_jit
def _activated_input_grad_kernel(dy_ptr, y_ptr, dx_ptr, var_ptr, weight_ptr, bias_ptr, sums_ptr,
                                 count_ptr, eps, parameter, C, S, stride_n, stride_c, stride_s,
                                 chunks, tiles, ACTIVATION: tl.constexpr, BLOCK_C: tl.constexpr,
                                 BLOCK_S: tl.constexpr):
    """dx = weight * invstd * (dz - mean(dz) - xhat * mean(dz * xhat)), from y."""
    c, c_mask, n, chunk, _ = _coords(C, chunks, BLOCK_C)
    inv_weight, shift = _affine_inverse(weight_ptr, bias_ptr, c, c_mask)
    scale = tl.rsqrt(tl.load(var_ptr + c, mask=c_mask, other=1.0).to(tl.float32) + eps)
    if weight_ptr is not None:
        scale = scale * tl.load(weight_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    mean_dz, mean_dz_xhat = _group_grad_means(sums_ptr, count_ptr, c, c_mask, C)
    for t in range(tiles):
        offsets, mask, _ = _tile(c, c_mask, n, chunk, t, S, stride_n, stride_c, stride_s,
                                 tiles, BLOCK_S)
        dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        z, dz = _preactivation(y, dy, parameter, ACTIVATION)
        xhat = (z - shift[:, None]) * inv_weight[:, None]
        dx = scale[:, None] * (dz - mean_dz[:, None] - xhat * mean_dz_xhat[:, None])
        tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@dataclass(frozen=True)
class _Grid:
    """How the kernels walk x viewed as [n, channels, s] with the given strides."""

    n: int
    channels: int
    s: int
    strides: Tuple[int, int, int]
    block_c: int
    block_s: int
    tiles: int
    chunks: int

    @property
    def partials(self) -> int:
        return self.n * self.chunks

    @property
    def programs(self) -> Tuple[int]:
        return (triton.cdiv(self.channels, self.block_c) * self.partials,)

    @property
    def args(self) -> Tuple[int, ...]:
        return (self.channels, self.s, *self.strides, self.chunks, self.tiles)

    @property
    def meta(self) -> Dict[str, Any]:
        return {"BLOCK_C": self.block_c, "BLOCK_S": self.block_s}


def _dense(x: Tensor) -> Tuple[Tensor, torch.memory_format]:
    """x itself when contiguous or channels_last(_3d), else a contiguous copy; and its format."""
    formats = [torch.contiguous_format]
    if x.dim() == 4:
        formats.append(torch.channels_last)
    if x.dim() == 5:
        formats.append(torch.channels_last_3d)
    for memory_format in formats:
        if x.is_contiguous(memory_format=memory_format):
            return x, memory_format
    return x.contiguous(), torch.contiguous_format


def _grid(x: Tensor) -> _Grid:
    """The walk for a dense, non-empty x (from its shape and strides only)."""
    batch, channels = x.shape[0], x.shape[1]
    positions = x.numel() // (batch * channels)
    if x.stride(1) == 1:  # channels innermost: channels_last, or no positions at all
        n, s, strides = 1, batch * positions, (0, 1, channels)
        block_c = min(triton.next_power_of_2(channels), 64)
        block_s = min(triton.next_power_of_2(s), _TILE // block_c)
    else:
        n, s, strides = batch, positions, (x.stride(0), positions, 1)
        block_s = min(triton.next_power_of_2(s), _TILE)
        block_c = min(triton.next_power_of_2(channels), _TILE // block_s)
    tiles_per_sample = triton.cdiv(s, block_s)
    programs_if_one_tile = triton.cdiv(channels, block_c) * n * tiles_per_sample
    # Several tiles per program keep the partials few; enough programs keep the GPU busy.
    tiles = min(max(programs_if_one_tile // _TARGET_PROGRAMS, 1), tiles_per_sample)
    chunks = triton.cdiv(tiles_per_sample, tiles)
    tiles = triton.cdiv(tiles_per_sample, chunks)  # spread the tiles evenly over the chunks
    return _Grid(n, channels, s, strides, block_c, block_s, tiles, chunks)


def local_moments(x: Tensor) -> Tuple[Tensor, Tensor]:
    """(mean, M2 = sum (x - mean)^2) per channel of the local batch in fp64, zeros if empty."""
    channels = x.shape[1]
    if x.numel() == 0:
        zeros = torch.zeros((2, channels), dtype=torch.float64, device=x.device)
        return zeros[0], zeros[1]
    moments = torch.empty((2, channels), dtype=torch.float64, device=x.device)  # the merge writes all
    x, _ = _dense(x)
    grid = _grid(x)
    partials = torch.empty((4, channels, grid.partials), dtype=torch.float32, device=x.device)
    _stats_kernel[grid.programs](x, partials, grid.partials, *grid.args, **grid.meta)
    _stats_merge_kernel[(triton.cdiv(channels, _MERGE_BLOCK_C),)](
        partials, moments[0], moments[1], channels, grid.partials,
        BLOCK_C=_MERGE_BLOCK_C, BLOCK_P=min(triton.next_power_of_2(grid.partials), _MERGE_BLOCK_P))
    return moments[0], moments[1]


def forward_payload(x: Tensor, shift: Optional[Tensor]) -> Tensor:
    """The forward payload (4C+3 fp64) of the local batch: the statistics kernels, then the
    payload assembled by torch ops."""
    mean, m2 = local_moments(x)
    return reference.payload_from_moments(x, mean, m2, shift)


# The group statistics and running-stat update: the reference's torch ops on the device.
finalize = reference.finalize


def backward_sums(dy: Tensor, x: Tensor, mean: Tensor, var: Tensor, eps: float) -> Tensor:
    """[sum dy (C), sum dy * xhat (C)] of the local batch, in fp64."""
    return backward_payload(dy, x, mean, var, eps).double()


def normalize(
    x: Tensor, mean: Tensor, var: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float
) -> Tensor:
    """y = (x - mean) / sqrt(var + eps) * weight + bias in one pass; keeps dtype and layout."""
    # The activated kernel with ACTIVATION 0 (identity), a compile-time constant: the same code.
    return normalize_activate(x, mean, var, weight, bias, eps, 0, 0.0, inplace=False)


def backward_payload(dy: Tensor, x: Tensor, mean: Tensor, var: Tensor, eps: float) -> Tensor:
    """[sum dy (C), sum dy * xhat (C)] of the local batch, in fp32."""
    return _gradient_sums(_grad_stats_kernel, dy, x, mean, var, eps)


def input_grad(
    dy: Tensor, x: Tensor, mean: Tensor, var: Tensor, weight: Optional[Tensor], eps: float,
    global_payload: Tensor, count: Tensor,
) -> Tensor:
    """dx = weight * invstd * (dy - mean(dy) - xhat * mean(dy * xhat)), means over the group."""
    return _input_grad(_input_grad_kernel, dy, x, mean, var, weight, global_payload, count, eps)


def _gradient_sums(kernel, dy: Tensor, data: Tensor, first: Optional[Tensor],
                   second: Optional[Tensor], scalar: float, **constants: int) -> Tensor:
    """The two per-channel gradient sums (C each, fp32) from ``kernel``'s per-program partials.

    ``data`` is what the kernel reads besides dy (x, or the output y); ``first``, ``second`` and
    ``scalar`` are its per-channel inputs and scalar, in its argument order.
    """
    channels = data.shape[1]
    if data.numel() == 0:
        return torch.zeros(2 * channels, dtype=torch.float32, device=data.device)
    data, memory_format = _dense(data)
    dy = dy.contiguous(memory_format=memory_format)
    grid = _grid(data)
    partials = torch.empty((2, channels, grid.partials), dtype=torch.float32, device=data.device)
    kernel[grid.programs](dy, data, first, second, partials, scalar, grid.partials, *grid.args,
                          **constants, **grid.meta)
    # Plain fp32 sums merge without cancellation: one torch reduction over the partials.
    return partials.sum(dim=2).reshape(2 * channels)


def _input_grad(kernel, dy: Tensor, data: Tensor, *args, **constants: int) -> Tensor:
    """dx from ``kernel``, in the layout of ``data`` (x, or the output y); ``args`` in its order."""
    data, memory_format = _dense(data)
    dx = torch.empty_like(data)
    if data.numel() == 0:
        return dx
    dy = dy.contiguous(memory_format=memory_format)
    grid = _grid(data)
    kernel[grid.programs](dy, data, dx, *args, *grid.args, **constants, **grid.meta)
    return dx


def normalize_activate(
    x: Tensor, mean: Tensor, var: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
    eps: float, activation: int, parameter: float, inplace: bool,
) -> Tensor:
    """act(weight * (x - mean) * invstd + bias) in one pass, into x's storage when ``inplace``."""
    dense, _ = _dense(x)
    # Not dense: the kernel works on a copy, then the result goes back into x.
    y = dense if inplace else torch.empty_like(dense)
    if x.numel() != 0:
        grid = _grid(dense)
        _normalize_activate_kernel[grid.programs](dense, y, mean, var, weight, bias, eps, parameter,
                                                  *grid.args, ACTIVATION=activation, **grid.meta)
    return x.copy_(y) if inplace and y is not x else y


def activated_backward_payload(
    dy: Tensor, y: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], activation: int,
    parameter: float,
) -> Tensor:
    """[sum dz (C), sum dz * xhat (C)] of the local batch in fp32, read from the output y."""
    return _gradient_sums(_activated_grad_stats_kernel, dy, y, weight, bias, parameter,
                          ACTIVATION=activation)


def activated_input_grad(
    dy: Tensor, y: Tensor, var: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
    eps: float, activation: int, parameter: float, global_payload: Tensor, count: Tensor,
) -> Tensor:
    """dx = weight * invstd * (dz - mean(dz) - xhat * mean(dz * xhat)), read from the output y."""
    return _input_grad(_activated_input_grad_kernel, dy, y, var, weight, bias, global_payload,
                       count, eps, parameter, ACTIVATION=activation)
