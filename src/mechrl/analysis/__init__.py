"""Looking inside models: hooks, activation caches, TransformerLens interop, probes.

    arch.py         where each architecture family keeps blocks, attention, MLP, heads and neurons, and
                    what each sublayer adds to the residual stream; user-supplied site maps
    hooks.py        hook sites by module path or alias (resid_post.{L}, attn_out.{L}, mlp_out.{L},
                    heads.{L}, head_out.{L}.{H}) on plain and PEFT-wrapped HF models; `hooks(...)`
    cache.py        `run_with_cache` (one batch), `extract_activations` (a dataset, padding-safe,
                    positions relative to the last prompt token, in memory or on disk)
    store.py        activations on disk: safetensors shards + index.json, written and read in chunks
    tl.py           `to_transformer_lens`: a TransformerLens TransformerBridge checked against HF logits
    probes.py       ridge (closed form, batched over layers) and logistic probes per layer x position,
                    trained on ID, scored on held-out ID and every OOD set
    patching.py     activation patching (resid layer x position, heads, MLPs) and attribution patching
                    on clean/corrupted prompt pairs, normalised so 1 = clean and 0 = corrupted
    ablation.py     zero / mean ablation of heads and MLPs, importance per component, top-k Jaccard
    plots.py        patching and ablation heatmaps, Jaccard bars (matplotlib Agg)
    sae.py          SAEs (standard L1, TopK) trained by SAELens's SAETrainer on mechrl activations; FVU,
                    L0, dead latents, LM loss with the SAE spliced in; saved in SAELens's format
    sae_features.py SAE feature statistics per task label; ID-specific vs OOD-stable features; table + plot
    divergence.py   per-layer divergence of two checkpoints: weights (block / attn / MLP), CKA, activation
                    difference, logit-lens KL; top divergent layers; figure
    diffing.py      paired SAEs (one per model, same site and texts): MMCS both ways, unmatched features
    crosscoder.py   BatchTopK crosscoders over two models' activations: relative decoder norms, exclusive
                    latents, the latent-scaling check; safetensors + JSON folder format
    describe.py     latent descriptions offline: contexts, histogram, logit lens, token-lookup explanation and
                    its held-out score, reward firing
    llm_describe.py optional LLM descriptions through an OpenAI-compatible endpoint, scored by simulation
    reward_probes.py linear probes from dictionary codes to a text's reward; the latents that carry it

Analysis works on the same model object training uses: nothing is converted unless asked for. It is
model-generic; what is specific to the card game (its probe labels and patching pairs) lives with the
sft-vs-rl study (`mechrl.studies.card_probes`, `mechrl.studies.card_pairs`).
"""
