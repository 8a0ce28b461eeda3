"""On-disk cache of frozen-encoder outputs, so epochs (and reruns) never re-run the encoder.

Keyed by a hash of the encoder's name, parameters and weights, and by each input file's path,
size and modification time; one safetensors file per input under
``<cache>/features/<encoder-key>/``.

An input file that cannot be read fails the build (naming it) or, with ``on_corrupt="skip"``,
is left out and returned, so the caller drops its examples; it is never cached, so a fixed
file is picked up by the next run.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from mmcompose.errors import MediaError
from mmcompose.model.media import OnCorrupt, handle_unreadable
from mmcompose.model.processor import MMProcessor
from mmcompose.model.towers import Tower

# Bumped when features cached by older code are wrong. 2: frozen encoders were in train mode
# (per-batch BatchNorm statistics) when the trainer cached their features.
FEATURES_REVISION = 2


def encoder_key(tower: Tower) -> str:
    h = hashlib.sha1(json.dumps(tower.cfg.encoder.model_dump(mode="json"), sort_keys=True).encode())
    h.update(f"revision {FEATURES_REVISION}".encode())
    for name, t in sorted(tower.encoder.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _file_key(path: str) -> str:
    st = os.stat(path)
    return hashlib.sha1(
        f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}".encode()
    ).hexdigest()


class FeatureCache:
    def __init__(self, root: str | Path, tower: Tower, processor: MMProcessor) -> None:
        self.tower, self.processor = tower, processor
        self.dir = Path(root) / "features" / encoder_key(tower)
        self.dir.mkdir(parents=True, exist_ok=True)

    def _path(self, item: str) -> Path:
        return self.dir / f"{_file_key(item)}.safetensors"

    def has(self, item: str) -> bool:
        try:
            return self._path(item).is_file()
        except OSError:  # the input file itself is missing: loading it says so, with its path
            return False

    @torch.no_grad()
    def build(
        self,
        items: Sequence[str],
        batch_size: int = 16,
        progress: bool = True,
        on_corrupt: OnCorrupt = "fail",
    ) -> dict[str, str]:
        """Encode every item not cached yet (written atomically, file by file).

        Returns the unreadable items skipped (``on_corrupt="skip"``), path -> reason; with
        ``"fail"`` the first one raises its MediaError (items encoded before it stay cached).
        """
        todo = sorted({i for i in items if not self.has(i)})
        modality = self.tower.cfg.modality
        skipped: dict[str, str] = {}
        bar = tqdm(total=len(todo), desc=f"encoding {modality}", disable=not progress or not todo)
        for s in range(0, len(todo), batch_size):
            chunk, xs = [], []
            for item in todo[s : s + batch_size]:
                try:
                    xs.append(self.processor.preprocess(modality, [item])[0])
                    chunk.append(item)
                except MediaError as e:
                    handle_unreadable(item, e, on_corrupt, skipped)
            if chunk:
                x = torch.stack(xs).to(next(self.tower.parameters()).device)
                feats = self.tower.encode(x).cpu()
                for item, f in zip(chunk, feats, strict=True):
                    tmp = self._path(item).with_suffix(".tmp")
                    save_file({"features": f.contiguous()}, str(tmp))
                    os.replace(tmp, self._path(item))
            bar.update(len(todo[s : s + batch_size]))
        bar.close()
        return skipped

    def get(self, items: Sequence[str]) -> Tensor:
        return torch.stack([load_file(str(self._path(i)))["features"] for i in items])
