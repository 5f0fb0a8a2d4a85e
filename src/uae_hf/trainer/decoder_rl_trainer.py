"""[`DecoderRLTrainer`]: what the decoder's reinforcement-learning trainers ([`FlowGRPOTrainer`],
[`DiffusionNFTTrainer`]) share. Per micro-batch: caption each image with the frozen encoder, draw G reconstructions
per caption with the stage's sampler, score them with the reconstruction reward, turn rewards into advantages; the
subclass's `update` then trains on the rollout. Rollouts, the reward, the reference DiT, the EMA and saving are here.
"""

import contextlib
import copy
import time
from pathlib import Path

import torch
from accelerate.utils import DistributedType, convert_outputs_to_fp32, get_mixed_precision_context_manager
from huggingface_hub import ModelCard, ModelCardData
from transformers import TrainerCallback
from trl.trainer.utils import disable_dropout_in_model

from ..hub import MODEL_CARDS, hub_id_of
from ..images import decoded_images
from ..rewards.reconstruction import ReconstructionBatch, caption_metrics
from ..sampling.flow_sde import Trajectory, sample_trajectory
from ..seeding import seeded_generators, stream_seed
from .decoder_rl_config import DecoderRLConfig
from .decoder_trainer import CAPTION_STREAM, LORA_WEIGHT_NAME, DecoderTrainer, row_images, save_diffusers_model
from .health import HealthWarnings
from .model_card import card_tags, latest_metrics
from .weight_copy import WeightCopy

GROUP_NOISE_STREAM, SAMPLE_NOISE_STREAM, STEP_NOISE_STREAM = 3, 4, 5
MICRO_STEP_STREAM = 7  # names a micro-step's own streams within an accumulation window (the first keeps the step's)


