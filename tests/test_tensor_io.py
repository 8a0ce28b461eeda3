"""Streamed safetensors I/O (compose/tensor_io.py) and the blocked plain sum (methods.py).

The writer must produce the very bytes ``save_file`` writes, the reader the very tensors
``safe_open`` returns, and the blocked sum the very bits of the whole-tensor arithmetic.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import mmcompose.compose.methods as methods
import mmcompose.compose.tensor_io as tio
from mmcompose.compose.plan_data import Carry, Delta, MergeWeights, Ref
from mmcompose.compose.tensor_io import (
    TORCH_DTYPES,
    ReadAhead,
    ShardSpec,
    StreamWriter,
    TensorFile,
    all_finite,
    step_refs,
    write_shard_stream,
)
from mmcompose.errors import CheckpointError

META = {"format": "pt"}


def _mixed_tensors() -> dict[str, torch.Tensor]:
    """One tensor per safetensors dtype torch has, odd shapes, names out of order."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for i, (code, dt) in enumerate(sorted(TORCH_DTYPES.items())):
        shape = [(3, 5), (7,), (), (2, 0), (4, 1, 3)][i % 5]
        raw = torch.randint(0, 255, (max(1, torch.Size(shape).numel()) * 8,), generator=g)
        t = raw.to(torch.uint8)[
            : torch.Size(shape).numel() * torch.empty((), dtype=dt).element_size()
        ]
        out[f"z{15 - i:02d}.{code.lower()}"] = t.view(dt).reshape(shape).clone()
    out["a.same_bf16"] = torch.randn(6, 2, generator=g).to(torch.bfloat16)
    out["b.same_bf16"] = torch.randn(1, generator=g).to(torch.bfloat16)
    return out


def _spec(tensors: dict[str, torch.Tensor]) -> ShardSpec:
    names = tuple(tensors)
    return ShardSpec(
        names,
        tuple(tuple(t.shape) for t in tensors.values()),
        tuple(t.dtype for t in tensors.values()),
    )


class _Feed:
    """A ShardFeed stand-in: the spec and the tensors in a given order."""

    def __init__(self, spec: ShardSpec, items: list[tuple[str, torch.Tensor]]) -> None:
        self.spec, self.items = spec, items

    def __iter__(self):
        return iter(self.items)


def test_streamed_shard_is_byte_identical_to_save_file(tmp_path: Path) -> None:
    tensors = _mixed_tensors()
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata=META)
    items = list(reversed(tensors.items()))  # arrival order must not matter
    write_shard_stream(tmp_path / "ours.safetensors", _Feed(_spec(tensors), items), META)  # type: ignore[arg-type]
    assert (tmp_path / "ours.safetensors").read_bytes() == (
        tmp_path / "ref.safetensors"
    ).read_bytes()


def test_direct_read_equals_safe_open(tmp_path: Path) -> None:
    tensors = _mixed_tensors()
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path), metadata=META)
    tf = TensorFile(path)
    try:
        with safe_open(str(path), "pt") as f:
            for name in tensors:
                assert tf.readable(name)
                ours, ref = tf.read(name), f.get_tensor(name)
                assert ours.dtype == ref.dtype and ours.shape == ref.shape
                assert torch.equal(
                    ours.reshape(-1).view(torch.uint8), ref.reshape(-1).view(torch.uint8)
                )
    finally:
        tf.close()


@pytest.mark.parametrize("map_bytes", [0, 1 << 60], ids=["mapped", "read"])
def test_large_tensors_mapped_or_read_equal_safe_open(
    tmp_path: Path, monkeypatch, map_bytes: int
) -> None:
    """Both read paths (a private mapping of the tensor's range, a preadv into a fresh buffer)
    give safe_open's tensors, at offsets that are not page-aligned; writing into a mapped
    tensor never reaches the file (the mapping is copy-on-write); the mapping outlives the
    file's descriptor for as long as the tensor does."""
    g = torch.Generator().manual_seed(1)
    tensors = {
        "a.bf16": torch.randn(3001, 7, generator=g).to(torch.bfloat16),
        "b.f32": torch.randn(5, 4099, generator=g),
        "c.f16": torch.randn(12345, generator=g).to(torch.float16),
    }
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path), metadata=META)
    before = path.read_bytes()
    monkeypatch.setattr(tio, "MAP_BYTES", map_bytes)
    tf = TensorFile(path)
    got = {name: tf.read(name) for name in tensors}
    tf.close()
    for name, ref in tensors.items():
        assert torch.equal(got[name], ref), name
    for t in got.values():
        t.mul_(0)
    assert path.read_bytes() == before


