"""HPA 2021 single cells: the submission format (mask strings, PredictionStrings, the CSV) and the cell-level mAP."""

import lazy_loader

# The public names, imported on first use (listed in __init__.pyi), like every subpackage's.
__getattr__, __dir__, __all__ = lazy_loader.attach_stub(__name__, __file__)
