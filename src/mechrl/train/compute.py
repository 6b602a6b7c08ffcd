"""Training compute, counted in token-passes: the unit runs are compared on at matched compute.

One token through the model's forward pass is 1 unit (`FORWARD`); its backward pass is 2 more
(`BACKWARD`: the gradients with respect to the activations and to the weights, each about one
forward's arithmetic). Only real tokens count: padding positions are an artefact of batching, not
work the method needs. Evaluation does not count (it measures the model, it does not train it),
nor do the routing evaluations of a routed run. LoRA runs are counted as full fine-tuning is
(their backward skips the frozen weights' gradients, so for them the count is an upper bound).

What each loop counts per optimisation step, logged as `compute/step_token_passes` and, summed
over the run, `compute/token_passes` (checkpointed, so a resumed run continues the total):

    SFT   3 x the batch's prompt + completion tokens (EOS included): TRL's non-padding input count
    GRPO  1 x the sampling pass (prefill of the step's distinct prompts + every generated token)
          + 1 x a no-grad pass for the old log-probs (num_iterations > 1) and another for the
            reference log-probs (beta > 0)
          + 3 x num_iterations x the update pass over the rows the loss uses
    PPO   1 x sampling + 1 x the old log-probs and values + 1 x the reference (kl_coef > 0)
          + 3 x ppo_epochs x the update pass over every row

A *pass* over a set of rows costs its distinct prompts' tokens once and every row's completion
tokens (up to and including EOS). That is what mechrl's sampler and `completion_logprobs` compute:
the G completions of a GRPO group share one prompt pass, within a micro-batch (`pass_tokens`).
Generated tokens count as forwards, one each.

    >>> sft_token_passes(1000)
    3000
"""

from __future__ import annotations

import torch

FORWARD = 1
BACKWARD = 2
TRAIN = FORWARD + BACKWARD  # one token forward and backward

#: The per-step metric each RL step function reports, and the running total `run_rl` logs.
STEP_KEY = "compute/step_token_passes"
TOTAL_KEY = "compute/token_passes"


def sft_token_passes(tokens: int) -> int:
    """Token-passes of SFT steps that saw `tokens` real (non-padding) input tokens."""
    if tokens < 0:
        raise ValueError(f"sft_token_passes: negative token count {tokens}")
    return TRAIN * int(tokens)


def pass_tokens(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_mask: torch.Tensor,
                rows: slice | torch.Tensor | None = None, *, share_prompts: bool = True) -> int:
    """Real tokens one pass over `rows` (all when None) processes: each distinct prompt's tokens once
    (every row's when `share_prompts` is False) plus every row's completion tokens.

    prompt_ids, prompt_mask: (B, P) left-padded; completion_mask: (B, T) 1 up to and including EOS."""
    B = prompt_ids.size(0)
    if prompt_mask.shape != prompt_ids.shape or completion_mask.size(0) != B:
        raise ValueError(f"pass_tokens: shapes disagree: prompt_ids {tuple(prompt_ids.shape)}, prompt_mask "
                         f"{tuple(prompt_mask.shape)}, completion_mask {tuple(completion_mask.shape)}")
    if rows is not None:
        prompt_ids, prompt_mask, completion_mask = prompt_ids[rows], prompt_mask[rows], completion_mask[rows]
    if prompt_ids.size(0) == 0:
        return 0
    if share_prompts:  # the same rows the sampler and completion_logprobs treat as one prompt
        uniq = torch.unique(torch.cat([prompt_ids, prompt_mask.to(prompt_ids.dtype)], 1), dim=0)
        prompt_tokens = int(uniq[:, prompt_ids.size(1):].sum())
    else:
        prompt_tokens = int(prompt_mask.sum())
    return prompt_tokens + int(completion_mask.sum())


class ComputeCounter:
    """Adds up one step's token-passes: `forward(n)` for no-grad passes, `train(n)` for passes with a
    backward. `total` is the step's count."""

    def __init__(self):
        self.total = 0

    def forward(self, tokens: int) -> None:
        self.total += FORWARD * int(tokens)

    def train(self, tokens: int) -> None:
        self.total += TRAIN * int(tokens)


def crossed(before: float, after: float, marks: list[float] | tuple[float, ...]) -> list[float]:
    """The marks a running total passed on this step: before < mark <= after.

    >>> crossed(90, 130, [100, 120, 200])
    [100, 120]
    """
    return [m for m in marks if before < m <= after]
