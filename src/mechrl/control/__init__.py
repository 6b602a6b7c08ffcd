"""Reward shaping from a reward model's internals (the feature-control study, seeds 002 and 004).

    sarm.py           SAEReward: score = w . z over SAE latents at the last token (SARM form); exact attribution,
                      clamps and head edits as context managers; the published SARM checkpoint layout
    sarm_train.py     fit_sarm: a TopK SAE (SAELens) on a trained reward model's hidden states + a bias-free head
    features.py       evidence per latent, selection with a causal clamping check, top stories, logit lens,
                      clamping probes, best-of-N
    density_ratio.py  cross-fitted logistic density-ratio KL between two sample sets (and its online form)
    penalties.py      the registered reward components: sarm_score, feature_penalty, latent_kl, and monitors

Every penalty is read by the frozen reward model on the policy's text, never from the policy's activations.
"""
