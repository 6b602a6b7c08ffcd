"""TransformerLens interop: a mechrl / Hugging Face model as a TransformerLens `TransformerBridge`.

The bridge wraps the HF modules themselves (no weight processing: no LayerNorm folding, no
centring), so its logits equal HF's and TransformerLens's hook names (`blocks.0.hook_resid_post`,
`blocks.0.attn.hook_z`, ...) and tools (`run_with_cache`, `run_with_hooks`) work on the model mechrl
trained. The conversion checks that: it runs a check batch through both and raises when the
logits differ by more than `atol`. The classic weight-processed `HookedTransformer` is never used
as a fallback (it shifts logits; see TransformerLens's `fold_ln` / `center_unembed`).

    bridge = to_transformer_lens("runs/sft/checkpoints/step-100")      # a checkpoint folder
    bridge = to_transformer_lens(model, tokenizer)                      # or a model in memory
    logits, cache = bridge.run_with_cache(tokens)
"""

from __future__ import annotations

import copy

import logging
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from mechrl.analysis.hooks import unwrap
from mechrl.errors import UserError

log = logging.getLogger(__name__)

#: Largest |logit_TL - logit_HF| accepted on the check batch (float32 on CPU: measured 7e-7 for GPT-2, 0 for Llama).
DEFAULT_ATOL = 1e-4


class TransformerLensError(RuntimeError):
    """TransformerLens could not represent the model faithfully."""


def check_batch(vocab_size: int, batch: int = 2, seq: int = 12, seed: int = 0) -> torch.Tensor:
    """(batch, seq) token ids drawn with a fixed seed, unpadded (the check compares raw forwards)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, seq), generator=g)


def to_transformer_lens(model: PreTrainedModel | str | Path, tokenizer=None, *, atol: float = DEFAULT_ATOL,
                        tokens: torch.Tensor | None = None, device: str | None = None):
    """A `TransformerBridge` over `model` (a model object or a checkpoint folder), checked against HF.

    A model object is copied and the copy wrapped, on the model's own device (`device`, if given,
    must be that one): building a bridge replaces the modules of the model it wraps (its state
    dict gains keys, mechrl's module-path sites stop resolving), so the caller's model must never be
    the one wrapped. A PEFT model is merged into the copy (the bridge needs plain modules; the copy
    computes what the adapted model computes). A folder is loaded in float32 onto `device`
    (default cpu). Raises
    `TransformerLensError` when the bridge cannot be built for the architecture or its logits differ
    from HF's by more than `atol` on `tokens` (default: a seeded random batch).
    """
    from transformer_lens.model_bridge import TransformerBridge

    from mechrl.models.adapters import merged_model

    if isinstance(model, (str, Path)):
        folder = Path(model)
        if not (folder / "config.json").is_file():
            raise UserError(f"{folder}: not a model folder (no config.json)")
        device = device or "cpu"
        hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).to(device)
        tmp = None
    else:
        if tokenizer is None:
            raise ValueError("to_transformer_lens(model, tokenizer): a model object needs its tokenizer")
        hf = merged_model(model) if unwrap(model) is not model else copy.deepcopy(model)
        own = next(hf.parameters()).device
        want = torch.device(device) if device is not None else own
        if want.type != own.type or (want.index is not None and want.index != own.index):
            raise ValueError(f"to_transformer_lens: the model is on {own}, device={device!r} was asked for; "
                             "move the model first")
        device = str(own)
        # TransformerLens reads config and tokenizer from a folder: save them next to the weights
        tmp = tempfile.TemporaryDirectory(prefix="mechrl-tl-")
        folder = Path(tmp.name)
        hf.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    try:
        # loaded fresh from the folder: TransformerLens adjusts the tokenizer it is given, and the
        # caller's stays untouched
        tl_tok = AutoTokenizer.from_pretrained(str(folder))
        try:
            bridge = TransformerBridge.boot_transformers(str(folder), hf_model=hf, tokenizer=tl_tok, device=device)
        except Exception as e:
            raise TransformerLensError(f"TransformerLens's TransformerBridge cannot represent "
                                       f"{type(hf).__name__} (model_type {hf.config.model_type!r}): {e}") from e
    finally:
        if tmp is not None:
            tmp.cleanup()
    tokens = check_batch(hf.config.vocab_size) if tokens is None else tokens
    was_training = hf.training
    hf.eval()  # the check compares deterministic forwards (no dropout)
    try:
        diff = max_logit_diff(bridge, hf, tokens.to(device))
    finally:
        hf.train(was_training)
    if not diff <= atol:  # also catches NaN
        raise TransformerLensError(f"TransformerBridge logits differ from HF logits by {diff:.3g} "
                                   f"(tolerance {atol:g}) for {type(hf).__name__}; refusing to use it")
    log.info("TransformerBridge for %s: max |logit diff| vs HF %.2g (tolerance %g)", type(hf).__name__, diff, atol)
    return bridge


@torch.no_grad()
def max_logit_diff(bridge, hf: PreTrainedModel, tokens: torch.Tensor) -> float:
    """max |logits_TL - logits_HF| over a (B, T) batch of token ids."""
    tl_logits = bridge(tokens)
    hf_logits = hf(tokens).logits
    assert tl_logits.shape == hf_logits.shape, f"TL logits {tuple(tl_logits.shape)} vs HF {tuple(hf_logits.shape)}"
    return float((tl_logits.float() - hf_logits.float()).abs().max())
