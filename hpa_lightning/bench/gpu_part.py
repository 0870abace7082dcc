"""One benchmark configuration in a process of its own: `python -m hpa_lightning.bench.gpu_part SPEC.json`.

The GPU check runs its compiled configuration so: a compiler that crashes, hangs or leaves the device unusable costs
that part only, and the check ends it at its time (bench/acceptance.py writes the spec: data, recipe, batch, windows,
`stop_in_s`, and where the figures go).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from hpa_lightning.files import write_json_atomic


def main(argv: list[str] | None = None) -> None:
    import torch

    from hpa_lightning.bench.common import PROFILES
    from hpa_lightning.bench.gpu_speed import Windows, gpu_run

    started = time.monotonic()
    spec = json.loads(Path((argv or sys.argv[1:])[0]).read_text())
    prof = replace(PROFILES["full"], gpu_model=spec["model"], gpu_size=spec["size"], gpu_batch=spec["batch"])
    device = torch.device("cuda", 0) if spec["device"] == "cuda" else torch.device("cpu")
    print(f"gpu_part: {spec['model']} at {spec['size']} px, batch {spec['batch']}, compiled={spec['compiled']} "
          f"(backend {spec.get('backend') or 'inductor'}) on {device}", flush=True)
    result = gpu_run(Path(spec["root"]), Path(spec["cache"]), prof, spec["workers"], spec["recipe"], spec["seed"],
                     spec["compiled"], device, Windows(**spec["windows"]), stop_at=started + spec["stop_in_s"],
                     compile_backend=spec.get("backend"), augment=False)
    result.pop("augment", None)
    write_json_atomic(Path(spec["result"]), result)
    print(f"gpu_part: {result['images_per_s']:.1f} images/s, warm-up {result['warmup_s']:.1f} s", flush=True)


if __name__ == "__main__":
    main()
