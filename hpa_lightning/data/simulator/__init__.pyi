from .dataset import generate, render_sample
from .labels import sample_labels
from .single_cell import CellSample, render_cell_sample

__all__ = ["CellSample", "generate", "render_cell_sample", "render_sample", "sample_labels"]
