"""The story tokenizer: one token per word or punctuation mark, 4096 ids like SimpleStories-1.25M's.

Special tokens as in SimpleStories' tokenizer: `[UNK]` id 0, `[EOS]` id 1, no BOS, plus a `[PAD]`
(id 2) for batched generation. As in `mechrl.models.tokenizer`, each word or symbol exists with and
without one leading space (`"fox"`, `" fox"`), and the decoder concatenates tokens, so
`decode(encode(t)) == t` exactly and a completion decodes with its leading space (prompt +
completion text is the story). Prompts are tokenised with `add_special_tokens=False`; with
`add_special_tokens=True` the template appends `[EOS]`, as the SimpleStories tokenizer does.

The grammar has a few hundred words (about 650 tokens with both spellings); the rest of the 4096
ids are filler tokens `[unused<i>]` that no text can produce (the pre-tokenizer splits brackets
off), so the pretrained model learns never to emit them. They exist only so that the embedding
shape matches SimpleStories-1.25M.
"""

from __future__ import annotations

import re

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from mechrl.models.tokenizer import _PIECE

UNK, EOS, PAD = "[UNK]", "[EOS]", "[PAD]"
SPECIAL_TOKENS = (UNK, EOS, PAD)
VOCAB_SIZE = 4096


def build_story_tokenizer(words: list[str], vocab_size: int = VOCAB_SIZE,
                          model_max_length: int = 512) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over `words` (each a run of letters or one symbol), each with and
    without a leading space, padded to `vocab_size` ids with `[unused<i>]` fillers."""
    words = list(dict.fromkeys(words))  # unique, order kept
    bad = [w for w in words if not (re.fullmatch(r"[A-Za-z]+", w) or (len(w) == 1 and not w.isalnum()
                                                                        and not w.isspace()))]
    if bad:
        raise ValueError(f"story vocabulary entries must be letters only or one symbol, got {bad[:5]}")
    pieces = [p for w in words for p in (w, " " + w)]
    n_real = len(SPECIAL_TOKENS) + len(pieces)
    if n_real > vocab_size:
        raise ValueError(f"{len(pieces)} tokens + {len(SPECIAL_TOKENS)} special tokens exceed vocab_size={vocab_size}")
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + tuple(pieces))}
    for i in range(vocab_size - n_real):
        vocab[f"[unused{i}]"] = n_real + i
    assert len(vocab) == vocab_size, (len(vocab), vocab_size)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(_PIECE), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single=f"$A {EOS}", special_tokens=[(EOS, 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token=UNK, eos_token=EOS, pad_token=PAD,
        model_max_length=model_max_length, clean_up_tokenization_spaces=False, padding_side="left",
    )
    assert fast.unk_token_id == 0 and fast.eos_token_id == 1 and fast.pad_token_id == 2 and fast.bos_token is None
    assert len(fast) == vocab_size, (len(fast), vocab_size)
    return fast
