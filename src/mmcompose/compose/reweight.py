"""Configs with per-model weights, and a composition re-weighted in memory.

The search composes once, with a method linear in its inputs, so that the merged ``text``
adapter is the sources' factors concatenated: ``A = cat(A_i)``, ``B = cat(c_i s_i B_i)``.
A candidate then only rescales B's blocks, with the very coefficients ``c_i`` the executor
would use for those weights (so ``normalize``, ``lambda`` and conditional parameters count).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmcompose.compose.config import ComposeConfig
from mmcompose.compose.search_loop import InvalidWeights, Weights
from mmcompose.errors import ConfigError, MergeError, MMComposeError

if TYPE_CHECKING:
    import torch

SEARCHABLE_METHODS = ("linear", "task_arithmetic")  # linear in their inputs: exact as concat


def start_weights(config: ComposeConfig) -> Weights:
    """The config's own weights where every merged model has one scalar weight (its own or
    the global one), else 1/N each (NaiveMC's default)."""
    entries = config.merge_entries
    glob = config.parameters.get("weight")
    found: list[float] = []
    for e in entries:
        w = e.parameters.get("weight", glob)
        if isinstance(w, bool) or not isinstance(w, int | float):
            return (1.0 / len(entries),) * len(entries)
        found.append(float(w))
    return tuple(found)


def with_weights(config: ComposeConfig, weights: Sequence[float]) -> ComposeConfig:
    """The config with ``parameters.weight = w_i`` on the i-th merged model (the models that
    ``merge_entries`` lists); other parameters, and a base listed among the models, unchanged."""
    entries = config.merge_entries
    if len(weights) != len(entries):
        raise ConfigError(f"{len(weights)} weights for {len(entries)} merged models")
    by_id = {id(e): float(w) for e, w in zip(entries, weights, strict=True)}
    models = [
        e.model_copy(update={"parameters": {**e.parameters, "weight": by_id[id(e)]}})
        if id(e) in by_id
        else e
        for e in config.models
    ]
    return config.model_copy(update={"models": models})


def search_config(config: ComposeConfig, weights: Weights) -> ComposeConfig:
    """The temporary composition that the search loads: the text adapter kept (also for
    NaiveMC, whose shared ``text`` adapter is otherwise folded into W0) in an mmcompose folder."""
    cfg = with_weights(config, weights)
    return cfg.model_copy(update={"output_format": "mmcompose", "lora_output": "adapter"})


def check_searchable(config: ComposeConfig) -> None:
    """Refuse what cannot be re-weighted in memory, before anything is read."""
    if config.merge_method not in SEARCHABLE_METHODS:
        raise ConfigError(
            f"merge_method {config.merge_method!r} cannot be re-weighted in memory: its merged "
            "adapter is not linear in the per-model weights",
            hint="search with merge_method: task_arithmetic (or linear); weights tuned under "
            "one method are not tuned for another",
        )


# ---------------------------------------------------------------- in memory


class InMemoryComposition:
    """A composition written once (with ``weights``) to ``folder`` and loaded; :meth:`apply`
    resets its merged text adapter to any other weights, exactly as composing with them would.

    Only the adapter's B blocks change per candidate; the sources' text factors are read once
    and kept on ``device``. LLM base tensors stay as composed: with ``base_model`` under
    task_arithmetic they are ``base + sum_i w_i (W_i - base)``, which is ``base`` whatever the
    weights when the sources share the base (the usual case; otherwise a note says so).
    """

    def __init__(
        self,
        config: ComposeConfig,
        folder: str | Path,
        weights: Sequence[float] | None = None,
        *,
        device: str | torch.device = "cpu",
        progress: bool = False,
    ) -> None:
        import torch

        from mmcompose.compose.executor import compose
        from mmcompose.compose.inputs import open_inputs
        from mmcompose.compose.plan_data import ConcatAdapter, MergeWeights
        from mmcompose.devices import resolve_device
        from mmcompose.model.config import TEXT_ADAPTER
        from mmcompose.model.lora import lora_layers
        from mmcompose.model.modeling import MMComposeForCausalLM
        from mmcompose.model.processor import MMProcessor

        check_searchable(config)
        self.config = config
        start = tuple(weights) if weights is not None else start_weights(config)
        folder = Path(folder)
        plan = compose(with_weights(config, start), folder, dry_run=True, progress=False).plan
        if plan.mode == "full":
            raise MergeError(
                "the coefficient search needs LoRA-trained sources with a text adapter "
                f"(this composition is {plan.mode!r}: nothing to re-weight in memory)",
                hint="search lambdas for NaiveMC/DAMC compositions of LoRA models; full "
                "fine-tunes are merged as whole weights",
            )
        self.notes: list[str] = []
        if any(isinstance(s, MergeWeights) for s in plan.steps):
            self.notes.append(
                "LLM base tensors are merged against base_model with the start weights and held "
                "fixed during the search (exact when the sources share base_model's weights)"
            )
        if config.merge_method == "linear" and config.parameters.get("normalize", True):
            self.notes.append(
                "linear normalizes the weights (normalize: true): only their ratios matter"
            )
        tmp_plan = compose(search_config(config, start), folder, progress=progress).plan
        if not any(isinstance(s, ConcatAdapter) for s in tmp_plan.steps):
            raise MergeError("internal: the search composition holds no concatenated adapter")
        self.device = resolve_device(device)
        self.model = MMComposeForCausalLM.from_pretrained(folder, device=self.device)
        self.processor = MMProcessor.from_pretrained(folder)
        compute = getattr(torch, config.dtype) if config.dtype else None
        inputs = open_inputs(config)
        try:
            self.layers: list[tuple[str, Any, list[Any], list[Any], list[float]]] = []
            for name, layer in lora_layers(self.model.language_model):
                if TEXT_ADAPTER not in layer.lora:
                    continue
                key = f"language_model.{name}.lora.{TEXT_ADAPTER}"
                a_s, b_s, scales = [], [], []
                for src in inputs.models:
                    spec = src.config.lora.adapters.get(TEXT_ADAPTER) if src.config.lora else None
                    if spec is None or f"{key}.lora_A" not in src:
                        raise MergeError(f"{src.path} has no text adapter on {name}")
                    a, b = src.get(f"{key}.lora_A"), src.get(f"{key}.lora_B")
                    if compute is not None:
                        a, b = a.to(compute), b.to(compute)
                    a_s.append(a.to(self.device))
                    b_s.append(b.to(self.device))
                    scales.append(spec.scaling)
                self.layers.append((name, layer.lora[TEXT_ADAPTER], a_s, b_s, scales))
        finally:
            for s in [*inputs.models, inputs.base]:
                if s is not None:
                    s.close()

    @staticmethod
    def coefficients(config: ComposeConfig, hf_name: str) -> list[float]:
        """c_i with merged = sum_i c_i dW_i for one tensor, as the executor binds it."""
        from mmcompose.compose.config import bind_method
        from mmcompose.compose.plan import concat_coefficients

        return list(concat_coefficients(bind_method(config, config.merge_entries, hf_name)))

    def apply(self, weights: Sequence[float]) -> None:
        """Set the text adapter to the composition with ``weights`` (in place, exact)."""
        from mmcompose.compose.config import resolve_parameters
        from mmcompose.compose.executor import set_concat_adapter

        cfg = with_weights(self.config, weights)
        entries = cfg.merge_entries
        cache: dict[str, list[float]] = {}
        for name, adapter, a_s, b_s, scales in self.layers:
            hf = f"{name}.weight"
            key = json.dumps(resolve_parameters(cfg, entries, hf), sort_keys=True, default=str)
            if key not in cache:
                try:
                    cache[key] = self.coefficients(cfg, hf)
                except MMComposeError as e:
                    raise InvalidWeights(e.message, hint=e.hint) from None
            coeffs = [c * s for c, s in zip(cache[key], scales, strict=True)]
            set_concat_adapter(name, adapter, list(zip(a_s, b_s, strict=True)), coeffs, b_only=True)
