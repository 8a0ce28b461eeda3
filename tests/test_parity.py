"""Imported checkpoints behave exactly as their own library runs them (issue 14).

Every source here is a tiny random checkpoint that transformers builds and saves itself
(``LlavaForConditionalGeneration`` + ``LlavaProcessor`` with llava-hf's llava-1.5 chat template
and a CLIP image processor, over a SentencePiece-style tokenizer with ``<image>`` and ``<pad>``
added the way llava-hf adds them), imported with a one-model ``compose`` config. The reference
side is run through transformers' own classes on hand-written content parts; the imported side
through ``MMProcessor`` and ``MMComposeForCausalLM`` on mmcompose prompts. Logit tolerances are
float32 rounding over the LLM's reductions (``hidden * layers`` terms, see
:func:`mmcompose.compose.check.tolerance`); greedy tokens must be identical.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoProcessor,
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    GenerationConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from mmcompose.compose import run_from_yaml
from mmcompose.compose.check import check_against
from mmcompose.compose.sources import open_source
from mmcompose.errors import CheckpointError, ConfigError
from mmcompose.model import MMComposeForCausalLM, MMProcessor, media
from mmcompose.testing import (
    _CORPUS,
    assert_float_close,
    compose_config,
    save_tiny_single,
    tiny_inputs,
    tiny_text_config,
    tiny_tokenizer,
)

# llava-hf/llava-1.5-7b-hf's chat template, as transformers saves it (chat_template.jinja).
LLAVA15 = (
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
SIZE, PATCH = 42, 14  # 3x3 patches: 9 image tokens ("default" drops CLS)
CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            image_size=SIZE, patch_size=PATCH, projection_dim=16)  # fmt: skip
EXTRA_ROWS = 8  # llava-hf pads the vocabulary past <image> and <pad>
# (mmcompose prompt, the same user turn as transformers' content parts)
IMAGE_Q = ("<image>\nWhat is shown in the image?",
           [{"type": "image"}, {"type": "text", "text": "What is shown in the image?"}])  # fmt: skip
TEXT_Q = ("a dog or a cat? answer briefly.",
          [{"type": "text", "text": "a dog or a cat? answer briefly."}])  # fmt: skip
IMAGE_Q2 = ("describe <image> briefly",
            [{"type": "text", "text": "describe"}, {"type": "image"},
             {"type": "text", "text": "briefly"}])  # fmt: skip
# Image sizes (w, h): landscape and portrait (resize truncates, crop offsets floor), square at
# and above the tower's size, an upsampled small one, and a strongly elongated one.
SIZES = [(80, 60), (60, 80), (42, 42), (13, 29), (100, 43), (57, 200)]


def _image(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed + 7 * w + h)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def llama_tokenizer() -> PreTrainedTokenizerFast:
    """A SentencePiece-style BPE tokenizer (Metaspace, ``▁`` prepended to the first piece
    only, BOS added) like Llama's, without ``<image>``/``<pad>`` (LLaVA-original's)."""
    corpus = _CORPUS + " USER: ASSISTANT: What is shown in the image? describe it briefly.\n"
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
        initial_alphabet=sorted(set(corpus.replace(" ", "▁"))),
    )  # fmt: skip
    tok.train_from_iterator([corpus] * 4, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def llava_hf_tokenizer() -> tuple[PreTrainedTokenizerFast, int]:
    """llava-hf's tokenizer: the base one plus ``<image>`` and ``<pad>`` (the pad token)."""
    tok = llama_tokenizer()
    base = len(tok)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"], "pad_token": "<pad>"})
    return tok, base


def save_llava_hf(path: Path, family: str = "llama", seed: int = 0) -> int:
    """A tiny llava-hf folder written by transformers (model + LlavaProcessor); returns the
    base vocabulary size (rows before ``<image>``)."""
    tok, base = llava_hf_tokenizer()
    text = tiny_text_config(base + EXTRA_ROWS, family, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id)  # fmt: skip
    text |= {"bos_token_id": tok.bos_token_id, "tie_word_embeddings": family != "llama"}
    cfg = LlavaConfig(
        text_config=text, vision_config=CLIP, image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2, vision_feature_select_strategy="default",
        projector_hidden_act="gelu", tie_word_embeddings=text["tie_word_embeddings"],
    )  # fmt: skip
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).eval()
    image_proc = CLIPImageProcessor(
        size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE}
    )
    proc = LlavaProcessor(
        image_processor=image_proc, tokenizer=tok, chat_template=LLAVA15, patch_size=PATCH,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
    )  # fmt: skip
    model.save_pretrained(path)
    proc.save_pretrained(path)
    return base


