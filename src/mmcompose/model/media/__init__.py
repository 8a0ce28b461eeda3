"""File loaders and modality preprocessing: turn a path into an array, and an array into the
tensor an encoder expects.

Loaders fail with a ``MediaError`` that names the path, the problem and what to do, because a
bad file deep inside a dataset should be fixable from the message alone. Everything here is a
pure function of its arguments (randomness comes from explicit seeds) so preprocessing is
reproducible across processes and runs.

One module per modality (``image``, ``audio``, ``video``, ``point``) over ``common`` (file
checks, the ``on_corrupt`` policy). Every name other code uses is re-exported here, the
few private ones included (dataset tools and tests call them), so
``from mmcompose.model import media; media.load_image(...)`` stays the interface.
"""

from __future__ import annotations

from mmcompose.model.media.audio import (
    load_audio,
    log_mel_spectrogram,
    mel_filter_bank,
    prepare_waveform,
)
from mmcompose.model.media.common import (
    AUDIO_EXTENSIONS,
    IMAGE_EXTENSIONS,
    POINT_CLOUD_EXTENSIONS,
    SKIP_HINT,
    VIDEO_EXTENSIONS,
    CorruptFileWarning,
    OnCorrupt,
    PathLike,
    handle_unreadable,
    warn_skipped,
)
from mmcompose.model.media.image import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageProcessing,
    _own_pixels,
    _to_rgb,
    center_crop,
    expand_to_square,
    image_to_tensor,
    load_image,
    preprocess_image,
    resize_shortest_edge,
    sample_frames_to_tensor,
)
from mmcompose.model.media.point import (
    _MESH_EXTENSIONS,
    load_point_cloud,
    normalize_points,
    sample_points,
)
from mmcompose.model.media.video import (
    VIDEO_STILL_EXTENSIONS,
    _frame_indices,
    _video_frame_estimate,
    frame_files,
    load_video,
    sample_frames,
)

__all__ = [
    "AUDIO_EXTENSIONS",
    "CLIP_MEAN",
    "CLIP_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "POINT_CLOUD_EXTENSIONS",
    "SKIP_HINT",
    "VIDEO_EXTENSIONS",
    "VIDEO_STILL_EXTENSIONS",
    "_MESH_EXTENSIONS",
    "CorruptFileWarning",
    "ImageProcessing",
    "OnCorrupt",
    "PathLike",
    "_frame_indices",
    "_own_pixels",
    "_to_rgb",
    "_video_frame_estimate",
    "center_crop",
    "expand_to_square",
    "frame_files",
    "handle_unreadable",
    "image_to_tensor",
    "load_audio",
    "load_image",
    "load_point_cloud",
    "load_video",
    "log_mel_spectrogram",
    "mel_filter_bank",
    "normalize_points",
    "prepare_waveform",
    "preprocess_image",
    "resize_shortest_edge",
    "sample_frames",
    "sample_frames_to_tensor",
    "sample_points",
    "warn_skipped",
]
