"""Loading Hugging Face causal LMs and tokenizers, and building tiny ones locally.

`load_model(cfg, task)`:
  - `cfg.path` set: a local folder, or a hub name with `cfg.allow_hub` on (the only case in which
    anything downloads). `trust_remote_code` stays off unless the config turns it on.
  - `cfg.path` unset: a tiny GPT-2 or Llama built from `cfg.tiny` around the task's tokenizer.

Tokenizers are prepared the same way everywhere: a pad token (distinct from EOS when the vocabulary
has one, else EOS), left padding for generation, and the model's generation config told the
pad and EOS ids. A loaded tokenizer must encode text as the checkpoint's own tokenizer.json does
(`tokenizer_as_saved`): where the class AutoTokenizer picks disagrees, the saved one is used.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM, AutoTokenizer, GPT2Config, LlamaConfig, PreTrainedModel, PreTrainedTokenizerBase,
)

from mechrl.config import ModelConfig, TinyModelConfig
from mechrl.errors import UserError
from mechrl.models.builtin import builtin_model_folder

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CheckpointError(UserError, FileNotFoundError):
    """A model path that is neither a loadable folder nor a hub name the user asked for."""


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("model.device=cuda but no CUDA device is available")
    return torch.device(device)


def prepare_tokenizer(tok: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Pad token set (EOS when the tokenizer has none), left padding for batched generation."""
    if tok.eos_token is None:
        raise ValueError(f"tokenizer {tok.name_or_path!r} has no EOS token; mechrl needs one to end completions")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def build_tiny_model(cfg: TinyModelConfig, tokenizer: PreTrainedTokenizerBase, seed: int = 0) -> PreTrainedModel:
    """A randomly initialised GPT-2 or Llama sized by `cfg`, vocabulary from `tokenizer`."""
    vocab = len(tokenizer)
    common = dict(vocab_size=vocab, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                  bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id,
                  tie_word_embeddings=cfg.tie_embeddings)
    d_mlp = cfg.d_mlp or 4 * cfg.d_model
    if cfg.arch == "gpt2":
        config = GPT2Config(n_layer=cfg.n_layer, n_embd=cfg.d_model, n_head=cfg.n_head, n_inner=d_mlp,
                            n_positions=cfg.n_positions, activation_function="gelu", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common)
    elif cfg.arch == "llama":
        config = LlamaConfig(num_hidden_layers=cfg.n_layer, hidden_size=cfg.d_model, num_attention_heads=cfg.n_head,
                             num_key_value_heads=cfg.n_head, intermediate_size=d_mlp,
                             max_position_embeddings=cfg.n_positions, **common)
    else:
        raise ValueError(f"unknown tiny arch {cfg.arch!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def load_tokenizer(path: str | Path, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The checkpoint's tokenizer, encoding text exactly as its saved `tokenizer.json` does
    (`tokenizer_as_saved`), prepared for mechrl (`prepare_tokenizer`)."""
    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    return prepare_tokenizer(tokenizer_as_saved(tok, path))


class TokenizerMismatchError(UserError, ValueError):
    """A checkpoint's tokenizer cannot be loaded so that it encodes text as its tokenizer.json does."""


#: Fixed part of the probe: words, case, digits, punctuation, runs of spaces, tabs, newlines, non-ASCII.
TOKENIZER_PROBE = ("Cards : RED 3 BLUE 5 the story. Hello, World! It's 2024: 3.14 + 42 = 45.14\n"
                   "\tThe  QUICK brown fox; (naive cafe) -- done.\nna\u00efve caf\u00e9 \u65e5\u672c \u00ab\u00bb")


def _saved_tokenizer_file(path: str | Path) -> str | None:
    """The checkpoint's tokenizer.json: in the folder, or in the hub cache for a hub name (None if absent)."""
    local = Path(path)
    if local.is_dir():
        f = local / "tokenizer.json"
        return str(f) if f.is_file() else None
    from transformers.utils import cached_file

    return cached_file(str(path), "tokenizer.json", _raise_exceptions_for_missing_entries=False,
                       _raise_exceptions_for_connection_errors=False)


def tokenizer_probes(saved) -> list[str]:
    """Texts on which a tokenizer must agree with the saved one (a `tokenizers.Tokenizer`): the fixed
    probe, and two texts made of up to 64 vocabulary entries spread over the saved vocabulary
    (specials left out), so that a word-level or otherwise unusual vocabulary is exercised by its own
    pieces: the entries decoded together, and each decoded alone, stripped and joined by spaces."""
    special = {t.content for t in saved.get_added_tokens_decoder().values() if t.special}
    ids = [i for i in range(saved.get_vocab_size()) if saved.id_to_token(i) not in special]
    ids = ids[::max(1, len(ids) // 64)][:64]
    pieces = [saved.decode([i], skip_special_tokens=True).strip() for i in ids]
    return [TOKENIZER_PROBE, saved.decode(ids, skip_special_tokens=True), " ".join(p for p in pieces if p)]


def _disagreement(tok: PreTrainedTokenizerBase, saved) -> str | None:
    """None when `tok` encodes every probe as `saved` does; else a description of the first difference."""
    for text in tokenizer_probes(saved):
        mine = list(tok(text, add_special_tokens=False)["input_ids"])
        ref = saved.encode(text, add_special_tokens=False).ids
        if mine != ref:
            return f"{len(mine)} ids vs {len(ref)} on {text[:40]!r} (first ids {mine[:6]} vs {ref[:6]})"
    return None


def tokenizer_as_saved(tok: PreTrainedTokenizerBase, path: str | Path) -> PreTrainedTokenizerBase:
    """`tok` if it encodes the probes (`tokenizer_probes`, without special tokens, as mechrl encodes
    prompts) exactly as the checkpoint's own tokenizer.json does; otherwise the saved fast tokenizer
    (`PreTrainedTokenizerFast` over tokenizer.json, special tokens from tokenizer_config.json), with a
    warning. Why: `AutoTokenizer` picks a class by model type (transformers 5 forces `Qwen2Tokenizer`
    for qwen2), and such a class can rebuild a different tokenizer around the saved vocabulary (a
    word-level tokenizer became byte-level BPE). Raises `TokenizerMismatchError` when the saved fast
    tokenizer does not agree either. Without a tokenizer.json (e.g. a sentencepiece-only checkpoint)
    there is nothing to compare against and `tok` is returned as it is."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    file = _saved_tokenizer_file(path)
    if file is None:
        log.debug("%s has no tokenizer.json; keeping %s as loaded", path, type(tok).__name__)
        return tok
    saved = Tokenizer.from_file(file)
    why = _disagreement(tok, saved)
    if why is None:
        return tok
    fast = PreTrainedTokenizerFast.from_pretrained(str(path))
    still = _disagreement(fast, saved)
    if still is not None:
        raise TokenizerMismatchError(f"{path}: neither {type(tok).__name__} (AutoTokenizer's pick) nor the saved fast "
                                     f"tokenizer encodes text as its tokenizer.json does ({still})")
    log.warning("%s: AutoTokenizer's %s encodes text differently from the saved tokenizer.json (%s); using the "
                "saved fast tokenizer instead", path, type(tok).__name__, why)
    return fast


#: Files of which a model folder's tokenizer needs at least one.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "spiece.model")


def check_model_folder(path: Path) -> None:
    """Raise `CheckpointError` naming the file unless `path` holds a loadable causal LM: a readable
    config.json, safetensors weights whose header reads, and tokenizer files. Checked before
    transformers sees the folder, whose own errors do not always say which file is at fault."""
    import json

    from safetensors import SafetensorError, safe_open

    config = path / "config.json"
    if not config.is_file():
        raise CheckpointError(f"{path}: not a model folder (no config.json)")
    try:
        data = json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{config}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or "model_type" not in data:
        raise CheckpointError(f"{config}: not a transformers model config (no model_type)")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
        weights = [path / f for f in shards]
    else:
        weights = [path / "model.safetensors"]
    for w in weights:
        if not w.is_file():
            pickled = [f.name for f in path.glob("*.bin")]
            hint = f" (it has {pickled}: mechrl loads safetensors only)" if pickled else ""
            raise CheckpointError(f"{path}: no weights file {w.name}{hint}")
        try:
            with safe_open(str(w), framework="pt") as f:
                if not list(f.keys()):
                    raise CheckpointError(f"{w}: a safetensors file with no tensors")
        except SafetensorError as e:
            raise CheckpointError(f"{w}: not a readable safetensors file ({e})") from None
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise CheckpointError(f"{path}: no tokenizer files (one of {', '.join(TOKENIZER_FILES)}); save the "
                              "tokenizer with the model (tokenizer.save_pretrained(folder))")


def resolve_model_path(path: str | Path, *, allow_hub: bool = False) -> str:
    """`path` as a checked local model folder (`check_model_folder`), or as a hub name when `allow_hub`;
    anything else raises `CheckpointError` at once (a name is never tried on the network unasked)."""
    path = str(path)
    local = Path(path).expanduser()
    if local.exists():
        if not local.is_dir():
            raise CheckpointError(f"{path}: a file, not a model folder")
        check_model_folder(local)
        return str(local)
    if path.startswith((".", "/", "~")) or path.count("/") > 1:
        raise CheckpointError(f"checkpoint not found: {path}")
    if not allow_hub:
        raise CheckpointError(f"{path} is not a local folder; to download it from the Hugging Face hub, set "
                              "model.allow_hub=true")
    return path


def load_pretrained(path: str | Path, *, dtype: str = "float32", device: str = "auto",
                    trust_remote_code: bool = False, allow_hub: bool = False
                    ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A causal LM and its tokenizer from a local folder, or from the hub when `allow_hub` (only
    then can anything download). A folder is checked first (`check_model_folder`); weights load from
    safetensors only."""
    path = resolve_model_path(path, allow_hub=allow_hub)
    if not Path(path).is_dir():
        log.info("loading %s from the Hugging Face hub (model.allow_hub is on)", path)
    tok = load_tokenizer(path, trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code,
                                                     use_safetensors=True)
    except (OSError, ValueError) as e:  # transformers' own "cannot load" errors; a bug elsewhere still raises
        raise CheckpointError(f"{path}: transformers cannot load this model: {str(e).splitlines()[0]}") from e
    model.to(resolve_device(device))
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model, tok


def load_model(cfg: ModelConfig, task=None, seed: int = 0) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model a config describes: pretrained from `cfg.path`, a built-in model (`cfg.builtin`),
    else tiny built for `task`; with `cfg.site_map`, that map checked and stored in the model's config."""
    model, tok = _load_model(cfg, task, seed)
    if cfg.site_map is not None:
        from mechrl.analysis.arch import set_site_map  # local: analysis sits above models

        set_site_map(model, cfg.site_map)
    return model, tok


def _load_model(cfg: ModelConfig, task, seed: int) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if cfg.builtin is not None:
        return load_pretrained(builtin_model_folder(cfg.builtin), dtype=cfg.dtype, device=cfg.device)
    if cfg.path is not None:
        return load_pretrained(cfg.path, dtype=cfg.dtype, device=cfg.device, trust_remote_code=cfg.trust_remote_code,
                               allow_hub=cfg.allow_hub)
    if task is None:
        raise ValueError("model.path is unset and no task was given to build a tiny model's tokenizer for")
    tok = prepare_tokenizer(task.build_tokenizer())
    model = build_tiny_model(cfg.tiny, tok, seed=seed).to(DTYPES[cfg.dtype]).to(resolve_device(cfg.device))
    return model, tok
