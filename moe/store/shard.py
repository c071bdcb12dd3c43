"""One expert version as one self-describing safetensors shard: weights, routing entry and metadata.

Everything needed to rebuild and trust the expert is in the file: the tenant and its labels, the trunk
fingerprint it was trained on, the architecture, a version, and a sha256 of the tensors. Loading checks all
of it before anything is used, and never unpickles.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import os
import stat
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from moe import __version__
from moe.model.kinds import Architecture
from moe.trunk.base import hash_tensors

FORMAT = "moe.expert/1"


class ShardError(ValueError):
    """A shard that can not be trusted; the message names the file and the reason."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"expert shard {path}: {reason}")
        self.path, self.reason = str(path), reason


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class ExpertMeta:
    tenant: str
    labels: tuple[str, ...]
    trunk_fingerprint: str
    architecture: Architecture  # a mapping in a shard's metadata format is read as one (`Architecture.from_dict`)
    version: int = 1
    created: str = field(default_factory=_now)
    package_version: str = __version__
    metrics: dict[str, float | str] = field(default_factory=dict)  # figures, and how it was grown (`growth_method`)

    def __post_init__(self):
        object.__setattr__(self, "architecture", Architecture.from_dict(self.architecture))

    def with_version(self, version: int) -> ExpertMeta:
        return replace(self, version=version)

    def to_dict(self) -> dict[str, Any]:
        return {
            "tenant": self.tenant,
            "labels": list(self.labels),
            "trunk_fingerprint": self.trunk_fingerprint,
            "architecture": self.architecture.to_dict(),
            "version": self.version,
            "created": self.created,
            "package_version": self.package_version,
            "metrics": self.metrics,
        }

    def to_strings(self, tensors_sha256: str) -> dict[str, str]:
        values = self.to_dict() | {"format": FORMAT, "tensors_sha256": tensors_sha256}
        strings = {k: v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in values.items()}
        return strings | {"metadata_sha256": metadata_sha256(strings)}

    @classmethod
    def from_strings(cls, strings: dict[str, str]) -> ExpertMeta:
        decoded: dict[str, Any] = {k: strings[k] for k in ("tenant", "trunk_fingerprint", "created", "package_version")}
        decoded |= {k: json.loads(strings[k]) for k in ("labels", "architecture", "version", "metrics")}
        decoded["labels"] = tuple(decoded["labels"])
        meta = cls(**decoded)  # the architecture checked as it is read (`Architecture.from_dict`)
        if not (
            all(isinstance(label, str) for label in meta.labels)
            and isinstance(meta.version, int)
            and isinstance(meta.metrics, dict)
        ):
            raise TypeError(f"labels {meta.labels!r}, version {meta.version!r} or metrics {meta.metrics!r} invalid")
        return meta


def metadata_sha256(strings: dict[str, str]) -> str:
    """A sha256 of every metadata entry but itself: a flipped byte anywhere in the header is caught."""
    entries = {k: v for k, v in strings.items() if k != "metadata_sha256"}
    return hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()


def expected_shapes(architecture: Architecture | Mapping, num_labels: int) -> dict[str, tuple[int, ...]]:
    """The tensors an expert of this architecture must hold, by name (`Architecture.shapes`)."""
    return Architecture.from_dict(architecture).shapes(num_labels)


def weight_names(architecture: Architecture | Mapping) -> tuple[str, ...]:
    """The tensors an expert of this architecture computes with (paged in: `Architecture.weight_names`)."""
    return Architecture.from_dict(architecture).weight_names()


def meta_dtype(meta: ExpertMeta) -> torch.dtype:
    """The dtype every tensor of `meta`'s shard is stored in."""
    return meta.architecture.torch_dtype


def tensor_bytes(meta: ExpertMeta, names: tuple[str, ...]) -> int:
    """Bytes the named tensors of `meta`'s shard hold, from its metadata alone."""
    shapes = meta.architecture.shapes(len(meta.labels))
    return sum(math.prod(shapes[name]) * meta_dtype(meta).itemsize for name in names)


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    hash_tensors(digest, tensors, separator="|")
    return digest.hexdigest()


def check_tensors(
    path: str | Path, meta: ExpertMeta, tensors: Mapping[str, torch.Tensor], complete: bool = True
) -> None:
    """That `tensors` are what `meta`'s architecture implies: every one of them and no other (`complete`; else only
    those given are checked), each of its shape and dtype, and finite (`check_finite`). A ShardError naming `path`
    and the first problem."""
    shapes, dtype = meta.architecture.shapes(len(meta.labels)), meta_dtype(meta)
    if complete and (missing := sorted(set(shapes) - set(tensors))):
        raise ShardError(path, f"missing tensors {missing}")
    if extra := sorted(set(tensors) - set(shapes)):
        raise ShardError(path, f"unexpected tensors {extra}")
    for name in [name for name in shapes if name in tensors]:
        tensor = tensors[name]
        if tuple(tensor.shape) != shapes[name]:
            raise ShardError(path, f"tensor {name} has shape {tuple(tensor.shape)}, metadata implies {shapes[name]}")
        if tensor.dtype != dtype:
            raise ShardError(path, f"tensor {name} has dtype {tensor.dtype}, metadata says {dtype}")
    check_finite(path, tensors)