def import_one(src: Path, out: Path, **options: Any) -> Path:
    """``mmcompose compose`` of one model (importer options as a user writes them)."""
    entry: dict[str, Any] = {"model": str(src)}
    if options:
        entry["importer_options"] = options
    cfg = out.parent / f"{out.name}.yaml"
    cfg.write_text(yaml.safe_dump({"merge_method": "linear", "models": [entry]}))
    run_from_yaml(cfg, out, progress=False)
    return out


@pytest.fixture(scope="module")
def llava(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """llava-hf folders (Llama, Qwen2, Mistral LLMs) and their imports."""
    d = tmp_path_factory.mktemp("parity")
    out: dict[str, Any] = {"dir": d}
    for family in ("llama", "qwen2", "mistral"):
        src = d / f"llava-{family}"
        base = save_llava_hf(src, family)
        out[family] = (src, import_one(src, d / f"{family}-full"))
        out["base"] = base
    return out


@pytest.fixture(scope="module")
def trimmed(llava) -> Path:
    """The Llama llava-hf folder imported with ``base_vocab_size`` (its added rows dropped)."""
    return import_one(
        llava["llama"][0], llava["dir"] / "llama-trimmed", base_vocab_size=llava["base"]
    )


def _reference(src: Path) -> tuple[Any, LlavaForConditionalGeneration]:
    proc = AutoProcessor.from_pretrained(str(src))
    proc.tokenizer.padding_side = "left"
    return proc, LlavaForConditionalGeneration.from_pretrained(str(src)).eval()


def _hf_inputs(proc: Any, turns: list[list[dict]], images: list[Image.Image]) -> Any:
    texts = [
        proc.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True)
        for t in turns
    ]
    return proc(text=texts, images=images or None, padding=True, return_tensors="pt")


def _tolerance_terms(model: MMComposeForCausalLM) -> int:
    cfg = model.language_model.config
    return cfg.hidden_size * cfg.num_hidden_layers


# ------------------------------------------------------------------ (1) chat templates
def test_llava_template_renders_the_users_words_in_every_saved_form(llava, tmp_path):
    """transformers saves the processor's template as chat_template.jinja (older processors:
    chat_template.json; older tokenizers: tokenizer_config.json). Each renders the user's
    words and placeholders exactly as transformers renders the same turn as content parts."""
    src, out = llava["llama"]
    hf_proc, _ = _reference(src)
    forms = {"jinja": out}
    for form in ("json", "tokenizer_config"):
        copy = tmp_path / form
        shutil.copytree(out, copy, ignore=shutil.ignore_patterns("*.safetensors"))
        (copy / "chat_template.jinja").unlink()
        if form == "json":
            (copy / "chat_template.json").write_text(json.dumps({"chat_template": LLAVA15}))
        else:
            tc = json.loads((copy / "tokenizer_config.json").read_text())
            (copy / "tokenizer_config.json").write_text(json.dumps(tc | {"chat_template": LLAVA15}))
        forms[form] = copy
    for form, folder in forms.items():
        proc = MMProcessor.from_pretrained(folder)
        assert proc.tokenizer.chat_template == LLAVA15, form
        for ours, parts in (IMAGE_Q, TEXT_Q, IMAGE_Q2):
            want = hf_proc.apply_chat_template(
                [{"role": "user", "content": parts}], add_generation_prompt=True
            )
            assert proc.format_prompt(ours) == want, (form, ours)
        assert (
            proc.format_prompt("hi there") == "USER: hi there ASSISTANT:"
        )  # not 'USER: ASSISTANT:'
    # A conversation (training renders these): the assistant's words survive too.
    chat = proc.render_chat(
        [{"role": "user", "content": "<image>\nwhat?"}, {"role": "assistant", "content": "a dog"}],
        add_generation_prompt=False,
    )
    assert chat == "USER: <image>\nwhat? ASSISTANT: a dog "


