"""The device bundle: wheels of what the GPU check imports that the lent machine's image lacks, and the one command
that installs them there and runs the check (`make gpu-bundle`, hpa_lightning/gpu_bundle.py).

The lent machine reaches no package registry: a package it lacks can only travel as a wheel inside the working tree.
Which ones is read off the check itself, never written by hand: `python -m hpa_lightning.gpu_check rehearse=true`
runs every part on the CPU with the import tracer (import_tracer/sitecustomize.py) in each of its processes; each
file they loaded is mapped to the installed distribution that owns it (by the distributions' RECORD files), and the
bundle is those distributions minus the image's (resources/lent_image_packages.txt) and the project itself, at the
versions installed here. Optional imports of the image's own packages (timm's `try: import wandb`) are hidden during
the rehearsal, as they will be missing there, so a check that passes its rehearsal runs on image + bundle.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

TRACER_DIR = Path(__file__).resolve().parent / "import_tracer"
IMAGE_LIST = Path(__file__).resolve().parents[1] / "resources" / "lent_image_packages.txt"
ENV_TRACE, ENV_IMAGE = "HPA_TRACE_IMPORTS", "HPA_TRACE_IMAGE"  # read by import_tracer/sitecustomize.py
BUNDLE_DIR = ".gpu_bundle"  # in the repository root, ignored by git, named in the device call's `carry`
REQUIREMENTS = "requirements.txt"
# The lent machine: CPython 3.12 on x86-64 Linux. pip matches manylinux_2_N exactly, so every glibc up to the
# image's (Ubuntu 24.04: 2.39) is named.
TARGET_PYTHON = "3.12"
TARGET_PLATFORMS = (*(f"manylinux_2_{n}_x86_64" for n in range(39, 16, -1)), "manylinux2014_x86_64",
                    "manylinux1_x86_64", "linux_x86_64")
TARGET_MARKERS = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
                  "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
                  "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}
PROJECT = "hpa-lightning"


def normalize(name: str) -> str:
    """PEP 503: `Pillow`, `typing_extensions` and `lazy-loader` as pip compares them."""
    import re

    return re.sub(r"[-_.]+", "-", name).lower()


def image_packages(path: Path = IMAGE_LIST) -> dict[str, str | None]:
    """The image's distributions (normalized name -> version where known)."""
    found: dict[str, str | None] = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            found[normalize(name)] = version or None
    return found


def trace_environment(trace_dir: Path, environ: dict[str, str] | None = None) -> dict[str, str]:
    """Variables under which every Python process records its imports into `trace_dir` (the tracer folder first on
    PYTHONPATH: an interpreter imports the first sitecustomize it finds)."""
    env = dict(os.environ if environ is None else environ)
    env[ENV_TRACE], env[ENV_IMAGE] = str(trace_dir), str(IMAGE_LIST)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TRACER_DIR), env.get("PYTHONPATH")) if p)
    return env


