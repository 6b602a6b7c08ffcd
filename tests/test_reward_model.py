"""Reward models: one tokenization for training and scoring, the pooling check, and TRL RewardTrainer training
on a tiny Llama that learns a planted preference."""

from __future__ import annotations

import pytest
import torch

from fc_helpers import COMPLETIONS, PROMPTS, story_tokenizer, tiny_story_lm
from mechrl.errors import UserError
from mechrl.train.reward_model import (
    PoolingError, RewardModel, RewardModelConfig, encode, end_positions, pad_right, train_reward_model, train_record,
)


def test_encode_appends_eos_and_nothing_else():
    tok = story_tokenizer()
    ids = encode(tok, PROMPTS, COMPLETIONS)
    for p, c, x in zip(PROMPTS, COMPLETIONS, ids):
        assert x == tok(p + c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert x.count(tok.eos_token_id) == 1
    with pytest.raises(ValueError, match="3 prompts for 2 completions"):
        encode(tok, PROMPTS, COMPLETIONS[:2])


def test_end_positions_are_the_last_real_tokens():
    ids, mask = pad_right([[5, 6, 1], [7, 1], [1]], pad_id=2)
    assert ids.tolist() == [[5, 6, 1], [7, 1, 2], [1, 2, 2]]
    assert end_positions(ids, mask, end_id=1, pad_id=2).tolist() == [2, 1, 0]


def test_pooling_check_catches_a_wrong_position():
    # the last real token is not the end token (EOS not appended)
    ids, mask = pad_right([[5, 6, 1], [7, 8]], pad_id=2)
    with pytest.raises(PoolingError, match="row 1: the last real token is id 8, not the end token id 1") as e:
        end_positions(ids, mask, end_id=1, pad_id=2)
    assert "\n" not in str(e.value) and isinstance(e.value, UserError)
    # pad == EOS: the classifier's rule (last non-pad token) reads the token before the EOS
    ids, mask = pad_right([[5, 6, 1], [7, 1]], pad_id=1)
    with pytest.raises(PoolingError, match="classifier would pool position 1 but the last real token is at 2"):
        end_positions(ids, mask, end_id=1, pad_id=1)
    # left padding: the last real token is not where a right-padded batch has it
    ids = torch.tensor([[2, 7, 1], [5, 6, 1]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    with pytest.raises(PoolingError, match="not right-padded"):
        end_positions(ids, mask, end_id=1, pad_id=2)


def test_training_refuses_a_tokenizer_whose_pad_is_eos(tmp_path):
    folder = tiny_story_lm(tmp_path / "lm")
    tok = story_tokenizer()
    tok.pad_token = tok.eos_token
    tok.save_pretrained(folder)
    with pytest.raises(PoolingError, match="must exist and differ from its EOS"):
        train_reward_model(folder, [{"prompt": "a", "chosen": " b", "rejected": " c"}], tmp_path / "rm",
                           RewardModelConfig())


def _planted_pairs(n: int) -> list[dict]:
    """Chosen says "glad", rejected says "sad": a preference a tiny model learns in one epoch."""
    import random

    rng = random.Random(0)
    places = ["park", "forest", "lake", "cave", "river", "garden"]
    out = []
    for _ in range(n):
        p = f"once upon a time , a little fox lived in the {rng.choice(places)} ."
        tail = f" it went to the {rng.choice(places)} ."
        out.append({"prompt": p, "chosen": " it felt glad ." + tail, "rejected": " it felt sad ." + tail})
    return out


def test_reward_trainer_learns_a_planted_preference_and_scores_as_trained(tmp_path):
    torch.set_num_threads(1)
    base = tiny_story_lm(tmp_path / "lm", n_layer=1, d_model=32)
    pairs = _planted_pairs(128)
    path = train_reward_model(base, pairs, tmp_path / "rm", RewardModelConfig(lr=3e-3, epochs=2, batch_size=16, log_every=2))
    rec = train_record(path)
    assert rec["n_pairs"] == 128 and rec["log"] and rec["log"][-1]["loss"] < rec["log"][0]["loss"]
    rm = RewardModel.load(path)
    held = _planted_pairs(300)[200:]
    P = [p["prompt"] for p in held]
    sc, sr = rm.score(P, [p["chosen"] for p in held]), rm.score(P, [p["rejected"] for p in held])
    assert (sc > sr).float().mean() == 1.0
    # the score is the classifier's logit at the appended EOS, computed one text at a time without padding
    tok = rm.tokenizer
    for p, c, s in zip(P[:3], [h["chosen"] for h in held[:3]], sc[:3]):
        ids = torch.tensor([tok(p + c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]])
        with torch.no_grad():
            want = rm.model(input_ids=ids).logits[0, 0]
        torch.testing.assert_close(s, want, atol=1e-5, rtol=0)
    with pytest.raises(UserError, match="more than max_length=8"):
        train_reward_model(base, pairs[:4], tmp_path / "rm2", RewardModelConfig(max_length=8))
