"""The study's data, models and per-rank work: each public function here runs inside one rank.

Data: scikit-learn's bundled digits (1,797 real 8x8 images), split once (seed 0) into 70%
training, 10% validation (learning-rate selection) and 20% test (reported scores).
Segmentation canvases: 2-3 digits of one split upscaled to 14x14 and placed in distinct
quadrants of a 32x32 canvas (jitter 0-2 px); a pixel is labelled with its digit's class + 1
where the digit's ink exceeds 0.3, else 0 (background).

Arms (the normalization layer after every conv):
- ``local``: torch.nn.BatchNorm2d on each rank's own batch;
- ``sync``: syncbn.SyncBatchNorm over all ranks;
- ``group``: torch.nn.GroupNorm, ``group_channels`` channels per group (1: InstanceNorm);
- ``full``: torch.nn.BatchNorm2d in one process on the whole global batch (the target).
Every arm starts from the same conv weights (seeded), sees the same global batches in the same
order (``syncbn.data.rank_batch_stream``), averages gradients over ranks
(``syncbn.data.average_gradients``) and follows the same LR schedule shape; each arm's peak
learning rate (and GroupNorm's group size) is chosen on the validation split.
"""
from __future__ import annotations

import functools
import math
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import syncbn
from syncbn.data import average_gradients, rank_batch_stream, rank_batches

ARMS = ("local", "sync", "group", "full")
# Arms whose result does not depend on how the global batch is split over ranks: run in one
# process on the whole global batch. GroupNorm normalizes each sample on its own, so W ranks of
# b samples with averaged gradients compute the gradient of the mean loss over the b*W batch.
ONE_PROCESS_ARMS = ("group", "full")
DEFAULT_GROUP_CHANNELS = 4
NUM_SEG_CLASSES = 11  # background + 10 digits
_CANVAS = 32
_DIGIT_PX = 14