def start_tracing(trace_dir: Path) -> None:
    """Trace this process from now on (what it imported already is recorded as loaded) and every process it starts."""
    import importlib.util

    os.environ.update(trace_environment(trace_dir))
    spec = importlib.util.spec_from_file_location("hpa_import_tracer", TRACER_DIR / "sitecustomize.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # installs itself: the variables are set


@dataclass
class Owners:
    """Which installed distribution owns a file: by its top-level name under site-packages, and by the RECORD files
    of the candidates where several distributions share that name (namespace packages: hydra_plugins)."""

    site: tuple[str, ...] = field(default_factory=lambda: tuple(sorted(
        {os.path.normpath(sysconfig.get_paths()[k]) + os.sep for k in ("purelib", "platlib")}, key=len,
        reverse=True)))
    _top_level: dict[str, list[str]] | None = None
    _files: dict[str, set[str]] = field(default_factory=dict)

    def files_of(self, dist: str) -> set[str]:
        from importlib.metadata import distribution

        if dist not in self._files:
            found = distribution(dist)
            self._files[dist] = {os.path.normpath(str(found.locate_file(f))) for f in found.files or ()}
        return self._files[dist]

    def __call__(self, path: str) -> str | None:
        """The normalized distribution name; None for files outside site-packages (the project, the stdlib)."""
        from importlib.metadata import packages_distributions

        path = os.path.normpath(path)
        site = next((s for s in self.site if path.startswith(s)), None)
        if site is None:
            return None
        if self._top_level is None:
            self._top_level = packages_distributions()
        candidates = self._top_level.get(path[len(site):].split(os.sep)[0].split(".")[0], [])
        if len(candidates) > 1:
            candidates = [d for d in candidates if path in self.files_of(d)] or candidates[:1]
        return normalize(candidates[0]) if candidates else None


def read_trace(trace_dir: Path) -> list[tuple[str, str, str, str]]:
    """Every line the traced processes wrote: (module, file, importer, guard)."""
    rows = []
    for path in sorted(trace_dir.glob("*.txt")):
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            fields = line.split("\t")
            if len(fields) == 4:
                rows.append((fields[0], fields[1], fields[2], fields[3]))
    return rows


def installed_version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


def resolve(trace_dir: Path, image: dict[str, str | None] | None = None) -> dict:
    """The bundle a traced rehearsal calls for: {"needed": {name: version}, "hidden": {name: why}, "on_image":
    [names], "unmet": [...], "conflicts": [...], "version_skew": {name: versions}, "processes": n}."""
    image = image_packages() if image is None else image
    owner = Owners()
    loaded: set[str] = set()
    hidden: dict[str, set[str]] = {}
    for _module, origin, importer, guard in read_trace(trace_dir):
        dist = owner(origin)
        if dist is None or dist == PROJECT:
            continue
        if guard == "hidden":
            hidden.setdefault(dist, set()).add(owner(importer) or importer)
        else:
            loaded.add(dist)
    needed = {d: installed_version(d) for d in sorted(loaded - set(image))}
    unmet, conflicts = check_requirements(needed, image)
    why = "asked for inside try/except ImportError by {}; absent on the image, and hidden in the rehearsal likewise"
    return {"needed": needed, "on_image": sorted(loaded & set(image)),
            "hidden": {d: why.format(", ".join(sorted(by))) for d, by in sorted(hidden.items()) if d not in loaded},
            "unmet": unmet, "conflicts": conflicts,
            # rehearsed with these versions, run there with others: where a difference shows, look here first
            "version_skew": {d: {"here": installed_version(d), "image": image[d]} for d in sorted(loaded & set(image))
                             if image[d] and installed_version(d) != image[d]},
            "processes": len(list(trace_dir.glob("*.txt")))}


def check_requirements(needed: dict[str, str], image: dict[str, str | None]) -> tuple[list[str], list[str]]:
    """What the bundled distributions declare they need (for Python 3.12 on Linux x86-64): names neither bundled nor
    on the image (`unmet`: never imported by the check, else they would be bundled), and image versions outside the
    declared range (`conflicts`, where the image's version is known)."""
    from importlib.metadata import requires

    from packaging.requirements import Requirement

    unmet, conflicts = [], []
    for dist in needed:
        for text in requires(dist) or ():
            requirement = Requirement(text)
            if requirement.marker is not None and not requirement.marker.evaluate(TARGET_MARKERS):
                continue
            name = normalize(requirement.name)
            if name in needed:
                continue
            if name not in image:
                unmet.append(f"{dist} declares {text}")
            elif image[name] and not requirement.specifier.contains(image[name], prereleases=True):
                conflicts.append(f"{dist} declares {text}; the image has {name} {image[name]}")
    return unmet, conflicts


def _pip_target_options() -> list[str]:
    options = ["--only-binary=:all:", "--python-version", TARGET_PYTHON, "--implementation", "cp"]
    for platform in TARGET_PLATFORMS:
        options += ["--platform", platform]
    return options


def is_pure(dist: str) -> bool:
    """Whether the installed distribution is pure Python (its WHEEL says Root-Is-Purelib): a wheel built here runs
    on any interpreter."""
    from importlib.metadata import distribution

    wheel = distribution(dist).read_text("WHEEL") or ""
    return "Root-Is-Purelib: true" in wheel


def download(needed: dict[str, str], dest: Path, log=print) -> list[str]:
    """The wheels of `needed` for the lent machine into `dest` (one version each: two stop an install); a pure-Python
    distribution published only as source (antlr4-python3-runtime 4.9.3) is built into a wheel here. Returns the
    requirement lines."""
    dest.mkdir(parents=True, exist_ok=True)
    pins = [f"{name}=={version}" for name, version in needed.items()]
    for stale in dest.glob("*.whl"):
        if normalize(stale.name.split("-")[0]) not in needed:
            stale.unlink()
    for pin, name in zip(pins, needed, strict=True):
        if _wheel_in(dest, name, needed[name]):
            continue
        pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
        fetched = subprocess.run([*pip, "download", "--no-deps", *_pip_target_options(), "-d", str(dest), pin],
                                 capture_output=True, text=True)
        if fetched.returncode != 0:
            if not is_pure(name):
                raise RuntimeError(f"no wheel of {pin} for CPython {TARGET_PYTHON} on manylinux x86-64:\n"
                                   f"{fetched.stderr[-1500:]}")
            log(f"  {pin}: no wheel published; building a pure-Python wheel from its source")
            subprocess.run([*pip, "wheel", "--no-deps", "-w", str(dest), pin], check=True, capture_output=True)
        log(f"  {pin}")
    (dest / REQUIREMENTS).write_text("\n".join(pins) + "\n")
    return pins


def _wheel_in(dest: Path, name: str, version: str) -> bool:
    return any(normalize(p.name.split("-")[0]) == name and p.name.split("-")[1] == version for p in dest.glob("*.whl"))


def install_offline(bundle: Path, target: Path) -> subprocess.CompletedProcess:
    """What the lent machine will do, checked here: every pinned requirement installs from the bundle alone, for
    CPython 3.12 on manylinux x86-64, without an index."""
    return subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "install", "--no-index",
                           "--no-deps", "--find-links", str(bundle), "--target", str(target), *_pip_target_options(),
                           "-r", str(bundle / REQUIREMENTS)], capture_output=True, text=True)


