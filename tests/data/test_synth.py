"""Tests of the synthetic HPA generator: Kaggle layout, label marginals, determinism, atomicity, label-driven green."""

from __future__ import annotations

import csv
import io
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hpa_lightning import synth as synth_cli
from hpa_lightning.classes import CHANNELS, KAGGLE_TRAIN_COUNTS, KAGGLE_TRAIN_SAMPLES, NUM_CLASSES
from hpa_lightning.data import simulator as synth
from hpa_lightning.data.simulator import dataset as synth_dataset

UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def read_csv(root: Path) -> list[tuple[str, list[int]]]:
    text = (root / "train.csv").read_text()
    assert text.splitlines()[0] == "Id,Target"
    rows = list(csv.DictReader(io.StringIO(text)))
    return [(r["Id"], [int(t) for t in r["Target"].split(" ")]) for r in rows]


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_label_marginals_follow_kaggle() -> None:
    n = 5000
    labels = synth.sample_labels(n, np.random.default_rng(0))
    assert len(labels) == n
    onehot = np.zeros((n, NUM_CLASSES), dtype=bool)
    for row in labels:
        assert row, "every sample needs a label"
        assert len(set(row)) == len(row)
        assert all(isinstance(c, int) and 0 <= c < NUM_CLASSES for c in row)
    for i, row in enumerate(labels):
        onehot[i, row] = True
    prior = np.asarray(KAGGLE_TRAIN_COUNTS) / KAGGLE_TRAIN_SAMPLES
    freq = onehot.mean(axis=0)
    # 4 binomial standard errors, plus 2 samples of slack for the rare-class top-up
    tol = 4 * np.sqrt(prior * (1 - prior) / n) + 2 / n
    bad = {c: (round(freq[c], 4), round(prior[c], 4)) for c in range(NUM_CLASSES) if abs(freq[c] - prior[c]) > tol[c]}
    assert not bad, f"class frequency (got, kaggle) off: {bad}"
    assert freq[0] == pytest.approx(0.415, abs=0.03) and freq[25] == pytest.approx(0.265, abs=0.03)
    assert 1.55 <= onehot.sum(axis=1).mean() <= 1.72  # Kaggle: 50782 / 31072 = 1.63
    assert onehot.sum(axis=0).min() >= 2


def test_every_class_present_twice_in_small_sets() -> None:
    for seed in range(3):
        labels = synth.sample_labels(200, np.random.default_rng(seed))
        counts = np.bincount([c for row in labels for c in row], minlength=NUM_CLASSES)
        assert counts.min() >= 2, counts
    # label order inside a sample is not sorted, like Kaggle's Target column
    assert any(row != sorted(row) for row in synth.sample_labels(200, np.random.default_rng(0)))


def test_generate_writes_kaggle_layout(tmp_path: Path) -> None:
    n, size = 12, 64
    root = synth.generate(tmp_path / "hpa", n=n, seed=3, size=size, workers=1)
    assert root == tmp_path / "hpa"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hpa"], "no temporary folder may be left behind"
    assert sorted(p.name for p in root.iterdir()) == ["train", "train.csv"]
    rows = read_csv(root)
    ids = [i for i, _ in rows]
    assert len(rows) == n and len(set(ids)) == n and ids == sorted(ids)
    assert all(UUID_RE.match(i) for i in ids)
    assert all(t and all(0 <= c < NUM_CLASSES for c in t) for _, t in rows)
    expected = {f"{i}_{ch}.png" for i in ids for ch in CHANNELS}
    assert {p.name for p in (root / "train").iterdir()} == expected
    for path in (root / "train").iterdir():
        with Image.open(path) as im:
            assert im.format == "PNG" and im.mode == "L" and im.size == (size, size)


def test_generate_is_deterministic_for_any_worker_count(tmp_path: Path) -> None:
    a = tree_bytes(synth.generate(tmp_path / "a", n=20, seed=7, size=64, workers=1))
    b = tree_bytes(synth.generate(tmp_path / "b", n=20, seed=7, size=64, workers=2))
    assert a.keys() == b.keys() and len(a) == 20 * 4 + 1
    assert all(a[k] == b[k] for k in a), [k for k in a if a[k] != b[k]][:5]
    c = tree_bytes(synth.generate(tmp_path / "c", n=20, seed=8, size=64, workers=1))
    assert c["train.csv"] != a["train.csv"]
    assert set(a) & set(c) == {"train.csv"}, "ids depend on the seed"


