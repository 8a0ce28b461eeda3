"""Our multiple-choice scoring and results file are lm-evaluation-harness's (issue 17).

lm-eval 0.4.13 itself runs here: its Hugging Face model class (``HFLM``) on a tiny random
Llama saved to a folder, and ``simple_evaluate`` on a tiny local multiple-choice task with a
chat template. The same requests and items go through ``MMComposeForCausalLM`` (packed
``score_requests``) and ``mmcompose eval``. The chat template's generation prompt ends in a
space (``"Answer: "``), so lm-eval's tokenisation (that space moved into each option, the text
tokenised whole) differs from tokenising the two apart, and the test can tell them apart.
Log-likelihood tolerances are float32 rounding through the tiny LLM at the scores' size
(:func:`mmcompose.testing.llm_tol`); choices and accuracies must be identical.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from lm_eval import simple_evaluate
from lm_eval.api.instance import Instance
from lm_eval.loggers import EvaluationTracker
from lm_eval.models.huggingface import HFLM
from lm_eval.result_schema import EvalResults
from lm_eval.tasks import TaskManager
from lm_eval.utils import get_file_task_name, get_results_filenames, make_table

from mmcompose.bench.mcub import evaluate_mcub, load_mcub
from mmcompose.bench.multiple_choice import encode_pair
from mmcompose.model.modeling import ScoreRequest
from mmcompose.testing import build_tiny_model, llm_tol

pytestmark = pytest.mark.slow

# ChatML with an assistant turn that opens with "Answer: ": the generation prompt ends in a space.
SPACE_CHAT = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' %}Answer: {% endif %}{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\nAnswer: {% endif %}"
)
# Options of different lengths, one a prefix of another ("cow", "cowboy"); gold letters.
ITEMS = [
    (["cow", "cowboy", "a horse", "bird"], "B"),
    (["dog", "cat", "banana", "apple pie"], "A"),
    (["red", "water", "fire", "a piano"], "C"),
    (["one", "two", "three", "four"], "D"),
    (["drum", "guitar", "bell", "the piano"], "B"),
    (["yes", "no", "a photo", "a sound"], "A"),
]
TASK = "tiny_mc"
OURS = "mcub_"  # mmcompose eval names a text-only MCUB task "mcub_" + its modalities (none)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The same text-only tiny model twice: a plain Hugging Face folder for lm-eval and an
    mmcompose folder; the processor of the loaded mmcompose model."""
    from mmcompose.model import MMComposeForCausalLM, MMProcessor

    model, proc = build_tiny_model((), strategy=None, seed=0)
    proc.tokenizer.chat_template = SPACE_CHAT
    root = tmp_path_factory.mktemp("lm_eval")
    hf, ours = root / "hf", root / "mmcompose"
    model.language_model.save_pretrained(hf)
    proc.tokenizer.save_pretrained(hf)
    model.save_pretrained(ours, processor=proc)
    loaded = MMComposeForCausalLM.from_pretrained(ours).eval()
    return {"hf": hf, "ours": ours, "model": loaded, "proc": MMProcessor.from_pretrained(ours)}


@pytest.fixture(scope="module")
def hflm(tiny) -> HFLM:
    return HFLM(pretrained=str(tiny["hf"]), device="cpu", batch_size=1, dtype="float32")


def _question(options: list[str]) -> str:
    lines = "\n".join(f"{k}. {o}" for k, o in zip("ABCD", options, strict=True))
    return f"which attribute do these inputs have in common?\n{lines}"


def _tol(model, values) -> float:
    return llm_tol(model.config.text_config, max(abs(v) for v in values))


