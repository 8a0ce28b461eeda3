"""The composed multimodal LLM: one causal LM, modality towers, routed LoRA adapters."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, PreTrainedModel

from mmcompose.compose.tensor_io import all_finite
from mmcompose.devices import resolve_device
from mmcompose.errors import CheckpointError, ConfigError, MMComposeError
from mmcompose.io import check_safetensors, dedupe_shared, load_state_dict, save_state_dict
from mmcompose.model.config import CONFIG_NAME, LoRAConfig, MMConfig, TowerConfig
from mmcompose.model.encoders import no_pretrained_weights
from mmcompose.model.lora import TokenRouter, inject_lora
from mmcompose.model.splice import IGNORE_INDEX, ROUTE_IDS, Spliced, splice
from mmcompose.model.towers import Tower

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ScoreRequest:
    """One prompt (token ids, no padding, with modality placeholders) and the continuations
    to score after it, for :meth:`MMComposeForCausalLM.score_requests`."""

    input_ids: Tensor  # (T,) or (1, T)
    continuations: Sequence[Sequence[int]]
    modal_inputs: Mapping[str, Tensor] | None = None
    modal_features: Mapping[str, Tensor] | None = None


@dataclass
class MMOutput:
    loss: Tensor | None
    logits: Tensor | None  # (B, T', V), or (n_label_tokens, V) when computed for the loss only
    spliced: Spliced


def build_llm(text_config: Mapping, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    from huggingface_hub.errors import StrictDataclassError

    try:
        cfg = AutoConfig.for_model(**dict(text_config))
    except (ValueError, TypeError, KeyError, StrictDataclassError) as e:
        # transformers validates the architecture (heads divide the width, known model_type)
        # and wraps the reason; show the reason.
        reason = e.__cause__ or e
        raise ConfigError(
            f"text_config (model_type {text_config.get('model_type')!r}) is not a valid LLM "
            f"config: {' '.join(str(reason).split())}",
            hint="the config.json was edited or damaged; restore it from the model's source",
        ) from None
    return AutoModelForCausalLM.from_config(cfg, dtype=dtype)


def expected_shapes(config: MMConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor a model built from ``config`` holds; built on the meta
    device, so it costs no memory and reads no weights, even for a multi-GB model."""
    from transformers.initialization import no_init_weights

    with torch.device("meta"), no_pretrained_weights(), no_init_weights():
        model = MMComposeForCausalLM(config)
    return {k: tuple(t.shape) for k, t in model.state_dict().items()}


