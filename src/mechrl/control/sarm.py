"""SAEReward: a reward model whose score is a bias-free linear head over sparse-autoencoder latents (SARM).

The form of SARM ("Interpretable Reward Model via Sparse Autoencoder", arXiv 2508.08746):

    h = hidden state of a transformer at the output of block `layer`, at the scored text's last token
    x = (h - mean(h)) / (std(h) + 1e-6)        per-token standardisation (optional; SARM does it)
    z = SAE.encode(x)                          (d_sae,) latents, a TopK SAE
    score = w . z                              no bias, so   score = sum_i w_i z_i   exactly

so each unit of reward is attributable to a latent (`attribution` returns w_i * z_i, summing to the score).
The scored text is tokenized as the reward model was trained (`mechrl.train.reward_model.encode`:
prompt + completion + EOS, or the tokenizer's chat template for chat models) and the end position is
checked (`end_positions`): the last real token must be the end token.

Two sources, one interface:
  - mechrl's own (`fit_sarm` in `sarm_train.py`): the trunk is a trained reward model (any HF model whose
    blocks `mechrl.analysis.hooks` knows), the SAE a SAELens TopK SAE trained by `mechrl.analysis.sae`,
    saved as a folder with `sarm.json`, `trunk/`, `sae/`, `head.safetensors`;
  - the published SARM checkpoint layout (`Schrieffer/Llama-SARM-4B`: a Llama cut after block
    `sae_source_layer`, `sae.{pre_bias,latent_bias,encoder.weight,decoder.weight}`, a bias-free `score`
    head, `sarm_param` in config.json), loaded from a local folder by `load_sarm_checkpoint`.

Interventions are context managers that restore the model on exit, also after an exception:

    with sarm.clamp(set={12: 0.0}, scale={40: 0.5}):   # latents changed before the head
        sarm.score(prompts, completions)
    with sarm.edit_head(zero=[12]):                    # head weights changed (w_12 = 0)
        ...

The model is frozen: nothing here builds a graph through the trunk, the SAE or the head.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import torch
from torch import nn

from mechrl.analysis.cache import run_with_cache
from mechrl.errors import UserError
from mechrl.train.reward_model import encode, end_positions, pad_right

log = logging.getLogger(__name__)

__all__ = ["FeatureIndexError", "SAEReward", "SarmTopK", "load_sarm_checkpoint", "standardize", "hidden_at_end",
           "SARM_FORMAT"]

SARM_FORMAT = "mechrl-sarm/1"
#: Batches of latents an SAEReward keeps (chosen and rejected texts of a probe alternate: 4 covers them).
CACHED_BATCHES = 4
SARM_FILE = "sarm.json"


class FeatureIndexError(UserError, IndexError):
    """A latent index that is not an int in [0, d_sae), or a bad value for one."""


def standardize(h: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """SARM's per-token standardisation of (..., D) hidden states: (h - mean) / (std + eps), std with
    Bessel's correction (torch's default, as SARM's `pre_process`)."""
    return (h - h.mean(-1, keepdim=True)) / (h.std(-1, keepdim=True) + eps)


class SarmTopK(nn.Module):
    """The SAE of the published SARM layout: z = TopK(encoder(x - pre_bias) + latent_bias), the k largest
    pre-activations kept as they are (no ReLU), x_hat = decoder(z) + pre_bias. With `topk=False` the
    latents are the dense pre-activations (SARM's `sarm_use_activation: false`)."""

    def __init__(self, d_in: int, d_sae: int, k: int, topk: bool = True):
        super().__init__()
        if not 1 <= k <= d_sae:
            raise ValueError(f"SarmTopK: k={k} must be in [1, d_sae={d_sae}]")
        self.pre_bias = nn.Parameter(torch.zeros(d_in))
        self.latent_bias = nn.Parameter(torch.zeros(d_sae))
        self.encoder = nn.Linear(d_in, d_sae, bias=False)
        self.decoder = nn.Linear(d_sae, d_in, bias=False)
        self.k, self.topk, self.d_in, self.d_sae = k, topk, d_in, d_sae

    def encode(self, x: torch.Tensor) -> torch.Tensor:  # (..., d_in) -> (..., d_sae)
        pre = self.encoder(x - self.pre_bias) + self.latent_bias
        if not self.topk:
            return pre
        top = torch.topk(pre, self.k, dim=-1)
        return torch.zeros_like(pre).scatter_(-1, top.indices, top.values)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z) + self.pre_bias

    @property
    def W_dec(self) -> torch.Tensor:  # (d_sae, d_in): each latent's decoder direction, as SAELens lays it out
        return self.decoder.weight.T


