"""Export a trained model as a self-contained folder: `python -m hpa_lightning.export ckpt=RUN_DIR|CKPT out=DIR`.

The folder holds
    model.safetensors  the timm network's weights (4-channel stem and 28-way head included), nothing executable
    card.json          what inference needs: timm architecture name, class names, channel order, training image
                       size, normalisation mean/std, tuned thresholds + ensure_one, source checkpoint, versions
and `python -m hpa_lightning.predict ckpt=DIR ...` runs from it without the training config. To use it elsewhere:

    net = timm.create_model(card["architecture"], pretrained=False, **card["timm_args"])
    net.load_state_dict(safetensors.torch.load_file("model.safetensors"))
    x = (uint8_rgby / 255 - mean[:, None, None]) / std[:, None, None]   # (4, S, S), R,G,B,Y, S = card image_size
    probs = sigmoid(net(x[None]))

An ensemble, `ckpt=RUN1,RUN2,...` or a folder of runs (e.g. a `+sweep=folds` folder) with optional `weights=`,
becomes one folder of `member<i>/` single-model exports and a card.json with the members' weights and the
ensemble's thresholds (out of fold for folds); `predict ckpt=DIR` predicts with the whole ensemble.

A model built by your own network factory (`model._target_`) is exported with that factory's node in the card;
exporting it and predicting from the export need `trust=<its _target_>` (the file may be someone else's).

The folder is written under a temporary name and renamed when complete; an existing non-empty `out` is refused.
"""

from __future__ import annotations

import sys
from pathlib import Path

from hpa_lightning.cli import fail, parse_key_values
from hpa_lightning.errors import UsageError, UserError
from hpa_lightning.runs.layout import RESULTS
from hpa_lightning.targets import trust_in_this_process

PROG = "hpa_lightning.export"


def main(argv: list[str] | None = None) -> None:
    try:
        args = parse_key_values(sys.argv[1:] if argv is None else argv,
                                {"ckpt": None, "out": None, "weights": "", "trust": ""}, PROG)
        if not args["ckpt"] or not args["out"]:
            raise UsageError(f"{PROG}: ckpt=RUN_DIR|CKPT and out=DIR are required")
        trust_in_this_process(str(args["trust"]))
        # imported only now (torch, timm: ~4 s on 2 cores), so that --help and a mistyped key answer at once
        from hpa_lightning.inference.export_folder import export_ensemble, export_model
        from hpa_lightning.inference.load import CARD_NAME, WEIGHTS_NAME

        source = Path(str(args["ckpt"]))
        several = "," in str(source) or (source.is_dir() and not (source / RESULTS).is_file()
                                          and not (source / CARD_NAME).is_file())
        if several:
            out = export_ensemble(str(args["ckpt"]), str(args["out"]), str(args["weights"]))
        elif args["weights"]:
            raise UsageError(f"{PROG}: weights= needs several runs (comma-separated ckpt= or a folder of runs)")
        else:
            out = export_model(str(source), str(args["out"]))
    except UserError as err:  # bad arguments or model files, an untrusted _target_
        fail(err)
    size_mb = sum(path.stat().st_size for path in out.rglob(WEIGHTS_NAME)) / 2**20
    print(f"exported {args['ckpt']} -> {out} ({len(list(out.rglob(WEIGHTS_NAME)))} x {WEIGHTS_NAME}, {size_mb:.1f} "
          f"MiB, {CARD_NAME})")


if __name__ == "__main__":
    main()
