"""Packed log-likelihood scoring: layout, mask, and equality with one forward per option."""

from __future__ import annotations

import pytest
import torch

from mmcompose.model.modeling import ScoreRequest
from mmcompose.model.scoring import allowed_attention, batches_by_tokens, pack_continuations
from mmcompose.testing import (
    assert_float_close,
    build_tiny_model,
    float64_model,
    tiny_inputs,
    to_float64,
)


def test_pack_layout_feeds_all_but_last_token_and_points_queries_back():
    row = pack_continuations(3, [[7, 8, 9], [5], [7, 6]])
    # fed tokens: 7, 8 (branch 0) and 7 (branch 2); positions restart after the prompt
    assert row.tokens.tolist() == [7, 8, 7]
    assert row.positions.tolist() == [3, 4, 3]
    assert row.branch.tolist() == [0, 0, 2]
    assert row.length == 6
    # 7 <- prompt end (2), 8 <- fed 7 (3), 9 <- fed 8 (4), 5 <- 2, 7 <- 2, 6 <- fed 7 (5)
    assert row.queries.tolist() == [2, 3, 4, 2, 2, 5]
    assert row.targets.tolist() == [7, 8, 9, 5, 7, 6]
    assert row.owner.tolist() == [0, 0, 0, 1, 2, 2]


def test_mask_branches_see_prompt_and_own_past_only():
    row = pack_continuations(2, [[1, 2, 3], [4, 5]])  # fed: 1, 2 (branch 0), 4 (branch 1)
    a = allowed_attention(row, 7).int()
    expected = [
        [1, 0, 0, 0, 0, 0, 0],  # prompt, causal
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],  # branch 0, token 1
        [1, 1, 1, 1, 0, 0, 0],  # branch 0, token 2
        [1, 1, 0, 0, 1, 0, 0],  # branch 1 does not see branch 0
        [0, 0, 0, 0, 0, 1, 0],  # padding sees itself only
        [0, 0, 0, 0, 0, 0, 1],
    ]
    assert a.tolist() == expected


def test_batches_respect_token_budget():
    assert batches_by_tokens([10, 10, 10, 30, 5], 40) == [[0, 1, 2], [3], [4]]
    assert batches_by_tokens([50, 5], 40) == [[0], [1]]  # too long: alone
    assert batches_by_tokens([], 40) == []


def test_pack_rejects_empty():
    with pytest.raises(ValueError, match="at least one token"):
        pack_continuations(3, [[1], []])
    with pytest.raises(ValueError, match="prompt"):
        pack_continuations(0, [[1]])


def _reference(model, ids: torch.Tensor, conts, modal) -> tuple[list[float], list[float]]:
    """One full forward per continuation, as lm-evaluation-harness scores options; also the
    largest logit + log-prob magnitude (the size of what scoring rounds to float32)."""
    out, mags = [], []
    for c in conts:
        full = torch.cat([ids.reshape(1, -1), torch.tensor([c])], dim=1)
        with torch.no_grad():
            logits = model(full, modal_inputs=modal).logits
            logp = logits.log_softmax(-1)[0]
        n = len(c)
        out.append(float(sum(logp[-n - 1 + j, c[j]] for j in range(n))))
        mags.append(float(logits.abs().max() + logp.abs().max()))
    return out, mags


@pytest.mark.parametrize(
    ("family", "strategy"), [("llama", "decoupled"), ("qwen2", "shared"), ("mistral", "decoupled")]
)
def test_score_requests_equal_one_forward_per_option(family, strategy):
    """Prompts of different lengths and modalities, continuations of different lengths with
    shared prefixes, batched under a budget that splits them: every score equals the
    unpacked reference."""
    model, proc = build_tiny_model(["image", "audio"], strategy=strategy, family=family)
    float64_model(model)  # packed vs one forward per option is algebraic: float64 network
    raw = [tiny_inputs(s) for s in range(3)]
    prompts = [
        ("<image> what is this", {"image": [raw[0]["image"]]}),
        (
            "<audio> and <image> together, please",
            {"audio": [raw[1]["audio"]], "image": [raw[1]["image"]]},
        ),
        ("hello", {}),
    ]
    conts = [[[40, 41, 42], [40, 41], [50]], [[60], [61, 62, 63, 64]], [[7, 8], [7, 9], [7]]]
    reqs, refs, mags = [], [], []
    for (text, media), cs in zip(prompts, conts, strict=True):
        b = proc([text], media or None)
        modal = to_float64(b.get("modal_inputs") or None)
        reqs.append(ScoreRequest(b["input_ids"][0], cs, modal))
        r, m = _reference(model, b["input_ids"], cs, modal)
        refs.append(r)
        mags.append(max(m))
    for budget in (4096, 40):  # all in one batch; one row per batch
        got = model.score_requests(reqs, max_tokens=budget)
        for g, r, m, cs in zip(got, refs, mags, conts, strict=True):
            # scoring rounds logits to float32 for log_softmax: a few eps per summed token
            n = max(map(len, cs))
            assert_float_close(g, torch.tensor(r, dtype=torch.float64), n_terms=n, magnitude=m)
    assert len({round(x, 4) for x in refs[0]}) == 3  # the options really differ
