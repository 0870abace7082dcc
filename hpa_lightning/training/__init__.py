"""One training job and what runs inside it: `train(cfg)`, the callbacks, the fine-tuning recipe, DDP, the LR finder."""

import lazy_loader

# The public names, imported on first use (listed in __init__.pyi): `python -m hpa_lightning.pack` should not pay
# for Lightning because this package also holds modules that need it.
__getattr__, __dir__, __all__ = lazy_loader.attach_stub(__name__, __file__)
