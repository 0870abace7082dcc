from .augment_speed import bench_augment
from .bench_data import tiled_dataset
from .common import PROFILES, TARGETS, Profile
from .gpu_speed import bench_gpu
from .jpeg import bench_jpeg, jpeg_dataset
from .loading import bench_loading
from .options import SECTIONS
from .overhead import bench_overhead, project_recipe
from .packing_speed import bench_packing
from .segmentation_speed import bench_segmentation
from .suite import main, quiet_libraries
from .summary import render_report
from .thresholds import bench_thresholds

__all__ = [
    "PROFILES",
    "Profile",
    "SECTIONS",
    "TARGETS",
    "bench_augment",
    "bench_gpu",
    "bench_jpeg",
    "bench_loading",
    "bench_overhead",
    "bench_packing",
    "bench_segmentation",
    "jpeg_dataset",
    "bench_thresholds",
    "main",
    "project_recipe",
    "quiet_libraries",
    "render_report",
    "tiled_dataset",
]
