import logging

import torch

from uae_hf.trainer.health import HealthWarnings, groups_without_variation


def test_groups_without_variation_counts_flat_and_nan_groups():
    rewards = torch.tensor([0.5, 0.5, 0.5, 0.5,    # flat
                            0.1, 0.9, 0.2, 0.4,    # varies
                            float("nan"), 0.3, float("nan"), 0.3,  # flat among its finite values
                            *[float("nan")] * 4])                  # no finite value at all
    assert groups_without_variation(rewards, 4) == 0.75
    assert groups_without_variation(torch.arange(8.0), 2) == 0.0


def test_each_problem_is_warned_about_once(caplog):
    health = HealthWarnings()
    with caplog.at_level(logging.WARNING):
        health.check_group_variation(0.25, step=1)
        health.check_on_policy(5e-5, step=1)
        health.check_finite_rewards(torch.tensor([0.5, 0.25]), step=1)
        assert not caplog.records and not health.warned
        health.check_group_variation(0.75, step=2)
        health.check_group_variation(1.0, step=3)
        health.check_on_policy(3e-2, step=3)
        health.check_finite_rewards(torch.tensor([0.5, float("nan"), float("nan")]), step=4)
        health.check_finite_rewards(torch.tensor([float("nan")]), step=5)
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 3 and health.warned == {"reward_variation", "on_policy", "non_finite_rewards"}
    assert "75% of the groups" in messages[0] and "3.00e-02" in messages[1] and "2 of 3" in messages[2]
