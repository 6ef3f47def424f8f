"""A Hugging Face tokenizer for the zoo's byte-level models (token id = byte value), so an exported run
loads with `transformers.AutoTokenizer` and `pipeline("text-generation", model=DIR)`.

It is the byte-level BPE of GPT-2 without merges: each byte is mapped to a printable character
(`byte_to_unicode`), the vocabulary holds those 256 characters at ids 0-255, and the ByteLevel decoder
maps them back to bytes. Written with the `tokenizers` package (what transformers' fast tokenizers use).
"""
from __future__ import annotations

import json
import os

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (printable Latin-1 bytes map to themselves)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def write_byte_tokenizer(path: str, *, vocab_size: int, max_length: int | None = None) -> None:
    """Writes `tokenizer.json` and `tokenizer_config.json` for a byte-level model into `path`."""
    if vocab_size < 256:
        raise ValueError(f"a byte-level tokenizer needs model.vocab_size >= 256, got {vocab_size}")
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    except ImportError:
        raise ImportError("writing a byte-level tokenizer needs the `tokenizers` package: "
                          "pip install tokenizers") from None
    vocab = {char: b for b, char in byte_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(os.path.join(path, TOKENIZER_FILE))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
              "add_bos_token": False, "add_eos_token": False}
    if max_length:
        config["model_max_length"] = int(max_length)
    with open(os.path.join(path, TOKENIZER_CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2)
