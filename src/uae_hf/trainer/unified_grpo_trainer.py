"""[`UnifiedGRPOTrainer`]: TRL's GRPO with the UAE decoder as the reward model."""

import contextlib
import functools
import types
from pathlib import Path

import datasets
import torch
from accelerate.utils import save_fsdp_model
from accelerate.utils.constants import FSDP_MODEL_NAME
from huggingface_hub import ModelCard, ModelCardData
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import CompileConfig
from transformers.generation.configuration_utils import ALL_STATIC_CACHE_IMPLEMENTATIONS
from trl import GRPOTrainer

from ..decoders import decoder_family
from ..hub import LOCAL_CHECKPOINT, MODEL_CARDS, hub_id_of, make_adapter_config_portable, model_source
from ..pipelines.uae_reconstruction.pipeline_uae_reconstruction import adapters_disabled, caption_messages, check_encoder
from .checkpointing import AtomicCheckpoints
from .decoder_reward import ReconstructionGrids, build_reconstruction_reward, check_image_column
from .frozen_sharding import block_classes, decoder_models, shard_frozen_models
from .health import HealthWarnings
from .model_card import card_tags, latest_metrics
from .sharded_parameters import full_values, trained_parameters, whole_model_loading
from .unified_grpo_config import UnifiedGRPOConfig


def check_generation_backend(args: UnifiedGRPOConfig) -> None:
    """Refuse, before anything loads, caption generation settings that TRL would drop or run without the images."""
    if args.use_transformers_continuous_batching:  # also set by the deprecated `use_transformers_paged`
        raise ValueError(
            "use_transformers_paged / use_transformers_continuous_batching cannot caption images: TRL hands "
            "transformers' continuous-batching engine the prompt token ids only (`generate_batch(prompt_ids, ...)`), "
            "and that engine takes no pixel_values / image_grid_thw, so every caption would be written without seeing "
            "its image (TRL refuses it for any processor for this reason). Use the default transformers `generate` "
            "path, with cache_implementation='static' (and a compile_config in generation_kwargs to compile the "
            "decode step) for speed, or use_vllm=True."
        )
    compile_config = (args.generation_kwargs or {}).get("compile_config")
    if compile_config is None:
        return
    if args.use_vllm:
        raise ValueError("generation_kwargs['compile_config'] configures transformers' `generate`; with use_vllm=True "
                         "generation_kwargs go to vLLM's SamplingParams (vLLM compiles its own decode step)")
    if args.cache_implementation not in ALL_STATIC_CACHE_IMPLEMENTATIONS:
        raise ValueError(
            f"generation_kwargs['compile_config'] with cache_implementation={args.cache_implementation!r}: "
            "transformers compiles the decode step only with a static KV cache, so set cache_implementation='static'"
        )
    if isinstance(compile_config, dict):  # from a YAML / JSON config
        args.generation_kwargs = {**args.generation_kwargs, "compile_config": CompileConfig(**compile_config)}


def _enable_input_require_grads_once(model) -> None:
    """`PreTrainedModel.enable_input_require_grads` that first removes the hooks of its previous call."""
    model.disable_input_require_grads()
    type(model).enable_input_require_grads(model)


@contextlib.contextmanager
def base_weights_kept(model: torch.nn.Module):
    """Restore, bit for bit, the weights under every PEFT adapter layer of `model` when the block ends."""
    saved = [(param, param.detach().clone()) for module in model.modules() if isinstance(module, BaseTunerLayer)
             for param in module.get_base_layer().parameters(recurse=False)]
    try:
        yield
    finally:
        with torch.no_grad():
            for param, value in saved:
                param.copy_(value)


def with_caption_prompt(dataset, name: str):
    """Check the dataset has images; give it the paper's captioning prompt when it has no `prompt` column."""
    if dataset is None:
        return None
    check_image_column(dataset, name)
    columns = dataset.column_names
    if columns is not None and "prompt" in columns:
        return dataset
    if isinstance(dataset, datasets.Dataset):
        return dataset.add_column("prompt", [caption_messages()] * len(dataset))
    return dataset.map(lambda _: {"prompt": caption_messages()})


