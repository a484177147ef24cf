"""babymerge.distributed: a plain run, and what torchrun's environment sets up."""

import datetime

import torch

from babymerge import distributed


def test_single_process_without_torchrun_is_a_world_of_one(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    world = distributed.setup("cpu")
    assert (world.rank, world.world_size, world.local_rank) == (0, 1, 0)
    assert world.is_main and not world.distributed and world.device == torch.device("cpu")
    value = torch.tensor([3.0])
    assert distributed.mean_over_ranks(value, world) is value


def test_torchrun_group_waits_long_enough_for_rank_0_to_tokenise(monkeypatch):
    """Under torchrun the other ranks wait at a barrier while rank 0 tokenises the corpus; the
    group's timeout must outlast that (NCCL's default is 10 minutes)."""
    seen = {}
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda **kw: seen.update(kw))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    world = distributed.setup("cpu")
    assert world.rank == 1 and world.local_rank == 1 and world.distributed
    assert seen["backend"] == "gloo" and seen["rank"] == 1 and seen["world_size"] == 2
    assert seen["timeout"] >= datetime.timedelta(minutes=30)


def test_cuda_device_per_local_rank_and_clear_errors(monkeypatch):
    import pytest

    from babymerge.config import InputError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert distributed.resolve_device("cuda") == torch.device("cuda", 1)
    assert distributed.resolve_device("auto") == torch.device("cuda", 1)
    # an explicit GPU under torchrun would put every rank of the node on it
    with pytest.raises(InputError, match="--device cuda:0: torchrun started 2 processes"):
        distributed.resolve_device("cuda:0")
    # more processes than GPUs: named, not CUDA's "invalid device ordinal"
    monkeypatch.setenv("LOCAL_RANK", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    with pytest.raises(InputError, match="GPU 2 does not exist.*LOCAL_RANK is 2"):
        distributed.resolve_device("cuda")
    # a plain run may pick any GPU
    monkeypatch.delenv("LOCAL_RANK")
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert distributed.resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(InputError, match="GPU 5 does not exist"):
        distributed.resolve_device("cuda:5")
