"""Real, offline datasets for every modality, prepared once into the asset cache.

Dataset hubs are unreachable here, so the data comes from Debian and PyPI packages (see
``shared/ASSETS.md``): emoji rendered from the Noto font, openclipart drawings, opencv/skimage
photos, words spoken by espeak-ng, lmms/freedesktop/alsa sounds, CGAL and pybullet meshes, and
opencv videos plus pan/zoom clips over the images. Every dataset lands in
``cache_dir()/datasets/<name>/`` as copies/renderings (self-contained: uninstalling the source
package keeps it usable), with

- ``manifest.jsonl``: one record per item (id, absolute path, modality, label, caption, split);
- ``mmcompose_manifest.json``: the dataset meta (sources with versions, counts per split and
  label, seed, split version), written last, so its presence marks the folder complete.

Splits are stratified per label (:func:`assign_splits`), so a concept is held out in every
modality at once, as the cross-modal benchmark needs. A folder prepared under an older split
rule only gets its manifest rewritten; the media are not rendered again.

The concept vocabulary (:data:`CONCEPTS`) is shared by all datasets on purpose: the same concept
(cow) appears as an emoji, a spoken word, a mesh and a video, which the cross-modal benchmark
needs. Nothing is installed here: a missing source raises :class:`MissingAssetError` whose hint
is the exact ``apt-get``/``pip`` command.

Layout: one module per dataset (``emoji``, ``openclipart``, ``photos``, ``spoken``, ``sounds``,
``meshes``, ``clips``), each registering its builder with :func:`register_dataset`; shared
modules ``items`` (records, seeded hashing), ``sources`` (packages, missing-source errors),
``render`` (PNG/WAV writers), ``concepts`` (vocabulary, concept table), ``splits``,
``registry`` and ``prepare`` (the preparation loop). A new dataset is a new module plus its
import line below.
"""

from mmcompose.assets.cache import MissingAssetError
from mmcompose.assets.datasets.concepts import CONCEPTS, CONCEPTS_NAME, concept_table
from mmcompose.assets.datasets.items import ITEMS_NAME, Item, read_items
from mmcompose.assets.datasets.prepare import prepare_datasets
from mmcompose.assets.datasets.registry import (
    DATASETS,
    DatasetSpec,
    dataset_dir,
    register_dataset,
)
from mmcompose.assets.datasets.render import MAX_IMAGE_SIDE, SAMPLE_RATE
from mmcompose.assets.datasets.splits import (
    HELD_OUT_PERCENT,
    SPLIT_VERSION,
    assign_splits,
    split_groups,
    split_quota,
)

# The source modules register themselves on import, in this order, which is the preparation
# order: clips is made from the image datasets, so it comes after them.
# isort: off
from mmcompose.assets.datasets import emoji, openclipart, photos  # noqa: F401
from mmcompose.assets.datasets import spoken, sounds, meshes, clips  # noqa: F401
from mmcompose.assets.datasets import mesh_renders  # noqa: F401
from mmcompose.assets.datasets import captions  # noqa: F401

# isort: on

__all__ = [
    "CONCEPTS",
    "CONCEPTS_NAME",
    "DATASETS",
    "HELD_OUT_PERCENT",
    "ITEMS_NAME",
    "MAX_IMAGE_SIDE",
    "SAMPLE_RATE",
    "SPLIT_VERSION",
    "DatasetSpec",
    "Item",
    "MissingAssetError",
    "assign_splits",
    "concept_table",
    "dataset_dir",
    "prepare_datasets",
    "read_items",
    "register_dataset",
    "split_groups",
    "split_quota",
]
