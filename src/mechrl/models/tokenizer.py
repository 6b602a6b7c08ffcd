"""Word-level tokenizers built locally (no download) for the built-in tasks.

Each token is a word, a single digit or a symbol, with or without one leading space
(`"RED"`, `" RED"`, `" 3"`, `"7"`, `"\\n"`), so that numbers are split into digits and
`decode(encode(text)) == text` exactly (the `Fuse` decoder concatenates tokens). Special tokens:
`[UNK]` id 0, `[EOS]` id 1 (as in SimpleStories' tokenizer), `[PAD]` id 2. No BOS.

The result is a standard `PreTrainedTokenizerFast`: it saves and reloads with
`AutoTokenizer.from_pretrained(folder)` like any Hugging Face tokenizer.
"""

from __future__ import annotations

import re
import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

UNK, EOS, PAD = "[UNK]", "[EOS]", "[PAD]"
SPECIAL_TOKENS = (UNK, EOS, PAD)

# One piece = optional space + (a word | one digit | one symbol), or a newline.
_PIECE = r" ?[A-Za-z]+| ?[0-9]| ?[^\sA-Za-z0-9]|\n"


def build_word_tokenizer(words: list[str], symbols: tuple[str, ...] | None = None,
                         model_max_length: int = 512) -> PreTrainedTokenizerFast:
    """A tokenizer whose vocabulary is `words` (letters only) + digits + `symbols`, each with and
    without a leading space, + newline. Text outside it maps to `[UNK]`."""
    bad = [w for w in words if not re.fullmatch(r"[A-Za-z]+", w)]
    if bad:
        raise ValueError(f"word-level vocabulary entries must be letters only, got {bad[:5]}")
    symbols = tuple(symbols) if symbols is not None else tuple(string.punctuation)
    bad = [s for s in symbols if len(s) != 1 or s.isalnum() or s.isspace()]
    if bad:
        raise ValueError(f"symbols must be single non-alphanumeric characters, got {bad}")
    base = sorted(set(words)) + [str(d) for d in range(10)] + sorted(set(symbols))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for piece in ["\n"] + [p for b in base for p in (b, " " + b)]:
        vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(_PIECE), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token=UNK, eos_token=EOS, pad_token=PAD,
        model_max_length=model_max_length, clean_up_tokenization_spaces=False, padding_side="left",
    )
    assert fast.unk_token_id == 0 and fast.eos_token_id == 1 and fast.pad_token_id == 2
    return fast
