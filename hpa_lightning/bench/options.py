"""The benchmark's command line: its keys, its sections, and the parse that answers `--help` or a bad argument before
the sections (torch, Lightning) are imported."""

from __future__ import annotations

from hpa_lightning.cli import parse_key_values
from hpa_lightning.errors import UsageError

SECTIONS = ("loading", "packing", "overhead", "augment", "gpu", "jpeg", "thresholds", "segment", "cells", "stream")

DEFAULTS: dict[str, object] = {"quick": False, "out": "", "cache": "", "workers": 0, "repeats": 0, "seed": 0,
                               "threads": 1, "gpu": True, "sections": "all"}


def parse_arguments(argv: list[str]) -> dict[str, object]:
    """The arguments typed like DEFAULTS, with `sections` as the tuple of sections to run; UsageError otherwise."""
    args = parse_key_values(argv, DEFAULTS, "hpa_lightning.bench")
    wanted = SECTIONS if args["sections"] in ("", "all") else tuple(str(args["sections"]).split(","))
    unknown = [w for w in wanted if w not in SECTIONS]
    if unknown:
        raise UsageError(f"hpa_lightning.bench: unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    return {**args, "sections": wanted}
