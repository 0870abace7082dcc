"""Export a trained model as a self-contained folder: `python -m hpa_lightning.export ckpt=RUN_DIR|CKPT out=DIR`.

The folder holds
    model.safetensors  the timm network's weights (4-channel stem and 28-way head included), nothing executable
    card.json          what inference needs: timm architecture name, class names, channel order, training image
                       size, normalisation mean/std, tuned thresholds + ensure_one, source checkpoint, versions
and `python -m hpa_lightning.predict ckpt=DIR ...` runs from it without the training config. To use it elsewhere:

    net = timm.create_model(card["architecture"], pretrained=False, in_chans=4, num_classes=card["num_classes"],
                            **({"global_pool": card["global_pool"]} if card.get("global_pool") else {}))
    net.load_state_dict(safetensors.torch.load_file("model.safetensors"))
    x = (uint8_rgby / 255 - mean[:, None, None]) / std[:, None, None]   # (4, S, S), R,G,B,Y, S = card image_size
    probs = sigmoid(net(x[None]))

The folder is written under a temporary name and renamed when complete; an existing non-empty `out` is refused.
"""

from __future__ import annotations

import sys

from hpa_lightning.cli import fail, parse_key_values
from hpa_lightning.errors import InferenceError, UsageError
from hpa_lightning.inference.export import PROG, export_model
from hpa_lightning.inference.load import CARD_NAME, WEIGHTS_NAME


def main(argv: list[str] | None = None) -> None:
    try:
        args = parse_key_values(sys.argv[1:] if argv is None else argv, {"ckpt": None, "out": None}, PROG)
        if not args["ckpt"] or not args["out"]:
            raise UsageError(f"{PROG}: ckpt=RUN_DIR|CKPT and out=DIR are required")
        out = export_model(str(args["ckpt"]), str(args["out"]))
    except (UsageError, InferenceError) as err:
        fail(err)
    size_mb = (out / WEIGHTS_NAME).stat().st_size / 2**20
    print(f"exported {args['ckpt']} -> {out} ({WEIGHTS_NAME} {size_mb:.1f} MiB, {CARD_NAME})")


if __name__ == "__main__":
    main()
