"""The input contract of the EfficientNet-Lite models trained and exported here (torch-free, so that export and
tests can read it without the train extra)."""

from __future__ import annotations

from app.engine.embedding import ModelInput

# (x - 127) / 128 per channel, as EfficientNet-Lite's ImageNet weights expect.
LITE_MEAN = (127.0, 127.0, 127.0)
LITE_STD = (128.0, 128.0, 128.0)
# Shorter side 288, centre crop 224 (docs/training.md).
EVAL_INPUT = ModelInput(name="images", size=224, resize_to=288, mean=LITE_MEAN, std=LITE_STD)
