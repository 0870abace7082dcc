from .dataset import generate, render_sample
from .labels import sample_labels

__all__ = ["generate", "render_sample", "sample_labels"]
