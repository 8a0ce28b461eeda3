"""``mmcompose serve``: streaming equals ``generate``, the checks before the weights load, and
the page itself in a real headless Chromium (Debian's, driven by Playwright): uploads of all
four modalities, the streamed answer, bad uploads shown on the page, a screenshot."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from mmcompose.errors import CheckpointError, ConfigError
from mmcompose.serve.browser import synthetic_media
from mmcompose.serve.checks import check_model_dir, check_port, free_port
from mmcompose.serve.prompt import sync_placeholders
from mmcompose.serve.streaming import TextDeltas, in_thread, stream_tokens

QUESTION = "What do these inputs have in common?"
MAX_NEW = 24


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread here and in the server: the answers on the page are compared with
    in-process generation token for token, so both sum in the same order (and a loaded
    2-core machine spends seconds per token on a contended second thread)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return synthetic_media(tmp_path_factory.mktemp("serve-media"))


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path):
    """The tiny model as the server holds it: loaded, folded for inference."""
    from mmcompose.model.modeling import MMComposeForCausalLM
    from mmcompose.model.processor import MMProcessor

    proc = MMProcessor.from_pretrained(tiny_model_dir)
    model = MMComposeForCausalLM.from_pretrained(tiny_model_dir).fold_for_inference()
    return model, proc


# --------------------------------------------------------------------------- streaming
@pytest.mark.parametrize(
    "sampling", [{}, {"do_sample": True, "temperature": 0.9, "top_p": 0.8, "seed": 3}]
)
def test_stream_tokens_equal_generate(loaded, media, sampling) -> None:
    model, proc = loaded
    prompt = "<image>\n<audio>\n<video>\n<point>\n" + QUESTION
    batch = proc(prompt, {m: [p] for m, p in media.items()})
    ids = model.generate(**batch, max_new_tokens=MAX_NEW, **sampling)[0].tolist()
    streamed = list(
        stream_tokens(
            model,
            batch["input_ids"],
            batch["attention_mask"],
            batch["modal_inputs"],
            max_new_tokens=MAX_NEW,
            **sampling,
        )
    )
    assert streamed == ids  # one prompt: generate also stops at its end of sequence
    assert len(streamed) == MAX_NEW or streamed[-1] in model._default_eos()


def test_stream_stops_at_eos(loaded) -> None:
    """With every token an end of sequence, the stream yields exactly one token."""
    model, proc = loaded
    batch = proc("hello", {})
    first = next(stream_tokens(model, batch["input_ids"], batch["attention_mask"]))
    out = list(stream_tokens(model, batch["input_ids"], eos_token_id=[first], max_new_tokens=9))
    assert out == [first]
    with pytest.raises(ValueError, match="one prompt"):
        next(stream_tokens(model, torch.cat([batch["input_ids"]] * 2)))


def test_text_deltas_hold_back_split_characters(loaded) -> None:
    """Byte-level BPE splits an emoji into several tokens: no piece carries half of it, and
    the pieces add up to the decoded whole."""
    _, proc = loaded
    text = "a cow 🐄 and a dog 🐕 é!"
    ids = proc.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text.split())  # the emoji takes more than one token
    d = TextDeltas(proc.decode)
    pieces = [d.push(i) for i in ids]
    pieces.append(d.flush())
    assert "".join(pieces) == proc.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)
    assert sum(bool(p) for p in pieces) < len(ids)  # some tokens completed nothing yet


def test_in_thread_order_errors_and_early_close() -> None:
    closed: list[bool] = []

    def numbers(n: int, fail: bool = False):
        try:
            yield from range(n)
            if fail:
                raise ConfigError("boom")
        finally:
            closed.append(True)

    async def collect(make, stop_after: int | None = None) -> list[int]:
        got: list[int] = []
        stream = in_thread(make)
        async for x in stream:
            got.append(x)
            if stop_after is not None and len(got) == stop_after:
                await stream.aclose()
                break
        return got

    assert asyncio.run(collect(lambda: numbers(50))) == list(range(50))
    with pytest.raises(ConfigError, match="boom"):
        asyncio.run(collect(lambda: numbers(3, fail=True)))

    async def early() -> list[int]:
        got = await collect(lambda: numbers(10**9), stop_after=5)
        for _ in range(200):  # the worker notices the stop after its current item
            if len(closed) == 3:
                break
            await asyncio.sleep(0.01)
        return got

    assert asyncio.run(early()) == list(range(5))
    assert closed == [True, True, True]  # the endless generator was closed, not abandoned


def test_demo_answer_streams_the_generate_text(tiny_model_dir, loaded, media) -> None:
    """The page's answer (its pieces joined) is ``mmcompose generate``'s text, in pieces."""
    from mmcompose.model.generation import generate_from_folder
    from mmcompose.serve.app import Demo

    model, proc = loaded
    demo = Demo(tiny_model_dir, check_model_dir(tiny_model_dir), model, proc)
    prompt = sync_placeholders(QUESTION, media)
    pieces = list(demo.answer(demo.prepare(prompt, media), MAX_NEW, 0.0))
    want = generate_from_folder(
        tiny_model_dir, prompt, {m: [p] for m, p in media.items()}, max_new_tokens=MAX_NEW
    )
    assert "".join(pieces).strip() == want.text
    assert len(pieces) > 1


# --------------------------------------------------------------------------- pure helpers
def test_sync_placeholders() -> None:
    assert sync_placeholders("Q?", {"point", "image"}) == "<image>\n<point>\nQ?"
    assert sync_placeholders("<image>\n<point>\nQ?", {"point"}) == "<point>\nQ?"
    assert sync_placeholders("<image>\n<point>\nQ?", set()) == "Q?"
    assert sync_placeholders("<image>", set()) == ""
    assert sync_placeholders("", {"audio"}) == "<audio>\n"
    # typed in the question: left where it is, not repeated
    assert sync_placeholders("Is <audio> like this?", {"audio", "video"}) == (
        "<video>\nIs <audio> like this?"
    )
    # idempotent
    once = sync_placeholders("Q?", {"image", "audio", "video", "point"})
    assert sync_placeholders(once, {"image", "audio", "video", "point"}) == once
    assert once == "<image>\n<audio>\n<video>\n<point>\nQ?"


def test_point_cloud_png(media) -> None:
    from PIL import Image

    from mmcompose.serve.preview import point_cloud_png

    pts = np.load(media["point"])
    png = point_cloud_png(pts, size_px=200)
    img = np.asarray(Image.open(__import__("io").BytesIO(png)).convert("RGB"))
    assert img.shape == (200, 200, 3)
    drawn = (img.astype(int).sum(-1) < 600).mean()  # not white
    assert 0.02 < drawn < 0.9
    coloured = np.concatenate([pts, np.tile([[1.0, 0.0, 0.0]], (len(pts), 1))], 1)
    red = np.asarray(Image.open(__import__("io").BytesIO(point_cloud_png(coloured))))
    red = red[..., :3].astype(int)
    assert ((red[..., 0] > 150) & (red[..., 1] < 120)).any()  # the points' own colour


# --------------------------------------------------------------------------- checks
def test_port_in_use_is_refused() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(ConfigError, match=f"port {port} on 127.0.0.1 is in use") as e:
            check_port("127.0.0.1", port)
        assert "--port" in (e.value.hint or "")
    check_port("127.0.0.1", free_port())  # free: no error
    with pytest.raises(ConfigError, match="not an address of this machine"):
        check_port("192.0.2.1", free_port())  # TEST-NET-1: never local
    with pytest.raises(ConfigError, match="cannot resolve host"):
        check_port("no-such-host.invalid", 7860)


def test_folder_that_is_no_model(tmp_path: Path, tiny_model_dir: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        check_model_dir(tmp_path / "missing")
    with pytest.raises(CheckpointError, match=r"has no config\.json"):
        check_model_dir(tmp_path)
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(CheckpointError, match="not an mmcompose model"):
        check_model_dir(plain)
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_bytes((tiny_model_dir / "config.json").read_bytes())
    with pytest.raises(CheckpointError, match=r"holds no model\.safetensors"):
        check_model_dir(no_weights)
    no_tok = tmp_path / "no-tokenizer"
    no_tok.mkdir()
    for f in ("config.json", "model.safetensors"):
        (no_tok / f).write_bytes((tiny_model_dir / f).read_bytes())
    with pytest.raises(CheckpointError, match="no tokenizer files"):
        check_model_dir(no_tok)
    assert [t["modality"] for t in check_model_dir(tiny_model_dir)["towers"]] == [
        "image",
        "audio",
        "video",
        "point",
    ]


@pytest.fixture
def no_weight_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if anything loads weights."""
    from mmcompose.model.modeling import MMComposeForCausalLM

    def refuse(*a, **k):
        raise AssertionError("weights were loaded before the inputs were checked")

    monkeypatch.setattr(MMComposeForCausalLM, "from_pretrained", classmethod(refuse))


