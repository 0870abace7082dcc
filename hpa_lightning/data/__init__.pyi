from .datamodule import HPADataModule
from .duplicates import find_duplicates
from .loader import PackedDataset, ThreadedDataLoader
from .sources import DataSource, decode_channel, load_sample, parse_sources
from .split import Split, channel_stats, load_split, prepare_split, stratified_split
from .store import PackedStore, build_store, store_path
from .stream_pack import pack_stream
from .stream_store import StreamStore, open_stream, open_stream_loader

__all__ = [
    "DataSource",
    "HPADataModule",
    "PackedDataset",
    "PackedStore",
    "Split",
    "StreamStore",
    "ThreadedDataLoader",
    "build_store",
    "channel_stats",
    "decode_channel",
    "find_duplicates",
    "load_sample",
    "load_split",
    "open_stream",
    "open_stream_loader",
    "pack_stream",
    "parse_sources",
    "prepare_split",
    "store_path",
    "stratified_split",
]
