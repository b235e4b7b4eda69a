"""GPU section: the layer table over NCCL (world size 1, which still takes syncbn's sync path)
and gloo on CUDA with 2 processes, against torch.nn.SyncBatchNorm, with achieved memory
bandwidth. Runs only where CUDA is present; elsewhere it says why it was skipped."""
from __future__ import annotations

import time
from typing import Callable, Dict, List

import torch

from .plan import DTYPES, RESNET50_LAYERS, LayerCase, Plan, Setting

# Ranks take GPU rank % device count: with one GPU the two gloo ranks share it.
GPU_SETTINGS = (Setting("nccl", 1, "cuda"), Setting("gloo", 2, "cuda"))
# A BatchNorm fwd+bwd reads or writes the full tensor about 8 times: forward reads x for the
# statistics, then reads x and writes y; backward reads dy and x for its sums, then reads dy
# and x and writes dx.
PASSES_PER_STEP = 8


def gpu_cases(plan: Plan) -> List[LayerCase]:
    dtypes = ["fp32"] + (["bf16"] if torch.cuda.is_bf16_supported() else [])
    return [LayerCase(n, c, spatial, dtype) for c, spatial in RESNET50_LAYERS
            for n in plan.gpu_batches for dtype in dtypes]


def copy_bandwidth_gbps(megabytes: int = 1024, reps: int = 10) -> float:
    """Device-to-device copy bandwidth (read + write), the practical peak of memory traffic."""
    source = torch.empty(megabytes * 2**20, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    target.copy_(source)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        target.copy_(source)
    torch.cuda.synchronize()
    return 2 * source.numel() * reps / (time.perf_counter() - start) / 1e9


def add_bandwidth(row: Dict, peak_gbps: float) -> Dict:
    """Give each peer of a GPU layer row its achieved GB/s and share of the peak."""
    case = row["case"]
    numel = 1
    for size in case["shape"]:
        numel *= size
    moved = PASSES_PER_STEP * numel * DTYPES[case["dtype"]].itemsize
    for summary in row["peers"].values():
        summary["gbps"] = moved / (summary["ms"] / 1e3) / 1e9
        summary["peak_fraction"] = summary["gbps"] / peak_gbps
    return row


def run_gpu_section(plan: Plan,
                    measure_setting: Callable[[Setting, List[LayerCase]], List[Dict]]) -> Dict:
    """The GPU tables, or why they were skipped; ``measure_setting`` runs the layer cases of a
    setting in its rank pool and returns combined rows."""
    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device on this machine (the GPU section needs one)"}
    peak = copy_bandwidth_gbps()
    rows = [add_bandwidth(row, peak)
            for setting in GPU_SETTINGS for row in measure_setting(setting, gpu_cases(plan))]
    return {"peak_gbps": peak, "peak_source": "measured device-to-device copy of 1 GiB",
            "layers": rows}
