"""Models: tiny GPT-2 / Llama built locally, save -> reload, tokenizer handling, loading errors."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mechrl.models.loading import CheckpointError, load_pretrained, prepare_tokenizer


def test_save_reload_gives_identical_logits(tiny_model, cards_tok, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    cards_tok.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    model2, tok2 = load_pretrained(tmp_path, device="cpu")
    assert type(model2) is type(tiny_model)
    text = ["Rule: the score is the number of odd cards .\nCards: RED 3 , BLUE 4 .\nAnswer:", "Cards: RED 1"]
    a = cards_tok(text, add_special_tokens=False, padding=True, return_tensors="pt")
    b = tok2(text, add_special_tokens=False, padding=True, return_tensors="pt")
    assert torch.equal(a["input_ids"], b["input_ids"])
    tiny_model.eval()
    with torch.no_grad():
        assert torch.equal(tiny_model(**a).logits, model2(**b).logits)
    assert (tok2.pad_token_id, tok2.eos_token_id, tok2.padding_side) == (2, 1, "left")


def test_prepare_tokenizer_sets_pad_from_eos(cards_tok, tmp_path):
    cards_tok.save_pretrained(tmp_path)
    raw = AutoTokenizer.from_pretrained(tmp_path)
    raw.pad_token = None
    raw.padding_side = "right"
    tok = prepare_tokenizer(raw)
    assert tok.pad_token == tok.eos_token == "[EOS]" and tok.padding_side == "left"


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_pretrained(tmp_path / "empty")


def test_remote_code_is_off_by_default(tiny_model, cards_tok, tmp_path, monkeypatch):
    seen = {}
    real = AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen["trust_remote_code"] = kwargs.get("trust_remote_code")
        return real(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    tiny_model.save_pretrained(tmp_path)
    cards_tok.save_pretrained(tmp_path)
    load_pretrained(tmp_path, device="cpu")
    assert seen["trust_remote_code"] is False