# ----------------------------------------------------------------------------- requests
def test_loglikelihood_requests_equal_hflm(tiny, hflm):
    """(context, continuation) requests as lm-eval's tasks make them: a chat prompt ending in
    a space, a plain one ending in a space or a newline, and a context without trailing
    whitespace before a delimited option. Same tokens as HFLM, same log-likelihoods."""
    model, proc = tiny["model"], tiny["proc"]
    chat = proc.render_chat([{"role": "user", "content": "what is shown?"}], True)
    requests = [
        (chat, "cow"),
        (chat, "cowboy"),
        ("the option is ", "a dog"),
        ("the option is  ", "horse"),  # two spaces: both move
        ("it is a photo of\n\n", "the object"),
        ("Question: which one?\nAnswer:", " cow"),
    ]
    instances = [
        Instance("loglikelihood", doc={}, arguments=pair, idx=i) for i, pair in enumerate(requests)
    ]
    theirs = [ll for ll, _ in hflm.loglikelihood(instances, disable_tqdm=True)]
    apart_differs = False
    for ctx, cont in requests:
        mine = encode_pair(proc.tokenize, ctx, cont)
        assert mine == hflm._encode_pair(ctx, cont)  # token ids, context and continuation
        apart = (proc.tokenize(ctx), proc.tokenize(cont, add_special_tokens=False))
        apart_differs |= apart != mine
    assert apart_differs  # tokenising the two apart would be caught
    pairs = [encode_pair(proc.tokenize, c, x) for c, x in requests]
    reqs = [ScoreRequest(torch.tensor(c), [x]) for c, x in pairs]
    ours = [float(s[0]) for s in model.score_requests(reqs)]
    assert ours == pytest.approx(theirs, abs=_tol(model, theirs))


