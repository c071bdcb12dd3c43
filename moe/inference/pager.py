"""ExpertPager: expert weights paged between device, host memory and disk, under byte budgets.

    device  the tier experts are computed on (a GPU, or CPU memory where there is none); LRU, byte budget
    host    CPU memory (pinned where CUDA is present) holding experts recently evicted or prefetched
    disk    the shard; reading it is the loader's job, and the pager never writes it

`acquire(keys)` makes a wave of experts resident on the device and pins them while the caller computes;
a wave must fit the device budget (`waves(keys)` cuts a batch's experts into such waves), and waits, never
overcommits, while other threads hold pins. All bookkeeping happens under one lock; computing does not.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from moe.inference.memory import fix_mmap_threshold
from moe.store.shard import Packed

Tensors = dict[str, torch.Tensor]


@dataclass
class TierStats:
    """Counters of one tier. A hit or miss is counted where a request was answered; `page_ins` are arrivals
    into this tier, with their bytes and latency."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    page_ins: int = 0
    bytes_in: int = 0
    seconds_in: float = 0.0
    latencies: deque = field(default_factory=lambda: deque(maxlen=10_000))

    def arrived(self, size: int, seconds: float) -> None:
        self.page_ins += 1
        self.bytes_in += size
        self.seconds_in += seconds
        self.latencies.append(seconds)

    def summary(self) -> dict[str, float]:
        ordered = sorted(self.latencies)
        pick = (lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]) if ordered else (lambda q: 0.0)
        return {
            "hits": self.hits,
            "misses": self.misses,
            "evictions": self.evictions,
            "page_ins": self.page_ins,
            "bytes_in": self.bytes_in,
            "page_in_s_mean": self.seconds_in / self.page_ins if self.page_ins else 0.0,
            "page_in_s_p50": pick(0.5),
            "page_in_s_p99": pick(0.99),
        }


