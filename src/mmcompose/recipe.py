"""The composition job's recipe: which data, towers and training each single-modality MLLM
gets, and :class:`Budget`, how much work a run does.

One job, two budgets: ``Budget()`` is the quickstart (image + audio + point cloud, one seed,
evaluation subsets; 15 minutes cold on a 2-core CPU) and the reproduction's budgets
(:mod:`mmcompose.reproduce`: four modalities, several seeds, every MCUB-3 subset, the
ablations) are the same recipe with more of it. A model's cache key is its train config, so
two budgets that train the same model (same modality, strategy, data, epochs, seed) share it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mmcompose.model.config import ModuleSpec, TowerConfig

__all__ = [
    "BASE_LLM",
    "DATASETS",
    "MODALITIES",
    "STRATEGIES",
    "Budget",
    "encoder_assets",
    "tower",
    "train_config",
]

BASE_LLM = "smollm2-135m-instruct"
MODALITIES = ("image", "audio", "point")  # the quickstart's
STRATEGIES = ("shared", "decoupled")
# Datasets per modality (the quickstart's image, audio and point; the reproduction adds
# mesh_views to the images so that every mesh concept has held-out images, see
# mmcompose.reproduce.DATASETS).
DATASETS: dict[str, tuple[str, ...]] = {
    "image": ("emoji", "openclipart", "photos"),
    "audio": ("spoken",),
    "video": ("mesh_clips", "clips"),
    "point": ("meshes",),
}
VIDEO_FRAMES = 4  # frames per clip given to the frame encoder


def tower(modality: str) -> TowerConfig:
    """Frozen pretrained encoders, 4-token pooled projectors, 2 + 2 prefix/suffix tokens.

    Video: EfficientNet-Lite0 (the image tower's encoder) on ``VIDEO_FRAMES`` frames sampled
    uniformly over the clip; ``video_frames`` gives the 49 grid tokens averaged over time and
    one spatial mean per frame, and the pooled projector averages those, so the video block
    is the clip's mean frame feature in 4 LLM tokens, like an image."""
    encoders = {
        "image": ModuleSpec(name="efficientnet_lite0"),
        # context "clip": Whisper attends over the 2 s used, not its 30 s window; ~15x faster
        # to encode, same accuracy here (85.0% vs 86.7% on 60 test clips, docs/results.md).
        "audio": ModuleSpec(
            name="whisper_tiny_en", params={"seconds": 2, "pool": 10, "context": "clip"}
        ),
        "video": ModuleSpec(
            name="video_frames",
            params={
                "frame_encoder": {"name": "efficientnet_lite0"},
                "num_frames": VIDEO_FRAMES,
            },
        ),
        "point": ModuleSpec(name="pointnet_meshes"),
    }
    return TowerConfig(
        modality=modality,
        encoder=encoders[modality],
        projector=ModuleSpec(name="pooled", params={"num_tokens": 4}),
        num_prefix=2,
        num_suffix=2,
    )


def encoder_assets(modality: str) -> list[str]:
    """The pretrained encoder assets a modality's tower loads (a frame encoder for video)."""
    spec = tower(modality).encoder
    if spec.name == "video_frames":
        return [spec.params["frame_encoder"]["name"]]
    return [spec.name]


@dataclass(frozen=True)
class Budget:
    """How much work a run does. The default fits the quickstart's 15-minute cold budget on a
    2-core CPU with evaluation subsets; ``Budget.full()`` scores whole test splits, all of
    mini-MCUB, and generation too (much longer). The reproduction's budgets set the fields
    after ``generate``."""

    # Epochs of stage 2 per modality, as short as each stood (docs/results.md, "Recipe"):
    # audio kept its accuracy at 1/2 epoch, image lost 8-12 points at 1/2 but not at 3/4,
    # point clouds (ridge residual 0.6: the closed-form fit leaves most to training) lost half
    # their accuracy at 3/4 of an epoch. Video is fitted like images (EfficientNet features).
    stage2_epochs: tuple[tuple[str, float], ...] = (
        ("image", 0.75),
        ("audio", 0.5),
        ("point", 1.0),
        ("video", 0.75),
    )
    stage2_lr: float = 2e-4
    batch_size: int = 16
    classify_limit: int | None = 24  # test items per modality (None: all)
    mcub_limit: int | None = 60  # mini-MCUB test items (None: all)
    search_limit: int = 24  # validation items per lambda candidate
    search_grid: tuple[float, ...] = (0.5, 1.0)
    search_passes: int = 1  # coordinate sweeps over the lambdas
    generate: bool = False  # also score classification by generation
    # The reproduction (defaults: the quickstart's one seed and one set of modalities).
    seeds: tuple[int, ...] = (0,)  # each seed trains every single-modality model
    # MCUB subsets (modality tuples) each with its own NaiveMC and DAMC, test and search set
    subsets: tuple[tuple[str, ...], ...] = ()
    ablations: bool = False  # decoupled with lambda = 1/N; NaiveMC with the lambda search
    generate_mcub: bool = False  # also score MCUB by generation (the letter parsed)
    paper_report: bool = False  # the report: mean over seeds, intervals, paired tests
    # MMER, TIES, DARE and NaiveMC with the label-free search (mmcompose.job_methods), on
    # the whole MCUB set and the test splits; the label-free search's grid (AdaMMS compares
    # neighbouring values: 2 would tie)
    methods: bool = False
    unlabelled_grid: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)

    @classmethod
    def full(cls) -> Budget:
        return cls(
            classify_limit=None,
            mcub_limit=None,
            search_limit=112,
            search_grid=(0.25, 0.5, 0.75, 1.0),
            search_passes=3,
            generate=True,
        )

    def epochs(self, modality: str) -> float:
        return dict(self.stage2_epochs)[modality]


def train_config(
    modality: str,
    strategy: str,
    budget: Budget,
    dataset_files: list[str],
    seed: int = 0,
    on_corrupt: str = "fail",
) -> Any:
    """One single-modality model's train config. ``seed`` 0 and ``on_corrupt`` "fail" are
    the config's defaults, so the quickstart's configs (and cache keys) are what they were."""
    from mmcompose.train.trainer import LoRASettings, StageConfig, TrainConfig

    return TrainConfig(
        base_llm=BASE_LLM,
        tower=tower(modality),
        data=dataset_files,
        system_prompt="",
        projector_init="lstsq",
        # No LoRA dropout: drawing its Bernoulli masks is a quarter of a training step on
        # this CPU (benchmarks/train_step.py).
        lora=LoRASettings(strategy=strategy, rank=16, alpha=32, dropout=0.0),
        stage1=StageConfig(epochs=0),
        stage2=StageConfig(
            epochs=budget.epochs(modality),
            lr=budget.stage2_lr,
            batch_size=budget.batch_size,
            warmup_ratio=0.1,
        ),
        max_length=96,
        seed=seed,
        on_corrupt=on_corrupt,
    )