# ----------------------------------------------------------------------------- items
@pytest.fixture(scope="module")
def runs(tiny, hflm, tmp_path_factory) -> dict[str, Any]:
    """lm-eval's ``simple_evaluate`` on the items as a local task (chat template applied,
    saved by its EvaluationTracker) and ``mmcompose eval`` on them as an MCUB file."""
    d = tmp_path_factory.mktemp("items")
    docs = [
        {"question": _question(opts), "choices": opts, "gold": "ABCD".index(g)} for opts, g in ITEMS
    ]
    (d / "docs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in docs))
    (d / "tasks").mkdir()
    (d / "tasks" / f"{TASK}.yaml").write_text(
        f"task: {TASK}\ndataset_path: json\ndataset_kwargs:\n"
        f"  data_files:\n    test: {d / 'docs.jsonl'}\n  cache_dir: {d / 'hf_cache'}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: gold\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\nmetadata:\n  version: 1.0\n"
    )
    tracker = EvaluationTracker(output_path=str(d / "lm_eval_out"))
    res = simple_evaluate(
        model=hflm,
        tasks=[TASK],
        task_manager=TaskManager(include_path=str(d / "tasks")),
        apply_chat_template=True,
        log_samples=True,
        evaluation_tracker=tracker,
    )
    samples = res.pop("samples")  # as lm-eval's CLI does before saving
    tracker.save_results_aggregated(results=res, samples=samples)
    (lm_file,) = (d / "lm_eval_out").rglob("results_*.json")

    qs = [
        {
            "id": f"q{i}",
            "conversations": [
                {"from": "human", "value": doc["question"]},
                {"from": "gpt", "value": g},
            ],
            "modal_inputs": {},
        }
        for i, (doc, (_, g)) in enumerate(zip(docs, ITEMS, strict=True))
    ]
    (d / "q.json").write_text(json.dumps(qs))
    return {
        "lm_doc": json.loads(lm_file.read_text()),
        "lm_samples": sorted(samples[TASK], key=lambda s: s["doc_id"]),
        "questions": d / "q.json",
        "out": d / "ours",
    }


def test_items_score_and_choose_as_lm_eval(tiny, runs):
    """Each item's context is lm-eval's chat-templated prompt (ending in "Answer: "), each
    option's log-likelihood equals lm-eval's, and acc / acc_norm agree item by item."""
    model, proc = tiny["model"], tiny["proc"]
    items = load_mcub(runs["questions"])
    r = evaluate_mcub(model, proc, items, ("loglikelihood",), progress=False)
    for it, s, lm in zip(items, r.samples, runs["lm_samples"], strict=True):
        args = [tuple(a) for a in lm["arguments"]]  # (context, continuation) per option
        prompt = proc.render_chat(it.messages(), add_generation_prompt=True)
        assert prompt.endswith("Answer: ")
        assert args == [(prompt, o) for o in it.options.values()]
        theirs = [float(resp[0][0]) for resp in lm["resps"]]
        ours = [s["option_logprobs"][k] for k in "ABCD"]
        assert ours == pytest.approx(theirs, abs=_tol(model, theirs))
        assert s["correct"]["acc,loglikelihood"] == lm["acc"]
        assert s["correct"]["acc_norm,loglikelihood"] == lm["acc_norm"]
        # lm-eval's rules on its own numbers: argmax, argmax of ll / len(choice)
        opts = list(it.options.values())
        norm = [t / len(o) for t, o in zip(theirs, opts, strict=True)]
        assert s["prediction"]["loglikelihood"] == "ABCD"[theirs.index(max(theirs))]
        assert s["prediction"]["loglikelihood_norm"] == "ABCD"[norm.index(max(norm))]
    block = runs["lm_doc"]["results"][TASK]
    assert r.accuracy("acc,loglikelihood") == pytest.approx(block["acc,none"])
    assert r.accuracy("acc_norm,loglikelihood") == pytest.approx(block["acc_norm,none"])


# ----------------------------------------------------------------------------- results file
def test_results_file_has_every_lm_eval_key_and_lm_eval_reads_it(run, tiny, runs):
    r = run(
        "eval", str(tiny["ours"]), "--task", "mcub", "--data", str(runs["questions"]),
        "--mode", "loglikelihood", "-o", str(runs["out"]), "--log-samples",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    (path,) = runs["out"].glob("results_*.json")
    ours = json.loads(path.read_text())
    lm = runs["lm_doc"]
    # every key lm-eval's saved file has, and every key of its results schema ("samples" is
    # popped before saving: the per-item records go to samples_*.jsonl, as ours do)
    schema = set(EvalResults.__annotations__) - {"samples"}
    assert not (set(lm) | schema) - set(ours)
    assert not set(lm["results"][TASK]) - {"acc,none", "acc_stderr,none", "acc_norm,none",
                                           "acc_norm_stderr,none"} - set(ours["results"][OURS])  # fmt: skip
    assert not set(lm["config"]) - set(ours["config"])
    assert ours["n-samples"][OURS] == lm["n-samples"][TASK] == {"original": 6, "effective": 6}
    assert ours["higher_is_better"][OURS] == lm["higher_is_better"][TASK]
    # the same tokenizer and chat template: the same facts, in lm-eval's form
    for key in (
        "tokenizer_pad_token", "tokenizer_eos_token", "tokenizer_bos_token", "eot_token_id",
        "max_length", "chat_template", "chat_template_sha", "system_instruction",
        "system_instruction_sha",
    ):  # fmt: skip
        assert ours[key] == lm[key], key
    assert isinstance(ours["date"], float) and float(ours["total_evaluation_time_seconds"]) >= 0
    # lm-eval's own readers: its table, its file-name helpers
    table = make_table(ours)
    assert OURS in table and "acc_norm" in table and "loglikelihood" in table
    assert TASK in make_table(lm)
    assert get_results_filenames([str(path)]) == [str(path)]
    (samples,) = runs["out"].glob("samples_*.jsonl")
    assert get_file_task_name(samples.name) == OURS


def test_results_file_nan_stderr_is_lm_eval_na(tmp_path):
    """One item: no standard error; lm-eval writes "N/A" (a NaN is no JSON)."""
    from mmcompose.bench.results import task_block, write_results

    path = write_results(
        tmp_path, {"t": task_block({"acc,x": [1.0]}, "t")}, {"t": {}}, {"t": 1}, {}
    )
    doc = json.loads(Path(path).read_text())
    assert doc["results"]["t"]["acc_stderr,x"] == "N/A" and doc["results"]["t"]["acc,x"] == 1.0
    assert doc["model_name"] == "mmcompose" and doc["chat_template"] is None
    make_table(doc)
