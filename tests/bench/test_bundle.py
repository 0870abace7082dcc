"""The device bundle: read off what the check's processes import (optional imports told apart), mapped to the
installed distributions, minus the lent image's; and, where a registry is reachable, downloaded and installed offline
for the lent machine's interpreter."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from hpa_lightning.bench import device_wheels as bundle
from tests.conftest import REPO

OPTIONAL_USER = "try:\n    import hpa_test_optional\nexcept ImportError:\n    pass\n"
NEEDED_USER = ("try:\n    import hpa_test_needed\nexcept ImportError as err:\n"
               "    raise RuntimeError('install it') from err\n")


def test_the_tracer_tells_an_optional_import_from_a_needed_one(tmp_path: Path) -> None:
    modules, trace = tmp_path / "modules", tmp_path / "trace"
    modules.mkdir()
    for name, text in {"hpa_test_optional": "", "hpa_test_needed": "", "user_optional": OPTIONAL_USER,
                       "user_needed": NEEDED_USER, "user_plain": "import hpa_test_plain\n",
                       "hpa_test_plain": ""}.items():
        (modules / f"{name}.py").write_text(text)
    env = bundle.trace_environment(trace, {**os.environ, "PYTHONPATH": str(modules)})
    proc = subprocess.run([sys.executable, "-c", "import user_optional, user_needed, user_plain, json"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    rows = {module: (Path(origin).name, Path(importer).name, guard) for module, origin, importer, guard
            in bundle.read_trace(trace)}
    assert rows["hpa_test_optional"] == ("hpa_test_optional.py", "user_optional.py", "guarded")
    assert rows["hpa_test_needed"] == ("hpa_test_needed.py", "user_needed.py", "unguarded")  # re-raised
    assert rows["hpa_test_plain"] == ("hpa_test_plain.py", "user_plain.py", "unguarded")
    assert "json" not in rows  # the standard library travels with any interpreter


def origin(module: str) -> str:
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin
    return spec.origin


def test_resolution_maps_files_to_distributions_minus_the_image(tmp_path: Path) -> None:
    trace = tmp_path / "trace"
    trace.mkdir()
    timm_file = str(Path(origin("timm")).parent / "utils" / "summary.py")
    lines = [("hydra", origin("hydra"), "", "?"), ("omegaconf", origin("omegaconf"), origin("hydra"), "unguarded"),
             # a namespace package shared by several distributions: told apart by their RECORD files
             ("hydra_plugins.hydra_joblib_launcher", origin("hydra_plugins.hydra_joblib_launcher"), "", "?"),
             ("torch", origin("torch"), "", "?"), ("hpa_lightning", origin("hpa_lightning"), "", "?"),
             ("json", origin("json"), "", ""), ("wandb", origin("wandb"), timm_file, "hidden")]
    (trace / "1.txt").write_text("".join("\t".join(line) + "\n" for line in lines))
    resolution = bundle.resolve(trace)
    assert resolution["needed"] == {name: version(name) for name in
                                    ("hydra-core", "hydra-joblib-launcher", "omegaconf")}
    assert resolution["on_image"] == ["torch"]
    assert list(resolution["hidden"]) == ["wandb"] and "timm" in resolution["hidden"]["wandb"]
    unmet, _ = bundle.check_requirements({"hydra-core": version("hydra-core")}, {"packaging": None})
    assert any(line.startswith("hydra-core declares antlr4-python3-runtime") for line in unmet)


def test_the_image_list_and_the_device_command() -> None:
    image = bundle.image_packages()
    assert {"torch", "lightning", "timm", "torchmetrics", "pandas", "pyyaml", "pillow"} <= set(image)
    assert not {"hydra-core", "omegaconf", "kornia", "antlr4-python3-runtime"} & set(image)
    assert image["torch"] == "2.11.0" and image["lightning"] is None
    command = bundle.device_command()
    assert len(command) <= 2000  # the device tool's limit
    assert command.startswith("python3 -m pip install -q --no-index --no-deps") and ".gpu_bundle/*.whl" in command
    assert "export PYTHONPATH=/tmp/site:$PWD" in command and command.endswith(
        "python3 -m hpa_lightning.gpu_check out=/tmp/gpu_check report=$OUT budget_s=420")
    ignored = subprocess.run(["git", "check-ignore", "-q", f"{bundle.BUNDLE_DIR}/x.whl"], cwd=REPO)
    assert ignored.returncode == 0  # the wheels travel by `carry`, never in a commit


@pytest.mark.network
@pytest.mark.slow
def test_the_bundle_installs_offline_for_the_lent_machine(tmp_path: Path) -> None:
    """`make gpu-bundle` into a scratch folder, then what the lent machine does, without an index: every pinned
    requirement of the check installs from the bundle alone for CPython 3.12 on manylinux x86-64."""
    dest = tmp_path / "bundle"
    proc = subprocess.run([sys.executable, "-m", "hpa_lightning.gpu_bundle", f"dest={dest}",
                           f"work={tmp_path / 'rehearsal'}"], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    requirements = (dest / bundle.REQUIREMENTS).read_text().split()
    assert {r.split("==")[0] for r in requirements} >= {"hydra-core", "omegaconf", "antlr4-python3-runtime", "kornia"}
    assert bundle.bundle_size(dest) < 32 * 2**20  # well under the 64 MiB the device tool carries
    platforms = [arg for platform in bundle.TARGET_PLATFORMS for arg in ("--platform", platform)]
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--find-links",
                              str(dest), "--target", str(tmp_path / "site"), "--python-version", "3.12",
                              "--implementation", "cp", *platforms, "--only-binary=:all:", *requirements],
                             capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-3000:]
    assert {"hydra", "omegaconf", "antlr4", "kornia"} <= {p.name for p in (tmp_path / "site").iterdir()}
    assert "python3 -m hpa_lightning.gpu_check" in proc.stdout and "carry=[" in proc.stdout
