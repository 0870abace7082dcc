"""Speed benchmark of the input pipeline and the training loop: `python -m hpa_lightning.bench [quick=true]`.

One module a section (loading, packing, overhead, augment, gpu, jpeg, thresholds), their shared data and helpers, the
printed report, `options.py` (the command line) and `suite.py` that runs the sections asked for and writes the JSON."""

import lazy_loader

# The public names, imported on first use (listed in __init__.pyi): `python -m hpa_lightning.pack` should not pay
# for Lightning because this package also holds modules that need it.
__getattr__, __dir__, __all__ = lazy_loader.attach_stub(__name__, __file__)