def test_cli_bad_inputs_fail_before_weights(run, tmp_path, tiny_model_dir, no_weight_loads):
    r = run("serve", str(tmp_path))
    assert r.returncode == 2
    assert "has no config.json" in r.stderr and "Traceback" not in r.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = run("serve", str(tiny_model_dir), "--port", str(port))
    assert r.returncode == 2
    assert f"port {port} on 127.0.0.1 is in use" in r.stderr and "hint:" in r.stderr
    r = run("serve", str(tiny_model_dir), "--device", "tpu")
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_binds_localhost_by_default() -> None:
    import inspect

    from mmcompose.cli import serve as cli_serve
    from mmcompose.serve.app import DEFAULT_HOST, serve

    assert DEFAULT_HOST == "127.0.0.1"
    assert inspect.signature(serve).parameters["host"].default == "127.0.0.1"
    assert inspect.signature(cli_serve).parameters["host"].default == "127.0.0.1"


# --------------------------------------------------------------------------- the browser
@pytest.fixture(scope="module")
def browser():
    """Debian's headless Chromium under Playwright; missing either is a failure, not a
    skip (``make test`` installs both)."""
    from playwright.sync_api import sync_playwright

    from mmcompose.serve.browser import find_chromium

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=find_chromium(), headless=True)
        yield b
        b.close()