@functools.lru_cache(maxsize=None)
def digits() -> Tuple[torch.Tensor, ...]:
    """(x_train, y_train, x_val, y_val, x_test, y_test): images (N, 1, 8, 8) in [0, 1], labels
    int64. The test split is the last 20% of one seeded permutation; validation the 10% before."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    val_start, test_start = int(0.7 * len(y)), int(0.8 * len(y))
    splits = (order[:val_start], order[val_start:test_start], order[test_start:])
    return tuple(t for split in splits for t in (x[split], y[split]))


def _canvases(images: torch.Tensor, labels: torch.Tensor, count: int,
              seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    big = F.interpolate(images, size=(_DIGIT_PX, _DIGIT_PX), mode="bilinear", align_corners=False)
    x = torch.zeros(count, 1, _CANVAS, _CANVAS)
    y = torch.zeros(count, _CANVAS, _CANVAS, dtype=torch.int64)
    half = _CANVAS // 2
    for n in range(count):
        k = 2 + int(torch.randint(2, (1,), generator=generator))
        quadrants = torch.randperm(4, generator=generator)[:k].tolist()
        picks = torch.randint(len(labels), (k,), generator=generator).tolist()
        for quadrant, pick in zip(quadrants, picks):
            top, left = (quadrant // 2) * half, (quadrant % 2) * half
            top += int(torch.randint(3, (1,), generator=generator))
            left += int(torch.randint(3, (1,), generator=generator))
            ink = big[pick, 0].clamp(0, 1)
            window = (slice(top, top + _DIGIT_PX), slice(left, left + _DIGIT_PX))
            x[n, 0][window] = ink
            y[n][window][ink > 0.3] = int(labels[pick]) + 1
    return x, y


@functools.lru_cache(maxsize=None)
def segmentation(num_train: int = 1000, num_val: int = 125, num_test: int = 250
                 ) -> Tuple[torch.Tensor, ...]:
    """(x_train, y_train, x_val, y_val, x_test, y_test): canvases (N, 1, 32, 32), per-pixel
    labels (N, 32, 32). Each split's canvases use only that split's digits."""
    x_train, y_train, x_val, y_val, x_test, y_test = digits()
    return (*_canvases(x_train, y_train, num_train, seed=1),
            *_canvases(x_val, y_val, num_val, seed=3),
            *_canvases(x_test, y_test, num_test, seed=2))


def _norm(arm: str, channels: int, group_channels: int) -> nn.Module:
    if arm == "sync":
        return syncbn.SyncBatchNorm(channels)
    if arm == "group":
        return nn.GroupNorm(channels // group_channels, channels)
    if arm in ("local", "full"):
        return nn.BatchNorm2d(channels)
    raise ValueError(f"unknown arm {arm!r}; expected one of {ARMS}")


def _block(arm: str, cin: int, cout: int, group_channels: int, stride: int = 1,
           dilation: int = 1) -> List[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=False),
            _norm(arm, cout, group_channels), nn.ReLU()]


def classifier(arm: str, group_channels: int = DEFAULT_GROUP_CHANNELS) -> nn.Module:
    """Small CNN for 8x8 digits: three conv-norm-ReLU blocks, global pooling, linear."""
    g = group_channels
    return nn.Sequential(*_block(arm, 1, 16, g), *_block(arm, 16, 32, g), nn.MaxPool2d(2),
                         *_block(arm, 32, 64, g), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(64, 10))


def segmenter(arm: str, group_channels: int = DEFAULT_GROUP_CHANNELS) -> nn.Module:
    """Small fully convolutional net for 32x32 canvases: stride 2, dilated context, upsample."""
    g = group_channels
    return nn.Sequential(*_block(arm, 1, 16, g), *_block(arm, 16, 32, g, stride=2),
                         *_block(arm, 32, 32, g, dilation=2), *_block(arm, 32, 32, g, dilation=4),
                         nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                         *_block(arm, 32, 16, g), nn.Conv2d(16, NUM_SEG_CLASSES, 1))


def _score(task: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Accuracy (classification) or mean IoU over the classes present (segmentation)."""
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(chunk).argmax(1) for chunk in x.split(256)])
    if task == "classification":
        return float((pred == y).float().mean())
    confusion = torch.bincount(y.reshape(-1) * NUM_SEG_CLASSES + pred.reshape(-1),
                               minlength=NUM_SEG_CLASSES ** 2).reshape(NUM_SEG_CLASSES, -1)
    hits = confusion.diag().double()
    union = confusion.sum(0) + confusion.sum(1) - confusion.diag()
    present = union > 0
    return float((hits[present] / union[present]).mean())


def train_and_score(task: str, arm: str, batch: int, steps: int, seed: int,
                    lr: float = 3e-3, group_channels: int = DEFAULT_GROUP_CHANNELS
                    ) -> Dict[str, float]:
    """Train one arm on this rank's share of every global batch; score rank 0 in eval mode.

    ``batch`` is the per-rank batch (the whole global batch for ``full``, run in one process).
    Returns the test score and the validation score on rank 0 (None elsewhere) and the final
    training loss of this rank. AdamW (weight decay 1e-4); LR: 5% linear warm-up, then cosine
    to 0.
    """
    comm = syncbn.resolve_communicator()
    if arm == "full" and comm.size != 1:
        raise ValueError("the full-batch arm runs in one process")
    x_train, y_train, x_val, y_val, x_test, y_test = (
        digits() if task == "classification" else segmentation())
    torch.manual_seed(seed)
    build = classifier if task == "classification" else segmenter
    model = build(arm, group_channels)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: min(
        (t + 1) / warmup, 0.5 * (1 + math.cos(math.pi * t / steps))))
    model.train()
    loss = torch.zeros(())
    for indices in rank_batch_stream(len(y_train), batch, comm.rank, comm.size, steps, seed):
        loss = F.cross_entropy(model(x_train[indices]), y_train[indices])
        optimizer.zero_grad()
        loss.backward()
        average_gradients(model.parameters())
        optimizer.step()
        schedule.step()
    if comm.rank != 0:
        return {"score": None, "val_score": None, "final_loss": float(loss.detach())}
    return {"score": _score(task, model, x_test, y_test),
            "val_score": _score(task, model, x_val, y_val), "final_loss": float(loss.detach())}


