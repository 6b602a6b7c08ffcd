"""The command line: user errors are one clear line and a non-zero exit, never a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mechrl.cli import main


def _run(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "error" in ln]
    return code, err, lines


def test_malformed_yaml(capsys, tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("kind: sft\nname: x\ntrain: {lr: 1\n")
    code, err, lines = _run(capsys, "sft", str(p))
    assert code == 2
    assert len(lines) == 1 and "malformed YAML at line" in lines[0]
    assert "Traceback" not in err


def test_unknown_rule_family(capsys, tmp_path):
    code, err, lines = _run(capsys, "sft", "cards-sft", f"out_dir={tmp_path}", "task.id_families=[red_minus_blue]")
    assert code == 2
    assert len(lines) == 1 and "unknown rule family 'red_minus_blue'" in lines[0]
    assert "Traceback" not in err
    assert not any(tmp_path.iterdir())  # nothing was created for a refused config


def test_misspelled_key(capsys, tmp_path):
    code, err, lines = _run(capsys, "sft", "cards-sft", "train.lrr=1e-3")
    assert code == 2 and "did you mean 'train.lr'" in lines[0]


def test_missing_checkpoint(capsys, tmp_path):
    code, err, lines = _run(capsys, "eval", str(tmp_path / "runs" / "x" / "checkpoints" / "step-5"), "--task", "cards")
    assert code == 2
    assert len(lines) == 1 and "checkpoint not found" in lines[0]
    assert "Traceback" not in err


def test_eval_unknown_split(capsys, tiny_model, cards_tok, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    cards_tok.save_pretrained(tmp_path)
    code, err, lines = _run(capsys, "eval", str(tmp_path), "--task", "cards", "--split", "ood_colour",
                            "task.n_train=10", "task.n_ood=10", "task.n_test=10", "task.n_val=10")
    assert code == 2 and "unknown split" in lines[0]


def test_eval_checkpoint_prints_table(capsys, tiny_model, cards_tok, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    cards_tok.save_pretrained(tmp_path)
    out = tmp_path / "eval.json"
    code = main(["eval", str(tmp_path), "--task", "cards", "--n", "8", "--out", str(out), "task.n_train=10",
                 "task.n_ood=10", "task.n_test=10", "task.n_val=10"])
    assert code == 0
    text = capsys.readouterr().out
    for split in ("test", "ood_colors", "ood_composition", "ood_paraphrase", "ood_length", "ood_bigsmall"):
        assert split in text
    assert out.exists()


def test_console_script_installed():
    """The `mechrl` entry point exists and exits non-zero with one line on a user error."""
    exe = __import__("shutil").which("mechrl") or str(__import__("pathlib").Path(sys.executable).parent / "mechrl")
    r = subprocess.run([exe, "sft", "no-such-recipe"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("mechrl sft: error: recipe not found")
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("argv", [["--help"], ["sft", "--help"], ["demo", "--help"], ["grpo", "--help"],
                                  ["ppo", "--help"]])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0


def test_grpo_cli_refuses_a_missing_sft_checkpoint(capsys, tmp_path):
    code, err, lines = _run(capsys, "grpo", "cards-grpo", f"out_dir={tmp_path}",
                            f"model.path={tmp_path / 'runs' / 'sft' / 'checkpoints' / 'step-9'}")
    assert code == 2 and "checkpoint not found" in lines[0]
    assert "Traceback" not in err