def _rss_file_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    raise AssertionError("no RssFile in /proc/self/status")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads Linux's RssFile")
def test_release_pages_drops_mapped_pages_and_keeps_values(tmp_path: Path, monkeypatch) -> None:
    """Released pages of a mapped tensor leave the resident set (RssFile) and read back the
    same values; a tensor that was read, not mapped, is never touched (MADV_DONTNEED would
    zero anonymous memory)."""
    g = torch.Generator().manual_seed(3)
    ref = torch.randn(8 << 20, generator=g)  # 32 MiB
    path = tmp_path / "m.safetensors"
    save_file({"w": ref, "v": ref[:100000].clone()}, str(path), metadata=META)
    monkeypatch.setattr(tio, "MAP_BYTES", 1 << 20)
    tf = TensorFile(path)
    mapped, small = tf.read("w"), tf.read("v")  # "v" (400 kB) is read into a fresh buffer
    tf.close()
    assert torch.equal(mapped, ref)  # every page resident now
    resident = _rss_file_kb()
    tio.release_pages(mapped, 0, 16 << 20)  # the first half
    half = _rss_file_kb()
    tio.release_pages(mapped)
    gone = _rss_file_kb()
    # 16 MiB each time (page rounding at the ends; other file pages may come and go a little)
    assert resident - half > 12 << 10
    assert half - gone > 12 << 10
    assert torch.equal(mapped, ref)  # faulted back in from the file
    kept = ref.clone()
    tio.release_pages(small)
    tio.release_pages(ref)
    assert torch.equal(small, kept[:100000])
    assert torch.equal(ref, kept)


def test_a_truncated_file_is_refused_not_mapped(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.ones(1 << 19)}, str(path), metadata=META)  # 2 MiB: mapped
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size - 4096)
    tf = TensorFile(path)
    try:
        with pytest.raises(CheckpointError, match="truncated"):
            tf.read("w")
    finally:
        tf.close()


def test_all_finite_sees_nan_and_both_infinities() -> None:
    for bad in (float("nan"), float("inf"), -float("inf")):
        for dt in (torch.bfloat16, torch.float16, torch.float32):
            t = torch.zeros(1000, dtype=dt)
            t[517] = bad
            assert not all_finite(t)
    assert all_finite(torch.ones(3, dtype=torch.bfloat16)) and all_finite(torch.arange(3))


def test_step_refs_walks_nested_steps() -> None:
    a, b, c = Ref(0, "x"), Ref(1, "x"), Ref(2, "x")
    d = Delta(Ref(0, "A"), Ref(0, "B"), 2.0)
    step = MergeWeights("x", (a, b), c, merge=None, deltas=(d, None))  # type: ignore[arg-type]
    assert list(step_refs(step)) == [a, b, c, d.a, d.b]
    assert list(step_refs(Carry("x", a, (b, c)))) == [a, b, c]


