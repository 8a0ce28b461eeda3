"""No transformers API that warns of its removal is used: transformers reports a renamed
keyword as a Python warning and some renames once per process through its logger, so both
are captured."""

from __future__ import annotations

import logging
import warnings

import torch
from transformers.utils import logging as hf_logging

from mmcompose.testing import build_tiny_model


def test_generation_uses_no_deprecated_transformers_api(caplog):
    model, _ = build_tiny_model(strategy="decoupled", seed=0)
    hf_logging.enable_propagation()
    try:
        with (
            caplog.at_level(logging.WARNING, logger="transformers"),
            warnings.catch_warnings(record=True) as caught,
        ):
            warnings.simplefilter("always")
            model.generate(torch.tensor([[1, 2, 3, 4]]), max_new_tokens=3)
    finally:
        hf_logging.disable_propagation()
    messages = [r.getMessage() for r in caplog.records] + [str(w.message) for w in caught]
    deprecated = [m for m in messages if "deprecat" in m.lower() or "removed" in m.lower()]
    assert not deprecated, deprecated
