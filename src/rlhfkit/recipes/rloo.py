"""RLOO: REINFORCE with a leave-one-out baseline, no critic (Ahmadian et al. 2024, "Back to
Basics: Revisiting REINFORCE Style Optimization for Learning from Human Feedback in LLMs").

A preset of the group recipe (rlhfkit.recipes.grpo): each prompt gets `num_generations`
responses; a response's reward is its score minus beta times its summed per-token KL to the
reference (the KL is in the reward, eq. 2); its advantage is that reward minus the mean reward
of the other responses to the same prompt (eq. 4; Kool et al. 2019). The whole response is one
action: the importance ratio is the ratio of whole-response probabilities, clipped per
response as in the paper and TRL, and at ratio 1 the gradient is -A * grad sum_t log pi(y_t).

    rlhfkit rloo --model runs/sft/final --reward rm:runs/rm/final --output_dir runs/rloo
"""

from __future__ import annotations

import dataclasses

from rlhfkit.recipes import grpo


@dataclasses.dataclass
class Config(grpo.Config):
    advantage_estimator: str = "rloo"
    """Group baseline: grpo (group mean and std) or rloo (leave-one-out mean)."""
    kl_in_reward: bool = True
    """Put -beta * KL(policy || reference) into each response's reward (RLOO) instead of the loss (GRPO)."""
    beta: float = 0.05
    """KL coefficient of the reward's -beta * summed per-token KL."""
    importance_sampling_level: str = "sequence_sum"
    """Importance ratio: sequence_sum (RLOO: whole response), sequence (GSPO) or token."""
    loss_type: str = "sequence"
    """Loss normalisation: with a sequence-level ratio, sequence counts each response's loss once."""
    scale_rewards: bool = False
    """Whiten the leave-one-out advantages over the batch."""
    output_dir: str = "runs/rloo"
    """Folder for checkpoints, metrics.jsonl, TensorBoard events and the final model."""


main = grpo.main