@torch.no_grad()
def hidden_at_end(trunk: nn.Module, tokenizer, layer: int, token_ids: Sequence[Sequence[int]], end_token_id: int,
                  batch_size: int = 64) -> torch.Tensor:
    """(B, D) float32 output of block `layer` of `trunk` at each sequence's last token, which must be
    `end_token_id` (`end_positions` raises otherwise). Batches are right-padded; the blocks after `layer`
    never run."""
    pad = tokenizer.pad_token_id
    if pad is None:
        raise UserError("the tokenizer has no pad token (batches are padded on the right)")
    site = f"resid_post.{layer}"
    out = []
    for i in range(0, len(token_ids), batch_size):
        ids, mask = pad_right(token_ids[i:i + batch_size], pad)
        pos = end_positions(ids, mask, end_token_id, pad)
        _, cache = run_with_cache(trunk, {"input_ids": ids, "attention_mask": mask}, [site], stop_early=True)
        h = cache[site]  # (b, T, D)
        out.append(h[torch.arange(len(pos)), pos.to(h.device)].float().cpu())  # (b, D)
    if not out:
        raise ValueError("hidden_at_end: no texts")
    return torch.cat(out)


class _Trunk(nn.Module):
    """A Llama cut after its SAE layer, shaped so that `mechrl.analysis.hooks` finds `model.layers.{L}`."""

    def __init__(self, config):
        super().__init__()
        from transformers import LlamaModel

        self.config = config
        self.model = LlamaModel(config)

    def forward(self, **kw):
        return self.model(**kw)


def _d_sae(encoder) -> int:
    d = getattr(encoder, "d_sae", None)
    if d is None:
        d = encoder.cfg.d_sae  # SAELens
    return int(d)


