"""The tokenizer of a DSMoE export: the model folder's tokenizer files, which
dsmoe_export copies beside the .onnx file. transformers' AutoTokenizer when it is
installed, else the `tokenizers` library on a bare tokenizer.json.
"""
from __future__ import annotations

from pathlib import Path

TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


class Tokenizer:
    """encode(text) -> ids, decode(ids) -> text and eos_token_id (None without transformers)."""

    def __init__(self, folder: Path):
        self.hf = None
        try:
            from transformers import AutoTokenizer

            self.hf = AutoTokenizer.from_pretrained(str(folder))
            self.eos_token_id = self.hf.eos_token_id
        except ImportError:
            from tokenizers import Tokenizer as BareTokenizer

            self.tk = BareTokenizer.from_file(str(folder / "tokenizer.json"))
            self.eos_token_id = None

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text)) if self.hf is not None else self.tk.encode(text).ids

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self.hf is not None:
            return self.hf.decode(ids, skip_special_tokens=True)
        return self.tk.decode(ids, skip_special_tokens=True)


def load_tokenizer(folder: str | Path) -> Tokenizer | None:
    """The tokenizer in `folder` (an export's folder), or None when it has no tokenizer files."""
    folder = Path(folder)
    if not any((folder / m).is_file() for m in TOKENIZER_MARKERS):
        return None
    return Tokenizer(folder)
