"""The fine-tuning recipe's `auto` values: the poster's first stage (train only the head for `frozen_epochs`, then
everything) and LR ratios for pretrained weights, equal LRs and no freeze from scratch, and layer-wise LR decay for
pretrained transformers."""

from __future__ import annotations

import math

from hpa_lightning.errors import FrozenStageError

POSTER_FROZEN_EPOCHS = 1


POSTER_LR_RATIOS = (1 / 9, 1 / 3, 1.0)  # early body, late body, head: fastai's lr/9, lr/3, lr


SCRATCH_LR_RATIOS = (1.0, 1.0, 1.0)


def resolve_recipe(frozen_epochs: object, lr_ratios: object, pretrained: bool) -> tuple[int, list[float], list[str]]:
    """`finetune.frozen_epochs` and `finetune.lr_ratios` with `auto` replaced: the poster's values for pretrained
    weights, no freeze and equal LRs from scratch. Returns (frozen_epochs, lr_ratios, the keys that were auto)."""
    auto = []
    if frozen_epochs == "auto":
        frozen_epochs, auto = (POSTER_FROZEN_EPOCHS if pretrained else 0), [*auto, "frozen_epochs"]
    if lr_ratios == "auto":
        lr_ratios, auto = (POSTER_LR_RATIOS if pretrained else SCRATCH_LR_RATIOS), [*auto, "lr_ratios"]
    try:
        frozen, ratios = int(frozen_epochs), [float(r) for r in lr_ratios]
    except (TypeError, ValueError):
        raise FrozenStageError(f"finetune: frozen_epochs={frozen_epochs!r} and lr_ratios={lr_ratios!r} must be "
                               "auto or an integer and a list of numbers") from None
    if frozen < 0 or not ratios or min(ratios) <= 0:
        raise FrozenStageError(f"finetune: frozen_epochs={frozen} must be >= 0 and lr_ratios={ratios} positive")
    return frozen, ratios, auto


# BEiT, MAE and DINOv2 fine-tune transformers with layer-wise LR decay (0.65-0.75 for base models); the frozen stage
# and the head's LR stay the poster's.
TRANSFORMER_LAYER_DECAY = 0.75


def resolve_layer_decay(layer_decay: object, pretrained: bool, transformer: bool) -> tuple[float | None, bool]:
    """`finetune.layer_decay` with `auto` replaced: 0.75 for pretrained transformers (architectures that fix their
    input size: ViT, DeiT, EVA, DINOv2, Swin, MaxViT), none (the depth groups of `lr_ratios`) otherwise, CNNs
    included. Returns (layer_decay or None, whether it was auto)."""
    if layer_decay == "auto":
        return (TRANSFORMER_LAYER_DECAY if pretrained and transformer else None), True
    if layer_decay in (None, "null", "none"):
        return None, False
    try:
        value = float(layer_decay)
    except (TypeError, ValueError):
        value = math.nan
    if not 0 < value <= 1:
        raise FrozenStageError(f"finetune.layer_decay={layer_decay!r}: expected auto, null or a factor in (0, 1] "
                               f"(each layer's LR is the next one's times it)")
    return value, False
