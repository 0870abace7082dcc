"""Synthetic HPA data: 2018 in the Kaggle layout, or 2021 with cell masks and per-cell truth; `generate` is the way
in."""

import lazy_loader

# The public names, imported on first use (listed in __init__.pyi): `python -m hpa_lightning.pack` should not pay
# for Lightning because this package also holds modules that need it.
__getattr__, __dir__, __all__ = lazy_loader.attach_stub(__name__, __file__)
