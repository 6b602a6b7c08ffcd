"""Tokenizers load as saved: whatever class AutoTokenizer picks, the loaded tokenizer encodes text as the
checkpoint's own tokenizer.json does (reference: `tokenizers.Tokenizer.from_file`)."""

from __future__ import annotations

import logging

import pytest
import transformers
from tokenizers import Tokenizer
from transformers import AutoTokenizer, LlamaConfig, Qwen2Config

from mechrl.errors import UserError
from mechrl.models.loading import TokenizerMismatchError, load_pretrained, load_tokenizer, tokenizer_probes
from mechrl.models.tokenizer import build_word_tokenizer

TEXT = "Cards : RED 3 BLUE 5 the story"


@pytest.fixture
def word_tok():
    return build_word_tokenizer(["Cards", "RED", "BLUE", "the", "story"], (":",))


def save(folder, tok, config):
    tok.save_pretrained(folder)
    config.save_pretrained(folder)
    return folder


def qwen2_config(tok):
    return Qwen2Config(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=1, intermediate_size=32, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id)


def test_custom_word_level_tokenizer_with_qwen2_model_type_keeps_its_tokenization(word_tok, tmp_path, caplog):
    folder = save(tmp_path, word_tok, qwen2_config(word_tok))
    want = word_tok(TEXT, add_special_tokens=False)["input_ids"]
    assert want == Tokenizer.from_file(str(folder / "tokenizer.json")).encode(TEXT, add_special_tokens=False).ids
    assert len(want) == 8
    # the failure this guards against: AutoTokenizer rebuilds a byte-level tokenizer for qwen2
    raw = AutoTokenizer.from_pretrained(folder)
    assert type(raw).__name__ == "Qwen2Tokenizer" and raw(TEXT, add_special_tokens=False)["input_ids"] != want
    with caplog.at_level(logging.WARNING, logger="mechrl.models.loading"):
        tok = load_tokenizer(folder)
    assert tok(TEXT, add_special_tokens=False)["input_ids"] == want
    assert tok.decode(want) == TEXT
    assert (tok.eos_token, tok.pad_token, tok.unk_token) == ("[EOS]", "[PAD]", "[UNK]")  # the saved specials
    assert (tok.eos_token_id, tok.pad_token_id, tok.padding_side) == (1, 2, "left")
    assert any("Qwen2Tokenizer encodes text differently" in r.getMessage() for r in caplog.records)
    # load_pretrained goes through the same path
    model = transformers.AutoModelForCausalLM.from_config(qwen2_config(word_tok))
    model.save_pretrained(folder)
    _, tok2 = load_pretrained(folder, device="cpu")
    assert tok2(TEXT, add_special_tokens=False)["input_ids"] == want
    for probe in tokenizer_probes(tok2.backend_tokenizer):
        assert tok2(probe, add_special_tokens=False)["input_ids"] == word_tok(probe, add_special_tokens=False)["input_ids"]


def test_agreeing_class_is_kept_without_a_warning(word_tok, tmp_path, caplog):
    folder = save(tmp_path, word_tok, LlamaConfig(vocab_size=len(word_tok)))
    picked = type(AutoTokenizer.from_pretrained(folder))
    with caplog.at_level(logging.WARNING, logger="mechrl.models.loading"):
        tok = load_tokenizer(folder)
    assert type(tok) is picked and not caplog.records
    assert tok(TEXT, add_special_tokens=False)["input_ids"] == word_tok(TEXT, add_special_tokens=False)["input_ids"]


def test_probes_exercise_the_vocabulary(word_tok):
    """The vocabulary-derived probe is made of the vocabulary's own pieces (a word-level tokenizer maps
    most of the fixed probe to [UNK], where a wrong tokenizer could still agree)."""
    fixed, joined, spaced = tokenizer_probes(word_tok.backend_tokenizer)
    ids = word_tok(spaced, add_special_tokens=False)["input_ids"]
    assert word_tok.unk_token_id not in ids
    words = {t.strip() for t in word_tok.get_vocab() if t.strip() and t not in word_tok.all_special_tokens}
    assert {t.strip() for t in word_tok.convert_ids_to_tokens(ids)} == words  # every piece of this small vocabulary


def test_unfixable_tokenizer_is_a_one_line_error(word_tok, tmp_path, monkeypatch):
    folder = save(tmp_path, word_tok, qwen2_config(word_tok))
    mangled = AutoTokenizer.from_pretrained(folder)  # the byte-level rebuild
    monkeypatch.setattr(transformers.PreTrainedTokenizerFast, "from_pretrained", classmethod(lambda cls, *a, **k: mangled))
    with pytest.raises(TokenizerMismatchError, match="encodes text as its tokenizer.json does") as err:
        load_tokenizer(folder)
    assert isinstance(err.value, UserError) and "\n" not in str(err.value)
