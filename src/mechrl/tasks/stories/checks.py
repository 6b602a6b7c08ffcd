"""Checks that a story model and its tokenizer follow the conventions the story task relies on.

The generated story model and SimpleStories-1.25M share them: no BOS, an EOS token that ends
every story (SimpleStories: `[EOS]`, id 1), prompts tokenised with `add_special_tokens=False`,
and a pad token for batched generation. SimpleStories ships no pad token: `load_pretrained`
then pads with EOS, which is correct for generation (pad positions are masked) but must not be
used to mask labels. Every violation raises a `UserError` that says what to change.

    model, tok = load_story_model("/data/SimpleStories-1.25M")
"""

from __future__ import annotations

from pathlib import Path

from mechrl.errors import UserError
from mechrl.models.loading import load_pretrained


class StoryModelError(UserError, ValueError):
    """A story model or tokenizer that breaks the story task's conventions."""


def check_story_tokenizer(tok, model=None, *, source: str = "tokenizer") -> None:
    """Raise `StoryModelError` unless `tok` (and `model`) follow the story conventions."""
    if tok.eos_token_id is None:
        raise StoryModelError(f"{source}: no EOS token; stories end at EOS (SimpleStories: '[EOS]', id 1). "
                              "Set tokenizer.eos_token to the token that ends a story")
    if tok.pad_token_id is None:
        raise StoryModelError(f"{source}: no pad token; batched generation needs one. SimpleStories ships none: "
                              "load it with mechrl.models.loading.load_pretrained (pads with EOS) or add one "
                              "with tokenizer.add_special_tokens({'pad_token': '[PAD]'}) and resize the embeddings")
    probe = "once upon a time"
    ids = tok(probe, add_special_tokens=False)["input_ids"]
    if not ids:
        raise StoryModelError(f"{source}: {probe!r} encodes to no tokens")
    for name, tid in (("BOS", tok.bos_token_id), ("EOS", tok.eos_token_id)):
        if tid is not None and tid in (ids[0], ids[-1]):
            raise StoryModelError(f"{source}: encoding {probe!r} with add_special_tokens=False still adds {name} "
                                  f"(id {tid}); story prompts must be plain text")
    if tok.padding_side != "left":
        raise StoryModelError(f"{source}: padding_side is {tok.padding_side!r}; generation needs left padding")
    if model is not None:
        vocab = model.get_input_embeddings().weight.shape[0]
        if len(tok) > vocab:
            raise StoryModelError(f"{source}: {len(tok)} tokens but the model embeds only {vocab}")
        gen_eos = model.generation_config.eos_token_id
        gen_eos = gen_eos if isinstance(gen_eos, list) else [gen_eos]
        if tok.eos_token_id not in gen_eos:
            raise StoryModelError(f"{source}: the model's generation_config.eos_token_id {gen_eos} does not contain "
                                  f"the tokenizer's EOS id {tok.eos_token_id}; generation would not stop at EOS")


def load_story_model(path: str | Path, *, dtype: str = "float32", device: str = "auto"):
    """`load_pretrained` + `check_story_tokenizer`: the generated story model or a local SimpleStories copy."""
    model, tok = load_pretrained(path, dtype=dtype, device=device)
    check_story_tokenizer(tok, model, source=str(path))
    return model, tok
