"""hpa_lightning: protein localisation from Human Protein Atlas RGBY microscopy with Lightning + Hydra."""

__version__ = "0.1.0"
