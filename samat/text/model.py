"""DistilBERT from a staged directory, wrapped so that samat's methods and checkpoints take it.

`model.pretrained` names a directory as the Hugging Face hub holds `distilbert-base-uncased`:
`config.json`, `model.safetensors` and the tokenizer (`tokenizer.json`, or the WordPiece
`vocab.txt`; `tokenizer_config.json` beside it is read when present). Stage it on a machine with
internet: `huggingface_hub.snapshot_download("distilbert-base-uncased", local_dir=PATH,
allow_patterns=["config.json", "model.safetensors", "tokenizer*.json", "vocab.txt"])`, then copy
PATH over. Loading never goes online: HF_HUB_OFFLINE and TRANSFORMERS_OFFLINE are set and
local_files_only=True.

The seam to samat's methods: `Method.step(model, images, labels)` calls `model(images)`, so the
text batch is one int64 tensor [N, 2, L], token ids and attention mask stacked on dim 1, which
`TextClassifier.forward` unpacks; it also takes `forward(input_ids, attention_mask)`.
"""

from __future__ import annotations

import json
import os
import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from samat.config import ConfigError

MODEL_FILES = ("config.json", "model.safetensors")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def _transformers() -> Any:
    """transformers, offline and quiet (no progress bars, no load reports)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def check_model_dir(path: str | os.PathLike[str]) -> list[str]:
    """What a staged model directory lacks ([] when complete)."""
    path = Path(path)
    missing = [name for name in MODEL_FILES if not (path / name).is_file()]
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        missing.append(" or ".join(TOKENIZER_FILES))
    return missing


def require_model_dir(path: str | os.PathLike[str], key: str = "model.pretrained") -> Path:
    """`path` if it is a complete DistilBERT directory, else ConfigError naming what is missing."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(
            f"{key} {path}: no such directory; stage distilbert-base-uncased there "
            "(config.json, model.safetensors, tokenizer.json or vocab.txt)"
        )
    missing = check_model_dir(path)
    if missing:
        raise ConfigError(
            f"{key} {path}: missing {', '.join(missing)}; stage the full model directory there"
        )
    try:
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as error:
        raise ConfigError(
            f"{key} {path}: config.json unreadable ({error}); stage it again"
        ) from None
    if model_type != "distilbert":
        raise ConfigError(
            f"{key} {path}: config.json has model_type {model_type!r}, expected 'distilbert'"
        )
    return path


def _plain(word: str) -> str:
    decomposed = unicodedata.normalize("NFD", word.lower())
    return "".join(c for c in decomposed if unicodedata.category(c) != "Mn")


class TextClassifier(nn.Module):
    """A sequence classifier returning logits [N, num_labels]; its state dict is plain tensors."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    @property
    def num_classes(self) -> int:
        return int(self.net.config.num_labels)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        if attention_mask is None:
            if input_ids.dim() != 3 or input_ids.shape[1] != 2:
                raise ValueError(
                    "expected ids and mask packed as [N, 2, L] or forward(input_ids, "
                    f"attention_mask); got {list(input_ids.shape)}"
                )
            input_ids, attention_mask = input_ids[:, 0], input_ids[:, 1]
        return self.net(input_ids=input_ids, attention_mask=attention_mask).logits


def load_tokenizer(path: str | os.PathLike[str]) -> Any:
    """The staged tokenizer (AutoTokenizer, local files only)."""
    path = require_model_dir(path)
    return _transformers().AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def load_pretrained(
    path: str | os.PathLike[str], *, num_labels: int = 2, seed: int = 0
) -> TextClassifier:
    """DistilBertForSequenceClassification from the staged weights, in train mode. The weights
    the checkpoint lacks (the classification head; the hub's checkpoint is a masked-LM one) are
    initialised from `seed`, without touching the global RNG."""
    path = require_model_dir(path)
    tf = _transformers()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = tf.DistilBertForSequenceClassification.from_pretrained(
                str(path),
                num_labels=num_labels,
                local_files_only=True,
                use_safetensors=True,
                dtype=torch.float32,
            )
    except Exception as error:  # transformers and safetensors raise many kinds
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(
            f"model.pretrained {path}: cannot load it ({reason}); stage it again"
        ) from None
    return TextClassifier(net).train()


def write_tiny_model(
    path: str | os.PathLike[str],
    vocab_words: Iterable[str],
    seed: int = 0,
    *,
    max_position_embeddings: int = 128,
) -> Path:
    """Write a random tiny DistilBERT (2 layers, dim 32, 2 heads, hidden 64) in the hub's format:
    a masked-LM checkpoint (model.safetensors, config.json) and a lower-casing WordPiece
    tokenizer whose vocabulary is the special tokens then the given words (vocab.txt,
    tokenizer.json, tokenizer_config.json). Returns `path`."""
    tf = _transformers()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    # As BERT's normaliser sees them: lower case, accents stripped.
    words = [_plain(w) for w in vocab_words]
    vocab = list(dict.fromkeys([*SPECIAL_TOKENS, *words]))
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tokenizer = tf.DistilBertTokenizer(
        vocab={token: i for i, token in enumerate(vocab)},
        do_lower_case=True,
        model_max_length=max_position_embeddings,
    )
    tokenizer.save_pretrained(str(path))
    config = tf.DistilBertConfig(
        vocab_size=len(vocab),
        dim=32,
        n_layers=2,
        n_heads=2,
        hidden_dim=64,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = tf.DistilBertForMaskedLM(config)
    net.save_pretrained(str(path))
    return path


class TextVictim:
    """`predict_proba(token lists) -> [N, C]` of a TextClassifier, what the attacks query: tokens
    joined by spaces, tokenized (truncated to `max_length`), softmax in eval mode, in batches."""

    def __init__(
        self,
        model: TextClassifier,
        tokenizer: Any,
        *,
        max_length: int = 128,
        batch_size: int = 64,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, texts: Sequence[Sequence[str]]) -> np.ndarray:
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        try:
            out = []
            for start in range(0, len(texts), self.batch_size):
                chunk = [" ".join(t) for t in texts[start : start + self.batch_size]]
                batch = self.tokenizer(
                    chunk,
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                )
                logits = self.model(
                    batch["input_ids"].to(device), batch["attention_mask"].to(device)
                )
                out.append(torch.softmax(logits.double(), dim=-1).cpu().numpy())
        finally:
            self.model.train(was_training)
        n = self.model.num_classes
        return np.concatenate(out) if out else np.zeros((0, n))
