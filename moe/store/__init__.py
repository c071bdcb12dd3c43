"""Experts on disk: self-describing safetensors shards and the store that versions them."""

from moe.store.assemble import architecture, expert_shards, save_gate
from moe.store.shard import ExpertMeta, ShardError, expected_shapes, read_meta, read_shard, read_tensors, write_shard
from moe.store.store import ExpertStore, ShardRecord, check_tenant_name

__all__ = [
    "ExpertMeta",
    "ExpertStore",
    "ShardError",
    "ShardRecord",
    "architecture",
    "check_tenant_name",
    "expected_shapes",
    "expert_shards",
    "read_meta",
    "read_shard",
    "read_tensors",
    "save_gate",
    "write_shard",
]