class UnifiedGRPOTrainer(AtomicCheckpoints, ReconstructionGrids, GRPOTrainer):
    """GRPO on the encoder of a unified auto-encoder, with the decoder's reconstruction fidelity as the reward.

    Args:
        model (`str` or `PreTrainedModel`): the encoder VLM being trained (a Hub id, a folder or a loaded model): any chat
            image-text-to-text model with a chat template (Qwen2.5-VL, Qwen3-VL, Gemma 3, ...).
        decoder (`DiffusionPipeline`): the frozen decoder, a `UAEReconstructionPipeline` or a pipeline of a
            supported family (`uae_hf.decoders`). The model it reads captions with (embeddings mode's `vlm`; the
            `text_encoder` of a family whose text encoder is the encoder's checkpoint, as Qwen-Image's Qwen2.5-VL)
            may be the very object passed as `model` (one copy in memory); with a PEFT adapter the decoder then reads
            captions with the adapter disabled (see `decoder_text_encoder`).
        args ([`UnifiedGRPOConfig`], *optional*): training, decoder and reward settings.
        train_dataset, eval_dataset: datasets with an `image` (or `images`) column; without a `prompt` column the
            UAE captioning prompt is added.
        processing_class: the encoder's processor.
        reward_funcs (`list[Callable]`, *optional*): extra TRL reward functions, added to the reconstruction reward.
        peft_config (`peft.PeftConfig`, *optional*): train a LoRA adapter (the paper: r=32, alpha=64, all linear).
        callbacks, optimizers: as in TRL.
    """

    _tag_names = ["trl", "grpo", "uae", "uae_hf"]
    _name = "UnifiedGRPO"

    def __init__(
        self,
        model,
        decoder,
        args: UnifiedGRPOConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        reward_funcs=None,
        peft_config=None,
        callbacks=None,
        optimizers=(None, None),
    ):
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path or "encoder"
            args = UnifiedGRPOConfig(output_dir=f"{str(name).rstrip('/').split('/')[-1]}-UnifiedGRPO")
        if not isinstance(args, UnifiedGRPOConfig):
            raise TypeError(f"args must be a UnifiedGRPOConfig, got {type(args).__name__}")
        check_generation_backend(args)
        self.decoder_family = decoder_family(decoder)
        self.decoder = self.decoder_family.pipe
        self.decoder.set_progress_bar_config(disable=True)
        train_dataset = with_caption_prompt(train_dataset, "train_dataset")
        if isinstance(eval_dataset, dict):
            eval_dataset = {key: with_caption_prompt(value, f"eval_dataset[{key!r}]") for key, value in eval_dataset.items()}
        else:
            eval_dataset = with_caption_prompt(eval_dataset, "eval_dataset")

        with whole_model_loading():  # the reward's backbones are frozen: no engine prepares them
            self.reconstruction_reward = build_reconstruction_reward(self.decoder, args)
        # the reward stays a function of its inputs; the trainer keeps the batches it logs
        reconstruction = functools.partial(self.reconstruction_reward, on_batch=self._keep_batch)
        super().__init__(
            model=model,
            reward_funcs=[reconstruction, *(reward_funcs or [])],
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            peft_config=peft_config,
            callbacks=callbacks,
            optimizers=optimizers,
        )
        check_encoder(self._policy_base_model(), self.processing_class, "model")
        # FSDP's auto-wrap policy reads `_no_split_modules`: only the blocks the encoder has (see `block_classes`)
        self._policy_base_model()._no_split_modules = block_classes(self._policy_base_model())
        self._check_decoder_text_path()
        self._setup_generation_backend()
        policy = self._policy_base_model()
        for component in self.decoder.components.values():
            if isinstance(component, torch.nn.Module) and component is not policy:
                component.requires_grad_(False).eval()
        self.decoder.to(self.accelerator.device)
        if args.shard_frozen_models:  # the frozen decoder, over the processes that shard the policy (FSDP2 only)
            shard_frozen_models(decoder_models(self.decoder), self.accelerator, trained=policy)
        self.health = HealthWarnings()

    # ------------------------------------------------------------------------------------------------ caption rollouts
    def _setup_generation_backend(self) -> None:
        if not self.use_vllm and (self.args.generation_kwargs or {}).get("compile_config") is not None:
            # TRL builds its GenerationConfig with disable_compile=True, which silently drops an explicit compile_config
            self.generation_config.disable_compile = False
        # TRL switches gradient checkpointing off and on around every rollout and log-prob pass; each switch on calls
        # transformers' `enable_input_require_grads`, which adds a forward hook on the input embeddings and forgets the
        # previous one (switching off removes it only for adapters added with transformers' own `add_adapter`): two
        # more hooks run on every decoded token each step, and a compiled decode step recompiles every step. Keep one.
        base = self._policy_base_model()
        base.enable_input_require_grads = types.MethodType(_enable_input_require_grads_once, base)
        policy = self.accelerator.unwrap_model(self.model)
        if self.use_vllm and isinstance(policy, PeftModel):
            # TRL pushes a PEFT policy to vLLM by merging the adapter into the base weights in place and unmerging it
            # afterwards. In bf16 that round trip is not exact and its error compounds sync after sync, while those
            # base weights are the frozen encoder the decoder reads captions with (decoder_text_encoder="frozen"), the
            # KL reference and the policy's own base: give them back exactly after every sync.
            sync_weights = self.vllm_generation.sync_weights

            def sync_weights_keeping_base_weights():
                with base_weights_kept(policy):
                    sync_weights()

            self.vllm_generation.sync_weights = sync_weights_keeping_base_weights

    # ----------------------------------------------------------------------------------------------- decoder text path
    def _policy_base_model(self):
        policy = self.accelerator.unwrap_model(self.model)
        return policy.get_base_model() if isinstance(policy, PeftModel) else policy

    def _decoder_caption_encoder(self):
        """The model the decoder reads captions with, where it may be the encoder's checkpoint (embeddings mode's
        `vlm`; Qwen-Image's Qwen2.5-VL text encoder), else `None`."""
        return self.decoder_family.caption_encoder(self.args.decoder_conditioning_mode)

    def _check_decoder_text_path(self) -> None:
        reader = self._decoder_caption_encoder()
        if reader is None:
            return
        shared = reader is self._policy_base_model()
        peft = isinstance(self.accelerator.unwrap_model(self.model), PeftModel)
        if self.args.decoder_text_encoder == "policy" and not shared:
            name = next(key for key, component in self.decoder.components.items() if component is reader)
            raise ValueError(
                f'decoder_text_encoder="policy" decodes captions with the model being trained, so the decoder\'s '
                f"`{name}` must be that model: build the decoder with {name}=<the model you pass as `model`>"
            )
        if self.args.decoder_text_encoder == "frozen" and shared and not peft:
            raise ValueError(
                'decoder_text_encoder="frozen" with full fine-tuning of the very model the decoder reads captions '
                "with: give the decoder its own frozen copy of the encoder, or train with a peft_config"
            )

    @contextlib.contextmanager
    def _decoder_text_path(self):
        """While the reward decodes: the frozen base LLM (adapters off) or the policy, in eval mode either way."""
        policy = self.accelerator.unwrap_model(self.model)
        vlm = self._decoder_caption_encoder()
        shared = vlm is not None and vlm is self._policy_base_model()
        disable = shared and self.args.decoder_text_encoder == "frozen"
        was_training = vlm.training if vlm is not None else False
        with adapters_disabled(policy) if disable else contextlib.nullcontext():
            if vlm is not None:
                vlm.eval()
            try:
                yield
            finally:
                if vlm is not None:
                    vlm.train(was_training)

    # ----------------------------------------------------------------------------------------------- rewards and logs
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        with self._decoder_text_path():
            rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        # TRL logs frac_reward_zero_std for the summed reward; warn when the reconstruction reward itself stalls
        mode = "train" if self.model.training else "eval"
        group = self.num_generations if mode == "train" else getattr(self, "num_generations_eval", None) or self.num_generations
        stalled = self.health.check_rewards(rewards[:, 0], group, self.state.global_step)
        self._metrics[mode]["reward/groups_without_variation"].append(stalled)
        return rewards

    # ------------------------------------------------------------------------------------------- saving under FSDP
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """`Trainer.save_model`, except under FSDP with a PEFT adapter: every process gathers the adapter's weights
        only, where `Trainer` would gather the whole encoder to process 0 at every save."""
        policy = self.accelerator.unwrap_model(self.model)
        if not (self.is_fsdp_enabled and isinstance(policy, PeftModel)):
            super().save_model(output_dir, _internal_call)
            return
        self._save(output_dir, state_dict=full_values(trained_parameters(policy)))
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _save_trained_state(self, output_dir: str) -> None:
        """The adapter's weights, whole, in the file `Trainer` resumes an FSDP model from (`pytorch_model_fsdp.bin`,
        loaded non-strictly for an adapter): accelerate's own adapter-only save keeps a tied output head, the size of
        the token embeddings (torch's `ignore_frozen_params` drops a frozen weight under its first name only).
        `SHARDED_STATE_DICT`, and a model with frozen weights but no adapter, are saved as accelerate saves them."""
        fsdp = self.accelerator.state.fsdp_plugin
        policy = self.accelerator.unwrap_model(self.model)
        if not (isinstance(policy, PeftModel) and "FULL_STATE_DICT" in str(fsdp.state_dict_type)):
            save_fsdp_model(fsdp, self.accelerator, self.model, output_dir, adapter_only=True)
            return
        weights = {name: value.cpu() for name, value in full_values(trained_parameters(policy)).items()}
        if self.args.should_save:
            torch.save(weights, Path(output_dir, f"{FSDP_MODEL_NAME}.bin"))

    # ----------------------------------------------------------------------------------------------------- model card
    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """As TRL saves, with the adapter config naming its base portably (`make_adapter_config_portable`), by the
        process that wrote it (DeepSpeed calls `_save` on every process: another one would read it mid-write)."""
        super()._save(output_dir, state_dict)
        if self.args.should_save:
            make_adapter_config_portable(output_dir or self.args.output_dir)

    def create_model_card(self, model_name: str | None = None, dataset_name: str | None = None, tags=None):
        """Write `output_dir/README.md` from `model_cards/unified_grpo_encoder.md`."""
        if not self.is_world_process_zero():
            return
        base_model = hub_id_of(self._policy_base_model())
        decoder_name = model_source(self.decoder.transformer)
        latest = latest_metrics(self.state.log_history)
        args = self.args
        card = ModelCard.from_template(
            ModelCardData(
                base_model=base_model,
                library_name="peft" if isinstance(self.accelerator.unwrap_model(self.model), PeftModel) else "transformers",
                tags=card_tags(self._tag_names, tags),
                datasets=[dataset_name] if dataset_name else None,
            ),
            template_path=str(MODEL_CARDS / "unified_grpo_encoder.md"),
            model_name=model_name or Path(args.output_dir).name,
            base_model=base_model or LOCAL_CHECKPOINT,
            base_model_path=base_model or "path/to/base-encoder",
            decoder=decoder_name,
            conditioning_mode=args.decoder_conditioning_mode or self.decoder_family.conditioning_mode,
            reward_backbones=", ".join(args.reward_backbones),
            heldout_backbones=", ".join(args.heldout_backbones) or "none",
            decoder_settings=f"{args.decoder_width}x{args.decoder_height}, {args.decoder_num_inference_steps} steps, "
            f"CFG {args.decoder_guidance_scale}, {args.reconstructions_per_caption} decode(s) per caption",
            grpo_settings=f"{args.num_generations} generations, beta {args.beta}, lr {args.learning_rate}, "
            f"{self.state.global_step} steps",
            metrics={key: value for key, value in latest.items() if "reward" in key or "reconstruction" in key
                     or key.startswith("caption_") or "unified_bench" in key},
            hub_model_id=self.hub_model_id or model_name or Path(args.output_dir).name,
        )
        card.save(Path(args.output_dir, "README.md"))
