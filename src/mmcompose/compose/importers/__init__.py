"""Importers for the multimodal checkpoint layouts users already have, one module per format.

Importing this package registers three importers with :func:`~mmcompose.compose.sources.
register_importer`: ``llava`` (:mod:`.llava`), ``llava_hf`` (:mod:`.llava_hf`) and
``modelcompose`` (:mod:`.modelcompose`); :mod:`.bin_reader` reads the folders (``.bin`` through
``torch.load(weights_only=True)``) and :mod:`._common` holds what the formats share. The
modules they build towers from live with the other encoders and projectors and load by name
on their own: ``clip_vision`` (:mod:`mmcompose.model.clip`), ``unavailable``
(:mod:`mmcompose.model.unavailable`) and ``blip2_qformer`` (:mod:`mmcompose.model.blip2_qformer`).
Each importer presents its checkpoint as a :class:`Source` under mmcompose names; nothing is
converted on disk and tensors are read one at a time (``.bin`` pickles through a read-only
memory map). Adding a format means adding a module here and importing it below.

Key mappings (``L`` = ``language_model.``, ``P`` = ``towers.<m>.projector.``,
``E`` = ``towers.<m>.encoder.``; ``<clip>`` = CLIP vision-transformer names such as
``embeddings.patch_embedding.weight``, ``encoder.layers.0.mlp.fc1.weight``)::

  importer      checkpoint key                                      mmcompose key
  llava         model.{embed_tokens,layers.*,norm}.*, lm_head.*     L + same
  (model_type   model.mm_projector.{0,2}.* (mlp2x_gelu) / .* (lin.) towers.image.projector.*
   llava_llama, model.vision_tower.vision_tower.vision_model.<clip> towers.image.encoder.clip.<clip>
   llava_mistral, (only when the tower was unfrozen; else see "Encoders" below)
   llava_qwen)
  llava_hf      language_model.model.* / model.language_model.*     L + model.*
  (model_type   language_model.lm_head.* / lm_head.*                L + lm_head.*
   llava)       multi_modal_projector.linear_{1,2}.*                towers.image.projector.{0,2}.*
                (or model.multi_modal_projector.*)
                [model.]vision_tower.[vision_model.]<clip>          towers.image.encoder.clip.<clip>
  modelcompose  [base_model.model.]model.layers.N.<mod>.<proj>      L + model.layers.N.<mod>.<proj>
  (model_type     .lora_{A,B}[.<adapter>].weight                      .lora.<ADAPTER>.lora_{A,B}
   multimodal)  [base_model.model.]model.modal_projectors.<mod>.*   towers.<MOD>.projector.*
                [base_model.model.]{prefix,suffix}_tokens.<mod>     towers.<MOD>.{prefix,suffix}
                                         (1, P, d)                         (P, d)

Adapter and modality names of the reference: ``default`` -> ``text``, ``vision`` -> ``image``,
``audio``/``video``/``point`` unchanged. The reference's audio projector ``qformer_<Q>N_<L>L`` (a
BLIP-2 BERT Q-Former, ``audio_Qformer.bert.*`` + ``audio_query_tokens`` + ``audio_llama_proj`` +
``audio_position_embedding``) maps onto ``blip2_qformer`` (transformers' ``Blip2QFormerModel``)
with ``bert.embeddings.LayerNorm`` -> ``qformer.layernorm`` and ``.attention.self.`` /
``.crossattention.self.`` -> ``.attention.attention.`` / ``.crossattention.attention.``.

Why each decision:

* Encoders. LLaVA-original and ModelCompose checkpoints do not contain their frozen encoders
  (CLIP is loaded from ``mm_vision_tower`` at run time; BEATs, LanguageBind and Point-BERT from
  their own files). Composing such a model with, say, an audio model is still useful (the LLM,
  adapters and projectors merge without the encoder), so opening never fails for that: the tower
  gets the ``unavailable`` encoder, a spec that records where the encoder came from and its
  output size, and that fails *when the composed model is built* with a message naming the
  missing encoder and the importer option that supplies it. Pass ``encoders={"image": PATH}``
  (a local Hugging Face CLIP folder: its vision weights are carried into the tower as
  ``clip_vision``) or ``encoders={"audio": (ModuleSpec(...), "encoder.safetensors")}`` (any
  registered encoder plus its state dict) to get a complete, loadable model. The output size is
  checked against the projector either way.
* Vocabulary. LLaVA-hf adds ``<image>`` (and ``<pad>``, padded to a multiple of 64) to the
  vocabulary, so its embeddings and LM head have more rows than the base LLM and a merge would
  refuse them. mmcompose splices blocks at negative sentinel ids and never needs an ``<image>``
  row, so ``base_vocab_size=N`` keeps only the first N rows (and sets ``vocab_size``); without it
  the rows are kept and the difference is left to the composer to refuse. The same option exists
  for LLaVA-original (``mm_use_im_start_end`` or v0's ``[PAD]`` add rows there). A
  ``pad_token_id`` among the dropped rows (llava-hf's ``<pad>``) is set to None: no kept row is
  that token, padded positions are masked (and embedded as row 0), and the LLM's embedding
  could not be built with it. A BOS or EOS id among them is refused (the trim is wrong).
* Preprocessing. The image tower keeps the checkpoint's own processor settings
  (``preprocessor_config.json``, or transformers 5's ``processor_config.json``; for
  LLaVA-original, the CLIP folder's) and LLaVA-1.5's ``image_aspect_ratio: pad``
  (``expand2square`` with the mean colour), and images are preprocessed by transformers'
  ``CLIPImageProcessor`` itself (see :func:`mmcompose.model.media.preprocess_image`). Chat
  templates are copied as saved and rendered in the content form they expect
  (:mod:`mmcompose.model.chat`).
* ModelCompose checkpoints hold only adapters, projectors and prefix/suffix tokens; the base
  LLM is whatever ``_name_or_path`` named at training time. ``base=PATH`` (or ``_name_or_path``
  when it is an existing local folder) adds the base weights as ``language_model.*``; otherwise
  the source has none, and ``source.base_model`` tells the composer what it needs.
* Unknown keys are errors, so nothing is silently dropped. The only tensors dropped on purpose
  are listed in ``DROPPED`` (e.g. the reference's unused ``prefix_tokens.default``).
"""

from __future__ import annotations

from mmcompose.compose.importers._common import EncoderChoice
from mmcompose.compose.importers.bin_reader import ImportedSource, checkpoint_files
from mmcompose.compose.importers.llava import KNOWN_CLIP_TOWERS, open_llava
from mmcompose.compose.importers.llava_hf import open_llava_hf
from mmcompose.compose.importers.modelcompose import DROPPED, open_modelcompose

__all__ = [
    "DROPPED",
    "KNOWN_CLIP_TOWERS",
    "EncoderChoice",
    "ImportedSource",
    "checkpoint_files",
    "open_llava",
    "open_llava_hf",
    "open_modelcompose",
]
