"""Architecture matrix: the analysis sites, patching, ablation, LoRA, dual LoRA and TransformerLens interop
on a tiny random model of every family mechrl's site maps cover (tests/arch_zoo.py), plus the
user-supplied site map and the one-line error for an architecture mechrl does not know.

References: HF's own `output_hidden_states` (the block inputs), the model's own modules applied by
hand (output projections, post-norms), TransformerLens's bridge hooks, and identities that hold for
any correct site map (the residual sum; patching the last block's output restores the clean run).
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, BioGptConfig
from transformers.pytorch_utils import Conv1D

import arch_zoo as zoo
from dual_lora_helpers import randomise_b
from mechrl.analysis import arch
from mechrl.analysis.ablation import ablation_importance
from mechrl.analysis.cache import run_with_cache
from mechrl.analysis.hooks import hooks, resolve_site
from mechrl.analysis.patching import PairBatch, answer_metric, patch_site
from mechrl.config import LoraConfig, ModelConfig
from mechrl.errors import UserError
from mechrl.models.adapters import add_lora, default_targets, matches
from mechrl.models.dual_lora import add_dual_lora, dual_lora_modules
from mechrl.models.loading import load_model

FAMILIES = list(zoo.FAMILIES)
TEXTS = ["Rule : the score is RED . Cards : RED 3 , BLUE 4 , GREEN 5 . Answer :", "Cards : BLUE 9 . Answer :"]
ATOL = 1e-5  # activations are of order 1-10 (arch_zoo perturbs the weights): float32 sums agree to ~1e-6


@pytest.fixture(scope="module")
def tok():
    return zoo.tokenizer()


@pytest.fixture(scope="module")
def batch(tok):
    b = tok(TEXTS, return_tensors="pt", padding=True, add_special_tokens=False)
    assert (b["attention_mask"][:, 0] == 0).any(), "the batch should be left-padded"
    return b


def all_sites(model) -> list[str]:
    return [f"{a}.{i}" for a in arch.ALIASES for i in range(arch.n_layers(model))]


@pytest.mark.parametrize("family", FAMILIES)
def test_sites_resolve_and_add_up(family, tok, batch):
    """Every alias resolves to a module of the model; the residual stream is the sum of what each block
    writes; heads through the output projection (and post-norm) give attn_out; neurons through the MLP's
    output projection give mlp_out; resid_pre is what HF reports as the block's input."""
    model = zoo.build(family, tok)
    L, H = arch.n_layers(model), arch.n_heads(model)
    assert L == model.config.num_hidden_layers == 2
    modules = dict(model.named_modules())
    for name in all_sites(model):
        assert resolve_site(model, name).module_path in modules
    table = arch.site_table(model, layer=1)
    sm = arch.site_map_of(model)
    assert table["attn_out"] == f"{sm.blocks}.1.{sm.attn_out} (output)" and table["heads"].endswith(" (input)")
    out, c = run_with_cache(model, batch, all_sites(model))
    with torch.no_grad():
        hf = model(**{k: v for k, v in batch.items()}, output_hidden_states=True,
                   position_ids=(batch["attention_mask"].cumsum(-1) - 1).clamp(min=0))
    B, T = batch["input_ids"].shape
    D = model.config.hidden_size
    torch.testing.assert_close(out.logits, hf.logits)
    with torch.no_grad():
        for i in range(L):
            torch.testing.assert_close(c[f"resid_pre.{i}"], hf.hidden_states[i])  # HF's own account of block inputs
            assert c[f"heads.{i}"].shape == (B, T, H, c[f"heads.{i}"].shape[-1])
            assert c[f"mlp_post.{i}"].shape == (B, T, arch.mlp_width(model))
            assert c[f"attn_out.{i}"].shape == c[f"mlp_out.{i}"].shape == (B, T, D)
            torch.testing.assert_close(c[f"resid_pre.{i}"] + c[f"attn_out.{i}"] + c[f"mlp_out.{i}"],
                                       c[f"resid_post.{i}"], atol=ATOL, rtol=0)
            torch.testing.assert_close(arch.heads_to_attn_out(model, i, c[f"heads.{i}"]), c[f"attn_out.{i}"],
                                       atol=ATOL, rtol=0)
            torch.testing.assert_close(arch.neurons_to_mlp_out(model, i, c[f"mlp_post.{i}"]), c[f"mlp_out.{i}"],
                                       atol=ATOL, rtol=0)
        torch.testing.assert_close(c["resid_post.0"], c["resid_pre.1"])
    assert c["attn_out.1"].abs().max() > 0.1 and c["mlp_out.1"].abs().max() > 0.1  # not vacuous


