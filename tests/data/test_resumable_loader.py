"""The training loader stopped after any batch and resumed in a fresh process delivers exactly the batches the
uninterrupted loader would have, and draws nothing from the process's generators doing so. The oracle is the
uninterrupted loader itself, for every kind of sampler and reader this project builds."""

from __future__ import annotations

import io

import pytest
import torch
from torch.utils.data import Dataset, DistributedSampler, WeightedRandomSampler

from hpa_lightning.data.loader import ThreadedDataLoader
from hpa_lightning.errors import ConfigError

SAMPLES, BATCH = 37, 4


class Indices(Dataset):
    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor(i)


def make_loader(sampler: str, reader: str) -> ThreadedDataLoader:
    kwargs: dict = {"batch_size": BATCH, "drop_last": sampler != "weighted"}
    if sampler == "shuffle":
        kwargs["shuffle"] = True
    elif sampler == "generator":
        kwargs.update(shuffle=True, generator=torch.Generator().manual_seed(7))
    elif sampler == "weighted":
        kwargs["sampler"] = WeightedRandomSampler(torch.linspace(0.1, 1.0, SAMPLES), num_samples=45, replacement=True)
    elif sampler == "distributed":
        kwargs["sampler"] = DistributedSampler(Indices(), num_replicas=3, rank=1, shuffle=True, seed=5)
        kwargs["sampler"].set_epoch(4)
    threads = {"threads": 2, "processes": 0, "main": 0}[reader]
    workers = {"threads": 0, "processes": 2, "main": 0}[reader]
    return ThreadedDataLoader(Indices(), read_threads=threads, num_workers=workers, **kwargs)


def batches(iterator, count: int | None = None) -> list[list[int]]:
    out = []
    for batch in iterator:
        out.append(batch.tolist())
        if count is not None and len(out) == count:
            break
    return out


SAMPLERS = ["shuffle", "generator", "weighted", "distributed"]
READERS = ["threads", "processes", "main"]


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_resumed_epoch_delivers_the_rest_of_the_uninterrupted_one_and_draws_nothing(sampler: str,
                                                                                     reader: str) -> None:
    torch.manual_seed(0)
    straight = make_loader(sampler, reader)
    epochs = [batches(straight), batches(straight)]  # two epochs, as an uninterrupted run draws them
    stop = 2
    torch.manual_seed(0)
    interrupted = make_loader(sampler, reader)
    assert batches(interrupted, stop) == epochs[0][:stop]
    buffer = io.BytesIO()
    torch.save(interrupted.state_dict(), buffer)  # through a checkpoint file, loadable with weights_only
    at_checkpoint = torch.get_rng_state()

    torch.manual_seed(123)  # a fresh process: another state until the checkpoint's RNG states are restored
    resumed = make_loader(sampler, reader)
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    torch.set_rng_state(at_checkpoint)  # RNGState's restore
    rest = batches(resumed)
    assert rest == epochs[0][stop:]
    assert torch.equal(torch.get_rng_state(), at_checkpoint), "resuming drew from the global generator"
    assert batches(resumed) == epochs[1], "the epoch after the resumed one differs"


def test_a_finished_epoch_is_not_replayed() -> None:
    torch.manual_seed(0)
    loader = make_loader("shuffle", "threads")
    first = batches(loader)
    state = loader.state_dict()
    assert state["delivered"] == state["batches"] == len(first)
    second = batches(loader)
    torch.manual_seed(0)
    fresh = make_loader("shuffle", "threads")
    batches(fresh)
    fresh.load_state_dict(state)  # an epoch-end checkpoint
    assert batches(fresh) == second


def test_unstarted_loader_has_nothing_to_resume() -> None:
    loader = make_loader("shuffle", "threads")
    assert loader.state_dict() == {}
    loader.load_state_dict({})
    assert len(batches(loader)) == SAMPLES // BATCH


def test_resuming_with_other_data_settings_is_one_clear_error() -> None:
    torch.manual_seed(0)
    loader = make_loader("shuffle", "threads")
    batches(loader, 2)
    state = loader.state_dict()
    other = ThreadedDataLoader(Indices(), batch_size=BATCH * 2, shuffle=True, read_threads=2)
    other.load_state_dict(state)
    with pytest.raises(ConfigError, match="had 9 batches, this loader draws 5; resume with the run's data.batch_size"):
        batches(other)


def test_len_and_samplers_stay_the_dataloaders_own() -> None:
    loader = make_loader("weighted", "threads")
    assert len(loader) == 12 and isinstance(loader.sampler, WeightedRandomSampler)
    assert loader.batch_sampler.batch_size == BATCH
