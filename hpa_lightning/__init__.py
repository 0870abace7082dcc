"""hpa_lightning: protein localisation from Human Protein Atlas RGBY microscopy with Lightning + Hydra.

Subpackages follow the data flow (docs/architecture.md): data -> models -> runs -> training and inference ->
classical (the baselines) and reporting -> bench; the modules at this level are the entry points
(`python -m hpa_lightning.X`) and the helpers every stage shares.
"""

from pathlib import Path

__version__ = "0.1.0"

# The checkout the package runs from (an editable install): conf/ beside the package holds every Hydra config.
SOURCE_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = SOURCE_ROOT / "conf"
