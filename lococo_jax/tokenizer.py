"""Tokenizers from local files only (an HF folder, a converted directory, or a .gguf file), and
the byte tokenizer of the tiny test model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Any of these makes a folder loadable by AutoTokenizer.
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class ByteTokenizer:
    """UTF-8 bytes as token ids (vocab 256): needs no download; for tiny models and tests."""

    vocab_size = 256
    eos_token_id = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


def load_tokenizer(path: str | Path) -> Any:
    """A transformers fast tokenizer for ``path``, never touching the network.

    path: an HF folder or a converted directory (with tokenizer.json / tokenizer_config.json ...),
    or a .gguf file (transformers builds the tokenizer from the GGUF's tokenizer.ggml.* metadata).
    """
    from transformers import AutoTokenizer

    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"tokenizer source not found: {path}")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{path}: a tokenizer file must be a .gguf; otherwise pass its folder")
        return AutoTokenizer.from_pretrained(
            str(path.parent), gguf_file=path.name, local_files_only=True
        )
    if not any((path / m).is_file() for m in TOKENIZER_MARKERS):
        raise FileNotFoundError(
            f"no tokenizer in {path}: expected one of {', '.join(TOKENIZER_MARKERS)}"
        )
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
