"""`hpa COMMAND [arguments]`: every command of hpa_lightning behind one console script (`hpa --help` lists them).

`hpa train +experiment=focal_g02` is `python -m hpa_lightning.train +experiment=focal_g02`, and so on: each command
keeps its own syntax (Hydra overrides for the commands that compose conf/, key=value for the others) and takes
`--help`. The `python -m` forms stay.
"""

from __future__ import annotations

import difflib
import re
import runpy
import sys

from hpa_lightning.cli import command_doc, fail

# command -> module run as `python -m <module>`; Hydra's commands first
COMMANDS: dict[str, str] = {
    "train": "hpa_lightning.train",
    "lr-find": "hpa_lightning.lr_find",
    "baseline": "hpa_lightning.baseline",
    "pack": "hpa_lightning.pack",
    "predict": "hpa_lightning.predict",
    "segment": "hpa_lightning.segment",
    "evaluate-cells": "hpa_lightning.evaluate_cells",
    "export": "hpa_lightning.export",
    "explain": "hpa_lightning.explain",
    "resume": "hpa_lightning.resume",
    "rerun-failed": "hpa_lightning.rerun_failed",
    "report": "hpa_lightning.report",
    "dashboard": "hpa_lightning.dashboard",
    "reproduce": "hpa_lightning.reproduce",
    "demo-cells": "hpa_lightning.demo_cells",
    "synth": "hpa_lightning.synth",
    "bench": "hpa_lightning.bench",
    "gpu-check": "hpa_lightning.gpu_check",
    "gpu-bundle": "hpa_lightning.gpu_bundle",
}


def summary_line(module: str) -> str:
    """The first sentence of a command's docstring without its `python -m ...` / `make ...` usage."""
    first = " ".join(command_doc(module).strip().split("\n\n")[0].split())  # the first paragraph, on one line
    text = first.split("`", 1)[0].strip(" .:;(")  # the words before any usage
    if not text:  # the docstring starts with its usage: the words after it
        text = re.sub(r"\(?`[^`]*`\)?", "", first).strip(" .:;")
    text = text.split(". ")[0]
    return text[:1].upper() + text[1:]


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {summary_line(module)}" for name, module in COMMANDS.items()]
    return ("usage: hpa COMMAND [arguments]   (hpa COMMAND --help for a command's arguments)\n\ncommands:\n"
            + "\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        sys.exit(0 if args else 2)
    name = args[0].replace("_", "-")
    module = COMMANDS.get(name)
    if module is None:
        close = difflib.get_close_matches(name, COMMANDS, n=1)
        fail(f"hpa: unknown command {args[0]!r}" + (f" (did you mean {close[0]}?)" if close else "")
             + f"; commands: {', '.join(COMMANDS)}")
    sys.argv = [f"hpa {name}", *args[1:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
