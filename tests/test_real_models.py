"""Real architectures converted to syncbn: same function in one process, and 2 ranks equal one.

Models are built without pretrained weights from a seed, in float64, on every rank and in
the oracle alike. The oracle is the same model with torch's BatchNorm2d trained in one
process on the global batch (the ranks' batches concatenated).

Parity tolerance: every rank and the oracle compute the same float64 arithmetic up to the
order of summation (the ranks' partial sums, DDP's gradient all-reduce), about 1e-16
relative per operation. Two SGD steps through up to ~50 layers amplify that: the largest
absolute difference measured was 2.3e-11 (dla46_c, on weights up to 5.8), 1.8e-11
(resnet50), 1.7e-15 (deeplabv3_mobilenet_v3_large), and relative to each tensor's largest
value at most 8e-11 over all models and RetinaNet's running statistics (2-core CPU
development machine under load). rtol=1e-8 with atol=1e-9 for entries near zero leaves
about 40x headroom over the worst element.
"""
from __future__ import annotations

import copy
from typing import Callable, Dict, Tuple

import torchvision_shim  # noqa: F401  (declares torchvision's operator schemas; before torchvision)

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

import syncbn
from scenarios import training_step

WORLD_SIZE = 2
IMAGES_PER_RANK = 2
STEPS = 2
CLASSES = 5
RTOL, ATOL = 1e-8, 1e-9
# Multi-rank runs of ResNet-50-sized models are slow on a loaded 2-core machine.
RUN_TIMEOUT_S = 600.0


def _classifier(builder: Callable[..., torch.nn.Module]) -> Callable[[], torch.nn.Module]:
    return lambda: builder(num_classes=CLASSES)


def _segmentation(builder: Callable[..., torch.nn.Module]) -> Callable[[], torch.nn.Module]:
    return lambda: builder(weights=None, weights_backbone=None, num_classes=CLASSES, aux_loss=False)


# name -> (builder, image side, task). Two timm families that use plain BatchNorm2d.
MODELS: Dict[str, Tuple[Callable[[], torch.nn.Module], int, str]] = {
    "torchvision_resnet50": (_classifier(torchvision.models.resnet50), 64, "classification"),
    "torchvision_fcn_resnet50": (_segmentation(torchvision.models.segmentation.fcn_resnet50), 32,
                                 "segmentation"),
    "torchvision_deeplabv3_mobilenet_v3_large": (
        _segmentation(torchvision.models.segmentation.deeplabv3_mobilenet_v3_large), 64, "segmentation"),
    "timm_resnet10t": (lambda: timm.create_model("resnet10t", num_classes=CLASSES), 64, "classification"),
    "timm_dla46_c": (lambda: timm.create_model("dla46_c", num_classes=CLASSES), 64, "classification"),
}


def _build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = MODELS[name][0]()
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            module.p = 0.0  # dropout masks would differ between the ranks and the oracle
    return model.double()


def _global_batch(name: str, step: int) -> Tuple[torch.Tensor, torch.Tensor]:
    _, side, task = MODELS[name]
    generator = torch.Generator().manual_seed(1000 + step)
    images = torch.randn(WORLD_SIZE * IMAGES_PER_RANK, 3, side, side, dtype=torch.double,
                         generator=generator)
    label_shape = (images.shape[0], side, side) if task == "segmentation" else (images.shape[0],)
    return images, torch.randint(0, CLASSES, label_shape, generator=generator)


def _loss(output, target: torch.Tensor) -> torch.Tensor:
    # A mean over the local batch: DDP averages the ranks' gradients, so with equal batch
    # sizes the step equals one on the mean loss over the global batch.
    logits = output["out"] if isinstance(output, dict) else output
    return F.cross_entropy(logits, target)