def bundle_size(bundle: Path) -> int:
    return sum(p.stat().st_size for p in bundle.glob("*.whl"))


def device_command(bundle: str = BUNDLE_DIR, budget_s: int = 420, extra: Iterable[str] = ()) -> str:
    """The command for the device tool (`run`, with carry=[bundle]): install the wheels with the image's python3,
    then run the check from the working tree with results, summary and part logs in $OUT, the data in /tmp."""
    args = " ".join(["out=/tmp/gpu_check", "report=$OUT", f"budget_s={budget_s}", *extra])
    return (f"python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "
            f"{bundle}/*.whl && export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 WANDB_MODE=disabled "
            f"PYTHONUNBUFFERED=1 && python3 -m hpa_lightning.gpu_check {args}")


def write_manifest(bundle: Path, resolution: dict, carried: str = BUNDLE_DIR) -> None:
    from hpa_lightning.files import write_json_atomic

    write_json_atomic(bundle / "manifest.json", {**resolution, "size_bytes": bundle_size(bundle),
                                                 "wheels": sorted(p.name for p in bundle.glob("*.whl")),
                                                 "carry": [carried], "command": device_command(carried)})


def read_resolution(report: Path) -> dict:
    """The bundle part of a rehearsal's gpu_check.json."""
    part = json.loads(report.read_text())["parts"].get("bundle") or {}
    if part.get("status") != "ok":
        raise RuntimeError(f"the rehearsal did not resolve the bundle: {part.get('error') or part}")
    return part["resolution"]
