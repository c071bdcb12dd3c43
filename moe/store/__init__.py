"""Experts on disk: self-describing safetensors shards and the store that versions them (locally, or at an fsspec URL
through a local cache)."""

from moe.store.assemble import architecture, expert_shards, save_gate
from moe.store.remote import RemoteStore, is_url, mirror_bundle, open_store
from moe.store.shard import (
    ExpertMeta,
    ShardError,
    expected_shapes,
    read_meta,
    read_shard,
    read_tensors,
    tensor_bytes,
    write_shard,
)
from moe.store.store import ExpertStore, ShardRecord, check_tenant_name
from moe.store.trunks import TrunkVersions

__all__ = [
    "ExpertMeta",
    "ExpertStore",
    "RemoteStore",
    "ShardError",
    "ShardRecord",
    "TrunkVersions",
    "architecture",
    "check_tenant_name",
    "expected_shapes",
    "expert_shards",
    "is_url",
    "mirror_bundle",
    "open_store",
    "read_meta",
    "read_shard",
    "read_tensors",
    "save_gate",
    "tensor_bytes",
    "write_shard",
]
