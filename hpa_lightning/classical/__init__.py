"""The poster's classical baselines: grid features and 28 one-vs-all scikit-learn classifiers."""

import lazy_loader

# The public names, imported on first use (listed in __init__.pyi): `python -m hpa_lightning.pack` should not pay
# for Lightning because this package also holds modules that need it.
__getattr__, __dir__, __all__ = lazy_loader.attach_stub(__name__, __file__)
