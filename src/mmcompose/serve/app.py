"""``mmcompose serve MODEL_DIR``: a chat page in the browser for a composed model.

A person uploads an image, a sound, a video clip and a point cloud (for the towers the model
has), sees each one (the point cloud as a 3D scatter), asks a question whose placeholders are
filled in for them, and reads the answer as it is written. The model card at the top lists
the model's LLM, towers and LoRA adapters (``mmcompose inspect``'s facts).

Built with NiceGUI (FastAPI + Vue/Quasar, the ``serve`` extra): Gradio, the usual choice,
caps Pillow below 13, and this project pins Pillow 13. Everything is checked before the
weights load (folder, port, library); an upload is decoded once by the model's own loaders
when it arrives, so a corrupt or unsupported file is refused at once with the loader's
message, on the page, which stays usable. Each question is answered on its own (earlier
turns are not sent), as ``mmcompose generate`` answers one prompt; generations run one at a
time, in a worker thread, so the page keeps updating while tokens arrive.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import re
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmcompose.errors import MMComposeError
from mmcompose.model.media import (
    AUDIO_EXTENSIONS,
    IMAGE_EXTENSIONS,
    POINT_CLOUD_EXTENSIONS,
    VIDEO_EXTENSIONS,
)
from mmcompose.serve.checks import check_model_dir, check_port, check_web_library
from mmcompose.serve.prompt import sync_placeholders

log = logging.getLogger("mmcompose.serve")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
MAX_UPLOAD_BYTES = 256 * 1024 * 1024
EXTENSIONS = {
    "image": IMAGE_EXTENSIONS,
    "audio": AUDIO_EXTENSIONS,
    "video": VIDEO_EXTENSIONS,
    "point": POINT_CLOUD_EXTENSIONS,
}
LABELS = {"image": "Image", "audio": "Sound", "video": "Video clip", "point": "Point cloud"}


@dataclass
class Demo:
    """The loaded model and what every page shares: one generation at a time (the router's
    routes are per call state of the one model), the uploads' folder."""

    model_dir: Path
    info: dict[str, Any]
    model: Any  # MMComposeForCausalLM
    processor: Any  # MMProcessor
    max_new_tokens: int = 128
    seed: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    upload_root: Path | None = None  # where pages keep their uploads (serve() makes one)

    @classmethod
    def load(cls, model_dir: str | Path, device: str = "cpu", max_new_tokens: int = 128) -> Demo:
        """Check the folder, then load (processor first: a broken tokenizer fails before the
        weights), check finiteness and fold the text adapter, as ``mmcompose generate``."""
        from mmcompose.devices import check_device

        check_device(device)
        info = check_model_dir(model_dir)
        from mmcompose.devices import resolve_device
        from mmcompose.model.modeling import MMComposeForCausalLM
        from mmcompose.model.processor import MMProcessor

        processor = MMProcessor.from_pretrained(model_dir)
        model = MMComposeForCausalLM.from_pretrained(model_dir, device=resolve_device(device))
        model.check_finite(model_dir)
        model.fold_for_inference()
        return cls(Path(model_dir), info, model, processor, max_new_tokens)

    @property
    def modalities(self) -> list[str]:
        return [t["modality"] for t in self.info["towers"]]

    def check_input(self, modality: str, path: Path) -> None:
        """Decode and preprocess the file once with the model's own loader (MediaError)."""
        self.processor.preprocess(modality, [path])

    def prepare(self, prompt: str, uploads: dict[str, Path]) -> dict[str, Any]:
        """Prompt + files -> model inputs (PlaceholderError if they do not match)."""
        return self.processor(prompt, {m: [p] for m, p in uploads.items()}, chat=True)

    def answer(
        self, batch: dict[str, Any], max_new_tokens: int, temperature: float
    ) -> Iterator[str]:
        """The answer's text pieces as they are decoded, under the one-generation lock."""
        from mmcompose.serve.streaming import TextDeltas, stream_tokens

        tok = self.processor.tokenizer
        eos = [i for i in {tok.eos_token_id, *self.model._default_eos()} if i is not None]
        with self.lock:
            deltas = TextDeltas(self.processor.decode)
            for t in stream_tokens(
                self.model,
                batch["input_ids"],
                batch["attention_mask"],
                batch["modal_inputs"],
                max_new_tokens=max_new_tokens,
                do_sample=temperature > 0,
                temperature=temperature or 1.0,
                eos_token_id=eos,
                seed=self.seed,
            ):
                if piece := deltas.push(t):
                    yield piece
            if piece := deltas.flush():
                yield piece


