"""The on-disk cache of the shapes a config implies (compose/shape_cache.py): a hit gives
exactly what building the model on the meta device gives, without building it; a damaged
entry is recomputed; another config is another entry."""

from __future__ import annotations

from pathlib import Path

import pytest

import mmcompose.model.modeling as modeling
from mmcompose.compose.shape_cache import expected_shapes_cached, shape_cache_key
from mmcompose.testing import tiny_config


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MMCOMPOSE_CACHE", str(tmp_path))
    return tmp_path / "shapes"


def test_a_hit_equals_the_meta_build_and_builds_nothing(cache: Path, monkeypatch) -> None:
    config = tiny_config()
    want = modeling.expected_shapes(config)
    assert expected_shapes_cached(config) == want  # miss: built, then stored
    assert [p.name for p in cache.iterdir()] == [f"{shape_cache_key(config)}.json"]

    def no_build(_config):
        raise AssertionError("the cached shapes should have been used")

    monkeypatch.setattr(modeling, "expected_shapes", no_build)
    assert expected_shapes_cached(config) == want


def test_a_damaged_entry_is_recomputed(cache: Path) -> None:
    config = tiny_config()
    want = expected_shapes_cached(config)
    entry = cache / f"{shape_cache_key(config)}.json"
    for damage in ('{"shapes": {"x": "oops"}}', "{not json", '{"other": 1}'):
        entry.write_text(damage)
        assert expected_shapes_cached(config) == want


def test_another_config_is_another_entry(cache: Path) -> None:
    a = tiny_config()
    b = a.model_copy(update={"text_config": {**a.text_config, "num_hidden_layers": 3}})
    assert shape_cache_key(a) != shape_cache_key(b)
    sa, sb = expected_shapes_cached(a), expected_shapes_cached(b)
    assert sa != sb and sb == modeling.expected_shapes(b)
    assert len(list(cache.iterdir())) == 2
