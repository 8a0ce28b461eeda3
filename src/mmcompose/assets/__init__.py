"""Offline assets: the cache folder, atomic writes, and pretrained models prepared from pip
packages (model hubs are unreachable, so weights arrive inside packages and are converted once).

Kept import-light: torch and transformers load only when something is actually prepared.
"""

from mmcompose.assets.cache import MissingAssetError, atomic_dir, cache_dir, write_json_atomic
from mmcompose.assets.llm import base_llm_dir, prepare_base_llm

__all__ = [
    "MissingAssetError",
    "atomic_dir",
    "base_llm_dir",
    "cache_dir",
    "prepare_base_llm",
    "write_json_atomic",
]