def _sgd(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def _ddp_train_on_rank(name: str) -> Dict[str, torch.Tensor]:
    rank = torch.distributed.get_rank()
    model = syncbn.convert_sync_batchnorm(_build(name))
    ddp = DistributedDataParallel(model)
    optimizer = _sgd(ddp)
    local = slice(rank * IMAGES_PER_RANK, (rank + 1) * IMAGES_PER_RANK)
    for step in range(STEPS):
        images, target = _global_batch(name, step)
        optimizer.zero_grad()
        _loss(ddp(images[local]), target[local]).backward()
        optimizer.step()
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def _train_one_process(name: str) -> Dict[str, torch.Tensor]:
    model = _build(name)
    optimizer = _sgd(model)
    for step in range(STEPS):
        images, target = _global_batch(name, step)
        optimizer.zero_grad()
        _loss(model(images), target).backward()
        optimizer.step()
    return model.state_dict()


def _assert_states_match(states, oracle: Dict[str, torch.Tensor]) -> None:
    for rank, state in enumerate(states):
        assert state.keys() == oracle.keys()
        for key, expected in oracle.items():
            torch.testing.assert_close(state[key], expected, rtol=RTOL, atol=ATOL,
                                       msg=lambda m: f"rank {rank}, {key}: {m}")


@pytest.fixture(autouse=True)
def one_intra_op_thread():
    """One-process oracles on one thread, like each rank: on a loaded machine, torch's two
    threads spinning at each barrier made efficientnet_b0's float64 forward 25x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# The two ResNet-50s run only in the slow profile; one model of each kind runs in CI.
_SLOW = pytest.mark.slow


@pytest.mark.parametrize("name", [
    pytest.param("torchvision_resnet50", marks=_SLOW),
    pytest.param("torchvision_fcn_resnet50", marks=_SLOW),
    "torchvision_deeplabv3_mobilenet_v3_large",
    "timm_resnet10t",
    "timm_dla46_c",
])
def test_two_ranks_of_two_images_under_ddp_equal_one_process_on_the_global_batch(rank_pool, name):
    states = rank_pool(WORLD_SIZE, "gloo").run(_ddp_train_on_rank, name, timeout=RUN_TIMEOUT_S)
    _assert_states_match(states, _train_one_process(name))


# --- detection: RetinaNet with trainable BatchNorm in its ResNet-50 backbone -----------------

DETECTION_SIDE = 64


def _retinanet() -> torch.nn.Module:
    torch.manual_seed(0)
    backbone = resnet_fpn_backbone(
        backbone_name="resnet50", weights=None, norm_layer=torch.nn.BatchNorm2d,
        trainable_layers=5, returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256))
    # Images are already at the size the transform would resize them to.
    return RetinaNet(backbone, num_classes=3, min_size=DETECTION_SIDE,
                     max_size=DETECTION_SIDE).double()


def _detection_batch():
    generator = torch.Generator().manual_seed(7)
    images, targets = [], []
    for _ in range(WORLD_SIZE * IMAGES_PER_RANK):
        images.append(torch.rand(3, DETECTION_SIDE, DETECTION_SIDE, dtype=torch.double,
                                 generator=generator))
        corner = torch.rand(2, 2, dtype=torch.double, generator=generator) * DETECTION_SIDE / 2
        boxes = torch.cat([corner, corner + DETECTION_SIDE / 4], dim=1)
        targets.append({"boxes": boxes, "labels": torch.randint(1, 3, (2,), generator=generator)})
    return images, targets


def _running_stats(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    return {name: torch.stack([module.running_mean, module.running_var]).detach().clone()
            for name, module in model.named_modules() if isinstance(module, _BatchNorm)}


def _retinanet_on_rank():
    rank = torch.distributed.get_rank()
    model = syncbn.convert_sync_batchnorm(_retinanet()).train()
    images, targets = _detection_batch()
    local = slice(rank * IMAGES_PER_RANK, (rank + 1) * IMAGES_PER_RANK)
    with torch.no_grad():
        model(images[local], targets[local])
    after_forward = _running_stats(model)
    ddp = DistributedDataParallel(model)
    optimizer = _sgd(ddp)
    losses = ddp(images[local], targets[local])
    sum(losses.values()).backward()
    optimizer.step()
    return after_forward, {key: value.detach().clone() for key, value in model.state_dict().items()}


def test_retinanet_running_stats_equal_one_process_and_a_ddp_step_keeps_ranks_identical(rank_pool):
    results = rank_pool(WORLD_SIZE, "gloo").run(_retinanet_on_rank, timeout=RUN_TIMEOUT_S)
    oracle = _retinanet().train()
    images, targets = _detection_batch()
    with torch.no_grad():
        oracle(images, targets)
    expected = _running_stats(oracle)
    assert len(expected) == 53  # every BatchNorm of the ResNet-50 backbone is trainable
    for rank, (after_forward, _) in enumerate(results):
        assert after_forward.keys() == expected.keys()
        for name, stats in expected.items():
            torch.testing.assert_close(after_forward[name], stats, rtol=RTOL, atol=ATOL,
                                       msg=lambda m: f"rank {rank}, {name}: {m}")
    first, second = results[0][1], results[1][1]
    for key, value in first.items():
        assert torch.isfinite(value.double()).all(), key
        assert torch.equal(value, second[key]), key


# --- conversion never changes what a model computes (one process) --------------------------

def _outputs(model: torch.nn.Module, name: str):
    if name == "retinanet":
        images, targets = _detection_batch()
        if model.training:
            return model(images[:2], targets[:2])
        # Detection post-processing needs torchvision's compiled nms; compare the features.
        return model.backbone(torch.stack(images[:2]))
    # Two images at the model's side: a deep layer that saw only 1x1 maps would normalize two
    # values per channel, a variance so ill-conditioned that roundoff decides the output.
    images, _ = _global_batch(name, 0)
    return model(images[:2])


@pytest.mark.parametrize("name", list(MODELS) + ["retinanet"])
def test_converted_model_computes_the_same_function_in_train_and_eval(name):
    model = _retinanet() if name == "retinanet" else _build(name)
    converted = syncbn.convert_sync_batchnorm(copy.deepcopy(model))
    assert not any(type(m) in (torch.nn.BatchNorm2d, timm.layers.BatchNormAct2d)
                   for m in converted.modules())
    for training in (True, False):
        torch.testing.assert_close(_outputs(converted.train(training), name),
                                   _outputs(model.train(training), name), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(converted.state_dict(), model.state_dict(), rtol=1e-9, atol=1e-10)


def test_timm_batchnorm_act_becomes_sync_batchnorm_act_computing_the_same_function_and_reverts():
    # BatchNormAct2d runs norm, drop, act: a plain SyncBatchNorm would drop the last two.
    torch.manual_seed(0)
    model = timm.create_model("efficientnet_b0", num_classes=CLASSES).double()
    converted = syncbn.convert_sync_batchnorm(copy.deepcopy(model))
    assert not any(isinstance(m, timm.layers.BatchNormAct2d) for m in converted.modules())
    assert isinstance(converted.bn1, syncbn.SyncBatchNormAct) and converted.bn1.name == "bn1"
    images = _global_batch("timm_resnet10t", 0)[0][:2]
    for training in (True, False):
        torch.testing.assert_close(converted.train(training)(images), model.train(training)(images),
                                   rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(converted.state_dict(), model.state_dict(), rtol=0, atol=0)
    reverted = syncbn.revert_sync_batchnorm(converted)
    assert type(reverted.bn1) is timm.layers.BatchNormAct2d
    assert not any(isinstance(m, syncbn.SyncBatchNorm) for m in reverted.modules())
    torch.testing.assert_close(reverted.eval()(images), model.eval()(images), rtol=1e-9, atol=1e-10)


def test_timm_batchnorm_act_with_a_prelu_keeps_its_state_dict_keys_both_ways():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1),
                                timm.layers.BatchNormAct2d(4, act_layer=torch.nn.PReLU)).double()
    keys = list(model.state_dict())
    assert "1.act.weight" in keys
    images = _global_batch("timm_resnet10t", 0)[0][:2, :, :8, :8]
    expected = model(images)
    converted = syncbn.convert_sync_batchnorm(copy.deepcopy(model))
    assert isinstance(converted[1], syncbn.SyncBatchNormAct)
    assert list(converted.state_dict()) == keys
    torch.testing.assert_close(converted(images), expected, rtol=1e-12, atol=1e-12)
    converted.load_state_dict(model.state_dict())  # the original checkpoint loads strictly
    assert list(syncbn.revert_sync_batchnorm(converted).state_dict()) == keys


def test_frozen_batchnorm_is_left_alone():
    frozen = torchvision.ops.misc.FrozenBatchNorm2d  # also the one timm uses
    torch.manual_seed(0)
    model = torchvision.models.resnet18(norm_layer=frozen).double()
    frozen_layers = [m for m in model.modules() if isinstance(m, frozen)]
    x = torch.randn(2, 3, 32, 32, dtype=torch.double)
    expected = model(x)
    converted = syncbn.convert_sync_batchnorm(model)
    assert [m for m in converted.modules() if isinstance(m, frozen)] == frozen_layers
    assert not any(isinstance(m, syncbn.SyncBatchNorm) for m in converted.modules())
    assert torch.equal(converted(x), expected)


# --- convert_sync_batchnorm_act: fusing never changes what a model computes (one process) ----

def _timm(name: str, **options) -> Callable[[], torch.nn.Module]:
    return lambda: timm.create_model(name, num_classes=CLASSES, drop_rate=0.0, **options)


# The fused backward recovers xhat from the output, (z - bias) / weight: float64 rounding that
# the plain backward does not have, amplified through the network. Measured up to 2e-9
# relative (regnet_x_400mf, a weight gradient): the module's RTOL and ATOL hold.
# name -> (builder, layers fused, of them in place). timm's pre-activation ResNet (resnetv2)
# with LeakyReLU: every norm's input is also a shortcut's, so its BatchNormAct2d fuse out of
# place; ghostnet's and torchvision's conv -> BatchNorm -> act Sequentials fuse in place;
# efficientnet's and mobilenetv3's BatchNormAct2d without activation fuse out of place.
FUSABLE_MODELS: Dict[str, Tuple[Callable[[], torch.nn.Module], int, int]] = {
    "timm_resnetv2_18_leaky_relu": (_timm("resnetv2_18", act_layer=torch.nn.LeakyReLU), 17, 0),
    "timm_ghostnet_050": (_timm("ghostnet_050"), 32, 32),
    "timm_efficientnet_b0": (_timm("efficientnet_b0"), 16, 0),
    "timm_mobilenetv3_small_050": (_timm("mobilenetv3_small_050"), 11, 0),
    "torchvision_regnet_x_400mf_leaky_relu": (
        lambda: torchvision.models.regnet_x_400mf(num_classes=CLASSES,
                                                  activation=torch.nn.LeakyReLU), 45, 45),
}


# Big enough that the deepest maps are 2x2 (8 values per channel with 2 images), small for CI.
FUSED_SIDE = 48


@pytest.mark.parametrize("name", FUSABLE_MODELS)
def test_fused_model_has_the_outputs_gradients_and_statistics_of_the_original(name):
    build, fused, in_place = FUSABLE_MODELS[name]
    torch.manual_seed(0)
    model = build().double()
    converted = syncbn.convert_sync_batchnorm_act(copy.deepcopy(model))
    layers = [m for m in converted.modules() if isinstance(m, syncbn.SyncBatchNormAct)]
    assert (len(layers), sum(layer.inplace for layer in layers)) == (fused, in_place)
    images = _global_batch("timm_resnet10t", 0)[0][:2, :, :FUSED_SIDE, :FUSED_SIDE]
    for training in (True, False):
        for got, want in zip(training_step(converted.train(training), images),
                             training_step(model.train(training), images)):
            torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(converted.state_dict(), model.state_dict(), rtol=RTOL, atol=ATOL)
    reverted = syncbn.revert_sync_batchnorm_act(converted)
    assert [type(m) for m in reverted.modules()] == [type(m) for m in model.modules()]