def check_finite(path: str | Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """Every floating tensor finite: a ShardError naming `path` and the first tensor holding a NaN or an infinity
    (a training bug or a bad conversion writes such a shard with checksums that match)."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise ShardError(path, f"tensor {name} holds {bad} non-finite values (NaN or infinity)")


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _new_file_mode(path: Path) -> int:
    """The mode a file created at `path` gets under the umask (0o666 & ~umask), read from one created there (read,
    not computed: `os.umask` can only be read by changing it, for every thread)."""
    path.unlink(missing_ok=True)  # a leftover keeps its own mode
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        return stat.S_IMODE(os.fstat(fd).st_mode)
    finally:
        os.close(fd)


def save_atomically(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """A safetensors file written whole or not at all: a temporary file beside the target, fsynced, renamed over,
    the folder fsynced. It gets the permissions any new file gets under the umask (safetensors alone would make it
    0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        mode = _new_file_mode(tmp)
        save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, mode)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return path


def write_shard(path: str | Path, tensors: dict[str, torch.Tensor], meta: ExpertMeta) -> Path:
    """An expert's shard, its tensors checked against its architecture, written atomically (`save_atomically`)."""
    shapes = meta.architecture.shapes(len(meta.labels))
    if (got := {k: tuple(v.shape) for k, v in tensors.items()}) != shapes:
        raise ShardError(path, f"refusing to write tensors {got}; the architecture needs {shapes}")
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    check_finite(path, tensors)  # refused at write too: training can not leave a NaN expert behind
    return save_atomically(path, tensors, meta.to_strings(tensors_sha256(tensors)))


def read_meta(path: str | Path) -> tuple[ExpertMeta, str]:
    """The metadata and recorded tensor checksum, from the header alone (cheap; checks the format)."""
    path = Path(path)
    if not path.is_file():
        raise ShardError(path, "file not found")
    try:
        with safe_open(path, framework="pt") as handle:
            strings = handle.metadata() or {}
    except (SafetensorError, OSError) as error:
        raise ShardError(path, f"truncated or not a safetensors file ({error})") from None
    return meta_from_strings(path, strings)


def meta_from_strings(path: str | Path, strings: dict[str, str]) -> tuple[ExpertMeta, str]:
    """`read_meta`'s checks of a header's metadata strings (read from `path`, which errors name)."""
    if strings.get("format") != FORMAT:
        raise ShardError(path, f"format {strings.get('format')!r} is not {FORMAT!r}")
    if strings.get("metadata_sha256") != metadata_sha256(strings):
        raise ShardError(path, "metadata checksum mismatch: the header's metadata was altered or corrupted")
    try:
        return ExpertMeta.from_strings(strings), strings["tensors_sha256"]
    except (KeyError, TypeError, ValueError) as error:  # json.JSONDecodeError is a ValueError
        raise ShardError(path, f"malformed metadata ({type(error).__name__}: {error})") from None


def read_shard(path: str | Path, trunk_fingerprint: str | None = None) -> tuple[dict[str, torch.Tensor], ExpertMeta]:
    """Load and check a shard: format, metadata, tensor names, shapes, dtypes, checksum and trunk."""
    path = Path(path)
    meta, recorded = read_meta(path)
    if trunk_fingerprint is not None and meta.trunk_fingerprint != trunk_fingerprint:
        raise ShardError(
            path,
            f"trained on trunk {meta.trunk_fingerprint[:12]}…, not on this model's trunk {trunk_fingerprint[:12]}…",
        )
    tensors = read_tensors(path)
    check_tensors(path, meta, tensors)
    if (actual := tensors_sha256(tensors)) != recorded:
        raise ShardError(path, f"checksum mismatch: tensors hash to {actual[:12]}…, metadata records {recorded[:12]}…")
    return tensors, meta


# safetensors' dtype names, for the tensors a shard may hold
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
}
ALIGN = 64  # bytes: every tensor of a flat buffer starts on a boundary any dtype can view