def serve(
    model_dir: str | Path,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    device: str = "cpu",
    max_new_tokens: int = 128,
) -> None:
    """Check the folder, the address and the web library, load the model, serve until
    interrupted. Binds to 127.0.0.1 unless told otherwise: the page runs a model for anyone
    who can reach it."""
    from mmcompose.devices import check_device

    check_device(device)
    check_model_dir(model_dir)
    check_port(host, port)
    check_web_library()
    demo = Demo.load(model_dir, device, max_new_tokens)
    from nicegui import ui

    with (
        _stop_on_sigterm(),
        tempfile.TemporaryDirectory(prefix="mmc-serve-", ignore_cleanup_errors=True) as root,
    ):
        demo.upload_root = Path(root)  # removed with every upload when the server stops
        print(f"mmcompose serve: {demo.model_dir} on http://{host}:{port}", flush=True)
        ui.run(
            root=lambda: build_page(demo),
            host=host,
            port=port,
            title=f"mmcompose · {demo.model_dir.name}",
            favicon="🧩",
            reload=False,
            show=False,
            show_welcome_message=False,
            uvicorn_logging_level="warning",
        )


@contextlib.contextmanager
def _stop_on_sigterm() -> Iterator[None]:
    """uvicorn shuts down gracefully on SIGTERM, then re-raises the signal, whose default
    action ends the process before ``finally`` blocks (the uploads' folder) run; here it ends
    it with SystemExit(0) instead, so they do."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(0)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# --------------------------------------------------------------------------- the page
def build_page(demo: Demo) -> None:
    """One browser tab: the model card, an upload slot per tower, the chat."""
    from nicegui import ui

    if demo.upload_root is None:
        demo.upload_root = Path(tempfile.mkdtemp(prefix="mmc-serve-"))
    page = _Page(demo, Path(tempfile.mkdtemp(dir=demo.upload_root)))
    ui.query("body").classes("bg-grey-1")
    ui.add_css(".mmc-upload .q-uploader__list { min-height: 0; padding: 0 }")
    with ui.header().classes("items-center bg-indigo-8 q-py-sm"):
        ui.label("mmcompose").classes("text-h6 text-weight-bold")
        ui.label(demo.model_dir.name).classes("text-subtitle1 opacity-80")
    with ui.row().classes("w-full no-wrap items-start q-pa-md gap-4"):
        with ui.column().classes("w-5/12 gap-3"):
            _model_card(demo.info)
            if demo.modalities:
                with ui.grid(columns=2).classes("w-full gap-3"):
                    for m in demo.modalities:
                        page.upload_slot(m)
        with ui.column().classes("w-7/12 gap-3"):
            page.chat_panel()


def _model_card(info: dict[str, Any]) -> None:
    from nicegui import ui

    from mmcompose.inspect import human_count

    llm, lora = info["llm"], info["lora"]
    with ui.card().classes("w-full").props('flat bordered data-testid="model-card"'):
        ui.label("Model").classes("text-subtitle1 text-weight-bold")
        ui.label(
            f"LLM {llm['model_type']}: hidden {llm['hidden_size']}, {llm['num_layers']} layers, "
            f"{human_count(llm['params'])} parameters · {info['dtype']} · "
            f"{human_count(info['total_params'])} in all"
        ).classes("text-body2")
        towers = [
            {
                "modality": t["modality"],
                "encoder": t["encoder"] + (" (frozen)" if t["frozen_encoder"] else ""),
                "projector": t["projector"],
                "prefix/suffix": f"{t['prefix_tokens']}/{t['suffix_tokens']}",
                "params": human_count(t["encoder_params"] + t["projector_params"]),
            }
            for t in info["towers"]
        ]
        _table("Towers", towers, "towers", "none (text only)")
        if lora:
            adapters = [
                {
                    "adapter": a["name"],
                    "rank": a["rank"],
                    "alpha": f"{a['alpha']:g}",
                    "used by": ", ".join(a["used_by"]) or "-",
                    "params": human_count(a["params"]),
                }
                for a in lora["adapters"]
            ]
            title = f"LoRA adapters ({lora['strategy']}, on {', '.join(lora['target_modules'])})"
            _table(title, adapters, "adapters", "none")
        else:
            ui.label("LoRA adapters: none").props('data-testid="adapters"')
        if info.get("mmer"):
            mmer = info["mmer"]
            ui.label(
                f"MMER masks ({mmer['merge_method']}): "
                + ", ".join(f"{m['modality']} {m['density']:.0%}" for m in mmer["masks"])
            ).classes("text-body2")


def _table(title: str, rows: list[dict[str, Any]], testid: str, empty: str) -> None:
    from nicegui import ui

    if not rows:
        ui.label(f"{title}: {empty}").props(f'data-testid="{testid}"')
        return
    columns = [{"name": k, "label": k, "field": k, "align": "left"} for k in rows[0]]
    ui.label(title).classes("text-subtitle2 q-mt-sm")
    ui.table(columns=columns, rows=rows, row_key=next(iter(rows[0]))).props(
        f'dense flat hide-bottom data-testid="{testid}"'
    ).classes("w-full")


class _Page:
    """One tab's state: its uploads (modality -> saved file) and its widgets."""

    def __init__(self, demo: Demo, folder: Path) -> None:
        self.demo = demo
        self.folder = folder
        self.uploads: dict[str, Path] = {}
        self.turns = itertools.count(1)
        self.previews: dict[str, Any] = {}
        self.uploaders: dict[str, Any] = {}
        self.error: Any = None
        self.question: Any = None

    # ------------------------------------------------------------------ uploads
    def upload_slot(self, modality: str) -> None:
        from nicegui import ui

        exts = " ".join(EXTENSIONS[modality])
        with (
            ui.card()
            .classes("w-full q-pa-sm")
            .props(f'flat bordered data-testid="slot-{modality}"')
        ):
            with ui.row().classes("w-full items-center justify-between"):
                ui.label(f"{LABELS[modality]}  <{modality}>").classes("text-subtitle2")
                ui.button(icon="close", on_click=lambda: self.clear(modality)).props(
                    f'flat round dense data-testid="clear-{modality}"'
                ).tooltip("remove")
            self.uploaders[modality] = (
                ui.upload(
                    label=exts,
                    auto_upload=True,
                    max_files=1,
                    max_file_size=MAX_UPLOAD_BYTES,
                    on_upload=lambda e: self.on_upload(modality, e),
                    on_rejected=lambda: self.show_error(
                        f"{modality}: file refused (larger than "
                        f"{MAX_UPLOAD_BYTES // 2**20} MB, or more than one file)"
                    ),
                )
                .props(f'flat bordered hide-upload-btn data-testid="upload-{modality}"')
                .classes("w-full mmc-upload")
            )
            self.previews[modality] = ui.column().classes("w-full items-center")

    async def on_upload(self, modality: str, e: Any) -> None:
        from nicegui import run

        name = _safe_name(e.file.name)
        await self._typed_question()  # the placeholders go into what the page shows now
        path = self.folder / modality / name
        path.parent.mkdir(parents=True, exist_ok=True)
        for old in path.parent.iterdir():  # one file per slot
            old.unlink()
        await e.file.save(path)
        try:
            await run.io_bound(self.demo.check_input, modality, path)
            png = await run.io_bound(_point_png, path) if modality == "point" else None
        except MMComposeError as err:
            self._drop(modality)
            self.show_error(
                f"{LABELS[modality]} {name!r} refused: "
                + _redact(err.message, path, name)
                + (f" ({_redact(err.hint, path, name)})" if err.hint else "")
            )
            return
        except Exception as err:  # a decoder's unforeseen failure: say so, keep the page
            log.exception("checking upload %s", path)
            self._drop(modality)
            self.show_error(f"{LABELS[modality]} {name!r} refused: {type(err).__name__}: {err}")
            return
        self.uploads[modality] = path
        self.uploaders[modality].reset()  # the slot takes another file (it replaces this one)
        self._preview(modality, path, png)
        self.question.value = sync_placeholders(self.question.value or "", self.uploads)
        self.show_error("")

    def _preview(self, modality: str, path: Path, png: bytes | None) -> None:
        from nicegui import ui

        box = self.previews[modality]
        box.clear()
        with box:
            if modality == "image":
                ui.image(path).classes("w-full h-40").props(
                    'fit=contain data-testid="preview-image"'
                )
            elif modality == "audio":
                ui.audio(path).classes("w-full").props('data-testid="preview-audio"')
            elif modality == "video":
                ui.video(path, autoplay=False).classes("w-full h-40").props(
                    'muted data-testid="preview-video"'
                )
            elif png is not None:
                out = path.with_name(path.name + ".png")
                out.write_bytes(png)
                ui.image(out).classes("w-full h-40").props(
                    'fit=contain data-testid="preview-point"'
                )
            ui.label(path.name).classes("text-caption text-grey-8 ellipsis")

    def _drop(self, modality: str) -> None:
        self.uploads.pop(modality, None)
        self.previews[modality].clear()
        self.uploaders[modality].reset()
        self.question.value = sync_placeholders(self.question.value or "", self.uploads)

    async def clear(self, modality: str) -> None:
        await self._typed_question()
        self._drop(modality)
        shutil.rmtree(self.folder / modality, ignore_errors=True)

    def show_error(self, text: str) -> None:
        from nicegui import ui

        self.error.text = text
        self.error.set_visibility(bool(text))
        if text:
            ui.notify(text, type="negative", position="top", multi_line=True)

    # ------------------------------------------------------------------ chat
    def chat_panel(self) -> None:
        from nicegui import ui

        with ui.card().classes("w-full").props("flat bordered"):
            ui.label("Chat").classes("text-subtitle1 text-weight-bold")
            self.chat = ui.column().classes("w-full").props('data-testid="chat"')
            with self.chat:
                ui.label(
                    "Upload files on the left, ask a question, press Send. Each question is "
                    "answered on its own, from the files uploaded now."
                ).classes("text-caption text-grey-7")
        self.error = (
            ui.label("")
            .classes("w-full text-negative text-body2 q-pa-sm bg-red-1 rounded-borders")
            .props('data-testid="error"')
        )
        self.error.set_visibility(False)
        self.question = (
            ui.textarea(
                "Question",
                placeholder="What do these inputs have in common?",
            )
            .classes("w-full")
            .props('outlined autogrow data-testid="question"')
        )
        with ui.row().classes("w-full items-center"):
            self.max_tokens = (
                ui.number(
                    "max new tokens", value=self.demo.max_new_tokens, min=1, max=2048, precision=0
                )
                .classes("w-36")
                .props('dense data-testid="max-tokens"')
            )
            self.temperature = (
                ui.number("temperature (0 = greedy)", value=0.0, min=0.0, max=5.0, step=0.1)
                .classes("w-44")
                .props('dense data-testid="temperature"')
            )
            ui.space()
            self.send_button = ui.button("Send", icon="send", on_click=self.send).props(
                'data-testid="send"'
            )

    async def send(self) -> None:
        from nicegui import run, ui

        from mmcompose.serve.streaming import in_thread

        text = (await self._typed_question()).strip()
        if not text:
            self.show_error("type a question first")
            return
        prompt = sync_placeholders(text, self.uploads)
        n = next(self.turns)
        self.show_error("")
        self.send_button.disable()
        files = ", ".join(f"{m}: {p.name}" for m, p in self.uploads.items())
        with self.chat:
            ui.chat_message([prompt, *([files] if files else [])], name="you", sent=True).props(
                f'data-testid="prompt-{n}"'
            )
            with ui.chat_message(name=self.demo.model_dir.name):
                answer = (
                    ui.label("…").classes("whitespace-pre-wrap").props(f'data-testid="answer-{n}"')
                )
        max_new = int(self.max_tokens.value or self.demo.max_new_tokens)
        temperature = float(self.temperature.value or 0.0)
        text_so_far = ""
        try:
            batch = await run.io_bound(self.demo.prepare, prompt, dict(self.uploads))
            stream = in_thread(lambda: self.demo.answer(batch, max_new, temperature))
            async with contextlib.aclosing(stream):
                async for piece in stream:
                    text_so_far += piece
                    answer.text = text_so_far.lstrip()
            answer.text = text_so_far.strip()
            answer.classes("mmc-done")
        except MMComposeError as err:
            answer.text = f"(no answer: {err.message})"
            answer.classes("mmc-done mmc-failed text-negative")
            self.show_error(err.message + (f" ({err.hint})" if err.hint else ""))
        except Exception as err:
            log.exception("generation failed")
            answer.text = f"(no answer: {type(err).__name__}: {err})"
            answer.classes("mmc-done mmc-failed text-negative")
            self.show_error(f"generation failed: {type(err).__name__}: {err}")
        finally:
            self.send_button.enable()
            await asyncio.sleep(0)

    async def _typed_question(self) -> str:
        """The question as the browser shows it now. The socket's events are handled
        concurrently, so a click can be handled before the keystrokes just before it; the
        box's text is therefore read back from the page, and the server's copy updated."""
        from nicegui import ui

        js = (  # Quasar gives the element's id to the native textarea itself
            f"const e = document.getElementById('c{self.question.id}');"
            "const t = e && (e.tagName === 'TEXTAREA' ? e : e.querySelector('textarea'));"
            "return t ? t.value : null;"
        )
        try:
            typed = await ui.run_javascript(js, timeout=10)
        except TimeoutError:  # a page that does not answer: the last text it sent
            typed = None
        if isinstance(typed, str) and typed != self.question.value:
            self.question.value = typed  # (unchanged text is not sent back to the page)
        return self.question.value or ""


def _safe_name(name: str) -> str:
    """The upload's own name, reduced to a plain file name (no folders, no odd characters)."""
    base = Path(name.replace("\\", "/")).name
    stem, suffix = Path(base).stem, Path(base).suffix.lower()
    stem = re.sub(r"[^\w.-]+", "_", stem).strip("._") or "upload"
    return stem[:80] + re.sub(r"[^\w.]", "", suffix)


def _redact(text: str, path: Path, name: str) -> str:
    """Loader messages name the server's temporary path; the person knows the file's name."""
    return text.replace(str(path), name).replace(str(path.parent), "uploads")


def _point_png(path: Path) -> bytes:
    from mmcompose.model.media import load_point_cloud
    from mmcompose.serve.preview import point_cloud_png

    return point_cloud_png(load_point_cloud(path))


__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "Demo", "build_page", "serve"]
