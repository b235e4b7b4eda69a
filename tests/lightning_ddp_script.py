"""One Lightning DDP training step on 2 CPU processes with SyncBatchNormPlugin.

Run by tests/test_lightning.py as ``python lightning_ddp_script.py OUT_DIR``; Lightning starts
the second process by running this script again. Each rank saves what the test checks to
OUT_DIR/rank<r>.pt. The model, data and step are defined here and imported by the test's
one-process oracle.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torchvision_shim  # noqa: E402,F401  (Lightning imports torchvision)

import torch  # noqa: E402

GLOBAL_BATCH = 4
LEARNING_RATE = 0.1


def make_network() -> torch.nn.Module:
    """The oracle's network; the LightningModule fuses its second norm with its LeakyReLU."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.Conv2d(4, 4, 1), torch.nn.BatchNorm2d(4), torch.nn.LeakyReLU(0.1),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 2),
    ).double()


def make_data():
    generator = torch.Generator().manual_seed(3)
    images = 2 + torch.randn(GLOBAL_BATCH, 3, 6, 6, dtype=torch.double, generator=generator)
    return images, torch.randint(0, 2, (GLOBAL_BATCH,), generator=generator)


def main(out_dir: str) -> None:
    import lightning.pytorch as pl

    import syncbn
    from syncbn.lightning import SyncBatchNormPlugin

    class Classifier(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            # A fused layer in the model as built: the plugin keeps it while fitting, and
            # reverting at teardown makes it BatchNorm2d + LeakyReLU again.
            self.network = syncbn.convert_sync_batchnorm_act(make_network())
            self.norm_class_in_training = self.fused_class_in_training = None

        def training_step(self, batch, batch_index):
            self.norm_class_in_training = type(self.network[1])
            self.fused_class_in_training = type(self.network[4])
            images, labels = batch
            # The mean over the local batch: DDP averages it over the ranks' equal batches.
            return torch.nn.functional.cross_entropy(self.network(images), labels)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=LEARNING_RATE)

    images, labels = make_data()
    # Lightning adds a DistributedSampler: each rank gets half of the 4 samples.
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels),
                                         batch_size=GLOBAL_BATCH // 2)
    module = Classifier()
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=1,
                         plugins=[SyncBatchNormPlugin()], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0)
    trainer.fit(module, loader)
    # Teardown reverted the layer; its tensors are the ones trained.
    torch.save({
        "norm_class_in_training": f"{module.norm_class_in_training.__module__}."
                                  f"{module.norm_class_in_training.__qualname__}",
        "norm_class_after_fit": type(module.network[1]).__name__,
        "fused_class_in_training": module.fused_class_in_training.__name__,
        "fused_classes_after_fit": [type(module.network[i]).__name__ for i in (4, 5)],
        "state": {k: v.detach().clone() for k, v in module.network.state_dict().items()},
    }, os.path.join(out_dir, f"rank{trainer.global_rank}.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