def test_parts_template_token_maps_back_to_the_placeholder():
    """A template that prints its own image token (Qwen2-VL style) around structure tokens:
    the token becomes ``<image>``, the structure stays; a modality the template has no part
    type for stays in the text."""
    tok = tiny_tokenizer()
    tok.add_special_tokens(
        {"additional_special_tokens": ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>"]}
    )
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
        "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    proc = MMProcessor(tok, {})
    assert proc.format_prompt("<image>\nwhat is it? <audio>") == (
        "<|im_start|>user\n<|vision_start|><image><|vision_end|>what is it? <audio><|im_end|>\n"
        "<|im_start|>assistant\n"
    )


@pytest.mark.parametrize(
    "template",
    [
        "{% for m in messages %}{{ m['role'] }}: {% endfor %}",  # prints no content at all
        "{% for m in messages %}{{ m['content'][0] }}{% endfor %}",  # first char / part only
        "{{ raise_exception('no') }}",
    ],
)
def test_a_template_that_loses_the_prompt_is_an_error(template):
    tok = tiny_tokenizer()
    tok.chat_template = template
    with pytest.raises(CheckpointError, match="cannot render"):
        MMProcessor(tok, {}).format_prompt("<image>\nwhat is it?")


# ------------------------------------------------------------------ (2) image preprocessing
def test_resize_and_crop_follow_transformers_rounding():
    """The issue's case: 80x60 at 56 px resizes to 74x56 (truncated, not rounded to 75) and
    crops at offset 9 (floored)."""
    assert media.resize_shortest_edge(80, 60, 56) == (74, 56)
    assert media.resize_shortest_edge(60, 80, 56) == (56, 74)
    arr = np.arange(74 * 3).reshape(1, 74, 3)
    assert media.center_crop(arr.repeat(56, 0), 56, 56)[0, 0, 0] == 9 * 3


@pytest.mark.parametrize("pad", [False, True])
def test_clip_pixels_equal_transformers_image_processor(pad):
    """CLIP preprocessing equals CLIPImageProcessor bit for bit (ours runs it; our own copy of
    its steps, the fallback, equals it too); with pad-to-square, after LLaVA's expand2square."""
    settings = media.ImageProcessing(pad_to_square=pad).for_size(56)
    ref_proc = CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    for w, h in SIZES:
        img = _image(w, h)
        mean = tuple(int(x * 255) for x in ref_proc.image_mean)  # as LLaVA computes it
        square = _expand2square(img, mean) if pad else img
        ref = torch.from_numpy(ref_proc(images=square, return_tensors="np")["pixel_values"][0])
        assert torch.equal(media.preprocess_image(img, settings), ref), (w, h)
        own = media._own_pixels(media.expand_to_square(img, settings.image_mean) if pad else img,
                                settings)  # fmt: skip
        assert torch.equal(own, ref), (w, h)


def test_image_processor_settings_from_hf_configs():
    old = {"crop_size": 336, "do_center_crop": True, "do_normalize": True, "do_resize": True,
           "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": list(media.CLIP_MEAN),
           "image_std": list(media.CLIP_STD), "resample": 3, "size": 336}  # fmt: skip
    got = media.ImageProcessing.from_hf(old, "clip", pad_to_square=True)
    assert got.size == {"shortest_edge": 336} and got.crop_size == {"height": 336, "width": 336}
    assert got.pad_to_square and got.output_size() == (336, 336)
    with pytest.raises(CheckpointError, match="not supported"):
        media.ImageProcessing.from_hf({"image_processor_type": "SiglipImageProcessor"}, "x")
    with pytest.raises(CheckpointError, match="does not apply"):
        media.ImageProcessing.from_hf({"do_pad": True, "size": 336}, "x")
    with pytest.raises(ConfigError, match="takes 42x42"):  # crop must fit the tower
        from mmcompose.model.clip import clip_vision_spec

        clip_vision_spec(CLIP, -2, "default", media.ImageProcessing().for_size(56))


def test_imported_processor_uses_the_checkpoints_image_settings(llava):
    src, out = llava["llama"]
    hf_proc, _ = _reference(src)
    proc = MMProcessor.from_pretrained(out)
    for w, h in SIZES:
        img = _image(w, h)
        ref = hf_proc.image_processor(images=img, return_tensors="pt")["pixel_values"][0]
        assert torch.equal(proc.preprocess("image", [img])[0], ref), (w, h)


# ------------------------------------------------------------------ (3) base_vocab_size
def test_base_vocab_size_moves_pad_token_off_the_dropped_rows(llava, trimmed):
    """llava-hf's <pad> is an added row: after trimming, the pad id is unset (not past the
    embeddings), the model loads and pads batches; BOS/EOS among dropped rows are refused."""
    out = trimmed
    cfg = json.loads((out / "config.json").read_text())["text_config"]
    assert cfg["vocab_size"] == llava["base"] and cfg["pad_token_id"] is None
    model = MMComposeForCausalLM.from_pretrained(out)  # was: Padding_idx must be within ...
    proc = MMProcessor.from_pretrained(out)
    assert proc.tokenizer.pad_token_id >= llava["base"]  # the folder's tokenizer still pads so
    batch = proc([TEXT_Q[0], "hi"])
    assert (batch["input_ids"] >= llava["base"]).any()
    assert model.generate(**batch, max_new_tokens=2, eos_token_id=[]).shape == (2, 2)
    with pytest.raises(ConfigError, match="drops the eos_token_id"):
        open_source(llava["llama"][0], base_vocab_size=2)


# ------------------------------------------------------------------ parity: llava-hf
@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "llama-trimmed"])
def test_llava_hf_logits_and_greedy_tokens_equal_transformers(llava, family, request):
    """A batch mixing image and text-only prompts, images of several sizes and aspect ratios,
    left-padded: every position's logits (the kept vocabulary rows) and the greedy tokens
    equal LlavaForConditionalGeneration's."""
    src, out = llava[family.removesuffix("-trimmed")]
    if family.endswith("trimmed"):
        out = request.getfixturevalue("trimmed")
    hf_proc, ref = _reference(src)
    model, proc = MMComposeForCausalLM.from_pretrained(out), MMProcessor.from_pretrained(out)
    prompts = [IMAGE_Q, TEXT_Q, IMAGE_Q2, IMAGE_Q]
    images = [_image(*SIZES[0]), _image(*SIZES[4]), _image(*SIZES[5])]
    batch = proc([p for p, _ in prompts], {"image": images})
    hf = _hf_inputs(hf_proc, [t for _, t in prompts], images)
    position_ids = (hf["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        res = model(**batch, padding_side="left")
        theirs = ref(**hf, position_ids=position_ids).logits
    vocab = res.logits.shape[-1]
    assert vocab == (llava["base"] if family.endswith("trimmed") else theirs.shape[-1])
    mask = res.spliced.attention_mask.bool()
    assert torch.equal(mask, hf["attention_mask"].bool())  # same lengths, row by row
    assert_float_close(res.logits[mask], theirs[mask][:, :vocab], n_terms=_tolerance_terms(model))

    greedy = model.generate(**batch, max_new_tokens=6, eos_token_id=[])
    # Over the kept rows only (a trimmed model has no others); exactly 6 tokens, no stopping.
    gen = GenerationConfig(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0,
                           suppress_tokens=list(range(vocab, theirs.shape[-1])) or None)  # fmt: skip
    row_images = [images[:1], [], images[1:2], images[2:]]  # the images of each prompt
    for b in range(len(prompts)):  # one row at a time: transformers' own unpadded run
        row = _hf_inputs(hf_proc, [prompts[b][1]], row_images[b])
        want = ref.generate(**row, generation_config=gen)[0, row["input_ids"].shape[1] :]
        assert greedy[b].tolist() == want.tolist(), (family, b)


# ------------------------------------------------------------------ parity: LLaVA-original
def _expand2square(pil_img: Image.Image, background_color: tuple) -> Image.Image:
    """LLaVA's published preprocessing (llava/mm_utils.py), verbatim in behaviour."""
    width, height = pil_img.size
    if width == height:
        return pil_img
    elif width > height:
        result = Image.new(pil_img.mode, (width, width), background_color)
        result.paste(pil_img, (0, (width - height) // 2))
        return result
    else:
        result = Image.new(pil_img.mode, (height, height), background_color)
        result.paste(pil_img, ((height - width) // 2, 0))
        return result


def _save_llava_original(hf_dir: Path, dst: Path, base: int) -> Path:
    """The same weights as haotian-liu/LLaVA saves them: LLM under model.* / lm_head (base
    vocabulary only), mm_projector, ``image_aspect_ratio: pad``, and the CLIP tower as its own
    folder (with the CLIP processor config) named by ``mm_vision_tower``."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(hf_dir / "model.safetensors"))
    cfg = json.loads((hf_dir / "config.json").read_text())
    clip_dir = dst / "clip"
    vis = CLIPVisionModel(CLIPVisionConfig(**cfg["vision_config"]))
    inner = "" if "embeddings.class_embedding" in vis.state_dict() else "vision_model."
    vis.load_state_dict({
        inner + k.removeprefix("vision_tower.").removeprefix("vision_model."): v
        for k, v in state.items() if k.startswith("vision_tower.")
    })  # fmt: skip
    vis.save_pretrained(clip_dir)  # as transformers saves a CLIP vision tower
    CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE}
                       ).save_pretrained(clip_dir)  # fmt: skip
    llava = dst / "llava"
    llava.mkdir()
    ours: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if k.startswith("language_model.model."):
            ours["model." + k.removeprefix("language_model.model.")] = v
        elif k.startswith("language_model.lm_head."):
            ours["lm_head." + k.removeprefix("language_model.lm_head.")] = v
        elif k.startswith("multi_modal_projector.linear_"):
            i = int(k.split(".")[1][-1])
            ours[f"model.mm_projector.{2 * (i - 1)}.{k.rsplit('.', 1)[1]}"] = v
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        ours[k] = ours[k][:base].contiguous()
    save_file(ours, str(llava / "model.safetensors"))
    text = {k: v for k, v in cfg["text_config"].items() if k != "model_type"}
    text |= {"vocab_size": base, "pad_token_id": None}
    (llava / "config.json").write_text(json.dumps(text | {
        "model_type": "llava_llama", "architectures": ["LlavaLlamaForCausalLM"],
        "mm_vision_tower": str(clip_dir), "mm_hidden_size": CLIP["hidden_size"],
        "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch", "image_aspect_ratio": "pad",
    }))  # fmt: skip
    llama_tokenizer().save_pretrained(llava)
    return llava


def test_llava_original_pads_to_square_as_llava_does(llava, tmp_path):
    """LLaVA-1.5 as haotian-liu/LLaVA runs it: expand2square with the CLIP mean colour, then
    the CLIP folder's processor; prompt split on <image> and each chunk tokenised alone
    (tokenizer_image_token). The logits equal the same weights in transformers' class."""
    src = llava["llama"][0]
    original = _save_llava_original(src, tmp_path, llava["base"])
    out = import_one(original, tmp_path / "imported")
    model, proc = MMComposeForCausalLM.from_pretrained(out), MMProcessor.from_pretrained(out)
    _, ref = _reference(src)
    clip_proc = CLIPImageProcessor.from_pretrained(str(tmp_path / "clip"))
    mean = tuple(int(x * 255) for x in clip_proc.image_mean)
    prompt = "USER: <image>\nWhat is shown in the image? ASSISTANT:"  # LLaVA's own prompt text
    tok = llama_tokenizer()
    chunks = [tok(c).input_ids for c in prompt.split("<image>")]
    image_id = ref.config.image_token_index
    n_img = (SIZE // PATCH) ** 2
    for w, h in SIZES:
        img = _image(w, h, seed=1)
        pixels = clip_proc.preprocess(_expand2square(img, mean), return_tensors="pt")[
            "pixel_values"
        ]
        batch = proc(prompt, {"image": [img]}, chat=False)
        assert torch.equal(batch["modal_inputs"]["image"], pixels), (w, h)
        ids = chunks[0] + [image_id] * n_img + chunks[1][1:]  # tokenizer_image_token
        with torch.no_grad():
            theirs = ref(input_ids=torch.tensor([ids]), pixel_values=pixels).logits
            ours = model(**batch).logits
        assert ours.shape[1] == len(ids)
        assert_float_close(ours[0], theirs[0, :, : llava["base"]], n_terms=_tolerance_terms(model))


# ------------------------------------------------------------------ composed models
def test_damc_modality_alone_reproduces_its_source(tmp_path):
    """DAMC keeps each modality's adapter and routes its tokens through it: a modality given
    alone (no text before it) computes exactly what its source computes; a one-model compose
    of an mmcompose folder reproduces that folder everywhere (checked with ``check``)."""
    srcs = {m: save_tiny_single(tmp_path, m, "decoupled", 20 + k) for k, m in
            enumerate(("image", "audio"))}  # fmt: skip
    cfg = tmp_path / "damc.yaml"
    cfg.write_text(yaml.safe_dump(compose_config(list(srcs.values()), weights=[0.5, 0.5])))
    out = tmp_path / "damc"
    run_from_yaml(cfg, out, progress=False)
    composed, proc = MMComposeForCausalLM.from_pretrained(out), MMProcessor.from_pretrained(out)
    assert composed.config.lora.strategy == "decoupled"
    raw = tiny_inputs(3)
    for m, src in srcs.items():
        single = MMComposeForCausalLM.from_pretrained(src)
        batch = proc(f"<{m}>", {m: [raw[m]]}, chat=False)
        assert batch["input_ids"].shape == (1, 1)  # the placeholder only: no BOS, no text
        with torch.no_grad():
            got, want = composed(**batch).logits, single(**batch).logits
        assert_float_close(got, want, n_terms=_tolerance_terms(single), msg=m)
        # Text after the block reaches the merged text adapter: no promise there.
        text = proc(f"<{m}> what is it?", {m: [raw[m]]}, chat=False)
        with torch.no_grad():
            assert not torch.allclose(composed(**text).logits[0, -1], single(**text).logits[0, -1])

    one = tmp_path / "one.yaml"
    one.write_text(yaml.safe_dump(compose_config([srcs["image"]], weights=[1.0])))
    run_from_yaml(one, tmp_path / "one", progress=False)
    png = tmp_path / "x.png"
    _image(50, 30).save(png)
    r = check_against(tmp_path / "one", srcs["image"], "what is shown in the image?", png)
    assert r.source_kind == "mmcompose" and r.faithful, r.lines()


# ------------------------------------------------------------------ mmcompose check
def test_check_command(llava, trimmed, run, tmp_path):
    src, out = llava["llama"]
    png = tmp_path / "photo.png"
    _image(80, 60).save(png)
    r = run("check", str(out), "--against", str(src), "--prompt", "What is shown in the image?",
            "--image", str(png))  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert "max |logit difference|" in r.stdout and "greedy tokens: identical" in r.stdout
    assert "faithful: yes" in r.stdout
    r = run("check", str(trimmed), "--against", str(src), "--prompt", "hi there")
    rows = f"{llava['base']} of {llava['base'] + EXTRA_ROWS} vocabulary rows"
    assert r.returncode == 0 and rows in r.stdout, r.stdout
    # Another checkpoint is not what this model computes: exit 1.
    other = tmp_path / "other"
    save_llava_hf(other, "llama", seed=1)
    r = run("check", str(out), "--against", str(other), "--image", str(png))
    assert r.returncode == 1 and "faithful: NO" in r.stdout, r.stdout + r.stderr
    # Bad input: exit 2, one message.
    r = run("check", str(out), "--against", str(tmp_path / "missing"))
    assert r.returncode == 2 and "has no config.json" in r.stderr
    r = run("check", str(out), "--against", str(src), "--image", str(tmp_path / "no.png"))
    assert r.returncode == 2 and "not found" in r.stderr
