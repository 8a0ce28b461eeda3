"""Token-by-token generation for the web demo: the same decoding as
:meth:`~mmcompose.model.modeling.MMComposeForCausalLM.generate` for one prompt, yielded as it
goes, so a page can show the answer while it is being written.

``generate`` returns only when every token is decoded; a person waiting at a browser wants the
first words at once. :func:`stream_tokens` runs the same steps (prefill with the spliced
prompt and its routes, then one token at a time with a ``DynamicCache``, the same token
picker) and yields each id; the tests check that the ids equal ``generate``'s, greedy and
sampled. :class:`TextDeltas` turns ids into text pieces without splitting a multi-byte
character, and :func:`in_thread` moves a generator to a worker thread so an event loop can
await its items.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable, Generator, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor

from mmcompose.model.modeling import MMComposeForCausalLM

T = TypeVar("T")


@torch.no_grad()
def stream_tokens(
    model: MMComposeForCausalLM,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    modal_inputs: Mapping[str, Tensor] | None = None,
    *,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    seed: int | None = None,
) -> Iterator[int]:
    """Yield the new token ids of one prompt (batch of 1) as ``generate`` picks them; the end
    of sequence token is yielded last when reached."""
    if input_ids.shape[0] != 1:
        raise ValueError(f"stream_tokens takes one prompt, got a batch of {input_ids.shape[0]}")
    steps = model.decode_steps(
        input_ids, attention_mask, modal_inputs, max_new_tokens=max_new_tokens,
        do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
        eos_token_id=eos_token_id, seed=seed,
    )  # fmt: skip
    for tok in steps:
        yield int(tok[0])


class TextDeltas:
    """Token ids in, new text out. The whole answer is decoded each time (tokenizers merge
    bytes across tokens), and a piece ending in an incomplete UTF-8 character (U+FFFD) is
    held back until the next token completes it."""

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self._decode = decode
        self._ids: list[int] = []
        self._sent = 0
        self.text = ""

    def push(self, token: int) -> str:
        self._ids.append(token)
        text = self._decode(self._ids)
        if text.endswith("\ufffd"):
            return ""
        self.text = text
        delta, self._sent = text[self._sent :], len(text)
        return delta

    def flush(self) -> str:
        """What is left at the end (an incomplete character stays as U+FFFD)."""
        self.text = self._decode(self._ids)
        delta, self._sent = self.text[self._sent :], len(self.text)
        return delta


_END = object()


async def in_thread(make: Callable[[], Generator[T, None, None]]) -> AsyncIterator[T]:
    """Run ``make()`` and iterate it in a worker thread, yielding its items to the event loop
    as they come; an exception inside is raised here. Closing this iterator early asks the
    worker to stop after its current item."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Any] = asyncio.Queue()
    stop = threading.Event()

    def put(item: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile (shutdown)
            loop.call_soon_threadsafe(queue.put_nowait, item)

    def work() -> None:
        try:
            with contextlib.closing(make()) as items:  # closed early: its finally blocks run
                for item in items:
                    put(item)
                    if stop.is_set():
                        break
            put(_END)
        except BaseException as e:  # handed to the awaiting side, raised there
            put(_Failure(e))

    worker = threading.Thread(target=work, name="mmcompose-stream", daemon=True)
    worker.start()
    try:
        while True:
            item = await queue.get()
            if item is _END:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stop.set()


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


__all__ = ["TextDeltas", "in_thread", "stream_tokens"]
