"""The README's screenshot of ``mmcompose serve`` (``make serve-screenshot``).

    python docs/serve_screenshot.py docs/img/serve.png [--model DIR]

The model is ``--model``, else the quickstart's composed model with the most towers
(``<cache>/quickstart/compositions/*``, read only), else a tiny random one. The inputs are
one concept in four modalities from the prepared datasets (an emoji, a spoken word, a
rendered mesh clip, a mesh's point cloud) when they are there, else synthetic files. The page
is driven in Debian's headless Chromium as the browser test drives it: upload, ask, wait for
the whole answer, screenshot.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from mmcompose.assets.cache import cache_dir
from mmcompose.fs import atomic_file
from mmcompose.serve.browser import (
    ask,
    find_chromium,
    running_server,
    synthetic_media,
    upload,
    wait_for_upload,
)
from mmcompose.serve.checks import free_port

# MCUB's question form, which the quickstart's models are evaluated on
QUESTION = (
    "Which attribute do these inputs have in common?\nA. horse\nB. cow\nC. pig\nD. bear\n"
    "Answer with the option's letter from the given choices directly."
)
CONCEPT = "cow"
SOURCES = {"image": "emoji", "audio": "spoken", "video": "mesh_clips", "point": "meshes"}


def composed_model() -> Path | None:
    """The quickstart's composition with the most towers, DAMC with searched lambdas first
    (the quickstart's headline model), the newest on a tie; None if there is none."""
    root = cache_dir() / "quickstart" / "compositions"
    best: tuple[int, bool, bool, float] | None = None
    found = None
    for cfg in sorted(root.glob("*/config.json")) if root.is_dir() else []:
        try:
            towers = len(json.loads(cfg.read_text()).get("towers", []))
        except (OSError, ValueError):
            continue
        d = cfg.parent
        key = (towers, d.name.startswith("damc-"), (d / "search").is_dir(), cfg.stat().st_mtime)
        if best is None or key > best:
            best, found = key, cfg.parent
    return found


def dataset_media(modalities: list[str]) -> dict[str, Path] | None:
    """One test-split item of CONCEPT per modality from the prepared datasets, or None."""
    out: dict[str, Path] = {}
    for m in modalities:
        manifest = cache_dir() / "datasets" / SOURCES[m] / "manifest.jsonl"
        if not manifest.is_file():
            return None
        rows = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
        rows = [r for r in rows if r.get("label") == CONCEPT and Path(r["path"]).is_file()]
        rows.sort(key=lambda r: (r.get("split") != "test", r["path"]))
        if not rows:
            return None
        out[m] = Path(rows[0]["path"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--question", default=QUESTION)
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    from mmcompose.serve.checks import check_model_dir

    with tempfile.TemporaryDirectory(prefix="mmc-shot-") as tmp:
        model = args.model or composed_model()
        if model is None:
            from mmcompose.testing import build_tiny_model

            m, proc = build_tiny_model(strategy="decoupled", seed=0)
            model = m.save_pretrained(Path(tmp) / "tiny-composed", processor=proc)
        modalities = [t["modality"] for t in check_model_dir(model)["towers"]]
        media = dataset_media(modalities) or {
            k: v for k, v in synthetic_media(Path(tmp) / "media").items() if k in modalities
        }
        print(f"model {model}; inputs " + ", ".join(f"{k}={v}" for k, v in media.items()))
        log = Path(tmp) / "server.log"
        extra = ("--max-new-tokens", str(args.max_new_tokens))
        with (
            running_server(model, free_port(), log, extra_args=extra, timeout=900) as url,
            sync_playwright() as p,
        ):
            browser = p.chromium.launch(executable_path=find_chromium(), headless=True)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url)
            page.get_by_test_id("send").wait_for(timeout=120_000)
            for m, path in media.items():
                upload(page, m, path)
                wait_for_upload(page, m, timeout_ms=300_000)
            answer = ask(page, args.question, turn=1, timeout_ms=600_000)
            print(f"answer: {answer!r}")
            page.wait_for_timeout(500)  # the last update painted
            with atomic_file(args.out) as t:
                page.screenshot(path=str(t), full_page=True, type="png")
            browser.close()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