class _AfterOptimizerStep(TrainerCallback):
    def __init__(self, trainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.after_optimizer_step(state.global_step)


class DecoderRLTrainer(DecoderTrainer):
    """Base of the trainers that fine-tune a UAE decoder's DiT on the reconstruction reward of its own samples.

    A subclass sets the rollout sampler (`rollout_settings`), whether it needs the reference DiT (`uses_reference`),
    and trains on a rollout in `update`. Arguments as [`DecoderTrainer`]; `peft_config` is the DiT LoRA (default:
    r=`decoder_lora_r`, alpha=`decoder_lora_alpha` on the joint-attention projections), ignored with
    `decoder_full_finetune`.
    """

    config_class = DecoderRLConfig
    card_template = "decoder_rl_lora.md"
    algorithm = ""  # the objective's name, for the model card

    def __init__(self, model=None, decoder=None, args: DecoderRLConfig | None = None, train_dataset=None,
                 eval_dataset=None, processing_class=None, peft_config=None, callbacks=None, optimizers=(None, None)):
        super().__init__(model, decoder, args, train_dataset, eval_dataset, processing_class, peft_config, callbacks,
                         optimizers)
        if self.encoder is None or self.caption_processor is None:
            raise ValueError(f"{type(self).__name__} captions each image: pass the encoder as `model` (and its "
                             "processor), or a decoder with `vlm` and `processor`")
        # `per_device_train_batch_size` counts samples, as in TRL's GRPO: the loader yields that many images / G
        self._train_batch_size = self.args.per_device_train_batch_size // self.args.num_generations
        self._rollouts: dict[int, dict] = {}  # position in the accumulation window → the rollout it trains on
        self._sampled_step = -1  # the optimizer step that sampled the current rollouts (its updates are fresh)
        self._step_batches: list = []  # the micro-batches of the current optimizer step
        self._window = (-1, 0)  # (global step, position) of the current micro-step
        if self.reference is not None:  # copied before `Trainer.__init__` placed the decoder: follow it
            self.reference.to(self.accelerator.device)
            if self.accelerator.native_amp:  # and compute as the trained DiT will once accelerate wraps its forward
                autocast = get_mixed_precision_context_manager(True, self.accelerator.autocast_handler)
                self.reference.forward = convert_outputs_to_fp32(autocast(self.reference.forward))
        self.health = HealthWarnings()
        dit = self.accelerator.unwrap_model(self.model)
        self.ema = WeightCopy(dit) if self.args.ema_decay is not None else None
        self.add_callback(_AfterOptimizerStep(self))

    # ------------------------------------------------------------------------------------------ what each objective sets
    uses_reference = False  # the update reads the reference DiT (LoRA disabled, or a frozen copy when fully tuned)

    integer_rollout_timesteps = False  # the rollouts' DiT reads ⌊1000σ⌋ (see `sample_trajectory`)

    def rollout_settings(self) -> tuple[float, str, float]:
        """`(noise_level, method, guidance_scale)` of the rollout sampler."""
        raise NotImplementedError

    def rollout_policy(self) -> contextlib.AbstractContextManager:
        """The DiT that samples the rollouts, as a context manager: the trained one."""
        return contextlib.nullcontext(self.accelerator.unwrap_model(self.model))

    def update(self, model, rollout: dict, fresh: bool) -> torch.Tensor:
        """Backpropagate the objective on `rollout` (scaled for gradient accumulation); return the loss to log.
        `fresh`: the first update of this rollout."""
        raise NotImplementedError

    @property
    def trains_full_dit(self) -> bool:
        return self.args.decoder_full_finetune

    def build_trained_model(self, peft_config, train_dataset) -> torch.nn.Module:
        dit = self.decoder.transformer
        self.reference = None
        if self.args.decoder_full_finetune:
            dit.requires_grad_(True)
            if self.uses_reference:
                self.reference = copy.deepcopy(dit).requires_grad_(False).eval()
        else:
            self.add_dit_lora(dit, peft_config)
        if self.args.disable_dropout:
            disable_dropout_in_model(dit)
        return dit

    def frozen_models(self) -> dict[str, torch.nn.Module | None]:
        return super().frozen_models() | {"reference": self.reference}

    def evaluation_loss(self, model, rows, generator) -> None:
        return None  # an RL surrogate has no held-out meaning: evaluation reports the round trip alone

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """[`DecoderTrainer.evaluate`] of what `save_model` writes: with an EMA, the EMA's weights (as the Flow-GRPO
        and DiffusionNFT references evaluate theirs), so the logged `eval_*` numbers are the saved LoRA's; the live
        weights are back afterwards."""
        if self.ema is None:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        with self.ema.swapped_in(self.accelerator.unwrap_model(self.model)):
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)

    # ------------------------------------------------------------------------------------------------------- rollout
    def _micro_seed(self, stream: int) -> int:
        """The seed of `stream` at this step, process and micro-step: each micro-batch of an accumulation window
        draws its own noise; the first keeps the step's seed (so without accumulation nothing changes)."""
        base = self._seed(stream)
        micro_step = self._window[1]
        return stream_seed(base, MICRO_STEP_STREAM, micro_step) if micro_step else base

    def _generators(self, stream: int, count: int, repeat: int = 1) -> list[torch.Generator]:
        """`count * repeat` generators for this micro-step and process; each seed serves `repeat` consecutive
        samples."""
        base = self._micro_seed(stream)
        return seeded_generators(stream_seed(base, index) for index in range(count) for _ in range(repeat))

    def get_batch_samples(self, epoch_iterator, num_batches: int, device):
        """`Trainer` fetches an optimizer step's micro-batches here; they are kept so that the step's first
        micro-step samples all of them before any update (see `training_step`)."""
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._step_batches = batches
        return batches, num_items

    def _rollout(self, rows: list[dict]) -> dict:
        """One micro-batch's rollout, its advantages from its own rewards (an accumulation window of one)."""
        return self._rollout_window([rows])[0]

    @torch.no_grad()
    def _rollout_window(self, batches: list[list[dict]]) -> list[dict]:
        """Roll out each micro-batch of a window (its own seeds, as its micro-step would), then give every sample its
        advantage against the rewards of the whole window on every process."""
        model, window = self.model, self._window
        was_training = model.training
        model.eval()  # sampled without dropout, as the reference samples
        rollouts = []
        for micro_step, rows in enumerate(batches):
            self._window = (self.state.global_step, micro_step)  # the micro-step's seeds
            rollouts.append(self._sample(rows))
        model.train(was_training)
        self._window = window
        rewards = [rollout.pop("rewards") for rollout in rollouts]
        local = torch.cat(rewards)
        everyone = self.accelerator.gather(local)  # every process's rewards, once per window
        advantages = self._advantages(local, everyone).split([len(own) for own in rewards])
        for rollout, rollout_advantages in zip(rollouts, advantages):
            rollout["advantages"] = rollout_advantages
        stalled = self.health.check_rewards(everyone, self.args.num_generations, self.state.global_step)
        finite = everyone[~torch.isnan(everyone)]
        self._record({
            "reward": float(torch.nanmean(everyone)),
            "reward_std": float(finite.std()) if len(finite) > 1 else 0.0,
            "advantages/abs_mean": float(torch.cat(advantages).abs().mean()),
            "reward/groups_without_variation": stalled,
        })
        return rollouts

    def _sample(self, rows: list[dict]) -> dict:
        """Caption, sample G reconstructions per caption, score them: the conditioning, the trajectory and this
        process's rewards (one per sample)."""
        args, family, group = self.args, self.decoder_family, self.args.num_generations
        noise_level, method, guidance = self.rollout_settings()
        start = time.perf_counter()
        originals = row_images(rows)
        captions = self.caption(originals, self._micro_seed(CAPTION_STREAM))
        captions_g = [caption for caption in captions for _ in range(group)]
        originals_g = [image for image in originals for _ in range(group)]
        family.check_size(args.decoder_height, args.decoder_width)
        conditioning = family.encode_captions(captions_g, args.decoder_conditioning_mode)
        if args.same_noise_in_group:
            noise_seeds = self._generators(GROUP_NOISE_STREAM, len(originals), repeat=group)
        else:
            noise_seeds = self._generators(SAMPLE_NOISE_STREAM, len(captions_g))
        latents = family.initial_noise(len(captions_g), args.decoder_height, args.decoder_width, noise_seeds,
                                       self.accelerator.device)
        with self.rollout_policy() as dit:
            trajectory = sample_trajectory(
                family, conditioning, latents, args.decoder_num_inference_steps, guidance, noise_level, method,
                generator=self._generators(STEP_NOISE_STREAM, len(captions_g)), transformer=dit,
                integer_timesteps=self.integer_rollout_timesteps,
            )
        arrays = family.decode(trajectory.latents[:, -1], "np")
        rollout_time = self._seconds_since(start)

        start = time.perf_counter()
        reconstructions = decoded_images(arrays)
        rewards, metrics = self.reconstruction_reward.similarities(reconstructions, originals_g)
        self._record(metrics | caption_metrics(captions) | {
            "timing/rollout_s": rollout_time,
            "timing/reward_s": self._seconds_since(start),
        })
        self._keep_batch(ReconstructionBatch(originals_g, captions_g, reconstructions, rewards.tolist(), metrics))
        return {"conditioning": conditioning, "trajectory": self.kept_trajectory(trajectory),
                "rewards": rewards.to(self.accelerator.device)}

    def _seconds_since(self, start: float) -> float:
        """Wall time since `start`, once the device has finished the work queued so far (CUDA runs asynchronously:
        without the wait, a phase's time would land in the next one's)."""
        if self.accelerator.device.type == "cuda":
            torch.cuda.synchronize(self.accelerator.device)
        return time.perf_counter() - start

    def kept_trajectory(self, trajectory: Trajectory) -> Trajectory:
        """What of the sampled trajectory the update needs (all of it here)."""
        return trajectory

    def _advantages(self, rewards: torch.Tensor, everyone: torch.Tensor) -> torch.Tensor:
        """Rewards minus their group's mean, over the std of all processes' rewards (`"batch"`), of the group
        (`"group"`) or 1 (`"none"`), clipped to ±`advantage_clip`; NaN rewards get 0. In float64, as the references
        compute them: a group of equal rewards gets exactly 0 (in float32 its mean can miss them by an ulp)."""
        rewards, everyone = rewards.double(), everyone.double()
        grouped = rewards.view(-1, self.args.num_generations)
        centred = grouped - torch.nanmean(grouped, dim=1, keepdim=True)
        if self.args.scale_rewards == "group":
            std = torch.sqrt(torch.nanmean(centred**2, dim=1, keepdim=True))
        elif self.args.scale_rewards == "batch":
            finite = everyone[~torch.isnan(everyone)]  # the population std, as the reference computes it
            std = finite.std(correction=0) if len(finite) > 1 else torch.ones((), device=rewards.device)
        else:
            std = torch.ones((), device=rewards.device)
        advantages = (centred / (std + 1e-4)).nan_to_num(0.0).view(-1)
        return advantages.clamp(-self.args.advantage_clip, self.args.advantage_clip)

    def _trained_steps(self) -> list[int]:
        """The sampling steps each update trains on: the first `int(T·timestep_fraction)` (at least one)."""
        total = self.args.decoder_num_inference_steps
        return list(range(max(1, int(total * self.args.timestep_fraction))))

    # -------------------------------------------------------------------------------------------------------- update
    @contextlib.contextmanager
    def _reference(self):
        """The reference DiT: the trained DiT with its LoRA disabled (or the frozen copy when fully fine-tuned)."""
        dit = self.accelerator.unwrap_model(self.model)
        if self.reference is not None:
            yield self.reference
            return
        dit.disable_adapters()
        try:
            yield dit
        finally:
            dit.enable_adapters()

    def training_step(self, model, inputs, num_items_in_batch=None):
        global_step = self.state.global_step
        micro_step = self._window[1] + 1 if self._window[0] == global_step else 0  # position in the window
        self._window = (global_step, micro_step)
        # every micro-batch of a window is sampled at its first micro-step, so that `scale_rewards="batch"` divides by
        # the std of every reward of the step on every process (the reference's global std); the window's rollouts
        # serve `num_iterations` optimizer steps (μ inner epochs; the later ones off-policy), and the rows of the
        # steps in between are not sampled. A window's rollouts stay in memory until its last update.
        new_window = global_step % self.args.num_iterations == 0 or len(self._rollouts) < len(self._step_batches)
        if micro_step == 0 and new_window:
            self._rollouts = dict(enumerate(self._rollout_window(self._step_batches)))
            self._sampled_step = global_step
        model.train()
        start = time.perf_counter()
        loss = self.update(model, self._rollouts[micro_step], fresh=self._sampled_step == global_step)
        self._record({"timing/update_s": self._seconds_since(start),
                      "trained_steps": float(len(self._trained_steps()))})
        return loss

    def backpropagate_trained_steps(self, model, step_loss) -> torch.Tensor:
        """Backpropagate `step_loss(position, index)` at each trained step, one graph at a time (gradients are
        synchronised across processes on the last), scaled for the steps and the accumulation; the mean loss."""
        steps = self._trained_steps()
        scale = len(steps) * self.args.gradient_accumulation_steps
        # DeepSpeed would divide by the accumulation a second time (the loss is scaled here, as `Trainer` scales its own)
        deepspeed = self.accelerator.distributed_type == DistributedType.DEEPSPEED
        backward_kwargs = {"scale_wrt_gas": False} if deepspeed else {}
        total = torch.zeros((), device=self.accelerator.device)
        for position, index in enumerate(steps):
            with contextlib.nullcontext() if position == len(steps) - 1 else self._accumulating(model):
                loss = step_loss(position, index)
                self.accelerator.backward(loss / scale, **backward_kwargs)
            total += loss.detach() / len(steps)
        return total

    @contextlib.contextmanager
    def _accumulating(self, model):
        """A backward pass that is not the optimizer step's last: gradients accumulate locally (no DDP / FSDP2
        synchronisation), and DeepSpeed, which steps its optimizer after every backward at a synchronisation
        boundary, takes no step."""
        state = self.accelerator.gradient_state
        synchronised = state.sync_gradients
        state._set_sync_gradients(False)
        try:
            with self.accelerator.no_sync(model):
                yield
        finally:
            state._set_sync_gradients(synchronised)

    # ------------------------------------------------------------------------------------- after each optimizer step
    def after_optimizer_step(self, step: int) -> None:
        """Blend the EMA as the references' EMA does after their optimizer step `step` (counted from 1): when
        `step + 1` is a multiple of `ema_update_interval`, with decay `min(ema_decay, (1 + step) / (10 + step))`."""
        if self.ema is not None and (step + 1) % self.args.ema_update_interval == 0:
            decay = min(self.args.ema_decay, (1 + step) / (10 + step))
            self.ema.blend(self.accelerator.unwrap_model(self.model), decay)

    def weight_copies(self) -> dict:
        return {"ema": self.ema} if self.ema is not None else {}

    # -------------------------------------------------------------------------------------------------- save / load
    def save_parts(self, output_dir: Path, weights: dict[str, torch.Tensor]) -> None:
        """The DiT LoRA as a diffusers LoRA file (with its adapter metadata, so `alpha` survives), or the full DiT;
        the EMA's weights when there is one."""
        dit = self.accelerator.unwrap_model(self.model)
        weights = weights | (self.ema.weights if self.ema else {})
        if self.args.decoder_full_finetune:
            save_diffusers_model(dit, output_dir / "transformer", weights)
        else:
            self.save_dit_lora(dit, output_dir, weights)

    def card_settings(self) -> dict[str, str]:
        """The objective's settings for the model card."""
        args = self.args
        return {
            "objective": self.algorithm,
            "group size": f"{args.num_generations}",
            "advantages": f"group mean, {args.scale_rewards} std, clipped to ±{args.advantage_clip}",
            "trained steps per update": f"{len(self._trained_steps())} of {args.decoder_num_inference_steps}",
            "reward": f"{', '.join(args.reward_backbones)} similarity to the original",
            "EMA": "none" if args.ema_decay is None
            else f"decay {args.ema_decay} every {args.ema_update_interval} steps",
            "steps": f"{self.state.global_step}",
        }

    def _card_loading(self, base: str | None) -> dict[str, str]:
        """How the card loads the LoRA: into a UAE pipeline (round trips), or into the family's stock pipeline."""
        if hasattr(self.decoder, "vlm"):
            return {"loading_note": "A UAE pipeline reads it (image → caption → image):",
                    "load_arguments": '"path/to/uae-pipeline", trust_remote_code=True',
                    "pipeline_class": "UAEReconstructionPipeline",
                    "call": "out = pipe(image=image, generator=torch.Generator().manual_seed(0))\nout.images[0]"}
        pipeline_class = type(self.decoder).__name__
        return {"loading_note": f"The stock diffusers `{pipeline_class}` ({self.decoder_family.name} family) reads it:",
                "load_arguments": f'"{base or "path/to/base-pipeline"}", torch_dtype=torch.bfloat16',
                "pipeline_class": pipeline_class,
                "call": 'image = pipe(prompt="a caption", generator=torch.Generator().manual_seed(0)).images[0]'}

    def create_model_card(self, model_name: str | None = None, dataset_name: str | None = None, tags=None):
        """A diffusers-style LoRA card: base decoder, objective, tags, and loading with `UAEReconstructionPipeline`
        (SD3) or the family's stock pipeline."""
        if not self.is_world_process_zero():
            return
        args = self.args
        base = hub_id_of(self.decoder.transformer)
        latest = latest_metrics(self.state.log_history)
        card = ModelCard.from_template(
            ModelCardData(base_model=base, library_name="diffusers", license="other",
                          tags=card_tags(self._tag_names, tags), datasets=[dataset_name] if dataset_name else None,
                          instance_prompt=None),
            template_path=str(MODEL_CARDS / self.card_template),
            model_name=model_name or Path(args.output_dir).name,
            base_model=base,
            hub_model_id=self.hub_model_id or model_name or Path(args.output_dir).name,
            weight_name=LORA_WEIGHT_NAME,
            full_finetune=args.decoder_full_finetune,
            algorithm=self.algorithm,
            trainer=type(self).__name__,
            **self._card_loading(base),
            settings=self.card_settings(),
            metrics={k: v for k, v in latest.items() if k.startswith(("reward", "reconstruction/"))},
        )
        card.save(Path(args.output_dir, "README.md"))
