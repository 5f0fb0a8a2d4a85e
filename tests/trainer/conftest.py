import pytest
from tiny_trainer_configs import tiny_config


@pytest.fixture()
def make_config(tiny_dir, tmp_path):
    """`make_config(stage_or_config_class, **overrides)`: the stage's config (UnifiedGRPOConfig for "understanding",
    FlowGRPOConfig for "generation", DecoderPretrainingConfig for "pretrain", ColdStartConfig for "cold_start") with
    the settings every trainer test shares (tiny_trainer_configs.py), writing under `tmp_path / stage` unless
    `output_dir` is given."""

    def make(stage, **overrides):
        name = stage if isinstance(stage, str) else stage.__name__
        output_dir = overrides.pop("output_dir", tmp_path / name)
        return tiny_config(stage, tiny_dir, output_dir, **overrides)

    return make
