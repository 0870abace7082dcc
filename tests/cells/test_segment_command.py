"""`python -m hpa_lightning.segment` / `hpa segment` over folders in the Kaggle and HPA 2021 layouts: the masks written
(size, ids, the true cells found), reruns, an image without cells, bad files, the hpacellseg refusals."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hpa_lightning.cells.masks import read_label_image
from hpa_lightning.segment import main
from tests.cells.simulated import recall_at, simulated_cells
from tests.conftest import REPO


def write_image(folder: Path, image_id: str, seed: int, dtype: type = np.uint16, size: int = 512,
                suffix: str = ".png") -> dict[str, np.ndarray]:
    sample = simulated_cells(seed, size, 1.0, dtype=dtype)
    folder.mkdir(parents=True, exist_ok=True)
    for channel in ("red", "green", "blue", "yellow"):
        Image.fromarray(sample.get(channel, sample["red"])).save(folder / f"{image_id}_{channel}{suffix}")
    return sample


def segment(*args: str) -> None:
    main(["workers=1", *args])


def test_a_2021_folder_gets_masks_at_full_size_finding_the_true_cells(tmp_path: Path, capsys) -> None:
    truth = {f"img{seed}": write_image(tmp_path / "data" / "train", f"img{seed}", seed) for seed in range(3)}
    (tmp_path / "data" / "train.csv").write_text("ID,Label\n" + "".join(f"{i},1|2\n" for i in truth))
    main([f"input={tmp_path / 'data'}", f"out={tmp_path / 'masks'}", "workers=2"])
    printed = capsys.readouterr().out
    assert "3 images" in printed and "train.csv" in printed
    found = total = 0
    for image_id, sample in truth.items():
        cells = read_label_image(tmp_path / "masks" / f"{image_id}_cell_mask.png")
        nuclei = read_label_image(tmp_path / "masks" / f"{image_id}_nuclei_mask.png")
        with Image.open(tmp_path / "masks" / f"{image_id}_cell_mask.png") as img:
            assert img.mode.startswith("I;16") and img.size == (512, 512)
        assert set(np.unique(nuclei)) == set(np.unique(cells))
        hits, n = recall_at(sample["cells"], cells)
        found, total = found + hits, total + n
    assert found >= 0.9 * total
    # a rerun skips what is done and says so
    segment(f"input={tmp_path / 'data'}", f"out={tmp_path / 'masks'}")
    assert "skipped 3 images whose two masks exist" in capsys.readouterr().out


def test_scanned_folder_non_square_8_bit_tif_and_hpa_command(tmp_path: Path) -> None:
    sample = write_image(tmp_path / "in", "a", 1, dtype=np.uint8, suffix=".tif")
    for channel in ("red", "green", "blue", "yellow"):  # crop every channel to 301 x 450 (not divisible by 4)
        path = tmp_path / "in" / f"a_{channel}.tif"
        Image.fromarray(np.asarray(Image.open(path))[:301, 30:480]).save(path)
    done = subprocess.run([sys.executable, "-m", "hpa_lightning.commands", "segment", f"input={tmp_path / 'in'}",
                           f"out={tmp_path / 'm'}", "workers=1"], capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    cells = read_label_image(tmp_path / "m" / "a_cell_mask.png")
    assert cells.shape == (301, 450) and cells.max() >= 1
    assert sample["cells"].shape == (512, 512)


def test_an_image_without_cells_is_one_line_or_skipped_and_listed(tmp_path: Path, capsys) -> None:
    write_image(tmp_path / "in", "good", 2, size=256)
    for channel in ("red", "green", "blue", "yellow"):
        Image.fromarray(np.full((256, 256), 9, np.uint16)).save(tmp_path / "in" / f"empty_{channel}.png")
    with pytest.raises(SystemExit) as exit_:
        segment(f"input={tmp_path / 'in'}", f"out={tmp_path / 'm'}")
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "empty_blue.png: no cell found" in err
    assert not (tmp_path / "m" / "empty_cell_mask.png").exists()
    segment(f"input={tmp_path / 'in'}", f"out={tmp_path / 'm'}", "on_bad_sample=skip")
    out = capsys.readouterr().out
    assert "left out 1 bad images" in out and "empty" in out
    assert "empty," in (tmp_path / "m" / "segment_skipped.csv").read_text()
    assert (tmp_path / "m" / "good_cell_mask.png").is_file()


@pytest.mark.parametrize(("args", "expected"), [
    (["method=watershed"], "method=watershed"),
    (["scale=0"], "scale"),
    (["on_bad_sample=ignore"], "on_bad_sample"),
    (["method=hpacellseg"], "nuclei_model=PATH"),
    (["method=hpacellseg", "nuclei_model=/nonexistent/n.pth", "cell_model=/nonexistent/c.pth"], "never downloads"),
])
def test_bad_arguments_are_one_line_and_nothing_is_written(tmp_path: Path, capsys, args: list[str],
                                                           expected: str) -> None:
    write_image(tmp_path / "in", "a", 0, size=64)
    with pytest.raises(SystemExit) as exit_:
        segment(f"input={tmp_path / 'in'}", f"out={tmp_path / 'm'}", *args)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and expected in err
    assert not (tmp_path / "m").exists()


def test_a_corrupt_channel_file_is_named(tmp_path: Path, capsys) -> None:
    write_image(tmp_path / "in", "a", 0, size=64)
    (tmp_path / "in" / "a_red.png").write_bytes(b"not a png")
    with pytest.raises(SystemExit):
        segment(f"input={tmp_path / 'in'}", f"out={tmp_path / 'm'}")
    assert "a_red.png: cannot decode" in capsys.readouterr().err
    assert not (tmp_path / "m").exists() or not list((tmp_path / "m").glob("*.png"))