@pytest.mark.parametrize("family", FAMILIES)
def test_parallel_blocks_mlp_does_not_read_attn_out(family, tok, batch):
    """In parallel blocks the MLP reads the block input, so replacing attn_out leaves mlp_out alone; in
    sequential blocks it does not."""
    model = zoo.build(family, tok)
    assert arch.is_parallel(model) == (family in zoo.PARALLEL)
    _, clean = run_with_cache(model, batch, ["mlp_out.0"])
    with hooks(model, {"attn_out.0": torch.zeros_like}):
        _, zeroed = run_with_cache(model, batch, ["mlp_out.0"])
    same = torch.allclose(clean["mlp_out.0"], zeroed["mlp_out.0"], atol=1e-6, rtol=0)
    assert same == (family in zoo.PARALLEL)


@pytest.mark.parametrize("family", FAMILIES)
def test_patching_and_ablation_run(family, tok):
    """Patching the last block's output at the last position with the clean run's restores the clean
    metric; per-head, per-MLP and per-neuron zero ablation runs and changes the score."""
    model = zoo.build(family, tok)
    L = arch.n_layers(model)
    enc = tok(["Cards : RED 3 , BLUE 4 . Answer :", "Cards : BLUE 9 , RED 1 . Answer :"], return_tensors="pt",
              add_special_tokens=False)
    assert enc["input_ids"].shape[1] == tok(["Cards : RED 3 , BLUE 4 . Answer :"], return_tensors="pt",
                                            add_special_tokens=False)["input_ids"].shape[1]
    ids, mask = enc["input_ids"], enc["attention_mask"]
    pb = PairBatch({"input_ids": ids[:1], "attention_mask": mask[:1]}, {"input_ids": ids[1:], "attention_mask": mask[1:]},
                   clean_token=torch.tensor([tok.convert_tokens_to_ids(" 3")]),
                   corrupt_token=torch.tensor([tok.convert_tokens_to_ids(" 9")]), meta=[{}])
    with torch.no_grad():
        clean = answer_metric(model(**pb.clean).logits, pb.clean_token, pb.corrupt_token, "logit_diff")
        corrupt = answer_metric(model(**pb.corrupt).logits, pb.clean_token, pb.corrupt_token, "logit_diff")
    assert abs(float(clean - corrupt)) > 1e-3
    patched = patch_site(model, pb, f"resid_post.{L - 1}", "position")  # (1, T)
    torch.testing.assert_close(patched[0, -1], clean[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(patched[0, 0], corrupt[0], atol=ATOL, rtol=0)  # an unchanged token carries nothing
    examples = [{"prompt": "Cards : RED 3 . Answer :", "completion": " 3"},
                {"prompt": "Cards : BLUE 9 , RED 1 . Answer :", "completion": " BLUE"}]
    res = ablation_importance(model, tok, examples, names=["L0H1", "L1MLP", "L1N5"], metric="logprob")
    assert set(res["importance"]) == {"L0H1", "L1MLP", "L1N5"}
    assert all(abs(v) > 0 for v in res["importance"].values())


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_and_dual_lora_wrap(family, tok, batch):
    """PEFT LoRA and dual LoRA with the default targets wrap the model: exactly the modules the defaults
    name are adapted, the wrapped model starts equal to the base, sites resolve through PEFT."""
    base = zoo.build(family, tok)
    with torch.no_grad():
        ref = base(**batch).logits
    targets = default_targets(base.config.model_type)
    want = {n for n, m in base.named_modules() if n and matches(n, targets) and isinstance(m, (torch.nn.Linear, Conv1D))}
    assert want, f"{family}: default targets {targets} match nothing"

    peft = add_lora(copy.deepcopy(base), LoraConfig(rank=2))
    adapted = {n.removeprefix("base_model.model.") for n, m in peft.named_modules() if hasattr(m, "lora_A")}
    assert adapted == want
    with torch.no_grad():
        torch.testing.assert_close(peft(**batch).logits, ref)  # B = 0 at init
    _, c = run_with_cache(peft, batch, ["resid_post.1", "heads.0"])
    assert c["resid_post.1"].shape[:2] == batch["input_ids"].shape

    dual = add_dual_lora(copy.deepcopy(base), None, 2, 4.0, 1, 2.0)
    assert set(dual_lora_modules(dual)) == want
    with torch.no_grad():
        torch.testing.assert_close(dual(**batch).logits, ref)
        randomise_b(dual, 0.5)
        assert not torch.allclose(dual(**batch).logits, ref)


@pytest.mark.parametrize("family", FAMILIES)
def test_transformer_lens_agrees(family, tok):
    """TransformerLens's bridge hooks read the same tensors as mechrl's sites (its hook_attn_out and
    hook_mlp_out are what is added to the residual stream, post-norms included)."""
    from mechrl.analysis.tl import TransformerLensError, to_transformer_lens

    model = zoo.build(family, tok)
    try:
        bridge = to_transformer_lens(model, tok)
    except TransformerLensError as e:  # pragma: no cover - every family builds with TransformerLens 3.9
        pytest.skip(f"TransformerLens cannot represent {family}: {e}")
    ids = tok(TEXTS[:1], return_tensors="pt", add_special_tokens=False)["input_ids"]
    _, tl = bridge.run_with_cache(ids)
    _, c = run_with_cache(model, {"input_ids": ids}, all_sites(model))
    tl_name = {"resid_pre": "blocks.{i}.hook_resid_pre", "resid_post": "blocks.{i}.hook_resid_post",
               "attn_out": "blocks.{i}.hook_attn_out", "mlp_out": "blocks.{i}.hook_mlp_out",
               "heads": "blocks.{i}.attn.hook_z", "mlp_post": "blocks.{i}.mlp.hook_post"}
    for alias, template in tl_name.items():
        for i in range(arch.n_layers(model)):
            torch.testing.assert_close(tl[template.format(i=i)].reshape(c[f"{alias}.{i}"].shape), c[f"{alias}.{i}"],
                                       atol=1e-4, rtol=1e-4, msg=f"{family}: {alias}.{i} vs {template.format(i=i)}")


# ----------------------------------------------------------------------------------------------
# Unknown architectures and user-supplied site maps
# ----------------------------------------------------------------------------------------------

BIOGPT_MAP = {"blocks": "biogpt.layers", "attn_out": "self_attn", "mlp_out": "fc2",
              "attn_proj": "self_attn.out_proj", "mlp_proj": "fc2"}


def biogpt(tok):
    cfg = BioGptConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=64, max_position_embeddings=64, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


def test_unknown_architecture_is_a_one_line_error(tok, batch):
    model = biogpt(tok)
    with pytest.raises(arch.UnknownArchitectureError) as err:
        resolve_site(model, "resid_pre.0")
    msg = str(err.value)
    assert isinstance(err.value, UserError) and "\n" not in msg
    assert "BioGptForCausalLM" in msg and "biogpt" in msg and "model.site_map" in msg and "set_site_map" in msg
    with pytest.raises(arch.UnknownArchitectureError):
        run_with_cache(model, batch, ["mlp_out.1"])
    with pytest.raises(arch.UnknownArchitectureError):
        ablation_importance(model, tok, [{"prompt": "Cards :", "completion": " RED"}])
    _, c = run_with_cache(model, batch, ["biogpt.layers.0.fc2"])  # module paths need no map
    assert c["biogpt.layers.0.fc2"].shape[-1] == 32


def test_user_site_map_gives_every_site(tok, batch, tmp_path):
    model = biogpt(tok)
    arch.set_site_map(model, BIOGPT_MAP)
    _, c = run_with_cache(model, batch, all_sites(model))
    with torch.no_grad():
        for i in range(2):
            torch.testing.assert_close(c[f"resid_pre.{i}"] + c[f"attn_out.{i}"] + c[f"mlp_out.{i}"], c[f"resid_post.{i}"],
                                       atol=ATOL, rtol=0)
            torch.testing.assert_close(arch.heads_to_attn_out(model, i, c[f"heads.{i}"]), c[f"attn_out.{i}"])
            torch.testing.assert_close(arch.neurons_to_mlp_out(model, i, c[f"mlp_post.{i}"]), c[f"mlp_out.{i}"])
    # the map travels with the checkpoint: saved in config.json, read back by a fresh load
    model.save_pretrained(tmp_path / "ckpt")
    tok.save_pretrained(tmp_path / "ckpt")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    assert arch.site_map_of(again).model_dump() == arch.site_map_of(model).model_dump()
    _, c2 = run_with_cache(again, batch, ["attn_out.1"])
    torch.testing.assert_close(c2["attn_out.1"], c["attn_out.1"])
    # and through the config: model.site_map on load
    loaded, _ = load_model(ModelConfig(path=str(tmp_path / "ckpt"), device="cpu", site_map=BIOGPT_MAP))
    assert arch.site_map_of(loaded).blocks == "biogpt.layers"


def test_bad_site_maps_are_one_line_errors(tok):
    model = biogpt(tok)
    with pytest.raises(arch.SiteMapError, match=r"mlp_proj='mlp.down_proj' is not a module of block 0 .*fc2"):
        arch.set_site_map(model, dict(BIOGPT_MAP, mlp_proj="mlp.down_proj"))
    with pytest.raises(arch.SiteMapError, match=r"blocks='model.layers' is not a module of BioGptForCausalLM"):
        arch.set_site_map(model, dict(BIOGPT_MAP, blocks="model.layers"))
    with pytest.raises(arch.SiteMapError, match="is not a linear layer"):
        arch.set_site_map(model, dict(BIOGPT_MAP, attn_proj="self_attn_layer_norm"))
    with pytest.raises(arch.SiteMapError, match="names no boolean attribute"):
        arch.set_site_map(model, dict(BIOGPT_MAP, parallel="use_parallel_residual"))
    with pytest.raises(arch.SiteMapError, match="mlp_out: Field required"):
        arch.set_site_map(model, {k: v for k, v in BIOGPT_MAP.items() if k != "mlp_out"})
    with pytest.raises(ValueError, match="blocks"):
        ModelConfig(site_map=dict(BIOGPT_MAP, blocks="biogpt.layers.{L}"))
    assert getattr(model.config, arch.CONFIG_KEY, None) is None  # nothing stored by failed attempts


def test_user_map_overrides_and_the_matrix_catches_a_wrong_one(tok, batch):
    """Gemma2 read with the Llama layout (what mechrl did before: attention and MLP outputs before the
    post-sublayer norms) breaks the residual identity by far more than the tolerance: the identity
    is a real check of a site map."""
    model = zoo.build("gemma2", tok)
    arch.set_site_map(model, arch.FAMILIES["llama"])
    _, c = run_with_cache(model, batch, ["resid_pre.1", "attn_out.1", "mlp_out.1", "resid_post.1"])
    gap = (c["resid_pre.1"] + c["attn_out.1"] + c["mlp_out.1"] - c["resid_post.1"]).abs().max()
    assert gap > 0.1, gap