def test_generate_refuses_existing_root(tmp_path: Path) -> None:
    root = tmp_path / "hpa"
    root.mkdir()
    (root / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already exists"):
        synth.generate(root, n=2, size=32, workers=1)
    assert [p.name for p in root.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hpa"]


def test_a_concurrent_generator_finishing_first_is_a_file_exists_error(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Parallel jobs (or test workers) sharing a cache: the other generator renames its folder into place between our
    last check and our rename. The kernel refuses the rename (ENOTEMPTY); callers expect FileExistsError, and theirs
    stays whole."""
    root = tmp_path / "hpa"
    real_rename = synth_dataset.os.rename

    def other_generator_first(src: str | Path, dst: str | Path) -> None:
        monkeypatch.setattr(synth_dataset.os, "rename", real_rename)
        synth.generate(tmp_path / "theirs", n=2, size=32, workers=1)
        real_rename(tmp_path / "theirs", root)
        real_rename(src, dst)

    monkeypatch.setattr(synth_dataset.os, "rename", other_generator_first)
    with pytest.raises(FileExistsError, match="appeared while it was being written"):
        synth.generate(root, n=3, size=32, workers=1)
    assert len(read_csv(root)) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hpa"]


def test_interrupted_generate_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    real = synth.render_sample

    def flaky(*args: object, **kwargs: object) -> np.ndarray:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(synth_dataset, "render_sample", flaky)
    with pytest.raises(KeyboardInterrupt):
        synth.generate(tmp_path / "hpa", n=5, size=32, workers=1)
    assert list(tmp_path.iterdir()) == []


def test_stale_temporary_folder_of_dead_process_is_removed(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"hpa.tmp-{socket.gethostname()}-{dead.pid}"
    (stale / "train").mkdir(parents=True)
    alive = tmp_path / f"hpa.tmp-{socket.gethostname()}-1"  # pid 1 always exists: must be left alone
    alive.mkdir()
    synth.generate(tmp_path / "hpa", n=1, size=32, workers=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["hpa", alive.name])


def green_fraction_in_nuclei(img: np.ndarray) -> float:
    blue = img[2].astype(np.float32)
    nuclei = blue > 0.4 * np.percentile(blue, 99.5)  # blue is the nuclear stain
    green = np.clip(img[1].astype(np.float32) - np.median(img[1]), 0, None)  # minus the dark background
    return float(green[nuclei].sum() / green.sum())


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_green_pattern_follows_labels(seed: int) -> None:
    nucleoplasm = synth.render_sample([0], 128, np.random.default_rng(seed))
    cytosol = synth.render_sample([25], 128, np.random.default_rng(seed))
    # same rng: same cells and landmark channels, only the protein channel differs
    for ch in (0, 2, 3):
        assert np.array_equal(nucleoplasm[ch], cytosol[ch])
    assert green_fraction_in_nuclei(nucleoplasm) > 0.8
    assert green_fraction_in_nuclei(cytosol) < 0.2


def test_every_class_renders_a_distinct_green_pattern() -> None:
    masses = []
    for c in range(NUM_CLASSES):
        img = synth.render_sample([c], 64, np.random.default_rng(11))
        assert img.shape == (4, 64, 64) and img.dtype == np.uint8
        g = img[1].astype(np.float32)
        assert g.max() - np.median(g) > 60, f"class {c} draws no visible green"
        g = np.clip(g - np.median(g), 0, None)
        masses.append((g / g.sum()).ravel())
    m = np.stack(masses)
    # total variation distance between where the green mass lies; the closest pair is MTOC vs centrosome (~0.2)
    tv = np.abs(m[:, None] - m[None]).sum(axis=2) / 2
    np.fill_diagonal(tv, np.inf)
    assert tv.min() > 0.1, np.unravel_index(tv.argmin(), tv.shape)


def test_texture_noise_makes_pngs_incompressible(tmp_path: Path) -> None:
    def png_sizes(root: Path) -> list[int]:
        return [p.stat().st_size for p in sorted((root / "train").iterdir())]

    noisy = png_sizes(synth.generate(tmp_path / "noisy", n=1, size=512, workers=1, texture_noise=1.0))
    clean = png_sizes(synth.generate(tmp_path / "clean", n=1, size=512, workers=1))
    assert min(noisy) >= 50_000, noisy
    assert max(clean) < min(noisy), (clean, noisy)


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    synth_cli.main([f"out={out}", "n=3", "seed=1", "size=32", "workers=1", "texture_noise=0.5"])
    assert capsys.readouterr().out.strip() == str(out)
    assert len(read_csv(out)) == 3
    for argv, code in (
        ([f"out={out}", "n=3"], 2),  # exists: bad input like the others
        ([f"out={tmp_path / 'x'}", "colour=red"], 2),
        ([f"out={tmp_path / 'x'}", "n=three"], 2),
        ([f"out={tmp_path / 'x'}", "--n", "3"], 2),
        (["n=3"], 2),
        ([f"out={tmp_path / 'x'}", "texture_noise=2"], 2),
    ):
        with pytest.raises(SystemExit) as exc:
            synth_cli.main(argv)
        assert exc.value.code == code, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err  # the commands' one error convention
    assert not (tmp_path / "x").exists()
