from .features import extract_features
from .one_vs_all import fit_predict_one_vs_all
from .pipeline import run_baseline

__all__ = ["extract_features", "fit_predict_one_vs_all", "run_baseline"]
