"""Experts on disk: self-describing safetensors shards and the store that versions them."""

from moe.store.assemble import architecture, expert_shards, mixture_from_shards, save_gate
from moe.store.shard import ExpertMeta, ShardError, expected_shapes, read_meta, read_shard, write_shard
from moe.store.store import ExpertStore, check_tenant_name

__all__ = [
    "ExpertMeta",
    "ExpertStore",
    "ShardError",
    "architecture",
    "check_tenant_name",
    "expected_shapes",
    "expert_shards",
    "mixture_from_shards",
    "read_meta",
    "read_shard",
    "save_gate",
    "write_shard",
]
