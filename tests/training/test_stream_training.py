"""Training from the streaming store in a real loopback S3 server (moto, plain http), end to end through the entry
point: the memmap store's metrics for the same seed, two DDP ranks with disjoint equal shares, and SIGTERM mid-epoch
then resume reading exactly the samples not yet seen. Marked `s3` (make test-s3; CI runs it)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from hpa_lightning.data.split import load_split
from hpa_lightning.data.store import PackedStore
from hpa_lightning.data.stream_pack import pack_stream
from tests.conftest import REPO, run_train
from tests.data.s3_server import s3_server  # noqa: F401 - the fixture
from tests.training.recorders import read_rows
from tests.training.test_resume import resume_without_fault

pytestmark = [pytest.mark.slow, pytest.mark.s3]
TINY = ["+experiment=focal_g02", "+preset=tiny", "trainer.max_epochs=2"]
RECORD = "+callbacks.rows._target_=tests.training.recorders.RecordTrainRows"


@pytest.fixture(scope="module")
def memmap_run(tmp_path_factory: pytest.TempPathFactory, shared_cache: Path) -> Path:
    """The tiny run from the memmap store, unshuffled (data.shuffle=false) so that a stream can be compared batch by
    batch."""
    run = tmp_path_factory.mktemp("memmap") / "run"
    proc = run_train([*TINY, "data.shuffle=false", f"hydra.run.dir={run}"], shared_cache, REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


@pytest.fixture(scope="module")
def stream_url(memmap_run: Path, s3_server) -> str:  # noqa: F811
    """The memmap run's store packed into the loopback object store."""
    results = json.loads((memmap_run / "results.json").read_text())
    store = PackedStore.open(results["data"]["store"])
    split = load_split(Path(results["data"]["store"]) / "splits" / "seed42-val0.1-test0.1", store)
    return pack_stream(store, split, s3_server.url("tiny"), workers=2, progress=False)


def test_training_from_the_object_store_gives_the_memmap_stores_metrics(memmap_run: Path, stream_url: str,
                                                                        tmp_path: Path, shared_cache: Path) -> None:
    run = tmp_path / "stream"
    proc = run_train([*TINY, "data.shuffle=false", f"data.store={stream_url}", f"hydra.run.dir={run}"], shared_cache,
                     REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected, got = (json.loads((folder / "results.json").read_text()) for folder in (memmap_run, run))
    assert got["data"]["store"] == stream_url and got["data"]["split"] == expected["data"]["split"]
    for key in ("val", "test", "thresholds"):
        assert got[key] == expected[key], key
    for name in ("test_predictions.csv", "val_predictions.csv", "split.csv"):
        assert (run / name).read_text() == (memmap_run / name).read_text(), name
    pd.testing.assert_frame_equal(pd.read_csv(memmap_run / "metrics.csv"), pd.read_csv(run / "metrics.csv"))


def test_two_ddp_ranks_stream_disjoint_equal_shares(stream_url: str, tmp_path: Path, shared_cache: Path) -> None:
    """192 train samples, batches of 16, 2 ranks: each rank floor(floor(192 / 16) / 2) = 6 batches, every sample once
    per epoch (the remainder rule, drop_last: fewer than ranks x batch size samples are left out, here none).
    Validation and test in batches of 4: each rank its share, every sample on one rank."""
    run = tmp_path / "ddp"
    proc = run_train([*TINY, "trainer=ddp_cpu", f"data.store={stream_url}", "data.eval_batch_size=4",
                      f"hydra.run.dir={run}", RECORD, f"+callbacks.rows.out={run / 'rows'}"], shared_cache, REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    split = pd.read_csv(run / "split.csv")
    train = set(split.index[split["split"] == "train"])
    ranks = [read_rows(run / "rows" / f"rows_rank{rank}.txt") for rank in (0, 1)]
    for epoch in (0, 1):
        shares = [[row for e, _, rows in batches if e == epoch for row in rows] for batches in ranks]
        counts = [sum(1 for e, _, _ in batches if e == epoch) for batches in ranks]
        assert counts[0] == counts[1] == (len(train) // 16) // 2
        assert not set(shares[0]) & set(shares[1])
        assert all(len(share) == len(set(share)) for share in shares)
        union = set(shares[0]) | set(shares[1])
        assert union <= train and len(train - union) < 2 * 16
    for stage in ("val", "test"):
        expected = set(split.index[split["split"] == stage])
        ranks = [read_rows(run / "rows" / f"{stage}_rows_rank{rank}.txt") for rank in (0, 1)]
        epochs = sorted({e for e, _, _ in ranks[0]})
        assert len(epochs) >= (2 if stage == "val" else 1), epochs  # a validation per epoch (and the final one)
        for epoch in epochs:
            shares = [[row for e, _, rows in batches if e == epoch for row in rows] for batches in ranks]
            assert all(shares) and not set(shares[0]) & set(shares[1]), (stage, epoch)
            assert sorted(shares[0] + shares[1]) == sorted(expected), (stage, epoch)
    results = json.loads((run / "results.json").read_text())
    predictions = pd.read_csv(run / "test_predictions.csv")
    assert predictions["Id"].is_unique and results["test"]["n_samples"] == int((split["split"] == "test").sum())
    assert set(predictions["Id"]) == set(split.loc[split["split"] == "test", "Id"])


def test_sigterm_mid_epoch_then_resume_reads_exactly_the_samples_not_yet_seen(stream_url: str, tmp_path: Path,
                                                                              shared_cache: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HPA_TRUST_TARGETS", "tests.training.recorders.RecordTrainRows")  # resume rebuilds the recorder
    args = [*TINY, "trainer.max_epochs=3", f"data.store={stream_url}", RECORD]
    straight = tmp_path / "straight"
    proc = run_train([*args, f"hydra.run.dir={straight}", f"+callbacks.rows.out={straight / 'rows'}"], shared_cache,
                     REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "preempted"
    proc = run_train([*args, f"hydra.run.dir={run}", f"+callbacks.rows.out={run / 'rows'}",
                      "+callbacks.fault._target_=tests.training.faults.SignalAt", "+callbacks.fault.step=18"],
                     shared_cache, REPO)
    assert proc.returncode == 143, proc.stderr[-2000:]
    before = read_rows(run / "rows" / "rows_rank0.txt")
    assert before[-1][:2] == (1, 18)  # epoch 1, step 18 of 12 per epoch
    proc = resume_without_fault(run, shared_cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = read_rows(run / "rows" / "rows_rank0.txt")[len(before):]
    expected = read_rows(straight / "rows" / "rows_rank0.txt")
    assert [rows for _, _, rows in before + after] == [rows for _, _, rows in expected]
    seen = {row for e, _, rows in before if e == 1 for row in rows}
    epoch_rows = {row for e, _, rows in expected if e == 1 for row in rows}
    assert {row for e, _, rows in after if e == 1 for row in rows} == epoch_rows - seen
