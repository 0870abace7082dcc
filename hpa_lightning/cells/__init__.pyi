from .average_precision import average_precision, cell_map, check_same_images
from .crops import CellBox, cell_boxes, crop_cell
from .masks import find_cell_mask, load_cell_mask, read_label_image, write_masks
from .rle import decode_mask, encode_mask
from .submission import CellPrediction, ImageCells, format_prediction_string, read_submission, write_submission

__all__ = ["CellBox", "CellPrediction", "ImageCells", "average_precision", "cell_boxes", "cell_map",
           "check_same_images", "crop_cell", "decode_mask", "encode_mask", "find_cell_mask", "format_prediction_string",
           "load_cell_mask", "read_label_image", "read_submission", "write_masks", "write_submission"]
