"""Positions with left-padded prompts: mechrl numbers them from the attention mask (the first real token
is position 0) in its training pass, as sampling (`model.generate`) does; TRL 1.16's GRPO training pass
(`_get_per_token_logps_and_entropies`) passes no position_ids, so on a model with absolute position
embeddings (GPT-2) a left-padded row is shifted by its padding and its log-probs differ from the ones
it was sampled with. This file pins that difference (and that it vanishes without padding, and on a
rotary-position model, where only relative positions matter)."""

from __future__ import annotations

import pytest
import torch

from mechrl.models.loading import prepare_tokenizer
from mechrl.models.tokenizer import build_word_tokenizer
from mechrl.train.rollout import completion_logprobs

PROMPTS = ["a b c a b c", "b", "c a"]  # 6, 1 and 2 tokens: rows 1 and 2 are left-padded
T = 4  # completion tokens


def _trainer(tmp_path, arch: str):
    transformers = pytest.importorskip("transformers")
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    tok = prepare_tokenizer(build_word_tokenizer(["a", "b", "c"], (".",)))
    common = dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                  bos_token_id=tok.eos_token_id)
    if arch == "gpt2":
        config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=32, **common)
    else:
        config = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                                          num_key_value_heads=2, intermediate_size=64, **common)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # position embeddings of order 1, so that a shift is visible
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "init")
    args = trl.GRPOConfig(output_dir=str(tmp_path / "out"), use_cpu=True, bf16=False, report_to="none",
                          activation_checkpointing=False,
                          per_device_train_batch_size=3, num_generations=3, max_completion_length=T)
    trainer = trl.GRPOTrainer(model=str(tmp_path / "init"), reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                              args=args, train_dataset=Dataset.from_dict({"prompt": PROMPTS}), processing_class=tok)
    return trainer, tok


def _batch(tok):
    enc = tok(PROMPTS, add_special_tokens=False, padding=True, return_tensors="pt")
    assert tok.padding_side == "left" and (enc["attention_mask"][1:, 0] == 0).all()
    g = torch.Generator().manual_seed(3)
    completion = torch.randint(3, len(tok), (len(PROMPTS), T), generator=g)
    return enc["input_ids"], enc["attention_mask"], completion


@torch.no_grad()
def _logps(trainer, tok):
    """(mechrl padded, TRL padded, unpadded reference) per-token log-probs, (B, T) each."""
    model = trainer.model.eval()
    ids, mask, comp = _batch(tok)
    ones = torch.ones_like(comp)
    ours = completion_logprobs(model, ids, mask, comp, ones)
    trl_lp = trainer._get_per_token_logps_and_entropies(model, torch.cat([ids, comp], 1), torch.cat([mask, ones], 1),
                                                         logits_to_keep=T)[0]
    alone = []
    for i in range(len(PROMPTS)):
        real = mask[i].bool()
        row = torch.cat([ids[i][real], comp[i]])[None]  # no padding: every convention gives positions 0..n-1
        lp = trainer._get_per_token_logps_and_entropies(model, row, torch.ones_like(row), logits_to_keep=T)[0]
        torch.testing.assert_close(lp, completion_logprobs(model, ids[i][real][None], torch.ones_like(row[:, :-T]),
                                                           comp[i:i + 1], ones[:1]), atol=1e-5, rtol=0)
        alone.append(lp[0])
    return ours, trl_lp, torch.stack(alone)


def test_gpt2_left_padding_mechrl_counts_real_tokens_trl_counts_pads(tmp_path):
    trainer, tok = _trainer(tmp_path, "gpt2")
    ours, trl_lp, alone = _logps(trainer, tok)
    torch.testing.assert_close(ours, alone, atol=1e-5, rtol=0)  # padding changes nothing for mechrl
    torch.testing.assert_close(trl_lp[0], alone[0], atol=1e-5, rtol=0)  # the unpadded row: TRL agrees
    for i in (1, 2):  # left-padded rows: TRL's positions start at the padding, shifted by the pad count
        assert (trl_lp[i] - alone[i]).abs().max() > 1e-2, (i, trl_lp[i], alone[i])


def test_gpt2_mechrl_scores_what_generate_sampled(tmp_path):
    """Greedy `generate` on the left-padded batch (positions from the mask, as HF's generation does):
    the log-probs of its tokens under generate's own logits equal mechrl's training-pass log-probs."""
    trainer, tok = _trainer(tmp_path, "gpt2")
    model = trainer.model.eval()
    ids, mask, _ = _batch(tok)
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=T, min_new_tokens=T,
                         pad_token_id=tok.pad_token_id, output_logits=True, return_dict_in_generate=True)
    comp = out.sequences[:, ids.shape[1]:]  # (B, T)
    gen_lp = torch.stack(out.logits, 1).float().log_softmax(-1).gather(-1, comp[..., None])[..., 0]
    with torch.no_grad():
        ours = completion_logprobs(model, ids, mask, comp, torch.ones_like(comp))
    torch.testing.assert_close(ours, gen_lp, atol=1e-5, rtol=0)


def test_rotary_positions_make_the_conventions_agree(tmp_path):
    """On Llama (rotary positions: attention sees only position differences) shifting a row's positions
    by its padding changes nothing, so TRL's and mechrl's log-probs agree there."""
    trainer, tok = _trainer(tmp_path, "llama")
    ours, trl_lp, alone = _logps(trainer, tok)
    torch.testing.assert_close(ours, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(trl_lp, alone, atol=1e-4, rtol=0)
