"""Streamed safetensors I/O for the executor: direct reads, read-ahead, writes at offsets.

Why not ``safe_open`` / ``save_file``: ``safe_open`` maps the whole file, so every page read
stays in the process's RSS until the file is closed, and ``save_file`` needs a whole shard in
memory before it writes a byte. Here each large tensor gets a mapping of its own bytes only
(private, copy-on-write), which is unmapped as soon as the last reference to the tensor goes:
no copy out of the page cache and no fresh pages to fault in and zero (reading into fresh
buffers with ``preadv`` ran at a quarter of ``cat``'s speed here, all of it page faults).
Small tensors are read with ``preadv``. A thread reads the next plan steps' inputs while the
current one computes, and each output shard's header is laid out up front from the plan, so a
thread writes every tensor at its offset as soon as it exists. Files come out byte for byte as
``save_file`` writes them (same order: dtype descending, then name; same JSON; space padding).
"""

from __future__ import annotations

import dataclasses
import json
import mmap
import os
import struct
import sys
import threading
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mmcompose.errors import CheckpointError

__all__ = [
    "ReadAhead",
    "ShardFeed",
    "ShardSpec",
    "StreamWriter",
    "TensorFile",
    "all_finite",
    "write_shard_stream",
]

TORCH_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3": torch.float8_e4m3fn,
    "I16": torch.int16,
    "U16": torch.uint16,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "F32": torch.float32,
    "C64": torch.complex64,
    "F64": torch.float64,
    "I64": torch.int64,
    "U64": torch.uint64,
}
SAFE_NAMES = {v: k for k, v in TORCH_DTYPES.items()}
# safetensors' Dtype enum order; save_file lays tensors out by it, descending, then by name
_RANK = {name: i for i, name in enumerate(TORCH_DTYPES)}
_CHUNK = 64 << 20  # bytes per preadv / pwrite call
# Tensors at least this large are mapped rather than read (a mapping costs two syscalls and a
# VMA; below this a read into a fresh buffer is as cheap). A module attribute for benchmarks.
MAP_BYTES = 1 << 20
LITTLE = sys.byteorder == "little"


def all_finite(t: Tensor) -> bool:
    """NaN/Inf check at the cost of one reduction: min and max propagate NaN and show +-Inf,
    ~40x cheaper than ``isfinite(t).all()`` (a full boolean tensor) on large weights."""
    if not t.dtype.is_floating_point or t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


# Storage address -> (the private read-only mapping under it, the storage's offset in it).
_MAPPINGS: dict[int, tuple[weakref.ref[mmap.mmap], int]] = {}


def _remember_mapping(t: Tensor, m: mmap.mmap, offset: int) -> None:
    key = t.untyped_storage().data_ptr()

    def forget(ref: weakref.ref[mmap.mmap]) -> None:
        if _MAPPINGS.get(key, (None,))[0] is ref:
            del _MAPPINGS[key]

    _MAPPINGS[key] = (weakref.ref(m, forget), offset)


