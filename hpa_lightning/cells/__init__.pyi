from .average_precision import average_precision, cell_map, check_same_images
from .rle import decode_mask, encode_mask
from .submission import CellPrediction, ImageCells, format_prediction_string, read_submission, write_submission

__all__ = ["CellPrediction", "ImageCells", "average_precision", "cell_map", "check_same_images", "decode_mask",
           "encode_mask", "format_prediction_string", "read_submission", "write_submission"]