@pytest.fixture(scope="module")
def served(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    from mmcompose.serve.browser import running_server

    """The server; stopped (SIGTERM) at the end, it must leave no uploads behind."""
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    tmp = tmp_path_factory.mktemp("serve-tmp")  # the server's TMPDIR: where uploads go
    with running_server(
        tiny_model_dir,
        free_port(),
        log,
        extra_args=("--max-new-tokens", str(MAX_NEW)),
        extra_env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TMPDIR": str(tmp)},
        timeout=600,  # seconds on an idle machine; a loaded shared one starves a niced start
    ) as url:
        yield url
        assert list(tmp.glob("mmc-serve-*/*/image/photo.png"))  # the uploads were kept there
    assert not list(tmp.glob("mmc-serve-*")), log.read_text()


@pytest.fixture
def page(browser, served):
    p = browser.new_page(viewport={"width": 1280, "height": 1000})
    p.goto(served)
    p.get_by_test_id("send").wait_for(timeout=60_000)
    yield p
    p.close()


def _generate(model_dir: Path, prompt: str, files: dict[str, Path]) -> str:
    from mmcompose.model.generation import generate_from_folder

    inputs = {m: [p] for m, p in files.items()}
    return generate_from_folder(model_dir, prompt, inputs, max_new_tokens=MAX_NEW).text


@pytest.mark.slow
def test_page_chat_with_every_modality(page, tiny_model_dir, media, tmp_path) -> None:
    from PIL import Image

    from mmcompose.serve.browser import ask, question_text, upload, wait_for_upload

    towers = page.get_by_test_id("towers").inner_text()
    for enc in ("patch_embed", "mel_conv", "video_frames", "pointnet", "qformer"):
        assert enc in towers
    adapters = page.get_by_test_id("adapters").inner_text()
    for name in ("text", "image", "audio", "video", "point"):
        assert f"\n{name}\t" in adapters
    for m, path in media.items():
        upload(page, m, path)
        wait_for_upload(page, m)
    assert question_text(page) == "<image>\n<audio>\n<video>\n<point>\n"  # filled in
    answer = ask(page, QUESTION, turn=1)
    prompt = "<image>\n<audio>\n<video>\n<point>\n" + QUESTION
    assert prompt + "\n" in page.get_by_test_id("prompt-1").inner_text()
    assert answer == _generate(tiny_model_dir, prompt, media)
    assert answer  # a random tiny model still writes something
    shot = tmp_path / "serve.png"
    page.screenshot(path=str(shot), full_page=True)
    with Image.open(shot) as im:
        assert im.size[0] == 1280 and im.size[1] >= 1000
    # Send reads the question from the page: text the server has not been told about yet
    # (socket events are handled concurrently: a click may overtake the keystrokes) is used
    page.evaluate("document.querySelector('textarea[data-testid=question]').value = 'Quietly?'")
    page.get_by_test_id("send").click()
    page.locator('[data-testid="answer-2"].mmc-done').wait_for(timeout=120_000)
    assert "<point>\nQuietly?\n" in page.get_by_test_id("prompt-2").inner_text()


@pytest.mark.slow
def test_page_shows_bad_uploads_and_stays_usable(page, tiny_model_dir, media, tmp_path):
    from mmcompose.serve.browser import ask, question_text, upload, wait_for_upload

    error = page.get_by_test_id("error")
    corrupt = tmp_path / "broken.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    upload(page, "image", corrupt)
    error.wait_for(state="visible", timeout=60_000)
    assert "'broken.png' refused" in error.inner_text()
    assert str(tmp_path) not in error.inner_text()  # names the file, not server paths
    assert page.get_by_test_id("preview-image").count() == 0
    assert "<image>" not in question_text(page)

    notes = tmp_path / "notes.txt"
    notes.write_text("not a sound")
    upload(page, "audio", notes)
    page.get_by_text("unsupported audio file extension '.txt'").first.wait_for(timeout=60_000)

    truncated = tmp_path / "cut.npy"
    truncated.write_bytes(media["point"].read_bytes()[:100])
    upload(page, "point", truncated)
    page.get_by_text("'cut.npy' refused").first.wait_for(timeout=60_000)
    assert "<point>" not in question_text(page)

    # still usable: good files are accepted and answered, the error goes away
    for m in ("image", "point"):
        upload(page, m, media[m])
        wait_for_upload(page, m)
    assert not error.is_visible()
    assert question_text(page) == "<image>\n<point>\n"
    answer = ask(page, QUESTION, turn=1)
    want = _generate(tiny_model_dir, "<image>\n<point>\n" + QUESTION, {
        m: media[m] for m in ("image", "point")
    })  # fmt: skip
    assert answer == want

    # a placeholder without its file: refused on the page, the next turn works again
    ask_box = page.get_by_test_id("question")
    ask_box.fill("<image>\n<point>\nIs <audio> a sound?")
    page.get_by_test_id("send").click()
    page.locator('[data-testid="answer-2"].mmc-failed').wait_for(timeout=60_000)
    assert "<audio> placeholder" in error.inner_text()
    page.get_by_test_id("clear-point").click()
    page.wait_for_function(
        "() => !document.querySelector('textarea[data-testid=question]').value.includes('<point>')"
    )
    answer = ask(page, QUESTION, turn=3)
    assert answer == _generate(tiny_model_dir, "<image>\n" + QUESTION, {"image": media["image"]})