def release_pages(t: Tensor, begin: int = 0, end: int | None = None) -> None:
    """Drop the pages under bytes ``[begin, end)`` of a mapped input tensor (counted from its
    first element; default: from there to the end of its storage) from this process's
    resident set; a later read faults them back in from the page cache.

    A memory hint for one pass over large inputs (a merge's sign election holds one tensor
    of every model): without it every input tensor stays resident until it is freed. Only
    tensors :class:`TensorFile` mapped (private mappings nothing has written to) are
    touched; for any other tensor this does nothing.
    """
    storage = t.untyped_storage()
    entry = _MAPPINGS.get(storage.data_ptr())
    m = None if entry is None else entry[0]()
    if m is None or not hasattr(m, "madvise"):
        return
    first = t.storage_offset() * t.element_size()
    offset = entry[1] + first
    end = storage.nbytes() - first if end is None else min(end, storage.nbytes() - first)
    page = mmap.PAGESIZE
    lo = (offset + max(0, begin)) // page * page
    hi = min(len(m), -(-(offset + end) // page) * page)
    if hi > lo:
        m.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


def _bytes_view(t: Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor, writable, without a copy."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


# ---------------------------------------------------------------- reading


class TensorFile:
    """One safetensors file read with ``preadv``: the header once, each tensor into a fresh
    tensor. The descriptor stays open until :meth:`close`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            self.size = os.fstat(self.fd).st_size
            self.entries, self.data_start = self._header()
        except BaseException:
            os.close(self.fd)
            raise

    def _header(self) -> tuple[dict[str, Any], int]:
        raw = os.pread(self.fd, 8, 0)
        if len(raw) != 8:
            raise CheckpointError(f"cannot read {self.path}: no safetensors header")
        (n,) = struct.unpack("<Q", raw)
        head = os.pread(self.fd, n, 8)
        try:
            meta = json.loads(head)
        except (ValueError, UnicodeDecodeError):
            raise CheckpointError(f"cannot read {self.path}: damaged header") from None
        meta.pop("__metadata__", None)
        return meta, 8 + n

    def nbytes(self, name: str) -> int:
        begin, end = self.entries[name]["data_offsets"]
        return end - begin

    def readable(self, name: str) -> bool:
        e = self.entries.get(name)
        return LITTLE and e is not None and e["dtype"] in TORCH_DTYPES

    def read(self, name: str) -> Tensor:
        e = self.entries[name]
        dtype, shape = TORCH_DTYPES[e["dtype"]], tuple(e["shape"])
        begin, end = e["data_offsets"]
        pos = self.data_start + begin
        if pos + (end - begin) > self.size:
            raise CheckpointError(f"cannot read tensor {name} from {self.path}: file truncated")
        if end - begin >= MAP_BYTES and pos % dtype.itemsize == 0:
            return self._mapped(pos, end - begin).view(dtype).reshape(shape)
        buf = torch.empty(end - begin, dtype=torch.uint8)
        view = _bytes_view(buf)
        done = 0
        while done < len(view):  # preadv may return less than asked
            got = os.preadv(self.fd, [view[done : done + _CHUNK]], pos + done)
            if got <= 0:
                raise CheckpointError(f"cannot read tensor {name} from {self.path}: file truncated")
            done += got
        return buf.view(dtype).reshape(shape)

    def _mapped(self, pos: int, n: int) -> Tensor:
        """Bytes ``pos:pos+n`` as a tensor over a private mapping of just that range; the
        tensor keeps the mapping alive, and it is unmapped when the tensor is freed."""
        start = pos - pos % mmap.ALLOCATIONGRANULARITY
        m = mmap.mmap(self.fd, n + pos - start, offset=start, access=mmap.ACCESS_COPY)
        if hasattr(m, "madvise"):
            m.madvise(mmap.MADV_WILLNEED)  # the kernel starts reading the range now
        t = torch.frombuffer(m, dtype=torch.uint8, count=n, offset=pos - start)
        _remember_mapping(t, m, pos - start)
        return t

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class _Slot:
    __slots__ = ("done", "error", "finite", "tensor")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.tensor: Tensor | None = None
        self.finite = True
        self.error: BaseException | None = None


def step_refs(step: Any) -> Iterator[Any]:
    """Every :class:`~mmcompose.compose.plan_data.Ref` a plan step reads, found by walking its
    fields (so new step types need no change here)."""
    from mmcompose.compose.plan_data import Ref

    if isinstance(step, Ref):
        yield step
    elif isinstance(step, tuple):
        for x in step:
            yield from step_refs(x)
    elif dataclasses.is_dataclass(step) and not isinstance(step, type):
        for f in dataclasses.fields(step):
            yield from step_refs(getattr(step, f.name))


class ReadAhead:
    """Reads the inputs of the steps ahead in a thread, at most ``budget`` bytes beyond what
    the current step holds (a larger step still goes, alone); each tensor is also checked for
    NaN/Inf there. ``read(ref)`` returns (tensor, finite) or None for a tensor it cannot read
    directly (the caller then reads it the usual way)."""

    def __init__(
        self,
        steps: Sequence[Any],
        locate: Callable[[Any], tuple[TensorFile, str] | None],
        budget: int,
        check: bool = True,
    ) -> None:
        self.steps, self.locate, self.budget, self.check = steps, locate, budget, check
        self.cond = threading.Condition()
        self.slots: dict[int, dict[Any, deque[_Slot]]] = {}
        self.sizes: dict[int, int] = {}
        self.inflight = 0
        self.current = 0
        self.stop = False
        self.thread = threading.Thread(target=self._run, name="mmcompose-read", daemon=True)
        self.thread.start()

    def _plan(self, step: Any) -> tuple[list[tuple[Any, TensorFile, str]], int]:
        todo = []
        for ref in step_refs(step):
            where = self.locate(ref)
            if where is not None:
                todo.append((ref, *where))
        return todo, sum(f.nbytes(n) for _, f, n in todo)

    def _run(self) -> None:
        for i, step in enumerate(self.steps):
            try:
                todo, size = self._plan(step)
            except BaseException:
                todo, size = [], 0
            slots: dict[Any, deque[_Slot]] = {}
            for ref, _, _ in todo:
                slots.setdefault(ref, deque()).append(_Slot())
            with self.cond:
                while not self.stop and self.inflight and self.inflight + size > self.budget:
                    self.cond.wait()
                if self.stop:
                    return
                self.inflight += size
                self.sizes[i] = size
                self.slots[i] = slots
                self.cond.notify_all()
            queues = {ref: deque(q) for ref, q in slots.items()}
            for ref, file, name in todo:
                slot = queues[ref].popleft()
                try:
                    slot.tensor = file.read(name)
                    slot.finite = not self.check or all_finite(slot.tensor)
                except BaseException as e:
                    slot.error = e
                slot.done.set()
                if self.stop:
                    return

    def begin(self, i: int) -> None:
        """Step ``i`` starts: wait until the thread has taken it on."""
        with self.cond:
            self.current = i
            while i not in self.slots and self.thread.is_alive():
                self.cond.wait()

    def end(self, i: int) -> None:
        """Step ``i`` is done: forget what it did not use and free its share of the budget."""
        with self.cond:
            self.slots.pop(i, None)
            self.inflight -= self.sizes.pop(i, 0)
            self.cond.notify_all()

    def read(self, ref: Any) -> tuple[Tensor, bool] | None:
        q = self.slots.get(self.current, {}).get(ref)
        if not q:
            return None
        slot = q.popleft()
        slot.done.wait()
        if slot.error is not None:
            raise slot.error
        t, slot.tensor = slot.tensor, None
        assert t is not None
        return t, slot.finite

    def close(self) -> None:
        with self.cond:
            self.stop = True
            self.cond.notify_all()
        self.thread.join()
        self.slots.clear()


# ---------------------------------------------------------------- writing


@dataclasses.dataclass(frozen=True)
class ShardSpec:
    """One output shard: its tensors (name, shape, dtype) and where each lands in the file."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[torch.dtype, ...]

    def layout(self, metadata: dict[str, str]) -> tuple[bytes, dict[str, tuple[int, int]]]:
        """The header bytes and each tensor's absolute (start, nbytes) in the file."""
        order = sorted(
            range(len(self.names)),
            key=lambda k: (-_RANK[SAFE_NAMES[self.dtypes[k]]], self.names[k]),
        )
        head: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
        spans: dict[str, tuple[int, int]] = {}
        off = 0
        for k in order:
            n = torch.empty((), dtype=self.dtypes[k]).element_size()
            for d in self.shapes[k]:
                n *= d
            head[self.names[k]] = {
                "dtype": SAFE_NAMES[self.dtypes[k]],
                "shape": list(self.shapes[k]),
                "data_offsets": [off, off + n],
            }
            spans[self.names[k]] = (off, n)
            off += n
        raw = json.dumps(head, separators=(",", ":"), ensure_ascii=False).encode()
        raw += b" " * (-len(raw) % 8)
        start = 8 + len(raw)
        return struct.pack("<Q", len(raw)) + raw, {k: (start + o, n) for k, (o, n) in spans.items()}


class ShardFeed:
    """The tensors of one shard as they are produced: iterating yields (name, tensor) pairs
    until the shard is complete (or the writer stops)."""

    def __init__(self, spec: ShardSpec, writer: StreamWriter) -> None:
        self.spec = spec
        self.items: deque[tuple[str, Tensor]] = deque()
        self.writer = writer

    def __iter__(self) -> Iterator[tuple[str, Tensor]]:
        w = self.writer
        for _ in self.spec.names:
            with w.cond:
                while not self.items and not w.stop:
                    w.cond.wait()
                if w.stop:
                    return
                name, t = self.items.popleft()
            yield name, t
            with w.cond:
                w.queued -= t.numel() * t.element_size()
                w.cond.notify_all()


def write_shard_stream(path: Path, feed: ShardFeed, metadata: dict[str, str]) -> None:
    """Write one shard: its header first, then each tensor at its offset as it arrives."""
    header, spans = feed.spec.layout(metadata)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        os.pwrite(fd, header, 0)
        total = len(header) + sum(n for _, n in spans.values())
        os.ftruncate(fd, total)
        for name, t in feed:
            pos, n = spans[name]
            view = _bytes_view(t)
            if len(view) != n:
                raise RuntimeError(f"internal: {name} has {len(view)} bytes, planned {n}")
            done = 0
            while done < n:
                done += os.pwrite(fd, view[done : done + _CHUNK], pos + done)
    finally:
        os.close(fd)


class StreamWriter:
    """Writes the plan's shards in a thread, in order, as their tensors arrive; ``add`` blocks
    while more than ``budget`` bytes wait to be written. ``write(path, feed, metadata)`` writes
    one shard (the executor's seam); an error there is raised by the next ``add``/``finish``.
    ``threaded=False``: no thread; each shard is written by ``add`` once it is complete."""

    def __init__(
        self,
        shards: Sequence[tuple[Path, ShardSpec]],
        metadata: dict[str, str],
        write: Callable[[Path, ShardFeed, dict[str, str]], None],
        budget: int,
        threaded: bool = True,
    ) -> None:
        self.cond = threading.Condition()
        self.feeds = [ShardFeed(spec, self) for _, spec in shards]
        self.paths = [p for p, _ in shards]
        self.index = {n: g for g, (_, s) in enumerate(shards) for n in s.names}
        self.metadata, self.write, self.budget = metadata, write, budget
        self.missing = set(self.index)
        self.queued = 0
        self.stop = False
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None
        if threaded:
            self.thread = threading.Thread(target=self._run, name="mmcompose-write", daemon=True)
            self.thread.start()

    def _run(self) -> None:
        try:
            for path, feed in zip(self.paths, self.feeds, strict=True):
                self.write(path, feed, dict(self.metadata))
                if self.stop:
                    return
        except BaseException as e:
            with self.cond:
                self.error = e
                self.stop = True
                self.cond.notify_all()

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def add(self, name: str, t: Tensor) -> None:
        n = t.numel() * t.element_size()
        if self.thread is None:
            g = self.index[name]
            self.missing.discard(name)
            feed = self.feeds[g]
            feed.items.append((name, t))
            self.queued += n
            if len(feed.items) == len(feed.spec.names):
                self.write(self.paths[g], feed, dict(self.metadata))
            return
        with self.cond:
            while not self.stop and self.queued and self.queued + n > self.budget:
                self.cond.wait()
            self._raise()
            if self.stop:
                raise RuntimeError("internal: writer stopped")
            self.queued += n
            self.missing.discard(name)
            self.feeds[self.index[name]].items.append((name, t))
            self.cond.notify_all()

    def finish(self) -> None:
        """Wait for the last shard; the caller checked that ``missing`` is empty."""
        if self.thread is not None:
            self.thread.join()
        self._raise()

    def close(self) -> None:
        with self.cond:
            self.stop = True
            self.cond.notify_all()
        if self.thread is not None:
            self.thread.join()
