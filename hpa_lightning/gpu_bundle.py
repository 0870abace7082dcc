"""The device bundle in one call: `make gpu-bundle` (`python -m hpa_lightning.gpu_bundle [dest=.gpu_bundle]
[work=DIR] [download=true]`).

1. rehearses the GPU check on the CPU with the import tracer (`python -m hpa_lightning.gpu_check rehearse=true`),
2. reads off it the distributions the check imports that the lent machine's image lacks
   (hpa_lightning/bench/device_wheels.py), at the versions installed here,
3. downloads their wheels for CPython 3.12 on manylinux x86-64 into `dest` (ignored by git; a pure-Python one
   published only as source is built here), removes any other wheel there,
4. installs them from `dest` alone into a scratch folder, as the lent machine will (no index, no dependencies),
5. prints the size, the list, and the device tool's `carry` and command (also in `dest`/manifest.json).
`download=false` stops after 2. A failed rehearsal is an error: its bundle would not be the check's.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from hpa_lightning import SOURCE_ROOT
from hpa_lightning.cli import fail, parse_key_values
from hpa_lightning.errors import UsageError

PROG = "hpa_lightning.gpu_bundle"


def main(argv: list[str] | None = None) -> None:
    from hpa_lightning.bench import device_wheels as bundle

    try:
        args = parse_key_values(sys.argv[1:] if argv is None else argv,
                                {"dest": str(SOURCE_ROOT / bundle.BUNDLE_DIR), "work": "", "download": True}, PROG)
    except UsageError as err:
        fail(err)
    dest = Path(str(args["dest"])).resolve()
    with tempfile.TemporaryDirectory(prefix="gpu_bundle_") as scratch:
        work = Path(str(args["work"]) or Path(scratch) / "rehearsal").resolve()
        print(f"gpu-bundle: rehearsing the GPU check on the CPU with the import tracer ({work})", flush=True)
        code = subprocess.call([sys.executable, "-m", "hpa_lightning.gpu_check", "rehearse=true", f"out={work}"],
                               cwd=SOURCE_ROOT)
        report = work / "gpu_check.json"
        if code != 0 or not report.is_file():
            fail(f"the rehearsal failed (exit {code}; {report}): fix the check before bundling it", status=1)
        resolution = bundle.read_resolution(report)
        needed = resolution["needed"]
        print(f"gpu-bundle: {len(needed)} distributions beyond the image: "
              + ", ".join(f"{k}=={v}" for k, v in needed.items()), flush=True)
        for key in ("hidden", "unmet", "conflicts"):
            if resolution.get(key):
                print(f"gpu-bundle: {key}: {json.dumps(resolution[key], indent=1)}", flush=True)
        if not args["download"]:
            return
        try:
            bundle.download(needed, dest)
        except (RuntimeError, subprocess.CalledProcessError) as err:
            fail(f"downloading the bundle: {err}", status=1)
        installed = bundle.install_offline(dest, Path(scratch) / "site")
        if installed.returncode != 0:
            fail(f"the bundle does not install offline for CPython {bundle.TARGET_PYTHON}:\n"
                 f"{installed.stderr[-2000:]}", status=1)
    size = bundle.bundle_size(dest)
    wheels = sorted(p.name for p in dest.glob("*.whl"))
    print(f"\ngpu-bundle: {dest} holds {len(wheels)} wheels, {size / 2**20:.1f} MiB (the device tool carries at most "
          f"64 MiB with the working tree); it installs offline for CPython {bundle.TARGET_PYTHON}:")
    for name in wheels:
        print(f"  {name}")
    try:
        carried = str(dest.relative_to(SOURCE_ROOT))
    except ValueError:  # the command runs in the repository root there: the wheels must travel inside it
        carried = dest.name
        print(f"gpu-bundle: warning: {dest} is outside {SOURCE_ROOT}; move it there (ignored by git) to carry it")
    bundle.write_manifest(dest, resolution, carried)
    print(f"\ndevice tool `run`: carry={json.dumps([carried])}, timeout_s=560, command:\n"
          f"{bundle.device_command(carried)}")


if __name__ == "__main__":
    main()