def test_read_ahead_serves_every_step_within_its_budget(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    tensors = {f"t{i}": torch.full((256,), float(i)) for i in range(12)}  # 1 KiB each
    tensors["t5"][3] = float("nan")
    save_file(tensors, str(path))
    tf = TensorFile(path)
    steps = [Carry(f"t{i}", Ref(0, f"t{i}")) for i in range(12)]
    held: list[int] = []
    ahead = ReadAhead(steps, lambda ref: (tf, ref.name), budget=3 * 1024)
    try:
        for i, step in enumerate(steps):
            ahead.begin(i)
            held.append(ahead.inflight)
            t, finite = ahead.read(step.ref)  # type: ignore[misc]
            assert torch.equal(t, tensors[step.ref.name]) or i == 5
            assert finite == (i != 5)
            assert ahead.read(step.ref) is None  # each read is served once
            ahead.end(i)
    finally:
        ahead.close()
        tf.close()
    assert max(held) <= 3 * 1024


def test_stream_writer_hands_a_write_error_to_the_producer(tmp_path: Path) -> None:
    t = {"a": torch.ones(4), "b": torch.ones(4)}
    shards = [
        (tmp_path / "1.safetensors", _spec({"a": t["a"]})),
        (tmp_path / "2.safetensors", _spec({"b": t["b"]})),
    ]
    calls: list[str] = []

    def write(path, feed, meta):
        calls.append(threading.current_thread().name)
        if path.name == "2.safetensors":
            raise KeyboardInterrupt
        write_shard_stream(path, feed, meta)

    w = StreamWriter(shards, META, write, budget=1 << 20)
    w.add("a", t["a"])
    w.add("b", t["b"])
    with pytest.raises(KeyboardInterrupt):
        w.finish()
    w.close()
    assert calls == ["mmcompose-write"] * 2
    with safe_open(str(tmp_path / "1.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("a"), t["a"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("with_base", [False, True])
def test_blocked_sum_is_bit_identical(monkeypatch, dtype: torch.dtype, with_base: bool) -> None:
    """The blocked path against the whole-tensor one, on a size that is no multiple of the
    block (a short last block) and weights that do not sum to one."""
    g = torch.Generator().manual_seed(1)
    ts = [(torch.randn(301, 7, generator=g) * 0.02).to(dtype) for _ in range(3)]
    base = (torch.randn(301, 7, generator=g) * 0.02).to(dtype) if with_base else None
    cases = [
        ("task_arithmetic", dict(normalize=True, lambda_=0.7), [0.5, 0.3, 0.4]),
        ("task_arithmetic", dict(), [0.5, 0.3, 0.2]),
        ("dare_linear", dict(density=1.0, semantics="peft", normalize=True), [0.2, 0.3, 0.9]),
    ]
    if not with_base:
        cases.append(("linear", dict(), [0.5, 0.3, 0.3]))
    for name, kw, w in cases:
        method = methods.MERGE_METHODS.get(name).fn
        monkeypatch.setattr(methods, "BLOCK", 1 << 30)  # whole tensor
        ref = method(ts, w, base, **kw)
        monkeypatch.setattr(methods, "BLOCK", 64)  # 33 blocks, the last of 57 entries
        assert methods._blockable(ts, base)
        ours = method(ts, w, base, **kw)
        assert ours.dtype == ref.dtype == dtype
        assert torch.equal(ours.reshape(-1).view(torch.uint8), ref.reshape(-1).view(torch.uint8)), (
            name
        )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_blocked_sign_election_is_bit_identical(monkeypatch, dtype: torch.dtype) -> None:
    """TIES-style merges (sign election, disjoint sum) block by block against the whole
    tensor: mergekit's and PEFT's arithmetic, with and without normalising, a lambda, per-model
    densities, a short last block."""
    g = torch.Generator().manual_seed(2)
    base = (torch.randn(301, 7, generator=g) * 0.02).to(dtype)
    ts = [(base.double() + torch.randn(301, 7, generator=g) * 0.002).to(dtype) for _ in range(3)]
    # Magnitudes with many equal values (bf16 steps): the selection splits ties at the slice
    # ends, so which tied entries survive is decided by the sort order the stream replays.
    coarse = [(base.double() + torch.randint(-3, 4, (301, 7), generator=g) * 2e-3).to(dtype)
              for _ in range(3)]  # fmt: skip
    cases = [
        ("ties", dict(density=[0.5, 0.3, 0.9], normalize=True), ts),
        ("ties", dict(density=0.5, normalize=False, lambda_=0.7), ts),
        ("ties", dict(density=0.4, semantics="peft"), ts),  # top-k: the stacked path
        ("ties", dict(density=0.45, rescale=True), ts),
        ("ties", dict(density=0.3, rescale=True, semantics="peft", consensus="count"), ts),
        ("ties", dict(density=[0.37, 0.5, 0.61]), coarse),
        ("dare_ties", dict(density=1.0), ts),
        ("breadcrumbs_ties", dict(density=0.5, gamma=0.01), ts),
        ("breadcrumbs_ties", dict(density=0.6, gamma=0.05, rescale=True), coarse),
    ]
    streamed = []
    real_stream = methods.streamed_disjoint

    def spy(*a, **k):
        streamed.append(True)
        return real_stream(*a, **k)

    monkeypatch.setattr(methods, "streamed_disjoint", spy)
    # Without a base the inputs are the task vectors themselves (LoRA deltas, say).
    no_base = [("ties", dict(density=0.5), ts), ("breadcrumbs_ties", dict(density=0.5), coarse)]
    for (name, kw, inputs), b in [*((c, base) for c in cases), *((c, None) for c in no_base)]:
        method = methods.MERGE_METHODS.get(name).fn
        monkeypatch.setattr(methods, "BLOCK", 1 << 30)  # whole tensor
        ref = method(inputs, [0.5, 0.3, 0.4], b, **kw)
        monkeypatch.setattr(methods, "BLOCK", 192)  # 64 columns a block: 33 blocks, the last of 59
        assert methods._blockable(inputs, b)
        streamed.clear()
        ours = method(inputs, [0.5, 0.3, 0.4], b, **kw)
        stream_case = name != "dare_ties" and kw.get("semantics") != "peft"
        assert bool(streamed) == stream_case, (name, kw)  # the path under test was taken
        assert ours.dtype == ref.dtype == dtype
        assert torch.equal(ours.reshape(-1).view(torch.uint8), ref.reshape(-1).view(torch.uint8)), (
            name,
            kw,
        )
