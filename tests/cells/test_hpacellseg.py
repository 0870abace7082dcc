"""method=hpacellseg against a fake `hpacellseg` package put on sys.path by the test (the real one is not installed):
its refusals (no package, missing weight paths, untrusted weights), the calls it makes and the size of its masks."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from hpa_lightning.cells.hpacellseg import INSTALL, check_weights, load_segmenter
from hpa_lightning.errors import DataError, UnsafeTargetError, UsageError

FAKE = {
    "__init__.py": "CALLS = []\n",
    "cellsegmentator.py": """
        import numpy as np
        import hpacellseg

        class CellSegmentator:
            def __init__(self, nuclei_model, cell_model, scale_factor=0.25, device="cuda", padding=False,
                         multi_channel_model=True):
                hpacellseg.CALLS.append(("init", type(nuclei_model).__name__, type(cell_model).__name__,
                                         scale_factor, device, padding, multi_channel_model))
                self.scale_factor = scale_factor

            def pred_nuclei(self, images):
                hpacellseg.CALLS.append(("pred_nuclei", [image.shape for image in images]))
                # like upstream's cv2.resize((shape[0], shape[1])): width and height swapped for non-square images
                return [np.zeros((image.shape[1], image.shape[0], 3), np.uint8) for image in images]

            def pred_cells(self, images):
                hpacellseg.CALLS.append(("pred_cells", [[image.shape for image in channel] for channel in images]))
                return [np.zeros((image.shape[1], image.shape[0], 3), np.uint8) for image in images[0]]
    """,
    "utils.py": """
        import numpy as np
        import hpacellseg

        def label_cell(nuclei_pred, cell_pred):
            hpacellseg.CALLS.append(("label_cell", nuclei_pred.shape, cell_pred.shape))
            h, w = nuclei_pred.shape[:2]
            cells = np.zeros((h // 4, w // 4), np.uint8)  # a reduced-size answer: brought back to the image's size
            cells[2:8, 2:8], cells[10:14, 3:9] = 1, 2
            nuclei = np.zeros_like(cells)
            nuclei[4:6, 4:6], nuclei[11:13, 4:6] = 1, 2
            nuclei[0, 0] = 3  # a nucleus outside every cell is dropped
            return nuclei, cells
    """,
}


@pytest.fixture
def fake_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    package = tmp_path / "site" / "hpacellseg"
    package.mkdir(parents=True)
    for name, text in FAKE.items():
        (package / name).write_text(textwrap.dedent(text))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    for name in [m for m in sys.modules if m.split(".")[0] == "hpacellseg"]:
        monkeypatch.delitem(sys.modules, name)
    yield
    for name in [m for m in sys.modules if m.split(".")[0] == "hpacellseg"]:
        sys.modules.pop(name)


@pytest.fixture
def weights(tmp_path: Path) -> tuple[Path, Path]:
    paths = tmp_path / "nuclei.pth", tmp_path / "cell.pth"
    for path in paths:
        torch.save(torch.nn.Conv2d(3, 3, 1), path)  # a whole pickled model, as upstream's files are
    return paths


def test_untrusted_or_missing_weights_are_refused_before_loading(weights: tuple[Path, Path], fake_package) -> None:
    nuclei, cell = map(str, weights)
    with pytest.raises(UnsafeTargetError, match="pickled model.*runs code.*trust_weights="):
        check_weights(nuclei, cell, "")
    with pytest.raises(UnsafeTargetError, match="cell_model"):
        check_weights(nuclei, cell, nuclei)  # trusting one file trusts only that one
    with pytest.raises(DataError, match="never downloads"):
        check_weights(nuclei, str(Path(cell).with_name("absent.pth")), f"{nuclei},{cell}")
    with pytest.raises(UsageError, match="nuclei_model=PATH"):
        check_weights("", cell, cell)
    import hpacellseg

    assert hpacellseg.CALLS == []  # nothing of the package ran


def test_without_the_package_one_line_says_how_to_install(weights: tuple[Path, Path],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "hpacellseg", None)  # import fails as if not installed
    nuclei, cell = map(str, weights)
    with pytest.raises(UsageError) as err:
        load_segmenter(nuclei, cell, f"{nuclei},{cell}")
    assert INSTALL in str(err.value) and "\n" not in str(err.value)


def test_call_sequence_and_masks_at_the_original_size(weights: tuple[Path, Path], fake_package,
                                                      tmp_path: Path) -> None:
    nuclei, cell = map(str, weights)
    link = tmp_path / "link.pth"
    link.symlink_to(weights[1])  # trusted by resolved path: the link names the same file
    segmenter = load_segmenter(nuclei, str(link), f" {nuclei} , {weights[1]}", scale=0.25, device="cpu")
    blue, red, yellow = (np.full((72, 100), value, np.uint8) for value in (1, 2, 3))
    cells, nuclei_mask = segmenter(blue, red, yellow)
    import hpacellseg

    assert [call[0] for call in hpacellseg.CALLS] == ["init", "pred_nuclei", "pred_cells", "label_cell"]
    assert hpacellseg.CALLS[0] == ("init", "Conv2d", "Conv2d", 0.25, "cpu", True, True)
    assert hpacellseg.CALLS[1] == ("pred_nuclei", [(72, 100)])
    assert hpacellseg.CALLS[2] == ("pred_cells", [[(72, 100)], [(72, 100)], [(72, 100)]])
    assert cells.shape == nuclei_mask.shape == (72, 100)
    assert set(np.unique(cells)) == {0, 1, 2} and set(np.unique(nuclei_mask)) == {0, 1, 2}
    inside = nuclei_mask > 0
    assert (cells[inside] == nuclei_mask[inside]).all()
