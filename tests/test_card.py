"""Model cards (issue 17, part 6): every folder ``compose`` and ``train`` write holds a
README.md in the Hugging Face layout, whose YAML front matter names the base model, library,
tags and modalities, and whose body gives the sources, weights, config and results."""

from __future__ import annotations

import yaml

from mmcompose.bench.results import write_results
from mmcompose.compose import run_from_yaml
from mmcompose.model.card import MARKER, CardFacts, refresh_card, render_card
from mmcompose.train.trainer import train
from test_compose import MODS, _config, _yaml, sources  # noqa: F401  (tiny single-modality MLLMs)
from test_train import _cfg, setup  # noqa: F401  (the tiny image dataset and base LLM)

KEYS = {"base_model", "library_name", "tags", "pipeline_tag", "modalities"}


def _front(card: str) -> tuple[dict, str]:
    assert card.startswith("---\n")
    head, body = card[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


def _config_block(body: str) -> dict:
    return yaml.safe_load(body.split("```yaml\n", 1)[1].split("```", 1)[0])


def test_render_front_matter_and_hub_ids():
    facts = CardFacts(
        name="m",
        kind="compose",
        method="ties",
        composition="damc",
        sources=[
            {"model": "org/llava-audio", "role": "merged", "parameters": {"weight": 0.4}},
            {"model": "/abs/local/model", "role": "merged", "parameters": {"weight": 0.6}},
        ],
        config={"merge_method": "ties"},
        modalities=["audio", "point"],
        base_llm="HuggingFaceTB/SmolLM2-135M-Instruct",
    )
    meta, body = _front(render_card(facts))
    assert set(meta) == KEYS
    # only Hub ids are base models; a local path is listed in the body only
    assert meta["base_model"] == ["HuggingFaceTB/SmolLM2-135M-Instruct", "org/llava-audio"]
    assert meta["library_name"] == "mmcompose" and meta["pipeline_tag"] == "audio-text-to-text"
    assert {"mmcompose", "multimodal", "merge", "ties", "damc"} <= set(meta["tags"])
    assert meta["modalities"] == ["text", "audio", "point"]
    assert "`/abs/local/model`" in body and "weight: 0.6" in body
    assert _config_block(body) == {"merge_method": "ties"}


def test_compose_writes_a_card_and_results_are_listed(tmp_path, sources):  # noqa: F811
    out = tmp_path / "damc"
    weights = [0.5, 0.3, 0.2]
    cfg = _config(sources["decoupled"], weights=weights, composition="damc")
    run_from_yaml(_yaml(tmp_path, "damc", cfg), out, progress=False)
    card = (out / "README.md").read_text()
    meta, body = _front(card)
    assert set(meta) == KEYS and meta["library_name"] == "mmcompose"
    assert {"merge", "linear", "damc", *MODS} <= set(meta["tags"])
    assert meta["modalities"] == ["text", *MODS] and meta["pipeline_tag"] == "image-text-to-text"
    assert body.startswith(MARKER) and "# damc\n" in body  # the final name, not the temp one
    for p, w in zip(sources["decoupled"], weights, strict=True):
        assert f"`{p}`" in body and f"weight: {w}" in body
    assert _config_block(body)["merge_method"] == "linear"
    assert "No results yet" in body

    write_results(
        out / "eval",
        {"mcub": {"acc,none": 0.75, "acc_stderr,none": 0.1}},
        {"mcub": {"task": "mcub"}},
        {"mcub": 8},
        {"model": "mmcompose"},
    )
    assert refresh_card(out) == out / "README.md"
    _, body = _front((out / "README.md").read_text())
    assert "| mcub | acc | 0.7500 | 8 |" in body and "# damc\n" in body

    (out / "README.md").write_text("# my own card\n")  # a card the user wrote is theirs
    assert refresh_card(out) is None and (out / "README.md").read_text() == "# my own card\n"


def test_train_writes_a_card(setup, tmp_path):  # noqa: F811
    out = tmp_path / "trained"
    cfg = _cfg(setup).model_copy(
        update={
            "stage1": _cfg(setup).stage1.model_copy(update={"epochs": 0}),
            "stage2": _cfg(setup).stage2.model_copy(update={"epochs": 1}),
        }
    )
    train(cfg, out, config_dir=setup["dir"], progress=False)
    meta, body = _front((out / "README.md").read_text())
    assert set(meta) == KEYS and meta["library_name"] == "mmcompose"
    assert {"trained", "decoupled", "image"} <= set(meta["tags"])
    assert meta["modalities"] == ["text", "image"]
    assert "# trained\n" in body and "Final training loss, stage 2" in body
    assert _config_block(body)["tower"]["encoder"]["name"] == "patch_embed"


def test_eval_into_the_models_eval_folder_updates_its_card(tmp_path, sources):  # noqa: F811
    from mmcompose.bench.evaluate import _refresh_card_if_inside

    out = tmp_path / "naive"
    cfg = _config(sources["shared"], weights=[1 / 3] * 3, composition="naivemc")
    run_from_yaml(_yaml(tmp_path, "naive", cfg), out, progress=False)
    block = {"mcub": {"acc,none": 0.5, "acc_stderr,none": 0.1}}
    elsewhere = tmp_path / "results"
    write_results(elsewhere, block, {"mcub": {"task": "mcub"}}, {"mcub": 4}, {"model": "x"})
    _refresh_card_if_inside(out, elsewhere)  # results outside the folder: the card stays
    assert "No results yet" in (out / "README.md").read_text()
    inside = out / "eval" / "mcub"
    write_results(inside, block, {"mcub": {"task": "mcub"}}, {"mcub": 4}, {"model": "x"})
    _refresh_card_if_inside(out, inside)
    assert "| mcub | acc | 0.5000 | 4 |" in (out / "README.md").read_text()