class SAEReward:
    """A SARM-form reward model (see the module docstring). `head` is (d_sae,)."""

    def __init__(self, trunk: nn.Module, tokenizer, encoder, head: torch.Tensor, *, layer: int,
                 standardize_hidden: bool = True, end_token_id: int | None = None, text_format: str = "plain",
                 meta: dict | None = None):
        if text_format not in ("plain", "chat"):
            raise ValueError(f"SAEReward: text_format must be 'plain' or 'chat', got {text_format!r}")
        self.trunk = trunk.eval()
        self.tokenizer = tokenizer
        self.encoder = encoder.eval() if isinstance(encoder, nn.Module) else encoder
        self.d_sae = _d_sae(encoder)
        head = head.detach().reshape(-1).float()
        if head.numel() != self.d_sae:
            raise ValueError(f"SAEReward: head has {head.numel()} weights for {self.d_sae} latents")
        self.head = head.to(self.device)  # (d_sae,)
        self.layer = int(layer)
        self.site = f"resid_post.{self.layer}"
        self.standardize_hidden = standardize_hidden
        self.end_token_id = tokenizer.eos_token_id if end_token_id is None else int(end_token_id)
        self.text_format = text_format
        self.meta = dict(meta or {})
        self._clamps: list[tuple[dict[int, float], dict[int, float]]] = []  # (set, scale) of each open clamp
        self._cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()  # (prompts, completions) -> raw latents
        for p in self.trunk.parameters():
            p.requires_grad_(False)
        if isinstance(self.encoder, nn.Module):
            for p in self.encoder.parameters():
                p.requires_grad_(False)

    # -- tokenization and hidden states ----------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.trunk.parameters()).device

    def token_ids(self, prompts: Sequence[str], completions: Sequence[str]) -> list[list[int]]:
        """The scored token sequences: plain (prompt + completion + EOS) or the chat template's."""
        if len(prompts) != len(completions):
            raise ValueError(f"SAEReward: {len(prompts)} prompts for {len(completions)} completions")
        if self.text_format == "plain":
            return encode(self.tokenizer, prompts, completions)
        out = []
        for p, c in zip(prompts, completions):
            msgs = [{"role": "user", "content": p}, {"role": "assistant", "content": c}]
            ids = self.tokenizer.apply_chat_template(msgs, tokenize=True)
            out.append(list(ids["input_ids"] if isinstance(ids, Mapping) else ids))
        return out

    def hidden(self, prompts: Sequence[str], completions: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """(B, D) float32 hidden states at the end token (standardised when the model standardises)."""
        h = hidden_at_end(self.trunk, self.tokenizer, self.layer, self.token_ids(prompts, completions),
                          self.end_token_id, batch_size=batch_size)
        return standardize(h) if self.standardize_hidden else h

    @property
    def d_in(self) -> int:
        return int(self.W_dec.shape[1])

    @property
    def W_dec(self) -> torch.Tensor:
        """(d_sae, D) decoder directions."""
        return self.encoder.W_dec

    # -- latents, score, attribution ------------------------------------------------------------
    @torch.no_grad()
    def encode_hidden(self, h: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (B, d_sae) raw latents (no clamp)."""
        dev = self.W_dec.device
        return self.encoder.encode(h.to(dev, self.W_dec.dtype)).float().to(self.device)

    @torch.no_grad()
    def raw_latents(self, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
        """(B, d_sae) latents before any clamp (do not modify them in place). The last `CACHED_BATCHES`
        batches are kept, so several reward components scoring one batch run the trunk once."""
        key = (tuple(prompts), tuple(completions))
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        z = self.encode_hidden(self.hidden(prompts, completions))
        if not bool(torch.isfinite(z).all()):
            raise FloatingPointError("SAEReward: non-finite latents")
        self._cache[key] = z
        while len(self._cache) > CACHED_BATCHES:
            self._cache.popitem(last=False)
        return z

    def apply_clamps(self, z: torch.Tensor) -> torch.Tensor:
        """`z` with every open clamp applied (innermost last); a copy when any is open."""
        if not self._clamps:
            return z
        z = z.clone()
        for set_, scale in self._clamps:
            for i, v in set_.items():
                z[..., i] = v
            for i, s in scale.items():
                z[..., i] = z[..., i] * s
        return z

    def latents(self, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
        """(B, d_sae) latents as the head sees them (open clamps applied)."""
        return self.apply_clamps(self.raw_latents(prompts, completions))

    def score_latents(self, z: torch.Tensor) -> torch.Tensor:
        """(B, d_sae) -> (B,) w . z with the current head (no clamp applied here)."""
        if z.shape[-1] != self.d_sae:
            raise ValueError(f"score_latents: latents of width {z.shape[-1]}, the head has {self.d_sae}")
        return z.to(self.head.device, torch.float32) @ self.head

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
        """(B,) scores: w . z with open clamps and head edits applied."""
        return self.score_latents(self.latents(prompts, completions))

    def attribution(self, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
        """(B, d_sae) per-latent contributions w_i * z_i; each row sums to the score."""
        return self.latents(prompts, completions) * self.head

    # -- interventions ---------------------------------------------------------------------------
    def check_index(self, i, what: str = "feature") -> int:
        """`i` as an int in [0, d_sae), else a one-line `FeatureIndexError`."""
        if isinstance(i, torch.Tensor) and i.dim() == 0 and not i.is_floating_point() and i.dtype != torch.bool:
            i = int(i)
        if isinstance(i, bool) or not isinstance(i, numbers.Integral):
            raise FeatureIndexError(f"{what} index must be an integer, got {i!r}")
        j = int(i)
        if not 0 <= j < self.d_sae:
            raise FeatureIndexError(f"{what} index {j} is out of range: the SAE has {self.d_sae} latents "
                                    f"(0..{self.d_sae - 1})")
        return j

    def _values(self, spec: Mapping | None, what: str) -> dict[int, float]:
        out = {}
        for i, v in (spec or {}).items():
            j = self.check_index(i, what)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise FeatureIndexError(f"{what} value for feature {j} must be a finite number, got {v!r}")
            out[j] = float(v)
        return out

    @contextmanager
    def clamp(self, set: Mapping[int, float] | None = None, scale: Mapping[int, float] | None = None) -> Iterator[None]:
        """Within the block, latents in `set` take the given value and those in `scale` are multiplied, before
        the head (scores, latents and attributions all see it). Undone on exit, also after an exception."""
        entry = (self._values(set, "clamp set"), self._values(scale, "clamp scale"))
        self._clamps.append(entry)
        try:
            yield
        finally:
            popped = self._clamps.pop()
            assert popped is entry, "SAEReward.clamp: clamps were closed out of order"

    @contextmanager
    def edit_head(self, zero: Sequence[int] = (), scale: Mapping[int, float] | None = None) -> Iterator[None]:
        """Within the block, head weights of `zero` are 0 and those in `scale` multiplied. The head is restored
        on exit, also after an exception."""
        z = [self.check_index(i, "head edit") for i in zero]
        s = self._values(scale, "head edit scale")
        saved = self.head.clone()
        try:
            for i in z:
                self.head[i] = 0.0
            for i, f in s.items():
                self.head[i] = self.head[i] * f
            yield
        finally:
            self.head.copy_(saved)

    # -- saving ----------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write a self-contained folder (`sarm.json`, `trunk/`, `sae/` or `sae.safetensors`, `head.safetensors`)."""
        from safetensors.torch import save_file

        from mechrl.runs.rundir import atomic_write_json

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if self._clamps:
            raise RuntimeError("SAEReward.save inside a clamp: the saved model would not be the model")
        if not hasattr(self.trunk, "save_pretrained"):
            raise UserError("SAEReward.save: this trunk was loaded from a SARM checkpoint; use that folder itself")
        self.trunk.save_pretrained(path / "trunk")
        self.tokenizer.save_pretrained(path / "trunk")
        if isinstance(self.encoder, SarmTopK):
            save_file({k: v.contiguous() for k, v in self.encoder.state_dict().items()}, str(path / "sae.safetensors"))
            sae_meta = {"kind": "sarm_topk", "d_in": self.encoder.d_in, "d_sae": self.d_sae, "k": self.encoder.k,
                        "topk": self.encoder.topk}
        else:
            self.encoder.save_model(path / "sae")
            sae_meta = {"kind": "saelens"}
        save_file({"head": self.head.cpu().contiguous()}, str(path / "head.safetensors"))
        atomic_write_json(path / SARM_FILE, {"format": SARM_FORMAT, "layer": self.layer,
                                             "standardize": self.standardize_hidden, "end_token_id": self.end_token_id,
                                             "text_format": self.text_format, "sae": sae_meta, "meta": self.meta})
        return path

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", dtype: str = "float32") -> "SAEReward":
        """A folder written by `save`, or a published SARM checkpoint (config.json with `sarm_param`)."""
        path = Path(path)
        if (path / SARM_FILE).is_file():
            return _load_mechrl(path, device)
        cfg = path / "config.json"
        if cfg.is_file() and "sarm_param" in json.loads(cfg.read_text()):
            return load_sarm_checkpoint(path, device=device, dtype=dtype)
        raise UserError(f"{path}: neither a mechrl SAEReward folder ({SARM_FILE}) nor a SARM checkpoint "
                        "(config.json with sarm_param)")


def _load_mechrl(path: Path, device: str) -> SAEReward:
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    rec = json.loads((path / SARM_FILE).read_text())
    if rec.get("format") != SARM_FORMAT:
        raise UserError(f"{path / SARM_FILE}: format {rec.get('format')!r}, expected {SARM_FORMAT!r}")
    tok = AutoTokenizer.from_pretrained(str(path / "trunk"))
    arch = (AutoConfig.from_pretrained(str(path / "trunk")).architectures or [""])[0]
    auto = AutoModelForSequenceClassification if arch.endswith("ForSequenceClassification") else AutoModelForCausalLM
    trunk = auto.from_pretrained(str(path / "trunk")).to(device)
    sae_meta = rec["sae"]
    if sae_meta["kind"] == "sarm_topk":
        enc = SarmTopK(sae_meta["d_in"], sae_meta["d_sae"], sae_meta["k"], sae_meta["topk"])
        enc.load_state_dict(load_file(str(path / "sae.safetensors")))
    elif sae_meta["kind"] == "saelens":
        from sae_lens import SAE

        enc = SAE.load_from_disk(path / "sae", device=device)
    else:
        raise UserError(f"{path / SARM_FILE}: unknown SAE kind {sae_meta['kind']!r}")
    head = load_file(str(path / "head.safetensors"))["head"]
    return SAEReward(trunk, tok, enc.to(device), head, layer=rec["layer"], standardize_hidden=rec["standardize"],
                     end_token_id=rec["end_token_id"], text_format=rec["text_format"], meta=rec.get("meta"))


def load_sarm_checkpoint(path: str | Path, *, device: str = "cpu", dtype: str = "float32",
                         end_token: str | None = None) -> SAEReward:
    """A published SARM checkpoint (the layout of `schrieffer-z/sarm`'s `LlamaSARM`, e.g. Llama-SARM-4B)
    from a local folder: config.json (a LlamaConfig with `sarm_param` {sae_source_layer, sae_latent_size,
    sae_k, sarm_use_activation}), safetensors weights `model.*` (the blocks up to the SAE layer), `sae.*`
    and `score.weight` (1, d_sae), and the tokenizer. The end token is `<|eot_id|>` when the vocabulary has
    it (Llama 3 chat), else `end_token`, else EOS; texts use the chat template when the tokenizer has one."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, LlamaConfig

    from mechrl.models.loading import DTYPES

    path = Path(path)
    raw = json.loads((path / "config.json").read_text())
    sp = raw.get("sarm_param")
    if not isinstance(sp, dict):
        raise UserError(f"{path}/config.json: no `sarm_param` object (not a SARM checkpoint)")
    missing = [k for k in ("sae_latent_size", "sae_k") if k not in sp]
    if missing:
        raise UserError(f"{path}/config.json: sarm_param lacks {missing}")
    config = LlamaConfig.from_pretrained(str(path))
    layer_count = int(sp.get("sae_source_layer", config.num_hidden_layers // 2))
    if not 1 <= layer_count <= config.num_hidden_layers:
        raise UserError(f"{path}: sae_source_layer={layer_count} outside 1..{config.num_hidden_layers}")
    config.num_hidden_layers = layer_count  # the checkpoint holds the blocks up to the SAE layer only
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise UserError(f"{path}: no *.safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    trunk_state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    sae_state = {k[len("sae."):]: v for k, v in state.items() if k.startswith("sae.")}
    if "score.weight" not in state:
        raise UserError(f"{path}: no score.weight in the weights (keys: {sorted(state)[:6]}...)")
    unknown = sorted(k for k in state if not k.startswith(("model.", "sae.")) and k != "score.weight")
    if unknown:
        raise UserError(f"{path}: unexpected weights {unknown[:6]} in a SARM checkpoint")
    d_sae, k = int(sp["sae_latent_size"]), int(sp["sae_k"])
    trunk = _Trunk(config)
    trunk.model.load_state_dict(trunk_state, strict=True)
    enc = SarmTopK(config.hidden_size, d_sae, k, topk=bool(sp.get("sarm_use_activation", True)))
    enc.load_state_dict(sae_state, strict=True)
    head = state["score.weight"]
    if head.shape != (1, d_sae):
        raise UserError(f"{path}: score.weight has shape {tuple(head.shape)}, expected (1, {d_sae})")
    tok = AutoTokenizer.from_pretrained(str(path))
    vocab = tok.get_vocab()
    if "<|eot_id|>" in vocab:
        end_id = vocab["<|eot_id|>"]
    elif end_token is not None:
        if end_token not in vocab:
            raise UserError(f"{path}: end_token {end_token!r} is not in the vocabulary")
        end_id = vocab[end_token]
    else:
        end_id = tok.eos_token_id
    if tok.pad_token_id is None:
        raise UserError(f"{path}: the tokenizer has no pad token; set one in tokenizer_config.json")
    fmt = "chat" if getattr(tok, "chat_template", None) else "plain"
    dt = DTYPES[dtype]
    trunk = trunk.to(device, dt)
    enc = enc.to(device, dt)
    return SAEReward(trunk, tok, enc, head[0].float(), layer=layer_count - 1, standardize_hidden=True,
                     end_token_id=end_id, text_format=fmt,
                     meta={"source": str(path), "layout": "sarm", "sarm_param": sp})
