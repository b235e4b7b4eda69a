"""Memory of in-place activated SyncBatchNorm: ``python -m benchmarks.memory [--quick] [--publish]``.

Three arms build the same networks and differ only in their normalization + activation:
``torch BN + act`` (nn.BatchNorm2d, then LeakyReLU(inplace=True)), ``SyncBN + act``
(syncbn.SyncBatchNorm, then the same activation) and ``SyncBNAct`` (syncbn.SyncBatchNormAct,
in place). A block's last norm before a residual add has no activation (identity). Networks:
ResNet-50-style classifiers (bottleneck stages 3-4-6-3, widths divided by 4, 64x64 input), v1
(post-activation: the norm before each residual add has no activation) and v2 (pre-activation,
He et al. 2016: every norm is followed by an activation), and a segmentation-style network (strided encoder, dilated stage, ASPP-like head, 96x96 input,
per-pixel loss), small enough for a shared CPU. One process, world size 1.

What is measured, per network, arm and batch:

- kept bytes: every tensor autograd saves during the forward is seen by a
  ``torch.autograd.graph.saved_tensors_hooks`` pack hook. ``norm_act_bytes`` adds up those
  saved inside a norm or activation module (parameters and 0-dim tensors included);
  ``unique_bytes`` counts each storage of the whole model once (what memory actually holds
  until backward, parameters excluded).
- peak: peak resident memory of one training step (forward, backward, SGD), in a child
  process started with MALLOC_MMAP_THRESHOLD_=65536 so that every tensor above 64 KiB is its
  own mmap that is unmapped when freed, and the step's peak is the step's own: the kernel's
  high-water mark (VmHWM) is reset through /proc/self/clear_refs just before the step and
  read after it, minus the resident size before it. One warm-up step runs first.
- time: median wall time of a training step, the arms interleaved (A B C A B C ...), one thread;
  in a group of one (one process), and for the two syncbn arms also at W=2 through a stand-in
  communicator that sums two identical ranks (benchmarks/layer_cost.TwoIdenticalRanks: the
  synchronized path with no communication), interleaved the same way. The ratio SyncBNAct /
  SyncBN + act is the median of the ratios of the two arms' steps in the same round (a load
  burst on the shared machine then slows both sides of a ratio). The goal (issue 25): SyncBNAct
  within 1.15x of SyncBN + act's step time in both.
- largest batch within a budget: the budget is 1.01 times the peak of ``torch BN + act`` at
  the largest batch measured. Peak is linear in the batch, so a least-squares line through each arm's
  points predicts its largest batch within the budget; the largest batch reported is measured:
  from the prediction, one larger while the peak fits, or one smaller while it does not.

Results: JSON in benchmarks/results/, the Markdown section and plot in benchmarks/figures/;
``--publish`` also writes the section into BENCHMARKS.md (between its memory markers).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Tuple

import torch
from torch import nn

import syncbn

from .layer_cost import TwoIdenticalRanks
from .machine import machine_stamp, stamp_line
from .run import BENCHMARKS_MD, replace_section

ARMS = ("torch BN + act", "SyncBN + act", "SyncBNAct")
SYNC_ARMS = ARMS[1:]  # the arms with a process group: timed at W=2 too
STEP_TIME_GOAL = 1.15  # SyncBNAct / SyncBN + act, issue 25
SLOPE = 0.01
RESULTS_DIR = os.path.join(os.path.dirname(__file__), "results")
FIGURES_DIR = os.path.join(os.path.dirname(__file__), "figures")
_CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}

NormAct = Callable[[int, bool], nn.Module]  # (channels, activated) -> module


def norm_act_factory(arm: str, group=None) -> NormAct:
    """The arm's norm + activation layers; ``group``: the syncbn arms' process group."""
    def make(channels: int, activated: bool) -> nn.Module:
        if arm == "SyncBNAct":
            layer: nn.Module = syncbn.SyncBatchNormAct(
                channels, activation="leaky_relu" if activated else "identity", negative_slope=SLOPE,
                process_group=group)
        else:
            norm = (nn.BatchNorm2d(channels) if arm == "torch BN + act"
                    else syncbn.SyncBatchNorm(channels, process_group=group))
            layer = nn.Sequential(norm, nn.LeakyReLU(SLOPE, inplace=True)) if activated else norm
        layer.is_norm_act = True  # what kept_bytes attributes to the norm+act layers
        return layer
    return make


# ----- networks ------------------------------------------------------------------------------

class Bottleneck(nn.Module):
    def __init__(self, norm_act: NormAct, inputs: int, width: int, stride: int):
        super().__init__()
        outputs = 4 * width
        self.branch = nn.Sequential(
            nn.Conv2d(inputs, width, 1, bias=False), norm_act(width, True),
            nn.Conv2d(width, width, 3, stride, 1, bias=False), norm_act(width, True),
            nn.Conv2d(width, outputs, 1, bias=False), norm_act(outputs, False))
        self.shortcut = nn.Identity() if stride == 1 and inputs == outputs else nn.Sequential(
            nn.Conv2d(inputs, outputs, 1, stride, bias=False), norm_act(outputs, False))
        self.act = nn.LeakyReLU(SLOPE, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Out of place: an in-place add would modify SyncBNAct's output, which it keeps.
        return self.act(self.branch(x) + self.shortcut(x))


class PreActBottleneck(nn.Module):
    """ResNet v2 (He et al. 2016): norm + activation before each convolution."""

    def __init__(self, norm_act: NormAct, inputs: int, width: int, stride: int):
        super().__init__()
        outputs = 4 * width
        self.pre = norm_act(inputs, True)
        self.branch = nn.Sequential(
            nn.Conv2d(inputs, width, 1, bias=False), norm_act(width, True),
            nn.Conv2d(width, width, 3, stride, 1, bias=False), norm_act(width, True),
            nn.Conv2d(width, outputs, 1, bias=False))
        self.projection = None if stride == 1 and inputs == outputs else nn.Conv2d(
            inputs, outputs, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.projection is not None:  # projects the activated input, as ResNet v2 does
            activated = self.pre(x)
            return self.branch(activated) + self.projection(activated)
        # An in-place norm overwrites x, which the identity shortcut still needs: a copy,
        # transient (the add keeps nothing for backward).
        shortcut = x.clone() if getattr(self.pre, "inplace", False) else x
        return self.branch(self.pre(x)) + shortcut


def resnet50(block: type, pre_activation: bool, norm_act: NormAct, classes: int = 10,
             width_divisor: int = 4) -> nn.Module:
    """Bottleneck stages 3-4-6-3; widths divided by ``width_divisor``."""
    widths = [64 // width_divisor * 2 ** i for i in range(4)]
    stem = 64 // width_divisor
    layers: List[nn.Module] = [nn.Conv2d(3, stem, 7, 2, 3, bias=False), norm_act(stem, True),
                               nn.MaxPool2d(3, 2, 1)]
    inputs = stem
    for stage, (width, blocks) in enumerate(zip(widths, (3, 4, 6, 3))):
        for index in range(blocks):
            layers.append(block(norm_act, inputs, width, 2 if index == 0 and stage > 0 else 1))
            inputs = 4 * width
    if pre_activation:
        layers.append(norm_act(inputs, True))
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(inputs, classes)]
    return nn.Sequential(*layers)


class Segmenter(nn.Module):
    """Strided encoder to 1/8, a dilated stage, an ASPP-like head, upsampled logits."""

    def __init__(self, norm_act: NormAct, classes: int = 8, width: int = 32):
        super().__init__()

        def conv(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Module:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, dilation, dilation, bias=False),
                                 norm_act(cout, True))

        self.encoder = nn.Sequential(
            conv(3, width, 2), conv(width, width),
            conv(width, 2 * width, 2), conv(2 * width, 2 * width),
            conv(2 * width, 4 * width, 2), conv(4 * width, 4 * width),
            conv(4 * width, 4 * width, dilation=2), conv(4 * width, 4 * width, dilation=4))
        self.aspp = nn.ModuleList(conv(4 * width, width, dilation=d) for d in (1, 6, 12))
        self.head = nn.Sequential(nn.Conv2d(3 * width, width, 1, bias=False), norm_act(width, True),
                                  nn.Conv2d(width, classes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.encoder(x)
        logits = self.head(torch.cat([branch(features) for branch in self.aspp], 1))
        return nn.functional.interpolate(logits, size=x.shape[2:], mode="bilinear", align_corners=False)


MODELS: Dict[str, Tuple[Callable[[NormAct], nn.Module], int]] = {  # builder, input side
    "ResNet-50 v1-style": (lambda norm_act: resnet50(Bottleneck, False, norm_act), 64),
    "ResNet-50 v2-style": (lambda norm_act: resnet50(PreActBottleneck, True, norm_act), 64),
    "segmentation-style": (Segmenter, 96),
}


def batch_and_loss(model_name: str, batch: int) -> Tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    side = MODELS[model_name][1]
    generator = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, 3, side, side, generator=generator)
    if model_name.startswith("ResNet"):
        target = torch.randint(0, 10, (batch,), generator=generator)
    else:
        target = torch.randint(0, 8, (batch, side, side), generator=generator)
    return x, lambda logits: nn.functional.cross_entropy(logits, target)


def build(model_name: str, arm: str, group=None) -> nn.Module:
    torch.manual_seed(0)
    return MODELS[model_name][0](norm_act_factory(arm, group)).train()


# ----- kept bytes ----------------------------------------------------------------------------

def kept_bytes(model: nn.Module, x: torch.Tensor) -> Dict[str, int]:
    """Bytes autograd keeps for backward: those saved by norm/activation modules, and the
    whole model's distinct storages (parameters excluded).

    Under these hooks SyncBatchNormAct fuses out of place (hooks hide from it what autograd
    saved); the graph keeps the same output either way, so the bytes are those of in place.
    """
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    depth = [0]
    norm_act_bytes = [0]
    storages: Dict[int, int] = {}

    def enter(*_):
        depth[0] += 1

    def leave(*_):
        depth[0] -= 1

    handles = []
    for module in model.modules():
        if getattr(module, "is_norm_act", False):
            handles.append(module.register_forward_pre_hook(enter))
            handles.append(module.register_forward_hook(leave))

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if depth[0]:
            norm_act_bytes[0] += tensor.numel() * tensor.element_size()
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return {"norm_act_bytes": norm_act_bytes[0], "unique_bytes": sum(storages.values())}


# ----- peak and time (child process) ---------------------------------------------------------

def _status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, loss_fn) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss_fn(model(x)).backward()
    optimizer.step()


def step_peak_bytes(model: nn.Module, optimizer, x: torch.Tensor, loss_fn) -> int:
    """Peak resident bytes of one training step above the resident size before it."""
    _train_step(model, optimizer, x, loss_fn)  # warm-up: optimizer state, first-call caches
    optimizer.zero_grad(set_to_none=True)
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # resets VmHWM to the current resident size
    _train_step(model, optimizer, x, loss_fn)
    return 1024 * (_status_kib("VmHWM") - before)


def _child(spec: Dict) -> Dict:
    """Peaks for every (arm, batch) and interleaved step times, for one network."""
    torch.set_num_threads(1)
    model_name = spec["model"]
    peaks: Dict[str, Dict[int, int]] = {arm: {} for arm in ARMS}
    for batch in spec["batches"]:
        for arm in ARMS:
            model = build(model_name, arm)
            x, loss_fn = batch_and_loss(model_name, batch)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
            peaks[arm][batch] = step_peak_bytes(model, optimizer, x, loss_fn)
            del model, optimizer
    for arm, batch in spec.get("extra", []):
        model = build(model_name, arm)
        x, loss_fn = batch_and_loss(model_name, batch)
        peaks[arm][batch] = step_peak_bytes(model, torch.optim.SGD(model.parameters(), lr=0.01,
                                                                    momentum=0.9), x, loss_fn)
    measured = {"peaks": {arm: {str(b): v for b, v in p.items()} for arm, p in peaks.items()}}
    if spec.get("time", True):
        batch = spec["time_batch"]
        for key, arms, group in (("", ARMS, None), ("_w2", SYNC_ARMS, TwoIdenticalRanks())):
            seconds = step_times(model_name, batch, arms, group, spec["reps"])
            measured["step_ms" + key] = {arm: 1e3 * statistics.median(s) for arm, s in seconds.items()}
            measured["time_ratio" + key] = statistics.median(
                a / b for a, b in zip(seconds["SyncBNAct"], seconds["SyncBN + act"]))
        measured["time_batch"] = batch
    return measured


def step_times(model_name: str, batch: int, arms, group, reps: int) -> Dict[str, List[float]]:
    """Seconds of each training step per arm (``group``: the syncbn arms' process group), the
    arms interleaved round by round, after one warm-up step each."""
    seconds: Dict[str, List[float]] = {arm: [] for arm in arms}
    runs = {}
    for arm in arms:
        model = build(model_name, arm, group)
        x, loss_fn = batch_and_loss(model_name, batch)
        runs[arm] = (model, torch.optim.SGD(model.parameters(), lr=0.01), x, loss_fn)
        _train_step(*runs[arm])
    for _ in range(reps):
        for arm in arms:
            start = time.perf_counter()
            _train_step(*runs[arm])
            seconds[arm].append(time.perf_counter() - start)
    return seconds


def run_child(spec: Dict) -> Dict:
    env = dict(os.environ, **_CHILD_ENV)
    done = subprocess.run([sys.executable, "-m", "benchmarks.memory", "--child", json.dumps(spec)],
                          env=env, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"memory child failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----- analysis ------------------------------------------------------------------------------

def fit_line(points: Dict[int, int]) -> Tuple[float, float]:
    """(intercept, slope) of the least-squares line through (batch, bytes)."""
    xs, ys = list(points), [points[b] for b in points]
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)
    return mean_y - slope * mean_x, slope


def largest_batch(points: Dict[int, int], budget: int) -> int:
    intercept, slope = fit_line(points)
    return int((budget - intercept) // slope)


def fitting_batches(spec: Dict, peaks: Dict[str, Dict[int, int]], budget: int,
                    tries: int = 4) -> Tuple[Dict[str, int], Dict[str, int]]:
    """Each arm's largest measured batch within ``budget`` and its peak: the fit's batch is
    measured, then the next larger while it fits, or the next smaller while it does not."""
    candidate = {arm: largest_batch(peaks[arm], budget) for arm in ARMS}
    best: Dict[str, int] = {}
    best_peak: Dict[str, int] = {}
    step: Dict[str, int] = {}  # +1 searching up, -1 searching down
    pending = list(ARMS)
    for _ in range(tries):
        check = run_child({**spec, "batches": [], "extra": [[arm, candidate[arm]] for arm in pending],
                           "time": False})
        still = []
        for arm in pending:
            peak = check["peaks"][arm][str(candidate[arm])]
            fits = peak <= budget
            step.setdefault(arm, 1 if fits else -1)
            if fits:
                best[arm], best_peak[arm] = candidate[arm], peak
            if fits == (step[arm] == 1) and candidate[arm] + step[arm] >= 1:
                candidate[arm] += step[arm]
                still.append(arm)
        pending = still
        if not pending:
            break
    for arm in ARMS:
        if arm not in best:
            raise RuntimeError(f"{arm}: no batch within the budget found near the fit's prediction")
    return best, best_peak


def measure(quick: bool) -> Dict:
    resnet = [2, 4, 8] if quick else [4, 8, 16, 32]
    batches = {"ResNet-50 v1-style": resnet, "ResNet-50 v2-style": resnet,
               "segmentation-style": [2, 4] if quick else [2, 4, 8, 16]}
    results: Dict = {"stamp": machine_stamp(), "quick": quick, "models": {}}
    for model_name in MODELS:
        sizes = batches[model_name]
        kept = {arm: {} for arm in ARMS}
        for arm in ARMS:
            for batch in sizes:
                x, _ = batch_and_loss(model_name, batch)
                kept[arm][str(batch)] = kept_bytes(build(model_name, arm), x)
        spec = {"model": model_name, "batches": sizes, "time_batch": sizes[-1] if quick else sizes[1],
                "reps": 3 if quick else 15}
        measured = run_child(spec)
        peaks = {arm: {int(b): v for b, v in p.items()} for arm, p in measured["peaks"].items()}
        # 1% above torch BN + act's peak at the largest batch: a repeated measurement of that
        # same step must fit too, so the baseline is not pushed one batch down by noise.
        budget = int(1.01 * peaks[ARMS[0]][sizes[-1]])
        largest, peak_at_largest = fitting_batches(spec, peaks, budget)
        results["models"][model_name] = {
            "batches": sizes, "kept": kept,
            "peaks": {arm: {str(b): v for b, v in p.items()} for arm, p in peaks.items()},
            "budget_bytes": budget, "largest_batch": largest, "peak_at_largest_batch": peak_at_largest,
            **{key: measured[key] for key in ("step_ms", "step_ms_w2", "time_ratio", "time_ratio_w2",
                                              "time_batch")}}
    return results


# ----- report --------------------------------------------------------------------------------

def _mib(value: float) -> str:
    return f"{value / 2 ** 20:.1f}"


def _over(m: Dict, arm: str) -> str:
    excess = m["peak_at_largest_batch"][arm] / m["budget_bytes"] - 1
    return f", {100 * excess:.0f}% over the budget" if excess > 0.005 else ""


def _time_ratio(ratio: float) -> str:
    verdict = "within" if ratio <= STEP_TIME_GOAL else "NOT within"
    return (f"SyncBNAct / SyncBN + act, median of the rounds' ratios = {ratio:.2f}x, {verdict} the "
            f"{STEP_TIME_GOAL}x goal")


def markdown(results: Dict, figure: str) -> str:
    stamp = results["stamp"]
    lines = [
        "## In-place activated SyncBatchNorm: memory",
        "",
        f"`python -m benchmarks.memory{' --quick' if results['quick'] else ''}`, one process, "
        f"{stamp_line(stamp)}. Arms differ only in their norm + activation layers (method in "
        "the module's docstring): kept bytes are counted with saved_tensors_hooks, peaks are the "
        "step's resident high-water mark (VmHWM reset before the step, glibc mmap threshold "
        "64 KiB), times are medians of interleaved steps on one thread of a shared machine.",
        "",
    ]
    for model_name, m in results["models"].items():
        largest = str(m["batches"][-1])
        base, act = m["kept"][ARMS[0]][largest], m["kept"]["SyncBNAct"][largest]
        sync = m["kept"]["SyncBN + act"][largest]
        lines += [
            f"### {model_name}",
            "",
            "| batch | arm | kept by norm+act (MiB) | kept by model (MiB) | step peak (MiB) |",
            "|---|---|---|---|---|",
        ]
        for batch in m["batches"]:
            for arm in ARMS:
                kept = m["kept"][arm][str(batch)]
                lines.append(f"| {batch} | {arm} | {_mib(kept['norm_act_bytes'])} | "
                             f"{_mib(kept['unique_bytes'])} | {_mib(m['peaks'][arm][str(batch)])} |")
        ratio_largest = m["largest_batch"]["SyncBNAct"] / m["largest_batch"][ARMS[0]]
        lines += [
            "",
            f"- Bytes kept by the norm+act layers at batch {largest}: SyncBNAct keeps "
            f"{100 * (1 - act['norm_act_bytes'] / base['norm_act_bytes']):.0f}% fewer than torch "
            f"BN + act and {100 * (1 - act['norm_act_bytes'] / sync['norm_act_bytes']):.0f}% fewer "
            f"than SyncBN + act; the whole model keeps "
            f"{100 * (1 - act['unique_bytes'] / base['unique_bytes']):.0f}% fewer bytes.",
            f"- Budget {_mib(m['budget_bytes'])} MiB (1.01x torch BN + act's peak at batch {largest}): "
            "largest batch " + ", ".join(
                f"{arm} {m['largest_batch'][arm]} (measured peak "
                f"{_mib(m['peak_at_largest_batch'][arm])} MiB{_over(m, arm)})" for arm in ARMS)
            + f"; SyncBNAct fits {ratio_largest:.2f}x the batch of torch BN + act.",
            f"- Step time at batch {m['time_batch']}, group of one: " + ", ".join(
                f"{arm} {m['step_ms'][arm]:.0f} ms" for arm in ARMS)
            + f" ({_time_ratio(m['time_ratio'])}).",
            f"- Step time at batch {m['time_batch']}, W=2 (stand-in communicator summing two identical "
            "ranks, no communication): " + ", ".join(
                f"{arm} {m['step_ms_w2'][arm]:.0f} ms" for arm in SYNC_ARMS)
            + f" ({_time_ratio(m['time_ratio_w2'])}).",
            "",
        ]
    lines += [f"![memory]({figure})", ""]
    return "\n".join(lines)


def plot(results: Dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = dict(zip(ARMS, ("tab:blue", "tab:orange", "tab:green")))
    models = list(results["models"])
    fig, axes = plt.subplots(len(models), 2, figsize=(11, 3.6 * len(models)), squeeze=False)
    for row, model_name in enumerate(models):
        m = results["models"][model_name]
        largest = str(m["batches"][-1])
        ax = axes[row][0]
        for arm in ARMS:
            ax.plot(m["batches"], [m["peaks"][arm][str(b)] / 2 ** 20 for b in m["batches"]],
                    marker="o", color=colours[arm], label=arm)
        ax.axhline(m["budget_bytes"] / 2 ** 20, color="0.5", linestyle="--", label="budget")
        ax.set_xlabel("batch")
        ax.set_ylabel("peak of a training step (MiB)")
        ax.set_title(f"{model_name}: step peak vs batch")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7)
        ax = axes[row][1]
        kinds = ("norm_act_bytes", "unique_bytes")
        for index, arm in enumerate(ARMS):
            ax.bar([k + 0.27 * index for k in range(len(kinds))],
                   [m["kept"][arm][largest][kind] / 2 ** 20 for kind in kinds], 0.27,
                   color=colours[arm], label=arm)
        ax.set_xticks([k + 0.27 for k in range(len(kinds))])
        ax.set_xticklabels(["kept by norm+act layers", "kept by whole model"])
        ax.set_ylabel("MiB kept for backward")
        ax.set_title(f"{model_name}: bytes kept for backward, batch {largest}")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7)
    fig.text(0.005, 0.005, stamp_line(results["stamp"]), fontsize=6, color="0.4")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: List[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer and smaller batches")
    parser.add_argument("--out", default=RESULTS_DIR, help="folder for the JSON results")
    parser.add_argument("--figures", default=FIGURES_DIR, help="folder for the plot and Markdown")
    parser.add_argument("--publish", action="store_true",
                        help="also write the section into BENCHMARKS.md, between its memory markers")
    parser.add_argument("--render", action="store_true",
                        help="redo the plot and Markdown from the JSON in --out, measuring nothing")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return
    json_path = os.path.join(args.out, "memory.json")
    if args.render:
        with open(json_path) as handle:
            results = json.load(handle)
    else:
        results = measure(args.quick)
        os.makedirs(args.out, exist_ok=True)
        with open(json_path, "w") as handle:
            json.dump(results, handle, indent=1)
    os.makedirs(args.figures, exist_ok=True)
    figure = "memory_inplace_activated.png"
    plot(results, os.path.join(args.figures, figure))
    text = markdown(results, figure)
    with open(os.path.join(args.figures, "memory_results.md"), "w") as handle:
        handle.write(text)
    if args.publish:
        figure_path = os.path.relpath(os.path.join(args.figures, figure), os.path.dirname(BENCHMARKS_MD))
        replace_section(BENCHMARKS_MD, "memory", markdown(results, figure_path))
    print(text)


if __name__ == "__main__":
    main()
