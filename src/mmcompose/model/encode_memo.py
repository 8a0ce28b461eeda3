"""Reuse frozen-encoder outputs across models within one evaluation session.

Evaluating several models that share frozen encoders (six single-modality models and two
compositions in the quickstart, or the candidates of a lambda search) would run the same
encoder on the same files again for every model; the encoder, not the 135M LLM, is most of
the cost for Whisper's 30 s window. Inside ``memoized_encoders()``, a frozen tower looks each
preprocessed input up by (encoder fingerprint, input digest) and encodes only the misses.
The fingerprint covers the encoder's spec and weights, so two encoders of one name but
different weights never share entries; outputs are bit-identical to encoding afresh.
"""

from __future__ import annotations

import contextlib
import hashlib
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

_ACTIVE: list[EncodeMemo] = []


class EncodeMemo:
    """An LRU of encoder outputs, bounded in bytes."""

    def __init__(self, max_bytes: int = 2 << 30) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._store: OrderedDict[tuple[str, str], Tensor] = OrderedDict()
        # Per session, so weights loaded into an encoder between sessions are seen afresh.
        self._fingerprints: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()

    def fingerprint_of(self, spec: Callable[[], str], encoder: nn.Module) -> str:
        """``spec()`` (the encoder spec as JSON) is called only the first time."""
        if encoder not in self._fingerprints:
            self._fingerprints[encoder] = fingerprint(spec(), encoder)
        return self._fingerprints[encoder]

    def encode(self, fingerprint: str, x: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
        keys = [(fingerprint, _digest(x[i])) for i in range(x.shape[0])]
        first: dict[tuple[str, str], int] = {}
        for i, k in enumerate(keys):
            if k not in self._store:
                first.setdefault(k, i)
        missing = list(first.values())
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            out = fn(x[missing])
            for j, i in enumerate(missing):
                self._put(keys[i], out[j].detach().clone())
        for k in keys:
            self._store.move_to_end(k)
        return torch.stack([self._store[k] for k in keys])

    def _put(self, key: tuple[str, str], value: Tensor) -> None:
        self._store[key] = value
        self.bytes += value.numel() * value.element_size()
        while self.bytes > self.max_bytes and len(self._store) > 1:
            _, old = self._store.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()


def _digest(t: Tensor) -> str:
    t = t.detach().contiguous().cpu()
    h = hashlib.blake2b(digest_size=16)
    h.update(str((t.dtype, tuple(t.shape))).encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def fingerprint(spec_json: str, encoder: nn.Module) -> str:
    """Digest of an encoder's spec and weights (computed once per tower)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(spec_json.encode())
    for name, t in sorted(encoder.state_dict().items()):
        h.update(name.encode())
        h.update(_digest(t).encode())
    return h.hexdigest()


def active() -> EncodeMemo | None:
    return _ACTIVE[-1] if _ACTIVE else None


@contextlib.contextmanager
def memoized_encoders(memo: EncodeMemo | None = None) -> Iterator[EncodeMemo]:
    """Within the block, frozen towers reuse encoder outputs for inputs they have seen."""
    memo = memo or EncodeMemo()
    _ACTIVE.append(memo)
    try:
        yield memo
    finally:
        _ACTIVE.remove(memo)
