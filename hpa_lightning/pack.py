"""`python -m hpa_lightning.pack root=DIR size=N ... [out=s3://bucket/prefix|DIR]`: pack a dataset into the uint8 store
(see data/store.py) and, with `out=`, write it as a streaming store there too (data/stream_store.py; the endpoint from
AWS_ENDPOINT_URL, several machines with DATA_OPTIMIZER_NUM_NODES / DATA_OPTIMIZER_NODE_RANK or srun)."""

from __future__ import annotations

import sys

from hpa_lightning.classes import class_set
from hpa_lightning.cli import fail, parse_key_values
from hpa_lightning.data.sources import DEFAULT_MAX_IMAGE_PIXELS
from hpa_lightning.data.store import build_store
from hpa_lightning.errors import ConfigError, DataError, UsageError


def main(argv: list[str] | None = None) -> None:
    from hpa_lightning.data.split import SPLIT_NAMES, prepare_split  # the split lives beside the store it indexes

    try:
        args = parse_key_values(sys.argv[1:] if argv is None else argv,
                                {"root": None, "size": 512, "cache_dir": ".cache/stores", "image_dir": "train",
                                 "workers": 0, "val_fraction": 0.1, "test_fraction": 0.1, "seed": 42,
                                 "sixteen_bit": "divide", "duplicates": "drop", "classes": "hpa2018",
                                 "max_image_pixels": DEFAULT_MAX_IMAGE_PIXELS, "out": None},
                                "hpa_lightning.pack")
        if not args["root"]:
            raise UsageError("hpa_lightning.pack: root=DIR is required (a folder holding train.csv and train/)")
        roots = str(args["root"]).split(",")
        store = build_store(roots if len(roots) > 1 else roots[0], int(args["size"]), args["cache_dir"],
                            str(args["image_dir"]), workers=int(args["workers"]) or None, progress=True,
                            sixteen_bit=str(args["sixteen_bit"]), duplicates=str(args["duplicates"]),
                            classes=class_set(str(args["classes"])), max_image_pixels=int(args["max_image_pixels"]))
        split = prepare_split(store, float(args["val_fraction"]), float(args["test_fraction"]), int(args["seed"]),
                              knob_prefix="")
        counts = {name: len(split.indices(name)) for name in SPLIT_NAMES}
        print(f"store: {store.path} ({len(store)} samples at {store.image_size}px); split {split.path.name}: {counts}")
        if args["out"]:
            from hpa_lightning.data.stream_pack import pack_stream

            url = pack_stream(store, split, str(args["out"]), workers=int(args["workers"]) or None)
            print(f"streaming store: {url} (train with data.store={url})")
    except (DataError, UsageError, ConfigError) as err:
        fail(err)


if __name__ == "__main__":
    main()