def first_conv_activation(seed: int = 0) -> torch.Tensor:
    """The first conv layer's output (seeded init, as in ``classifier``) on all 1,797 digits."""
    images = digits()[0::2]
    torch.manual_seed(seed)
    conv = classifier("full")[0]
    with torch.no_grad():
        return conv(torch.cat(images))


def stats_error(mean: torch.Tensor, var: torch.Tensor, population: Tuple[torch.Tensor, torch.Tensor]
                ) -> Tuple[float, float]:
    """Squared errors, averaged over channels, of batch statistics against the population's.

    The mean's error is in units of the population std, the variance's relative to it:
    (mean - mu)^2 / sigma^2 and (var / sigma^2 - 1)^2.
    """
    mu, sigma2 = population
    return (float(((mean.double() - mu) ** 2 / sigma2).mean()),
            float(((var.double() / sigma2 - 1) ** 2).mean()))


def population_stats(activation: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    var, mean = torch.var_mean(activation.double(), dim=(0, 2, 3), correction=0)
    return mean, var


def sync_batch_stats(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The mean and biased variance SyncBatchNorm normalizes ``x`` with (over every rank).

    Read from the running buffers after one training forward with momentum 1 (running_var holds
    the unbiased variance of the global batch of M values per channel).
    """
    layer = syncbn.SyncBatchNorm(x.shape[1], momentum=1.0, affine=False)
    layer.train()
    with torch.no_grad():
        layer(x)
    count = torch.zeros(1, dtype=torch.float64)
    count += x.numel() // x.shape[1]
    total = syncbn.resolve_communicator().all_reduce_sum_(count)
    return layer.running_mean, layer.running_var * (total - 1) / total


def full_batch_parity(batch: int, seed: int = 0) -> Dict[str, float]:
    """Max abs difference of SyncBatchNorm's mean and variance on this rank's share of the first
    global batch against float64 BatchNorm statistics of the whole global batch.

    Every rank rebuilds the whole global batch from the sampler: it knows every rank's share.
    """
    comm = syncbn.resolve_communicator()
    activation = first_conv_activation(seed)
    shares = [rank_batches(len(activation), batch, r, comm.size, seed)[0] for r in range(comm.size)]
    mean, var = sync_batch_stats(activation[shares[comm.rank]])
    expected_var, expected_mean = torch.var_mean(activation[torch.cat(shares)].double(),
                                                 dim=(0, 2, 3), correction=0)
    return {"mean": float((mean.double() - expected_mean).abs().max()),
            "var": float((var.double() - expected_var).abs().max()),
            "scale": float(expected_var.max().sqrt())}


def rank_stats_errors(batches: Sequence[int], trials: int, seed: int = 0) -> Dict[int, Dict]:
    """For each per-rank batch b: root-mean-square errors of this rank's local BN statistics and
    of SyncBatchNorm's (over every rank) against the population, over ``trials`` fresh batches.
    """
    activation = first_conv_activation(seed)
    population = population_stats(activation)
    comm = syncbn.resolve_communicator()
    results = {}
    for batch in batches:
        local, synced = torch.zeros(2), torch.zeros(2)
        for trial in range(trials):
            indices = rank_batches(len(activation), batch, comm.rank, comm.size, seed, trial)[0]
            x = activation[indices]
            var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
            local += torch.tensor(stats_error(mean, var, population))
            synced += torch.tensor(stats_error(*sync_batch_stats(x), population))
        results[batch] = {"local": (local / trials).sqrt().tolist(),
                          "sync": (synced / trials).sqrt().tolist()}
    return results
