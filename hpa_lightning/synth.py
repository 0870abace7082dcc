"""Write a synthetic dataset in the Kaggle layout (see hpa_lightning/data/synth/).

    python -m hpa_lightning.synth out=DIR n=500 seed=0 size=128 [texture_noise=0.0] [zoom=1.0] [workers=N]
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from hpa_lightning.data.synth.dataset import generate

_CLI_TYPES: dict[str, Callable[[str], object]] = {
    "out": str,
    "n": int,
    "seed": int,
    "size": int,
    "workers": int,
    "texture_noise": float,
    "zoom": float,
}


_USAGE = ("usage: python -m hpa_lightning.synth out=DIR [n=500] [seed=0] [size=128] [texture_noise=0.0] [zoom=1.0] "
          "[workers=N]")


def main(argv: list[str] | None = None) -> None:
    """CLI entry point; prints the dataset path. Exit code 2 for bad arguments or an existing ``out``."""
    args = sys.argv[1:] if argv is None else argv
    kwargs: dict[str, object] = {"n": 500}
    for arg in args:
        if arg in ("-h", "--help"):
            print(_USAGE)
            raise SystemExit(0)
        key, sep, value = arg.partition("=")
        if not sep or key not in _CLI_TYPES:
            print(
                f"synth: bad argument {arg!r}; expected key=value with key in {', '.join(_CLI_TYPES)}", file=sys.stderr
            )
            raise SystemExit(2)
        try:
            kwargs[key] = _CLI_TYPES[key](value)
        except ValueError:
            print(f"synth: bad value for {key}: {value!r}", file=sys.stderr)
            raise SystemExit(2) from None
    if "out" not in kwargs:
        print(f"synth: missing out=DIR; {_USAGE}", file=sys.stderr)
        raise SystemExit(2)
    try:
        path = generate(**kwargs)  # type: ignore[arg-type]
    except (FileExistsError, ValueError) as e:
        print(f"synth: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(path)


if __name__ == "__main__":
    main()
