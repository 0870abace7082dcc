"""Cell and nucleus masks for a folder of images: `python -m hpa_lightning.segment input=DIR out=MASKS`.

    python -m hpa_lightning.segment input=DIR out=MASKS [method=classical|hpacellseg] [scale=0.25] [image_dir=]
        [workers=0] [on_bad_sample=error|skip] [sixteen_bit=percentile|divide] [max_image_pixels=268435456]
        [nuclei_model=PATH cell_model=PATH trust_weights=PATH,PATH] [device=auto|cpu|cuda]

Images are found as predict finds them: `DIR/test/` with `sample_submission.csv`, else `DIR/train/` with
`train.csv`, else DIR itself (either CSV, else every Id whose `{ID}_{blue,red,yellow}.{png,jpg,tif}` files are there);
`image_dir=` names the folder. Blue, red and yellow are read at full size (16-bit PNG/TIFF to 8 bits by `sixteen_bit`,
RGB-tinted JPGs by their colour plane; a file declaring more than `max_image_pixels` pixels is refused unread).

Writes `MASKS/{ID}_cell_mask.png` and `MASKS/{ID}_nuclei_mask.png` (uint16 label images at the image's size, 0
background, a cell and its nucleus under one id), each file atomically. A rerun skips the images whose two masks
exist. `method=classical` (default, no weights: scikit-image at `scale`, worker processes, `workers=0` = every CPU
available) or `method=hpacellseg` (HPA-Cell-Segmentation, installed by you, its two weight files given as local paths
and trusted by path: they are pickled models, loading them runs code; never downloads). docs/cells.md.

An image where no cell is found, or a bad file, is one `error: ...` line naming the file and exit status 2; with
`on_bad_sample=skip` such images are left out and listed in `MASKS/segment_skipped.csv`.
"""

from __future__ import annotations

import sys

from hpa_lightning.cli import fail, parse_key_values
from hpa_lightning.data.sources import DEFAULT_MAX_IMAGE_PIXELS
from hpa_lightning.errors import UserError

PROG = "hpa_lightning.segment"
DEFAULTS: dict[str, object] = {"input": None, "out": None, "method": "classical", "scale": 0.25, "image_dir": "",
                               "workers": 0, "on_bad_sample": "error", "sixteen_bit": "percentile",
                               "max_image_pixels": DEFAULT_MAX_IMAGE_PIXELS, "nuclei_model": "", "cell_model": "",
                               "trust_weights": "", "device": "auto"}


def main(argv: list[str] | None = None) -> None:
    try:
        args = parse_key_values(sys.argv[1:] if argv is None else argv, DEFAULTS, PROG)
        from hpa_lightning.inference.cell_masks import run

        result = run(args)
    except UserError as err:  # bad arguments, files, untrusted weights, an image without cells
        fail(err)
    print(f"{result['method']} segmentation at scale {result['scale']:g}: {result['images']} images "
          f"(Ids from {result['ids_from']}), {result['cells']} cells, {result['seconds']:.1f} s "
          f"({result['seconds_per_image']:.2f} s/image with {result['workers']} workers; "
          f"{result['cpu_seconds_per_image']:.2f} s per image in one process)\nmasks in {result['out']}")
    if result["already_done"]:
        print(f"skipped {result['already_done']} images whose two masks exist already (delete them to redo)")
    if result["skipped"]:
        print(f"left out {len(result['skipped'])} bad images (on_bad_sample=skip), listed in {result['skipped_file']}:")
        for image_id, reason in result["skipped"][:10]:  # type: ignore[index]
            print(f"  {image_id}: {reason}")
    if result["incomplete"]:
        print(f"ignored {len(result['incomplete'])} Ids without all of their blue, red and yellow files")


if __name__ == "__main__":
    main()
