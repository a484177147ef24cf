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
