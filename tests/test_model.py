"""The composed model: splicing, routed LoRA, generation, save/load."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import LlamaMLP

from mmcompose.errors import (
    CheckpointError,
    ConfigError,
    MMComposeError,
    PlaceholderError,
    UnknownNameError,
)
from mmcompose.model import MMComposeForCausalLM, MMConfig, MMProcessor, ModuleSpec, TowerConfig
from mmcompose.model.lora import LoRAAdapter, LoRALinear, contiguous_runs, lora_layers
from mmcompose.model.splice import IGNORE_INDEX, ROUTE_IDS, SENTINELS
from mmcompose.testing import (
    ALGEBRAIC_RTOL,
    assert_algebraically_equal,
    assert_float_close,
    build_tiny_model,
    float64_model,
    tiny_inputs,
    to_float64,
)

PROMPTS = [
    "Look: <image> and <audio>. What do they share?",
    "Only text here, no inputs at all.",
    "<point> then <video> and another <image>",
]


def batch_for(proc: MMProcessor, prompts=PROMPTS, seed=0, **kw):
    raw = tiny_inputs(seed)
    inputs: dict[str, list] = {m: [] for m in raw}
    for p in prompts:
        for m in ("image", "audio", "video", "point"):
            inputs[m] += [raw[m]] * p.count(f"<{m}>")
    return proc(prompts, inputs, **kw)


@pytest.fixture(scope="module")
def decoupled():
    return build_tiny_model(strategy="decoupled", seed=1)


@pytest.fixture(scope="module")
def decoupled64():
    """The same model in float64, for claims of algebraic equality (float32 rounding differs
    between CPUs; float64 rounding is ~1e-14, far below any real discrepancy)."""
    model, proc = build_tiny_model(strategy="decoupled", seed=1)
    return float64_model(model), proc


def test_splice_places_blocks_in_order_with_ignored_labels(decoupled):
    model, proc = decoupled
    batch = batch_for(proc, padding_side="right")
    labels = batch["input_ids"].clone().masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
    sp = model.prepare_inputs(
        batch["input_ids"], batch["attention_mask"], batch["modal_inputs"], labels=labels
    )
    # Sample 0: text, image block, text, audio block, text.
    blocks = model.embed_modalities(batch["modal_inputs"])
    r0 = sp.routes[0][sp.attention_mask[0].bool()].tolist()
    kinds = [k for i, k in enumerate(r0) if i == 0 or r0[i - 1] != k]
    assert kinds == [0, ROUTE_IDS["image"], 0, ROUTE_IDS["audio"], 0]
    start = r0.index(ROUTE_IDS["image"])
    n_img = blocks["image"].shape[1]
    assert torch.equal(sp.embeds[0, start : start + n_img], blocks["image"][0])
    # Sample 2 takes the *second* image block and the only point/video blocks.
    r2 = sp.routes[2].tolist()
    s2 = r2.index(ROUTE_IDS["image"])
    assert torch.equal(sp.embeds[2, s2 : s2 + n_img], blocks["image"][1])
    assert [k for i, k in enumerate(r2) if i == 0 or r2[i - 1] != k][:4] == [
        0,
        ROUTE_IDS["point"],
        0,
        ROUTE_IDS["video"],
    ]
    # Labels: -100 over every block and over padding, token ids elsewhere.
    assert (sp.labels[sp.routes != 0] == IGNORE_INDEX).all()
    assert (sp.labels[sp.attention_mask == 0] == IGNORE_INDEX).all()
    text_ids = batch["input_ids"][0][batch["input_ids"][0] >= 0]
    assert torch.equal(sp.labels[0][sp.routes[0] == 0][: len(text_ids)], text_ids)
    # The text-only sample is right-padded and has no blocks.
    assert (sp.routes[1] == 0).all() and sp.attention_mask[1, 0] == 1


def test_left_padding_and_positions(decoupled):
    model, proc = decoupled
    batch = batch_for(proc, padding_side="left")
    sp = model.prepare_inputs(
        batch["input_ids"], batch["attention_mask"], batch["modal_inputs"], padding_side="left"
    )
    assert (sp.attention_mask[:, -1] == 1).all()
    for b in range(3):
        n = int(sp.attention_mask[b].sum())
        assert torch.equal(sp.position_ids[b, -n:], torch.arange(n))


@pytest.mark.parametrize(
    ("prompts", "inputs", "match"),
    [
        (["<image> <image>"], {"image": 1}, "2 <image> placeholder"),
        (["no placeholder"], {"audio": 1}, "0 <audio> placeholder"),
    ],
)
def test_placeholder_mismatch(decoupled, prompts, inputs, match):
    _, proc = decoupled
    raw = tiny_inputs()
    with pytest.raises(PlaceholderError, match=match):
        proc(prompts, {m: [raw[m]] * n for m, n in inputs.items()})


def test_missing_modality_is_named():
    model, proc = build_tiny_model(modalities=("image",), strategy="shared")
    with pytest.raises(PlaceholderError, match="no audio input") as e:
        proc(["<audio>"], {"audio": [tiny_inputs()["audio"]]})
    assert "image" in e.value.hint
    ids = torch.tensor([[5, SENTINELS["audio"], 6]])
    with pytest.raises(ConfigError, match="no 'audio' tower"):
        model(ids, modal_inputs={"audio": torch.zeros(1, 80, 200)})


def test_splice_checks_counts_in_model(decoupled):
    model, _ = decoupled
    ids = torch.tensor([[5, SENTINELS["image"], 6, SENTINELS["image"]]])
    with pytest.raises(PlaceholderError, match="2 <image>"):
        model(ids, modal_inputs={"image": torch.zeros(1, 3, 32, 32)})


# ---------------------------------------------------------------- routing vs masked reference
def _masked_linear_forward(self: LoRALinear, x):
    """Reference (as ModelCompose does it): every adapter over every token, then masked."""
    y = F.linear(x, self.weight, self.bias)
    routes = self.router.routes
    for rid, name in self.router.route_to_adapter.items():
        if name is None or name not in self.lora:
            continue
        mask = torch.ones(x.shape[:-1]) if routes is None else (routes == rid).to(x.dtype)
        if routes is None and rid != 0:
            continue
        y = y + self.lora[name](x) * mask.unsqueeze(-1)
    return y


def _masked_mlp_forward(self: LlamaMLP, x):
    """Reference DAMC MLP: the whole gate/up/down path per adapter over all tokens, masked."""
    router = self.gate_proj.router
    routes = (
        router.routes if router.routes is not None else torch.zeros(x.shape[:-1], dtype=torch.long)
    )
    out = torch.zeros_like(x)

    def lin(layer: LoRALinear, h, name):
        y = F.linear(h, layer.weight, layer.bias)
        return y + layer.lora[name](h) if name is not None else y

    for rid, name in router.route_to_adapter.items():
        mask = (routes == rid).to(x.dtype).unsqueeze(-1)
        if not mask.any():
            continue
        h = self.act_fn(lin(self.gate_proj, x, name)) * lin(self.up_proj, x, name)
        out = out + lin(self.down_proj, h, name) * mask
    return out


def test_decoupled_routing_matches_masked_reference(decoupled64, monkeypatch):
    model, proc = decoupled64
    batch = to_float64(batch_for(proc, padding_side="left"))
    kw = dict(padding_side="left")

    # Rows each adapter is applied to, summed per layer call (a group in several contiguous
    # runs is applied run by run).
    keys = {id(a): f"{ln}:{an}" for ln, layer in lora_layers(model) for an, a in layer.lora.items()}
    seen: dict[str, int] = {}

    def counting(fn, rows_arg):
        def wrapped(self, *args):
            rows = args[rows_arg].reshape(-1, args[rows_arg].shape[-1]).shape[0]
            seen[keys[id(self)]] = seen.get(keys[id(self)], 0) + rows
            return fn(self, *args)

        return wrapped

    with monkeypatch.context() as mp:
        mp.setattr(LoRAAdapter, "forward", counting(LoRAAdapter.forward, 0))
        mp.setattr(LoRAAdapter, "add_to", counting(LoRAAdapter.add_to, 1))
        with torch.no_grad():
            routed = model(**batch, **kw).logits
    with torch.no_grad():
        routes = model.prepare_inputs(
            **{k: batch[k] for k in ("input_ids", "attention_mask", "modal_inputs")}, **kw
        ).routes

    # Each adapter ran, per layer, on exactly its own tokens.
    expected = {
        name: int((routes == ROUTE_IDS[name]).sum())
        for name in ("image", "audio", "video", "point")
    }
    expected["text"] = int((routes == 0).sum())
    n_layers = len(list(lora_layers(model)))
    assert len(seen) == n_layers * 5
    for key, rows in seen.items():
        assert rows == expected[key.split(":")[1]], key
    assert sum(expected.values()) == routes.numel()

    monkeypatch.setattr(LoRALinear, "forward", _masked_linear_forward)
    with torch.no_grad():
        ref_linear = model(**batch, **kw).logits
    monkeypatch.setattr(LlamaMLP, "forward", _masked_mlp_forward)
    with torch.no_grad():
        ref_mlp = model(**batch, **kw).logits
    # Dispatch vs masking is algebraic (float64 ~1e-14); a misrouted adapter moves logits O(1).
    assert_algebraically_equal(routed, ref_linear)
    assert_algebraically_equal(routed, ref_mlp)
    # And the adapters matter: without them the logits differ.
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.router.route_to_adapter = {}
        monkeypatch.undo()
        plain = model(**batch, **kw).logits
        model.router.route_to_adapter = {
            rid: model.config.lora.adapter_for(k) for k, rid in ROUTE_IDS.items()
        }
    assert (plain - routed).abs().max() > 1e-3


def test_shared_lora_equals_merged_weights():
    model, proc = build_tiny_model(strategy="shared", seed=2)
    float64_model(model)  # W x + s B A x == (W + s B A) x is algebraic: check it in float64
    batch = to_float64(batch_for(proc))
    with torch.no_grad():
        before = model(**batch).logits
        for _, layer in lora_layers(model):
            layer.merge_adapter("text")
        after = model(**batch).logits
    # float64 rounding ~1e-14 relative; a 1% error in one layer's merge moves logits by 5e-2
    assert_algebraically_equal(after, before)


@pytest.mark.parametrize("strategy", ["decoupled", "shared", "decoupled-no-audio-adapter"])
def test_fold_for_inference_keeps_outputs_and_refuses_saving(strategy, tmp_path):
    """Text adapter folded into W, modality adapters turned into differences (and tokens with
    no adapter sent back to W): every token's logits stay the same, text tokens run no
    adapter, and saving fails."""
    model, proc = build_tiny_model(strategy=strategy.split("-")[0], seed=4)
    if strategy.endswith("no-audio-adapter"):  # audio tokens use the base weights
        for _, layer in lora_layers(model):
            del layer.lora["audio"]
        model.router.route_to_adapter[ROUTE_IDS["audio"]] = None
    float64_model(model)  # folding is algebraic: W + dW_m == (W + dW_t) + (dW_m - dW_t)
    batch = to_float64(batch_for(proc))
    with torch.no_grad():
        before = model(**batch).logits
        model.fold_for_inference()
        after = model(**batch).logits
    # float64 rounding ~1e-14 relative; a wrong difference adapter moves logits by >= 1e-2
    assert_algebraically_equal(after, before)
    assert (before - after).abs().max() < ALGEBRAIC_RTOL * before.abs().max()  # same, relative
    names = {n for _, layer in lora_layers(model) for n in layer.lora}
    expected = {
        "decoupled": {"image", "audio", "video", "point"},
        "shared": set(),
        "decoupled-no-audio-adapter": {"image", "_base", "video", "point"},
    }
    assert names == expected[strategy]
    with pytest.raises(MMComposeError, match="folded"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_families_build_and_run(family):
    model, proc = build_tiny_model(modalities=("image",), strategy="decoupled", family=family)
    batch = proc(["<image> hi"], {"image": [tiny_inputs()["image"]]})
    out = model(**batch)
    assert out.logits.shape[-1] == model.language_model.config.vocab_size
    assert any(True for _ in lora_layers(model))


def test_contiguous_runs():
    assert contiguous_runs(torch.tensor([3, 4, 5, 9, 10, 20])) == ((3, 3), (9, 2), (20, 1))
    assert contiguous_runs(torch.tensor([7])) == ((7, 1),)
    assert contiguous_runs(torch.tensor([], dtype=torch.long)) == ()
    assert contiguous_runs(torch.arange(0, 20, 2), max_runs=9) is None  # 10 runs of 1


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_row_slices_equal_gather_scatter(padding_side, monkeypatch):
    """Adapters applied on contiguous row slices (views) give the logits and the gradients of
    the gather/scatter path, for training as for inference."""
    import mmcompose.model.lora as lora_mod

    def run() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model, proc = build_tiny_model(strategy="decoupled", seed=6)
        float64_model(model)
        model.train()
        batch = to_float64(batch_for(proc, padding_side=padding_side))
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
        runs_seen: list[bool] = []
        set_routes = model.router.set_routes

        def spy(routes):
            set_routes(routes)
            runs_seen.append(bool(model.router.runs))

        model.router.set_routes = spy
        out = model(**batch, labels=labels, padding_side=padding_side)
        out.loss.backward()
        assert any(runs_seen) == bool(lora_mod.MAX_RUNS)  # the path under test was taken
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        return out.logits.detach(), grads

    sliced, g_sliced = run()
    monkeypatch.setattr(lora_mod, "MAX_RUNS", 0)  # every group through gather/scatter
    gathered, g_gathered = run()
    # Same products on the same rows, summed in the same order: float64 rounding at most.
    assert_algebraically_equal(sliced, gathered)
    assert g_sliced.keys() == g_gathered.keys()
    assert any(".lora.image.lora_B" in n for n in g_sliced)
    for n, g in g_sliced.items():
        assert_algebraically_equal(g, g_gathered[n])


# ---------------------------------------------------------------- training signal
def test_gradients_reach_trainables_not_frozen_encoder(decoupled):
    model, proc = build_tiny_model(strategy="decoupled", seed=3)
    model.train()
    batch = batch_for(proc, padding_side="right")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
    out = model(**batch, labels=labels, padding_side="right")
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert grads["towers.image.projector.0.weight"] is not None
    assert all(g is None for n, g in grads.items() if ".encoder." in n)
    a = "language_model.model.layers.0.self_attn.q_proj.lora.image.lora_A"
    assert grads[a] is not None and grads[a].abs().sum() > 0
    # Only label positions reach the LM head.
    assert out.logits.shape[0] == int((out.spliced.labels[:, 1:] != IGNORE_INDEX).sum())


# ---------------------------------------------------------------- generation
def test_batched_generation_matches_single_and_uncached(decoupled64):
    # Greedy tokens: padded batches, single rows and recomputation round differently, and in
    # float32 a near tie of the two best logits could flip on another CPU; in float64 such a
    # flip would need a tie to ~1e-14.
    model, proc = decoupled64
    batch = to_float64(batch_for(proc))
    gen = model.generate(**batch, max_new_tokens=6, eos_token_id=[])
    assert gen.shape == (3, 6)
    raw = tiny_inputs()
    for i, p in enumerate(PROMPTS):
        inputs = {m: [raw[m]] * p.count(f"<{m}>") for m in raw}
        single = to_float64(proc([p], inputs))
        assert torch.equal(model.generate(**single, max_new_tokens=6, eos_token_id=[])[0], gen[i])
    # No-cache greedy decoding (full recompute each step) gives the same tokens.
    single = to_float64(proc([PROMPTS[0]], {"image": [raw["image"]], "audio": [raw["audio"]]}))
    ids, mask = single["input_ids"], single["attention_mask"]
    toks = []
    with torch.no_grad():
        for _ in range(6):
            logits = model(ids, mask, single["modal_inputs"]).logits
            nxt = logits[0, -1].argmax()
            toks.append(int(nxt))
            ids = torch.cat([ids, nxt.view(1, 1)], 1)
            mask = torch.cat([mask, torch.ones(1, 1, dtype=torch.long)], 1)
    assert toks == gen[0].tolist()


def test_sampling_is_seeded(decoupled):
    model, proc = decoupled
    batch = batch_for(proc)
    kw = dict(max_new_tokens=8, do_sample=True, temperature=1.5, top_p=0.9, top_k=50)
    a = model.generate(**batch, seed=7, **kw)
    b = model.generate(**batch, seed=7, **kw)
    assert torch.equal(a, b)  # same seed, model, inputs and kernels: bit-exact
    c = [model.generate(**batch, seed=s, **kw) for s in range(8, 12)]
    assert any(not torch.equal(a, x) for x in c)


def test_generation_stops_at_eos(decoupled):
    model, proc = decoupled
    batch = batch_for(proc)
    first = model.generate(**batch, max_new_tokens=4, eos_token_id=[])[:, 0]
    out = model.generate(**batch, max_new_tokens=4, eos_token_id=int(first[0]), pad_token_id=-1)
    assert out[0, 0] == first[0] and (out[0, 1:] == -1).all()


# ---------------------------------------------------------------- save / load
def test_save_load_round_trip_is_bit_exact(tmp_path, decoupled):
    model, proc = decoupled
    path = model.save_pretrained(tmp_path / "m", processor=proc, max_shard_size="200KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert (path / "processor_config.json").is_file() and (path / "tokenizer.json").is_file()
    loaded = MMComposeForCausalLM.from_pretrained(path)
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    proc2 = MMProcessor.from_pretrained(path)
    batch = batch_for(proc2)
    assert torch.equal(  # bit-exact weights (checked above), same inputs and kernels
        model.generate(**batch, max_new_tokens=5), loaded.generate(**batch, max_new_tokens=5)
    )
    assert loaded.language_model.get_output_embeddings().weight is (
        loaded.language_model.get_input_embeddings().weight
    )


def test_save_refuses_existing_and_leaves_nothing_on_failure(tmp_path, decoupled, monkeypatch):
    model, _ = decoupled
    out = tmp_path / "m"
    model.save_pretrained(out)
    with pytest.raises(Exception, match="already exists"):
        model.save_pretrained(out)
    import mmcompose.model.modeling as modeling

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(modeling, "save_state_dict", boom)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(tmp_path / "n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_bad_checkpoints(tmp_path, tiny_model_dir):
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        MMComposeForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        MMComposeForCausalLM.from_pretrained(tmp_path / "nope")
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    w = broken / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        MMComposeForCausalLM.from_pretrained(broken)


def test_config_errors():
    with pytest.raises(UnknownNameError, match="unknown encoder 'nope'"):
        MMComposeForCausalLM(
            MMConfig(
                text_config={
                    "model_type": "llama",
                    "vocab_size": 10,
                    "hidden_size": 8,
                    "num_hidden_layers": 1,
                    "num_attention_heads": 2,
                    "intermediate_size": 8,
                },
                towers=[
                    TowerConfig(
                        modality="image",
                        encoder=ModuleSpec(name="nope"),
                        projector=ModuleSpec(name="linear"),
                    )
                ],
            )
        )
    with pytest.raises(UnknownNameError, match="unknown modality 'smell'"):
        TowerConfig(modality="smell", encoder=ModuleSpec(name="x"), projector=ModuleSpec(name="y"))
    assert (
        TowerConfig(
            modality="vision", encoder=ModuleSpec(name="x"), projector=ModuleSpec(name="y")
        ).modality
        == "image"
    )
    with pytest.raises(ConfigError, match="model_type"):
        MMConfig.from_dict({"text_config": {"model_type": "gpt2"}})
    with pytest.raises(ConfigError, match="colour: Extra inputs"):
        MMConfig.from_dict({"text_config": {"model_type": "llama"}, "colour": "red"})


def test_adapter_modules_are_lora(decoupled):
    model, _ = decoupled
    names = {n for _, layer in lora_layers(model) for n in layer.lora}
    assert names == {"text", "image", "audio", "video", "point"}
    assert all(
        isinstance(a, LoRAAdapter) for _, layer in lora_layers(model) for a in layer.lora.values()
    )


def test_score_continuations_matches_full_forward(decoupled64):
    model, proc = decoupled64  # float64 network: packing vs separate rows is algebraic
    raw = tiny_inputs()
    batch = to_float64(proc(["<image> name it"], {"image": [raw["image"]]}))
    conts = [[40, 41, 42], [50], [60, 61]]
    scores = model.score_continuations(
        batch["input_ids"], conts, batch["attention_mask"], batch["modal_inputs"]
    )
    for c, s in zip(conts, scores, strict=True):
        ids = torch.cat([batch["input_ids"], torch.tensor([c])], dim=1)
        with torch.no_grad():
            logits = model(ids, modal_inputs=batch["modal_inputs"]).logits
            logp = logits.log_softmax(-1)[0]
        n = len(c)
        ref = sum(logp[-n - 1 + j, c[j]] for j in range(n))
        # Scoring rounds its logits to float32 for log_softmax: n terms, each off by a few
        # float32 eps of the largest logit or log-prob; the network itself is float64.
        mag = float(logits.abs().max() + logp.abs().max())
        assert_float_close(s, ref, n_terms=n, magnitude=mag)
    assert scores.shape == (3,) and len(set(scores.tolist())) == 3


def test_encoder_memo_reuses_outputs_bit_exactly() -> None:
    """Inside memoized_encoders, a second model with the same frozen encoder weights encodes
    nothing new and gets the same features; different weights never share entries."""
    from mmcompose.model.encode_memo import memoized_encoders
    from mmcompose.testing import build_tiny_model, tiny_inputs

    a, proc = build_tiny_model(["image"], seed=0)
    b, _ = build_tiny_model(["image"], seed=0)
    c, _ = build_tiny_model(["image"], seed=1)
    x = proc.preprocess("image", [tiny_inputs(0)["image"]] * 2)
    plain = a.towers["image"].encode(x)
    with memoized_encoders() as memo:
        first = a.towers["image"].encode(x)
        assert memo.misses == 1 and memo.hits == 1  # two equal inputs: one encoder call
        second = b.towers["image"].encode(x)
        assert memo.misses == 1 and memo.hits == 3
        other = c.towers["image"].encode(x)
        assert memo.misses == 2
    assert torch.equal(first, plain) and torch.equal(second, plain)
    assert not torch.equal(other, plain)
