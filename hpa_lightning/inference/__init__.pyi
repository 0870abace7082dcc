from .export_folder import export_model
from .load import InferenceModel, load_model
from .predictor import predict_probabilities
from .tta import tta_probabilities, tta_views

__all__ = ["InferenceModel", "export_model", "load_model", "predict_probabilities", "tta_probabilities", "tta_views"]