class ExpertPager:
    """`load(key)` reads an expert's tensors from disk (CPU tensors); `register(key, size)` declares each
    expert and its size in bytes before use."""

    def __init__(
        self,
        load: Callable[[Hashable], Tensors],
        device: str | torch.device = "cpu",
        device_budget: int = 1 << 30,
        host_budget: int = 0,
        pin_memory: bool | None = None,
    ):
        self.load, self.device = load, torch.device(device)
        self.device_budget, self.host_budget = int(device_budget), int(host_budget)
        self.pin_memory = (self.device.type == "cuda") if pin_memory is None else pin_memory
        self.sizes: dict[Hashable, int] = {}
        self._device: OrderedDict[Hashable, Tensors] = OrderedDict()  # least recently used first
        self._host: OrderedDict[Hashable, Tensors] = OrderedDict()
        self._pins: Counter = Counter()
        self._lock = threading.Condition()
        self.stats = {"device": TierStats(), "host": TierStats(), "disk": TierStats()}
        self.peak_device_bytes = 0
        fix_mmap_threshold()

    # -- bookkeeping -------------------------------------------------------------------------------
    def register(self, key: Hashable, size: int) -> None:
        if size > self.device_budget:
            raise ValueError(
                f"expert {key!r} needs {size} bytes, more than the whole device budget {self.device_budget}"
            )
        with self._lock:
            self.sizes[key] = int(size)

    def resident_bytes(self, tier: str = "device") -> int:
        with self._lock:
            return sum(self.sizes[k] for k in (self._device if tier == "device" else self._host))

    def resident(self, tier: str = "device") -> list[Hashable]:
        with self._lock:
            return list(self._device if tier == "device" else self._host)

    def summary(self) -> dict[str, dict[str, float]]:
        with self._lock:
            return {tier: stats.summary() for tier, stats in self.stats.items()} | {
                "resident": {
                    "device_bytes": sum(self.sizes[k] for k in self._device),
                    "host_bytes": sum(self.sizes[k] for k in self._host),
                    "device_experts": len(self._device),
                    "peak_device_bytes": self.peak_device_bytes,
                }
            }

    def waves(self, keys: Sequence[Hashable]) -> list[list[Hashable]]:
        """Cut `keys` into waves that each fit the device budget. Experts already resident go first, so that
        paging in the rest never evicts one this batch is about to use."""
        with self._lock:
            keys = sorted(keys, key=lambda k: k not in self._device)  # stable: resident first, order kept
        waves, current, used = [], [], 0
        for key in keys:
            size = self.sizes[key]
            if current and used + size > self.device_budget:
                waves.append(current)
                current, used = [], 0
            current.append(key)
            used += size
        return waves + [current] if current else waves

    # -- moving experts between tiers (lock held) --------------------------------------------------
    def _to_device(self, tensors: Tensors) -> Tensors:
        if self.device.type == "cpu":
            return tensors  # host and device are the same memory: promotion moves a reference
        packed = tensors if isinstance(tensors, Packed) else Packed.pack(tensors, pin=self.pin_memory)
        return packed.to(self.device)

    def _to_host(self, tensors: Tensors) -> Tensors:
        if self.device.type == "cpu" and not self.pin_memory:
            return tensors
        packed = tensors if isinstance(tensors, Packed) else Packed.pack(tensors)
        return packed.to(torch.device("cpu"), pin=self.pin_memory)

    def _keep_on_host(self, key: Hashable, tensors: Tensors) -> None:
        size = self.sizes[key]
        if size > self.host_budget:
            return
        while self._host and sum(self.sizes[k] for k in self._host) + size > self.host_budget:
            self._host.popitem(last=False)
            self.stats["host"].evictions += 1
        start = time.perf_counter()
        self._host[key] = self._to_host(tensors)
        self.stats["host"].arrived(size, time.perf_counter() - start)

    def _free_bytes(self) -> int:
        return self.device_budget - sum(self.sizes[k] for k in self._device)

    def _evictable(self, keep: Sequence[Hashable]) -> list[Hashable]:
        """Unpinned device experts outside `keep`, least recently used first."""
        return [k for k in self._device if self._pins[k] == 0 and k not in keep]

    def _room_for(self, need: int, keep: Sequence[Hashable]) -> bool:
        """Whether `need` bytes fit on the device once every evictable expert outside `keep` is gone."""
        return need <= self._free_bytes() + sum(self.sizes[k] for k in self._evictable(keep))

    def _make_room(self, need: int, keep: Sequence[Hashable]) -> None:
        """Evict experts outside `keep`, least recently used first, until `need` bytes are free."""
        for key in self._evictable(keep):
            if need <= self._free_bytes():
                break
            self._evict_device(key)

    def _evict_device(self, key: Hashable) -> None:
        tensors = self._device.pop(key)
        self.stats["device"].evictions += 1
        if self.host_budget:
            self._keep_on_host(key, tensors)

    def _page_in(self, key: Hashable, from_host: Tensors | None = None) -> None:
        """`from_host`: the expert's host copy, taken out of the host tier before evictions made room for it
        (else those evictions, moving into the host tier, could push it out and force a disk read)."""
        start = time.perf_counter()
        if from_host is None:
            from_host = self._host.pop(key, None)
        if from_host is not None:
            self.stats["host"].hits += 1
            tensors = self._to_device(from_host)
        else:
            self.stats["host"].misses += 1
            disk_start = time.perf_counter()
            loaded = self.load(key)
            self.stats["disk"].arrived(self.sizes[key], time.perf_counter() - disk_start)
            tensors = self._to_device(loaded)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        self._device[key] = tensors
        self.stats["device"].arrived(self.sizes[key], time.perf_counter() - start)
        self.peak_device_bytes = max(self.peak_device_bytes, sum(self.sizes[k] for k in self._device))

    # -- the public operations ---------------------------------------------------------------------
    @contextmanager
    def acquire(self, keys: Sequence[Hashable]) -> Iterator[dict[Hashable, Tensors]]:
        """Make a wave resident on the device and pinned for the duration of the `with` block."""
        keys = list(dict.fromkeys(keys))
        need_total = sum(self.sizes[k] for k in keys)
        if need_total > self.device_budget:
            raise ValueError(f"a wave of {len(keys)} experts needs {need_total} bytes > device budget; use waves()")
        with self._lock:
            while True:
                missing = [k for k in keys if k not in self._device]
                need = sum(self.sizes[k] for k in missing)
                if self._room_for(need, keys):
                    break
                self._lock.wait()  # other threads hold pins: wait for a release
            staged = {k: self._host.pop(k) for k in missing if k in self._host}
            self._make_room(need, keys)
            for key in keys:
                stats = self.stats["device"]
                if key in self._device:
                    stats.hits += 1
                    self._device.move_to_end(key)
                else:
                    stats.misses += 1
                    self._page_in(key, staged.get(key))
            for key in keys:  # pinned only once the whole wave is in: a failed read leaves no pin behind
                self._pins[key] += 1
            resident = {k: self._device[k] for k in keys}
        try:
            yield resident
        finally:
            with self._lock:
                for key in keys:
                    self._pins[key] -= 1
                self._lock.notify_all()

    def prefetch(self, keys: Sequence[Hashable]) -> None:
        """Bring experts a coming batch will need as close to the device as the budgets allow, without waiting:
        into free or unpinned device space, else into the host tier."""
        with self._lock:
            for key in keys:
                if key in self._device:
                    continue
                if self._room_for(self.sizes[key], keys):
                    staged = self._host.pop(key, None)
                    self._make_room(self.sizes[key], keys)
                    self._page_in(key, staged)
                elif self.host_budget and key not in self._host:
                    start = time.perf_counter()
                    loaded = self.load(key)
                    self.stats["disk"].arrived(self.sizes[key], time.perf_counter() - start)
                    self._keep_on_host(key, loaded)

    def evict(self, key: Hashable) -> None:
        """Page an expert out of memory entirely (its shard stays); waits while a computation pins it."""
        with self._lock:
            while self._pins[key]:
                self._lock.wait()
            if key in self._device:
                self._device.pop(key)
                self.stats["device"].evictions += 1
            if self._host.pop(key, None) is not None:
                self.stats["host"].evictions += 1

    def demote(self, key: Hashable) -> bool:
        """Move an expert off the device as an eviction under pressure would: into the host tier where its budget
        allows, else out of memory; waits while a computation pins it. Returns whether it is on the host tier."""
        with self._lock:
            while self._pins[key]:
                self._lock.wait()
            if key in self._device:
                self._evict_device(key)
            return key in self._host

    def forget(self, key: Hashable) -> None:
        """Evict and unregister (a retired expert)."""
        self.evict(key)
        with self._lock:
            self.sizes.pop(key, None)
