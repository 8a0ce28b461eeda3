"""transformers' Auto classes for mmcompose folders: ``AutoConfig``, ``AutoModelForCausalLM``
and ``AutoProcessor`` ``.from_pretrained(folder)`` on a composed or trained model.

transformers finds a config class by config.json's ``model_type`` (it must be a
``PreTrainedConfig``, since ``AutoModel*.from_pretrained`` reloads anything else), a model
class by the config's type, and a processor class by the ``processor_class`` name that
processor_config.json records. Our own classes are a pydantic config and an ``nn.Module`` with
their own loaders, so the entries here are thin adapters that validate with :class:`MMConfig`
and hand back our :class:`MMComposeForCausalLM` and :class:`MMProcessor`, loaded by their own
``from_pretrained``: the Auto path and ``mmcompose generate`` run the same code.

``import mmcompose`` registers these lazily (:mod:`mmcompose._auto_hook`): each entry is added
when transformers' auto module for it is first imported, so mmcompose's import stays free of
torch and transformers. :func:`register` does it at once (idempotent).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers.configuration_utils import PreTrainedConfig

from mmcompose.errors import ConfigError
from mmcompose.model.config import MMConfig

if TYPE_CHECKING:
    import torch

    from mmcompose.model.modeling import MMComposeForCausalLM
    from mmcompose.model.processor import MMProcessor

MODEL_TYPE = "mmcompose"

# What AutoModelForCausalLM.from_pretrained passes along for every model: hub options (a
# local folder needs none) and its own bookkeeping. Any other option is refused by name.
_PASSED_BY_AUTO = frozenset(
    {
        "_from_auto",
        "trust_remote_code",
        "adapter_kwargs",
        "cache_dir",
        "force_download",
        "local_files_only",
        "proxies",
        "revision",
        "subfolder",
        "token",
        "code_revision",
    }
)


class MMComposeHFConfig(PreTrainedConfig):
    """config.json of an mmcompose folder as transformers holds configs; validated by
    :class:`MMConfig` (unknown or invalid keys fail as they do in mmcompose), which
    :meth:`to_mmconfig` returns."""

    model_type = MODEL_TYPE

    mmcompose_version: str | None = None
    text_config: dict[str, Any] | None = None
    towers: list[dict[str, Any]] | None = None
    lora: dict[str, Any] | None = None
    mmer: dict[str, Any] | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        # transformers keeps any unknown key as an attribute; MMConfig refuses it, so do we.
        extra = {k: v for k, v in kwargs.items() if k not in _base_kwargs()}
        super().__post_init__(**kwargs)
        if self.text_config is not None or extra:  # AutoConfig.for_model builds an empty one
            self.to_mmconfig(extra)

    def to_mmconfig(self, _extra: dict[str, Any] | None = None) -> MMConfig:
        """The :class:`MMConfig` these fields describe (a ConfigError if they are invalid)."""
        data: dict[str, Any] = {
            **(_extra or {}),
            "model_type": MODEL_TYPE,
            "text_config": self.text_config,
        }
        for key in ("mmcompose_version", "towers", "lora", "mmer", "architectures"):
            if getattr(self, key, None) is not None:
                data[key] = getattr(self, key)
        if self.dtype is not None:  # transformers turns the saved "float32" into torch.float32
            data["dtype"] = str(self.dtype).removeprefix("torch.")
        return MMConfig.from_dict(data, source=f"config of {self._name_or_path or 'mmcompose'}")


@functools.cache
def _base_kwargs() -> frozenset[str]:
    """Keys ``PreTrainedConfig.__post_init__`` consumes itself (not config fields of ours)."""
    from transformers import GenerationConfig

    own = {
        "torch_dtype",
        "num_labels",
        "name_or_path",
        "_commit_hash",
        "output_attentions",
        "attn_implementation",
        "experts_implementation",
        "per_layer_config",
        "_attn_implementation_internal",
        "_experts_implementation_internal",
    }
    return frozenset(own | set(GenerationConfig._get_default_generation_params()))


class MMComposeAutoModel:
    """What ``AutoModelForCausalLM`` builds for ``model_type: mmcompose``: an
    :class:`MMComposeForCausalLM`, loaded by :meth:`MMComposeForCausalLM.from_pretrained`
    (``dtype`` and ``device_map`` as a single device are honoured; other model options are
    refused by name rather than ignored)."""

    config_class = MMComposeHFConfig

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *args: Any,
        config: MMComposeHFConfig | None = None,
        dtype: str | torch.dtype | None = None,
        torch_dtype: str | torch.dtype | None = None,
        device_map: str | torch.device | None = None,
        **kwargs: Any,
    ) -> MMComposeForCausalLM:
        from mmcompose.model.modeling import MMComposeForCausalLM

        _refuse(args, kwargs)
        name = _dtype_name(dtype if dtype is not None else torch_dtype)
        device = "cpu" if device_map is None else device_map
        if device == "auto":  # one device: the model is not split across several
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        return MMComposeForCausalLM.from_pretrained(path, device=device, dtype=name)

    @classmethod
    def _from_config(cls, config: MMComposeHFConfig, **kwargs: Any) -> MMComposeForCausalLM:
        """``AutoModelForCausalLM.from_config``: a new, randomly initialised model."""
        from mmcompose.model.modeling import MMComposeForCausalLM

        dtype = kwargs.pop("dtype", None) or kwargs.pop("torch_dtype", None)
        _refuse((), kwargs)
        mm = config.to_mmconfig()
        if dtype is not None:
            mm = mm.model_copy(update={"dtype": _dtype_name(dtype)})
        return MMComposeForCausalLM(mm)


def _dtype_name(dtype: str | torch.dtype | None) -> str | None:
    if dtype is None or dtype == "auto":  # "auto": the dtype the folder was saved in
        return None
    return str(dtype).removeprefix("torch.")


def _refuse(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    unknown = sorted(k for k in kwargs if k not in _PASSED_BY_AUTO)
    if args or unknown:
        raise ConfigError(
            "mmcompose models do not take "
            + (f"the option(s) {', '.join(unknown)}" if unknown else "positional model arguments"),
            hint="AutoModelForCausalLM.from_pretrained(folder, dtype=..., device_map='cpu'|'cuda') "
            "is what an mmcompose folder supports",
        )


def _load_processor(path: str | Path, **kwargs: Any) -> MMProcessor:
    from mmcompose.model.processor import MMProcessor

    return MMProcessor.from_pretrained(path)


class _ProcessorEntry:
    """``AutoProcessor``'s entry for processor_config.json's ``processor_class: MMProcessor``:
    transformers finds a registered processor by that class name, and this stand-in defers
    importing the real :class:`MMProcessor` (and its media libraries) to the first load."""

    from_pretrained = staticmethod(_load_processor)


_ProcessorEntry.__name__ = _ProcessorEntry.__qualname__ = "MMProcessor"


def register_config() -> None:
    from transformers.models.auto.configuration_auto import AutoConfig

    AutoConfig.register(MODEL_TYPE, MMComposeHFConfig, exist_ok=True)


def register_model() -> None:
    from transformers.models.auto.modeling_auto import AutoModelForCausalLM

    AutoModelForCausalLM.register(MMComposeHFConfig, MMComposeAutoModel, exist_ok=True)


def register_processor() -> None:
    from transformers.models.auto.processing_auto import AutoProcessor

    AutoProcessor.register(MMComposeHFConfig, _ProcessorEntry, exist_ok=True)


def register() -> None:
    """Register all three Auto entries now (``import mmcompose`` does it lazily)."""
    register_config()
    register_model()
    register_processor()


__all__ = ["MMComposeAutoModel", "MMComposeHFConfig", "register"]
