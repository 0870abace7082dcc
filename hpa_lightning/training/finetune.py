"""The poster's first stage: train only the classifier head for `frozen_epochs`, then unfreeze everything."""

from __future__ import annotations

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
