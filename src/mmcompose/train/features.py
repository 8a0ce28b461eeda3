"""On-disk cache of frozen-encoder outputs, so epochs (and reruns) never re-run the encoder.

Keyed by a hash of the encoder's name, parameters and weights, and by each input file's path,
size and modification time; one safetensors file per input under
``<cache>/features/<encoder-key>/``.
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

from mmcompose.model.processor import MMProcessor
from mmcompose.model.towers import Tower


def encoder_key(tower: Tower) -> str:
    h = hashlib.sha1(json.dumps(tower.cfg.encoder.model_dump(mode="json"), sort_keys=True).encode())
    for name, t in sorted(tower.encoder.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
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

    @torch.no_grad()
    def build(self, items: Sequence[str], batch_size: int = 16, progress: bool = True) -> None:
        """Encode every item not cached yet (written atomically, file by file)."""
        todo = sorted({i for i in items if not self._path(i).is_file()})
        modality = self.tower.cfg.modality
        bar = tqdm(total=len(todo), desc=f"encoding {modality}", disable=not progress or not todo)
        for s in range(0, len(todo), batch_size):
            chunk = todo[s : s + batch_size]
            x = self.processor.preprocess(modality, chunk)
            feats = self.tower.encode(x.to(next(self.tower.parameters()).device)).cpu()
            for item, f in zip(chunk, feats, strict=True):
                tmp = self._path(item).with_suffix(".tmp")
                save_file({"features": f.contiguous()}, str(tmp))
                os.replace(tmp, self._path(item))
            bar.update(len(chunk))
        bar.close()

    def get(self, items: Sequence[str]) -> Tensor:
        return torch.stack([load_file(str(self._path(i)))["features"] for i in items])