class Packed(dict):
    """Tensors as views of one flat byte buffer: one allocation, and one copy to move them between host and device
    (instead of one small copy per tensor). `read_tensors` reads a shard straight into one; the pager moves it."""

    def __init__(self, flat: torch.Tensor, layout: list[tuple[str, torch.dtype, tuple[int, ...], int, int]]):
        super().__init__({n: flat[o : o + size].view(dtype).view(shape) for n, dtype, shape, o, size in layout})
        self.flat, self.layout = flat, layout

    @staticmethod
    def size(nbytes: int) -> int:
        """`nbytes` rounded up to the alignment: the room a tensor takes in the buffer."""
        return -(-nbytes // ALIGN) * ALIGN

    @classmethod
    def pack(cls, tensors: dict[str, torch.Tensor], pin: bool = False) -> Packed:
        layout, offset = [], 0
        for name, t in tensors.items():
            size = t.numel() * t.element_size()
            layout.append((name, t.dtype, tuple(t.shape), offset, size))
            offset += cls.size(size)
        packed = cls(torch.empty(offset, dtype=torch.uint8, pin_memory=pin), layout)
        for name, t in tensors.items():
            packed[name].copy_(t)
        return packed

    def to(self, device: torch.device, pin: bool = False) -> Packed:
        if device.type == "cpu":
            flat = torch.empty(self.flat.shape, dtype=torch.uint8, pin_memory=pin)
            flat.copy_(self.flat)
        else:
            flat = self.flat.to(device, non_blocking=self.flat.is_pinned())
        return Packed(flat, self.layout)


def read_tensors(
    path: str | Path, names: tuple[str, ...] | None = None, handle: BinaryIO | None = None, size: int | None = None
) -> Packed:
    """Named tensors of a shard (all by default), read straight from the file into one buffer of their own (`Packed`:
    the pager moves it as it is). `handle` (and its `size` in bytes): an open file of the shard to read instead,
    such as an object store's file, where each read is a ranged request (`path` then only names it in errors).

    No check beyond the layout: `read_shard` verifies, and the pager calls this for a file verified and
    unchanged since. One allocation and one read per tensor, and no mapping of the file: `safe_open` keeps a
    little memory alive per `get_tensor` (about 3 KB of resident memory per shard read, measured with
    safetensors 0.8), which a pager reading shards all day can not afford."""
    try:
        with nullcontext(handle) if handle is not None else open(path, "rb", buffering=0) as handle:
            file_size = size if size is not None else os.fstat(handle.fileno()).st_size
            header_size = int.from_bytes(handle.read(8), "little")
            if not 2 <= header_size <= file_size - 8:
                raise ValueError(f"header size {header_size} does not fit the file")
            header = json.loads(handle.read(header_size))
            data_size = file_size - 8 - header_size
            wanted = names if names is not None else tuple(k for k in header if k != "__metadata__")
            if missing := [name for name in wanted if name not in header]:
                raise ValueError(f"no tensor {missing} in the header")
            layout, total = [], 0
            for name in wanted:
                dtype, shape, (start, end) = _entry(header[name], name, data_size)
                layout.append((name, dtype, shape, total, 8 + header_size + start, end - start))
                total += Packed.size(end - start)
            flat = torch.empty(total, dtype=torch.uint8)
            buffer = memoryview(flat.numpy())  # type: ignore[arg-type]  # numpy arrays are buffers
            for name, _, _, offset, position, size in layout:
                handle.seek(position)
                done = 0
                while done < size:  # a single read may return less (at most about 2 GiB on Linux)
                    got = handle.readinto(buffer[offset + done : offset + size])
                    if not got:
                        raise ValueError(f"file ends inside tensor {name}")
                    done += got
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise ShardError(path, f"truncated or unreadable tensor data ({error})") from None
    return Packed(flat, [(name, dtype, shape, o, size) for name, dtype, shape, o, _, size in layout])


def _entry(entry: Any, name: str, data_size: int) -> tuple[torch.dtype, tuple[int, ...], tuple[int, int]]:
    """A header entry's dtype, shape and byte range, checked against each other and the data section."""
    if not isinstance(entry, dict) or entry.get("dtype") not in SAFETENSORS_DTYPES:
        raise ValueError(
            f"tensor {name}: entry {entry!r} has no dtype this reader knows ({sorted(SAFETENSORS_DTYPES)})"
        )
    dtype, shape, offsets = SAFETENSORS_DTYPES[entry["dtype"]], entry.get("shape"), entry.get("data_offsets")
    if not (isinstance(shape, list) and all(isinstance(n, int) and n >= 0 for n in shape)):
        raise ValueError(f"tensor {name}: shape {shape!r} is not a list of sizes")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        raise ValueError(f"tensor {name}: data_offsets {offsets!r} are not two integers")
    start, end = offsets
    if not 0 <= start <= end <= data_size:
        raise ValueError(f"tensor {name}: bytes {start}..{end} outside the data section of {data_size} bytes")
    if end - start != torch.Size(shape).numel() * dtype.itemsize:
        raise ValueError(f"tensor {name}: {end - start} bytes for shape {tuple(shape)} of {dtype}")
    return dtype, tuple(shape), (start, end)