class MMComposeForCausalLM(nn.Module):
    """LLM + towers. ``forward`` trains, ``generate`` decodes with a KV cache.

    Parameter names: ``language_model.*`` are the LLM's own Hugging Face names (LoRA adds
    ``<linear>.lora.<adapter>.lora_A/B``), ``towers.<modality>.{encoder,projector,prefix,suffix}``.
    """

    def __init__(self, config: MMConfig, language_model: PreTrainedModel | None = None) -> None:
        super().__init__()
        self.config = config
        self.folded = False  # fold_for_inference() was called: evaluation only
        dtype = DTYPES.get(config.dtype)
        if dtype is None:
            raise ConfigError(
                f"unsupported dtype {config.dtype!r}", hint=f"use {', '.join(DTYPES)}"
            )
        self.language_model = language_model or build_llm(config.text_config, dtype)
        hidden = self.language_model.config.hidden_size
        self.towers = nn.ModuleDict({t.modality: Tower(t, hidden) for t in config.towers})
        lora = config.lora
        self.router = TokenRouter(
            {rid: (lora.adapter_for(kind) if lora else None) for kind, rid in ROUTE_IDS.items()}
        )
        if lora is not None:
            adapters = {n: (a.rank, a.alpha) for n, a in lora.adapters.items()}
            replaced = inject_lora(
                self.language_model, self.router, lora.target_modules, adapters, lora.dropout
            )
            if not replaced:
                raise ConfigError(
                    f"no linear layer of the LLM matches target_modules {list(lora.target_modules)}"
                )
        if config.mmer is not None:  # MMER: per-modality masks over one merged delta
            from mmcompose.model.masked import inject_masked_deltas, mmer_routes

            self.router.route_to_adapter = mmer_routes(config.mmer)
            self.router.set_routes(None)
            if not inject_masked_deltas(self.language_model, self.router, config.mmer):
                raise ConfigError(
                    "no linear layer of the LLM matches mmer.target_modules "
                    f"{list(config.mmer.target_modules)}"
                )

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return self.language_model.get_input_embeddings().weight.device

    @property
    def modalities(self) -> list[str]:
        return list(self.towers)

    # ------------------------------------------------------------------ forward
    def embed_modalities(
        self,
        modal_inputs: Mapping[str, Tensor] | None = None,
        modal_features: Mapping[str, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """Blocks (n, L, d) per modality, from raw inputs or from cached encoder features."""
        blocks: dict[str, Tensor] = {}
        for source, fn in ((modal_inputs, "encode"), (modal_features, None)):
            for m, x in (source or {}).items():
                if m not in self.towers:
                    raise ConfigError(
                        f"this model has no {m!r} tower",
                        hint=f"its modalities are: {', '.join(self.towers) or '(none)'}",
                    )
                if m in blocks:
                    raise ConfigError(f"{m!r} given both as inputs and as features")
                tower: Tower = self.towers[m]
                x = x.to(self.device)
                feats = tower.encode(x) if fn else x
                blocks[m] = tower.project(feats)
        return blocks

    def prepare_inputs(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        modal_inputs: Mapping[str, Tensor] | None = None,
        modal_features: Mapping[str, Tensor] | None = None,
        labels: Tensor | None = None,
        padding_side: Literal["left", "right"] = "right",
    ) -> Spliced:
        blocks = self.embed_modalities(modal_inputs, modal_features)
        embed = self.language_model.get_input_embeddings()
        return splice(
            input_ids.to(self.device),
            attention_mask.to(self.device) if attention_mask is not None else None,
            embed,
            blocks,
            labels.to(self.device) if labels is not None else None,
            padding_side,
        )

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        modal_inputs: Mapping[str, Tensor] | None = None,
        modal_features: Mapping[str, Tensor] | None = None,
        labels: Tensor | None = None,
        padding_side: Literal["left", "right"] = "right",
        loss_reduction: Literal["mean", "sum"] = "mean",
    ) -> MMOutput:
        """With ``labels``, the LM head runs only on positions that carry a label.
        ``loss_reduction="sum"`` lets data-parallel training divide by the global token count."""
        sp = self.prepare_inputs(
            input_ids, attention_mask, modal_inputs, modal_features, labels, padding_side
        )
        hidden = self._decode(sp.embeds, sp.attention_mask, sp.position_ids, sp.routes)
        head = self.language_model.get_output_embeddings()
        if sp.labels is None:
            return MMOutput(None, head(hidden), sp)
        target = sp.labels[:, 1:]
        keep = target != IGNORE_INDEX
        logits = head(hidden[:, :-1][keep])
        if keep.any():
            loss = F.cross_entropy(logits.float(), target[keep], reduction=loss_reduction)
        else:
            loss = hidden.sum() * 0
        return MMOutput(loss, logits, sp)

    def _decode(
        self,
        embeds: Tensor,
        attention_mask: Tensor,
        position_ids: Tensor,
        routes: Tensor | None,
        cache: DynamicCache | None = None,
    ) -> Tensor:
        decoder = self.language_model.get_decoder()
        with self.router.routing(routes):
            out = decoder(
                inputs_embeds=embeds,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=cache is not None,
                **{_cache_kwarg(type(decoder)): cache},
            )
        return out.last_hidden_state

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        modal_inputs: Mapping[str, Tensor] | None = None,
        modal_features: Mapping[str, Tensor] | None = None,
        *,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        seed: int | None = None,
    ) -> Tensor:
        """Decode up to ``max_new_tokens`` per sample; returns only the new tokens (B, n),
        padded with ``pad_token_id`` after a sample's end of sequence. New tokens are text."""
        out = list(
            self.decode_steps(
                input_ids, attention_mask, modal_inputs, modal_features,
                max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                top_k=top_k, top_p=top_p, eos_token_id=eos_token_id,
                pad_token_id=pad_token_id, seed=seed,
            )
        )  # fmt: skip
        if not out:
            return torch.empty(input_ids.shape[0], 0, dtype=torch.long, device=self.device)
        return torch.stack(out, dim=1)

    @torch.no_grad()
    def decode_steps(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        modal_inputs: Mapping[str, Tensor] | None = None,
        modal_features: Mapping[str, Tensor] | None = None,
        *,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        seed: int | None = None,
    ) -> Iterator[Tensor]:
        """:meth:`generate`'s decoding one step at a time: yields each step's new tokens (B,)
        as they are picked (a streamed answer reads them here), until every sample has ended
        or ``max_new_tokens``."""
        sp = self.prepare_inputs(
            input_ids, attention_mask, modal_inputs, modal_features, padding_side="left"
        )
        eos = _as_list(eos_token_id if eos_token_id is not None else self._default_eos())
        pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
        gen = torch.Generator(device=self.device)
        gen.manual_seed(seed if seed is not None else 0)
        cache = DynamicCache(config=self.language_model.config)
        head = self.language_model.get_output_embeddings()
        embed = self.language_model.get_input_embeddings()
        mask, pos = sp.attention_mask, sp.position_ids[:, -1:]
        hidden = self._decode(sp.embeds, mask, sp.position_ids, sp.routes, cache)
        bsz = mask.shape[0]
        done = torch.zeros(bsz, dtype=torch.bool, device=self.device)
        eos_t = torch.tensor(eos, dtype=torch.long, device=self.device)
        for step in range(max_new_tokens):
            logits = head(hidden[:, -1]).float()
            tok = _pick(logits, do_sample, temperature, top_k, top_p, gen)
            tok = torch.where(done, torch.full_like(tok, pad), tok)
            yield tok
            done |= torch.isin(tok, eos_t)
            if done.all() or step == max_new_tokens - 1:
                return
            mask = torch.cat([mask, mask.new_ones(bsz, 1)], dim=1)
            pos = pos + 1
            feed = torch.where(done, torch.zeros_like(tok), tok)  # finished rows: any valid id
            hidden = self._decode(embed(feed[:, None]), mask, pos, None, cache)

    @torch.no_grad()
    def score_continuations(
        self,
        input_ids: Tensor,
        continuations: Sequence[Sequence[int]],
        attention_mask: Tensor | None = None,
        modal_inputs: Mapping[str, Tensor] | None = None,
        modal_features: Mapping[str, Tensor] | None = None,
    ) -> Tensor:
        """Sum of log-probabilities of each continuation after one prompt (batch of 1): the
        multiple-choice scoring of lm-evaluation-harness, all options in one forward pass
        (see :meth:`score_requests`). Returns (K,)."""
        if input_ids.shape[0] != 1:
            raise ValueError("score_continuations takes one prompt")
        ids = input_ids[0] if attention_mask is None else input_ids[0][attention_mask[0].bool()]
        return self.score_requests(
            [ScoreRequest(ids, continuations, modal_inputs, modal_features)]
        )[0]

    @torch.no_grad()
    def score_requests(
        self, requests: Sequence[ScoreRequest], max_tokens: int = 2048
    ) -> list[Tensor]:
        """Summed log-probability of every continuation of every request, one (K_i,) tensor
        per request.

        Each prompt and all of its continuations share one row (branches that see the prompt
        and their own earlier tokens only, :mod:`mmcompose.model.scoring`), and rows are
        batched up to ``max_tokens`` padded positions per forward pass. The LM head runs only
        on the positions that predict a continuation token."""
        from mmcompose.model.scoring import (
            additive_mask,
            allowed_attention,
            batches_by_tokens,
            pack_continuations,
        )

        embed = self.language_model.get_input_embeddings()
        head = self.language_model.get_output_embeddings()
        prepared = []
        for r in requests:
            sp = self.prepare_inputs(
                r.input_ids.reshape(1, -1), None, r.modal_inputs, r.modal_features
            )
            prepared.append((sp, pack_continuations(sp.embeds.shape[1], r.continuations)))
        out: list[Tensor] = [torch.empty(0)] * len(requests)
        for chunk in batches_by_tokens([row.length for _, row in prepared], max_tokens):
            width = max(prepared[i][1].length for i in chunk)
            embeds, pos, routes, allowed, flat_q = [], [], [], [], []
            for b, i in enumerate(chunk):
                sp, row = prepared[i]
                pad = width - row.length
                e = torch.cat([sp.embeds[0], embed(row.tokens.to(self.device))])
                embeds.append(F.pad(e, (0, 0, 0, pad)))
                p = torch.cat([sp.position_ids[0], row.positions.to(self.device)])
                pos.append(F.pad(p, (0, pad)))
                r = torch.cat([sp.routes[0], sp.routes.new_zeros(row.tokens.numel())])
                routes.append(F.pad(r, (0, pad)))  # continuation tokens are text (route 0)
                allowed.append(allowed_attention(row, width))
                flat_q.append(row.queries + b * width)
            emb = torch.stack(embeds)
            mask = additive_mask(torch.stack(allowed), emb.dtype).to(self.device)
            hidden = self._decode(emb, mask, torch.stack(pos), torch.stack(routes))
            q = torch.cat(flat_q).to(self.device)
            uniq, inverse = torch.unique(q, return_inverse=True)
            logp = head(hidden.reshape(-1, hidden.shape[-1])[uniq]).float().log_softmax(-1)
            offset = 0
            for i in chunk:
                row = prepared[i][1]
                m = row.targets.numel()
                tok = logp[inverse[offset : offset + m], row.targets.to(self.device)]
                score = torch.zeros(len(requests[i].continuations), device=self.device)
                out[i] = score.index_add(0, row.owner.to(self.device), tok)
                offset += m
        return out

    def _default_eos(self) -> list[int]:
        return _as_list(getattr(self.language_model.config, "eos_token_id", None))

    # ------------------------------------------------------------------ adapters
    def lora_adapters(self) -> list[str]:
        return list(self.config.lora.adapters) if self.config.lora else []

    def parameter_counts(self) -> dict[str, int]:
        """Parameters by part (LLM base, each adapter, each tower), counted once if tied."""
        from mmcompose.inspect import param_group

        counts: dict[str, int] = {}
        for name, p in self.named_parameters():  # tied parameters are yielded once
            counts[param_group(name)] = counts.get(param_group(name), 0) + p.numel()
        return counts

    def fold_for_inference(self) -> MMComposeForCausalLM:
        """Fold the text LoRA adapter into the LLM's weights (see
        :func:`~mmcompose.model.lora.fold_text_adapter`): same outputs up to float rounding,
        up to a quarter less time per forward pass on a CPU (``benchmarks/scoring.py``). For evaluation only: the folded
        model refuses to be saved. Returns ``self``."""
        from mmcompose.model.lora import fold_text_adapter

        if fold_text_adapter(self.language_model, self.router):
            self.folded = True
        return self

    # ------------------------------------------------------------------ save / load
    def save_pretrained(
        self,
        path: str | Path,
        processor: object | None = None,
        max_shard_size: int | str = "2GB",
        overwrite: bool = False,
    ) -> Path:
        """Write config.json, safetensors (sharded with an index above ``max_shard_size``),
        and the processor (tokenizer + processor_config.json), atomically."""
        from mmcompose.fs import atomic_dir

        path = Path(path)
        with atomic_dir(path, overwrite=overwrite) as tmp:
            self.write_to(tmp, processor, max_shard_size)
        return path

    def write_to(
        self, folder: Path, processor: object | None = None, max_shard_size: int | str = "2GB"
    ) -> None:
        """Write the model files into an existing folder (callers make it atomic)."""
        if self.folded:
            raise MMComposeError(
                "this model's adapters were folded for inference; its weights no longer "
                "match its config",
                hint="save the model before calling fold_for_inference(), or reload it",
            )
        state, _ = dedupe_shared(self.state_dict())
        (folder / CONFIG_NAME).write_text(self.config.to_json())
        save_state_dict(state, folder, max_shard_size, metadata={"mmcompose": "1"})
        if processor is not None:
            processor.save_pretrained(folder)  # type: ignore[attr-defined]

    @classmethod
    def from_base_llm(
        cls,
        llm_dir: str | Path,
        towers: Sequence[TowerConfig] = (),
        lora: LoRAConfig | None = None,
        dtype: str = "float32",
    ) -> MMComposeForCausalLM:
        """A new composed model around a plain Hugging Face causal LM folder (its weights
        are loaded; towers and adapters are freshly initialised)."""
        llm_dir = Path(llm_dir)
        if not (llm_dir / CONFIG_NAME).is_file():
            raise CheckpointError(
                f"{llm_dir} has no {CONFIG_NAME}", hint="pass a Hugging Face LLM folder"
            )
        check_safetensors(llm_dir)  # a damaged file is named here, not mid-way in transformers
        try:
            llm = AutoModelForCausalLM.from_pretrained(str(llm_dir), dtype=DTYPES[dtype])
        except (OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(
                f"cannot load the LLM in {llm_dir}: {' '.join(str(e).split())[:500]}",
                hint="pass a complete Hugging Face causal LM folder (config.json + weights)",
            ) from None
        text_config = llm.config.to_dict()
        config = MMConfig(text_config=text_config, towers=list(towers), lora=lora, dtype=dtype)
        return cls(config, language_model=llm)

    @classmethod
    def from_pretrained(
        cls, path: str | Path, device: str | torch.device = "cpu", dtype: str | None = None
    ) -> MMComposeForCausalLM:
        device = resolve_device(device)
        config = MMConfig.from_dir(path)
        if dtype is not None:
            config = config.model_copy(update={"dtype": dtype})
        # Every weight comes from the checkpoint (load_weights is strict): skip building
        # encoders from the asset cache, and skip random initialisation (half of the load).
        from transformers.initialization import no_init_weights

        with no_pretrained_weights(), no_init_weights():
            model = cls(config)
        if getattr(model.language_model.config, "tie_word_embeddings", False):
            model.language_model.tie_weights()  # init_weights, which ties, was skipped
        model.load_weights(load_state_dict(path))
        return model.to(device).eval()

    def load_weights(self, state: Mapping[str, Tensor]) -> None:
        """Load a full state dict strictly; only aliases of tied weights may be absent."""
        own = self.state_dict()
        _, aliases = dedupe_shared(own)
        wrong = [
            f"{k} {list(t.shape)} (config.json implies {list(own[k].shape)})"
            for k, t in state.items()
            if k in own and t.shape != own[k].shape
        ]
        if wrong:
            raise CheckpointError(
                f"{len(wrong)} tensor(s) have a shape that does not match config.json, e.g. "
                + "; ".join(wrong[:2]),
                hint="config.json was edited or belongs to another model; restore the original",
            )
        result = self.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if k not in aliases]
        if missing or result.unexpected_keys:
            parts = []
            if missing:
                parts.append(f"missing {len(missing)} tensor(s), e.g. {missing[:3]}")
            if result.unexpected_keys:
                parts.append(
                    f"{len(result.unexpected_keys)} unexpected, e.g. {result.unexpected_keys[:3]}"
                )
            raise CheckpointError(
                "the weights do not match config.json: " + "; ".join(parts),
                hint="the folder was written by another version or edited by hand",
            )
        if getattr(self.language_model.config, "tie_word_embeddings", False):
            self.language_model.tie_weights()

    def check_finite(self, where: str | Path) -> None:
        """Refuse weights holding NaN or Inf: every score computed from them would be noise,
        reported as if it were a result (``compose`` refuses such inputs too)."""
        bad = [n for n, t in self.state_dict().items() if not all_finite(t)]
        if bad:
            raise CheckpointError(
                f"{where}: {len(bad)} tensor(s) hold NaN or Inf, e.g. {', '.join(bad[:3])}",
                hint="the model is damaged (a diverged training or a bad merge); retrain, "
                "re-compose or restore it",
            )


@functools.cache
def _cache_kwarg(decoder: type) -> str:
    """The decoder's name for its KV cache: ``cache`` since transformers renamed it (the old
    ``past_key_values`` warns of its removal in 5.40), ``past_key_values`` before."""
    params = inspect.signature(decoder.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _as_list(x: int | Sequence[int] | None) -> list[int]:
    if x is None:
        return []
    return [int(x)] if isinstance(x, int) else [int(v) for v in x]


def _pick(
    logits: Tensor,
    do_sample: bool,
    temperature: float,
    top_k: int,
    top_p: float,
    gen: torch.Generator,
) -> Tensor:
    if not do_sample or temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    return torch.multinomial(logits.softmax(-1), 1, generator=gen).squeeze(1)


__all__ = ["MMComposeForCausalLM", "MMOutput", "build_llm"]
