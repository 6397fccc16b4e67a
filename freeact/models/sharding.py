"""Splitting a state dict into the shard files of a checkpoint (used by every checkpoint writer)."""
from __future__ import annotations


def shard_groups(tensors: dict, max_shard_mb: float) -> list[dict]:
    """``tensors`` split, in order, into groups of at most ``max_shard_mb`` MB each (a tensor larger
    than that gets a group of its own): the files of a sharded checkpoint."""
    shards, size = [{}], 0
    for k, v in tensors.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > max_shard_mb * 1e6:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    return shards
