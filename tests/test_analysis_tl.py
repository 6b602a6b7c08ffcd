"""TransformerLens interop: the bridge's logits and hook values equal mechrl's on tiny GPT-2 and Llama."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, BioGptConfig

from mechrl.analysis.cache import run_with_cache
from mechrl.analysis.tl import TransformerLensError, check_batch, max_logit_diff, to_transformer_lens
from mechrl.config import LoraConfig
from mechrl.errors import UserError
from mechrl.models.adapters import add_lora


def test_bridge_from_checkpoint_folder_matches_hf(tiny_model, cards_tok, tmp_path):
    model = tiny_model.eval()
    model.save_pretrained(tmp_path / "ckpt")
    cards_tok.save_pretrained(tmp_path / "ckpt")
    bridge = to_transformer_lens(tmp_path / "ckpt")
    tokens = cards_tok(["RED 3 BLUE 4 GREEN 5 YELLOW 6"], return_tensors="pt")["input_ids"]
    assert max_logit_diff(bridge, model, tokens) <= 1e-5
    # TransformerLens's hook values equal mechrl's sites
    _, tl_cache = bridge.run_with_cache(tokens)
    _, cache = run_with_cache(model, {"input_ids": tokens}, ["resid_post.0", "resid_post.1", "mlp_out.1", "heads.1"])
    for L in (0, 1):
        torch.testing.assert_close(tl_cache[f"blocks.{L}.hook_resid_post"], cache[f"resid_post.{L}"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(tl_cache["blocks.1.hook_mlp_out"], cache["mlp_out.1"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(tl_cache["blocks.1.attn.hook_z"], cache["heads.1"], atol=1e-5, rtol=1e-4)


def test_bridge_from_model_object_leaves_model_and_tokenizer_alone(tiny_model, cards_tok):
    model = tiny_model.eval()
    tokens = check_batch(model.config.vocab_size)
    before = model(tokens).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [type(m) for m in model.modules()]
    side = cards_tok.padding_side
    model.train()
    bridge = to_transformer_lens(model, cards_tok)
    assert model.training, "the check batch runs in eval mode; the caller's mode comes back"
    model.eval()
    assert max_logit_diff(bridge, model, tokens) <= 1e-5
    assert cards_tok.padding_side == side
    with pytest.raises(ValueError, match="move the model first"):
        to_transformer_lens(model, cards_tok, device="meta")
    # the caller's model is untouched: same modules, same state dict, bit-identical logits
    assert [type(m) for m in model.modules()] == modules
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())
    assert torch.equal(model(tokens).logits, before)
    # mechrl hooks still work on the model, module-path sites included
    _, cache = run_with_cache(model, {"input_ids": tokens}, ["resid_post.1", "mlp_out.1", "heads.1", "attn_out.0"])
    assert cache["resid_post.1"].shape[:2] == tokens.shape


def test_peft_model_is_merged(tiny_model, cards_tok):
    peft = add_lora(tiny_model, LoraConfig(rank=4)).eval()
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    bridge = to_transformer_lens(peft, cards_tok)
    tokens = check_batch(tiny_model.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(bridge(tokens), peft(tokens).logits, atol=1e-5, rtol=1e-4)


def test_logit_mismatch_raises(tiny_model, cards_tok):
    # a negative tolerance no difference can meet: the comparison, not the build, must raise
    with pytest.raises(TransformerLensError, match="logits differ"):
        to_transformer_lens(tiny_model, cards_tok, atol=-1.0)


def test_unsupported_architecture_raises_clearly(cards_tok, tmp_path):
    cfg = BioGptConfig(vocab_size=len(cards_tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64, max_position_embeddings=64, pad_token_id=cards_tok.pad_token_id)
    model = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(TransformerLensError, match="cannot represent BioGptForCausalLM"):
        to_transformer_lens(model, cards_tok)


def test_missing_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        to_transformer_lens(tmp_path / "nothing")
