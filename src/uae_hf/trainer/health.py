"""Training-health checks of the RL stages: what would silently stall or bias training becomes a metric and a
warning (logged once per kind and run, so a long run's log stays readable)."""

import torch
from transformers.utils import logging

logger = logging.get_logger(__name__)

# On-policy: at the first update of a fresh rollout the new and old log-probs come from the same weights.
ON_POLICY_TOLERANCE = 1e-4
# Share of groups with no reward variation from which a step carries little learning signal.
STALLED_GROUP_SHARE = 0.5


def groups_without_variation(rewards: torch.Tensor, group_size: int, tolerance: float = 1e-6) -> float:
    """Share of consecutive groups of `group_size` rewards whose finite values do not vary (spread ≤ `tolerance`)."""
    grouped = rewards.detach().float().reshape(-1, group_size)
    finite = torch.isfinite(grouped)
    high = torch.where(finite, grouped, -torch.inf).amax(dim=1)
    low = torch.where(finite, grouped, torch.inf).amin(dim=1)
    flat = ~((high - low) > tolerance)  # also true for groups with fewer than two finite rewards
    return float(flat.float().mean())


class HealthWarnings:
    """Warns once per kind of problem; `warned` lists the kinds seen (tests and callbacks read it)."""

    def __init__(self):
        self.warned: set[str] = set()

    def check_rewards(self, rewards: torch.Tensor, group_size: int, step: int) -> float:
        """Both reward checks of an RL step (every process's rewards); returns the share of stalled groups to log."""
        stalled = groups_without_variation(rewards, group_size)
        self.check_group_variation(stalled, step)
        self.check_finite_rewards(rewards, step)
        return stalled

    def check_group_variation(self, share: float, step: int) -> None:
        if share >= STALLED_GROUP_SHARE and "reward_variation" not in self.warned:
            self.warned.add("reward_variation")
            logger.warning(
                f"step {step}: rewards do not vary within {share:.0%} of the groups, so those groups get zero "
                "advantage and teach nothing. Raise the sampling temperature or the SDE noise level, draw more "
                "samples per group (num_generations), or stop using a fixed noise for every sample of a group."
            )

    def check_finite_rewards(self, rewards: torch.Tensor, step: int) -> None:
        missing = int((~torch.isfinite(rewards)).sum())
        if missing and "non_finite_rewards" not in self.warned:
            self.warned.add("non_finite_rewards")
            logger.warning(
                f"step {step}: {missing} of {rewards.numel()} reconstruction rewards are NaN (the decoder produced "
                "non-finite pixels, or a reward function returned None/NaN); those samples get zero advantage. "
                "Check the decoder's dtype (fp16 overflows; use bf16 or fp32) and `reconstruction/nan_count`."
            )

    def check_on_policy(self, max_deviation: float, step: int) -> None:
        if max_deviation > ON_POLICY_TOLERANCE and "on_policy" not in self.warned:
            self.warned.add("on_policy")
            logger.warning(
                f"step {step}: the importance ratio deviates from 1 by {max_deviation:.2e} at the first update of a "
                "fresh rollout, where old and new log-probs come from the same weights: the rollout and the update "
                "compute different things (dropout or train-mode layers, another dtype or attention kernel, or "
                "weights changed in between)."
            )
