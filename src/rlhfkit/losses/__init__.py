"""Pure loss functions, one per variant; each returns (loss, metrics).

    sft.py         next-token NLL on completion tokens
    reward.py      reward-model losses (Bradley-Terry, ties, K-way rankings, centering)
    policy.py      PPO / GRPO / RLOO policy and value losses
    preference.py  DPO and relatives (IPO, hinge, robust, SimPO, KTO, ORPO)
"""

from rlhfkit.losses.policy import (  # noqa: F401
    LOSS_NORMALISERS,
    POLICY_LOSSES,
    entropy_bonus,
    grpo_loss,
    ppo_policy_loss,
    ptx_loss,
    rloo_loss,
    value_loss,
)
from rlhfkit.losses.preference import (  # noqa: F401
    PREFERENCE_LOSSES,
    compute_preference_loss,
    dpo_loss,
    kto_loss,
    needs_reference,
)
from rlhfkit.losses.reward import (  # noqa: F401
    PAIR_LOSSES,
    RANKING_LOSSES,
    bradley_terry_loss,
    davidson_tie_loss,
    instructgpt_ranking_loss,
    plackett_luce_loss,
    reward_centering_penalty,
    soft_label_loss,
)
from rlhfkit.losses.sft import SFT_LOSSES, sft_loss  # noqa: F401
