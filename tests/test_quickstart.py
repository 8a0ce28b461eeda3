"""The quickstart's pure parts: the claims check, the report and chart, the eval subsets.
(The whole job runs on real assets in `make quickstart`; its figures are in docs/results.md.)"""

from __future__ import annotations

import pytest

from mmcompose.quickstart import (
    MODALITIES,
    Budget,
    QuickstartReport,
    Row,
    _chart,
    _claims,
    _subset,
    render_markdown,
    train_config,
)

COLS = [*(f"{m} (test)" for m in MODALITIES), "mini-MCUB IAP"]


def _rows(naive: float, damc: float, keep: float) -> list[Row]:
    rows = []
    for s in ("shared", "decoupled"):
        for i, m in enumerate(MODALITIES):
            scores = dict.fromkeys(COLS)
            scores[COLS[i]] = 0.8
            scores[COLS[-1]] = 0.5 + 0.1 * i
            rows.append(Row(f"{m}-{s}", "single", scores))
    for name, mcub in (("NaiveMC", naive), ("DAMC", damc)):
        scores = {c: 0.8 * keep for c in COLS[:-1]} | {COLS[-1]: mcub}
        rows.append(Row(name, "composed", scores))
    return rows


@pytest.mark.parametrize(
    ("naive", "damc", "keep", "expected"),
    [
        (0.9, 0.95, 1.0, [True, True, True, True, True]),
        (0.6, 0.65, 0.9, [False, False, True, False, False]),
        (0.9, 0.85, 0.96, [True, True, False, True, True]),
    ],
)
def test_claims_follow_the_numbers(naive, damc, keep, expected):
    claims = _claims(_rows(naive, damc, keep), COLS)
    assert [ok for _, ok, _ in claims] == expected
    assert "vs best single point-" in claims[0][2]  # the best single model on MCUB is named


def test_report_and_chart(tmp_path):
    report = QuickstartReport(tmp_path, _rows(0.9, 0.95, 1.0), {"total": 12.0}, columns=COLS)
    report.rows[0].stderr[COLS[0]] = 0.05
    report.rows[0].scores[f"{COLS[0]} gen"] = 0.7
    report.claims = _claims(report.rows, COLS)
    md = render_markdown(report)
    assert "| image-shared | 80.0 ± 5.0 (70.0) | — | — | 50.0 |" in md
    assert md.count("holds:") == 5
    _chart(report, tmp_path / "chart.png")
    assert (tmp_path / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_subset_is_deterministic_and_spread():
    rows = [{"id": i} for i in range(100)]
    sub = _subset(rows, 10)
    assert [r["id"] for r in sub] == list(range(0, 100, 10))
    assert _subset(rows[:5], 10) == rows[:5]


def test_train_configs_differ_only_in_strategy():
    a = train_config("audio", "shared", Budget(), ["m.jsonl"])
    b = train_config("audio", "decoupled", Budget(), ["m.jsonl"])
    da, db = a.model_dump(), b.model_dump()
    assert da.pop("lora")["strategy"] == "shared" and db.pop("lora")["strategy"] == "decoupled"
    assert da == db
    assert a.projector_init == "lstsq" and a.system_prompt == ""
