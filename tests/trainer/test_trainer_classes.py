"""One trainer per algorithm, each its real type: only the GRPO on the encoder is TRL's `GRPOTrainer`; the trainers of
the decoder's parts are `transformers.Trainer`s (through `DecoderTrainer`); no class picks another in `__new__`."""

import importlib
import inspect
import pkgutil

import transformers
from trl import GRPOTrainer

import uae_hf.trainer
from uae_hf import (
    ColdStartConfig,
    ColdStartTrainer,
    DecoderPretrainingConfig,
    DecoderPretrainingTrainer,
    DecoderTrainer,
    FlowGRPOConfig,
    FlowGRPOTrainer,
    UnifiedGRPOTrainer,
)


def test_only_the_grpo_on_the_encoder_is_a_trl_grpo_trainer():
    assert issubclass(UnifiedGRPOTrainer, GRPOTrainer)
    for trainer_class, config_class in ((FlowGRPOTrainer, FlowGRPOConfig),
                                        (DecoderPretrainingTrainer, DecoderPretrainingConfig),
                                        (ColdStartTrainer, ColdStartConfig)):
        assert issubclass(trainer_class, DecoderTrainer) and issubclass(trainer_class, transformers.Trainer)
        assert not issubclass(trainer_class, (GRPOTrainer, UnifiedGRPOTrainer)), trainer_class
        assert trainer_class.config_class is config_class
        # their reward is the reconstruction's by construction: no TRL reward functions to pass
        assert "reward_funcs" not in inspect.signature(trainer_class).parameters


def test_no_class_of_the_trainer_package_defines_new():
    modules = [importlib.import_module(f"uae_hf.trainer.{info.name}")
               for info in pkgutil.iter_modules(uae_hf.trainer.__path__)]
    classes = [value for module in modules for value in vars(module).values()
               if inspect.isclass(value) and value.__module__ == module.__name__]
    assert UnifiedGRPOTrainer in classes and FlowGRPOTrainer in classes  # the scan sees the trainers
    assert [cls.__qualname__ for cls in classes if "__new__" in vars(cls)] == []
