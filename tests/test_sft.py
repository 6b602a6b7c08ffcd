"""SFT through TRL's SFTTrainer: the loss mask, a short run that learns, checkpoints, resume."""

from __future__ import annotations

import json

import pytest

from mechrl.config import load_config
from mechrl.runs.rundir import RunDir
from mechrl.train.sft import run_sft, trl_args


def test_loss_mask_covers_exactly_the_answer_tokens(cards_task, cards_tok, tmp_path):
    import torch
    from trl import SFTTrainer

    from mechrl.config import SFTRunConfig, TinyModelConfig
    from mechrl.models.loading import build_tiny_model

    cfg = SFTRunConfig(name="t")
    model = build_tiny_model(TinyModelConfig(), cards_tok)
    ds = cards_task.datasets["train"].select(range(8))
    trainer = SFTTrainer(model=model, args=trl_args(cfg, tmp_path, torch.device("cpu")),
                         train_dataset=ds.select_columns(["prompt", "completion"]), processing_class=cards_tok)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(8)])
    for i, ex in enumerate(ds):
        ids, labels, att = batch["input_ids"][i], batch["labels"][i], batch["attention_mask"][i]
        prompt_ids = cards_tok(ex["prompt"], add_special_tokens=False)["input_ids"]
        completion_ids = cards_tok(ex["completion"], add_special_tokens=False)["input_ids"] + [cards_tok.eos_token_id]
        real = ids[att.bool()].tolist()
        assert real == prompt_ids + completion_ids  # the sequence is prompt + answer + EOS
        trained = labels[labels != -100].tolist()
        assert trained == completion_ids  # and the loss sees exactly the answer and its EOS
        # labelled positions are exactly the completion's positions
        pos = (labels != -100).nonzero().squeeze(-1)
        assert pos.tolist() == list(range(len(prompt_ids), len(prompt_ids) + len(completion_ids)))


def _short_cfg(tmp_path, *extra):
    # One easy family, direct answers: learnable in ~150 steps on CPU.
    return load_config("cards-sft", [
        f"out_dir={tmp_path}", "task.id_families=[count_above]", "task.train_family_weights=null", "task.composition_families=[sum_above]",
        "task.answer_format=direct", "task.n_train=3000", "task.n_test=100", "task.n_ood=50", "task.n_val=50",
        "model.tiny.n_layer=2", "model.tiny.d_model=64", "train.max_steps=150", "train.warmup_steps=10", "train.lr=3e-3",
        "train.eval_every=75", "train.log_every=10", "eval.n_per_split=100", "eval.n_final=100", *extra])


def test_short_sft_lowers_loss_and_raises_accuracy(tmp_path):
    cfg, name = _short_cfg(tmp_path)
    run = RunDir.start(cfg, name)
    final = run_sft(cfg, run)
    assert final == run.checkpoint_path(150)
    assert (final / "model.safetensors").exists() and (final / "tokenizer.json").exists()
    metrics = run.metrics()
    losses = [m["train/loss"] for m in metrics if "train/loss" in m]
    assert losses[-1] < 0.5 * losses[0]
    acc = [m["eval/test/accuracy"] for m in metrics if "eval/test/accuracy" in m]
    assert len(acc) == 2  # evaluated at both checkpoints
    # untrained: the answer is a number 0..6, so chance is far below this
    assert acc[-1] >= 0.5, acc
    ev = json.loads((run.eval_dir / "step-150.json").read_text())
    assert set(ev["splits"]) == {"test", "ood_colors", "ood_composition", "ood_paraphrase", "ood_length",
                                 "ood_bigsmall"}
    assert ev["splits"]["test"]["groups"]["count_above"]["n"] == 100
    samples = [json.loads(line) for line in run.samples_path.read_text().splitlines()]
    assert {"step", "split", "prompt", "completion", "answer", "correct"} <= set(samples[0])
    assert run.finished
    assert "<img src=\"data:image/png;base64," in (run.path / "report.html").read_text()  # written at the end


def test_sft_resumes_from_last_checkpoint(tmp_path):
    cfg, name = _short_cfg(tmp_path, "train.max_steps=20", "train.eval_every=10", "train.log_every=5",
                           "eval.n_per_split=8", "eval.n_final=8")
    run = RunDir.start(cfg, name)
    run_sft(cfg, run)
    full = run.metrics()
    # Simulate a kill after the step-10 checkpoint: drop the later checkpoint and records.
    import shutil

    shutil.rmtree(run.checkpoint_path(20))
    run.set_status("running")
    with open(run.metrics_path, "a") as f:
        f.write('{"step": 15, "train/lo')  # a partial line from the killed process
    run2 = RunDir.start(cfg, name)
    run_sft(cfg, run2)
    resumed = run2.metrics()
    steps = [m["step"] for m in resumed if "train/loss" in m]
    assert steps == sorted(set(steps)) == [5, 10, 15, 20]  # no duplicates, no gap
    a = [m["train/loss"] for m in full if "train/loss" in m]
    b = [m["train/loss"] for m in resumed if "train/loss" in m]
    assert b == pytest.approx(a, rel=1e-4)  # the resumed run continues the same trajectory
