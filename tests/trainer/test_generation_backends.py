"""UnifiedGRPOTrainer with TRL's caption generation backends: transformers `generate` with a static KV cache (and a
compiled decode step), vLLM colocate (through TRL's own code, the engine replaced by a double), and the paged /
continuous-batching path, which cannot see images and is refused."""

import copy
import functools
import warnings
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, PeftModel
from transformers import AutoProcessor, CompileConfig, Qwen2_5_VLForConditionalGeneration, TrainerCallback
from transformers.generation import utils as generation_utils
from trl.generation import vllm_generation

from test_unified_grpo_understanding import LORA, config, photos_dataset, processor  # noqa: F401 (fixtures)

from uae_hf import UAEReconstructionPipeline, UnifiedGRPOTrainer, encode_generate_prompts
from uae_hf.pipelines.uae_reconstruction.pipeline_uae_reconstruction import caption_messages
from uae_hf.trainer.unified_grpo_trainer import check_generation_backend


class CaptionLog:
    """An extra reward (0) that records each step's captions."""

    __name__ = "caption_log"

    def __init__(self):
        self.steps = []

    def __call__(self, completions, **kwargs):
        self.steps.append([completion[0]["content"] for completion in completions])
        return [0.0] * len(completions)


# ------------------------------------------------------------------------------------------- paged: refused, early
def test_paged_generation_is_refused_early_with_the_reason(tiny_dir, pipe, processor, config, photos_dataset, tmp_path):
    unbuildable_reward = {"clip": str(tmp_path / "no-such-backbone")}  # the refusal must come before any loading
    with pytest.warns(FutureWarning, match="use_transformers_paged"):
        paged = config(use_transformers_paged=True)
    for args in (paged, config(use_transformers_continuous_batching=True)):
        args.backbone_checkpoints = unbuildable_reward
        with pytest.raises(ValueError, match=r"pixel_values.*without seeing its image.*cache_implementation='static'"):
            UnifiedGRPOTrainer(model=str(tiny_dir / "encoder"), decoder=pipe, args=args, train_dataset=photos_dataset,
                               processing_class=processor)

    compile_without_static_cache = config(generation_kwargs={"compile_config": {}})
    with pytest.raises(ValueError, match="static KV cache"):
        UnifiedGRPOTrainer(model=str(tiny_dir / "encoder"), decoder=pipe, args=compile_without_static_cache,
                           train_dataset=photos_dataset, processing_class=processor)
    with pytest.raises(ValueError, match="SamplingParams"):
        check_generation_backend(config(use_vllm=True, generation_kwargs={"compile_config": {}}))
    from_yaml = config(cache_implementation="static",
                       generation_kwargs={"compile_config": {"backend": "eager"}, "top_k": 5})
    check_generation_backend(from_yaml)  # a mapping (YAML / JSON) becomes the CompileConfig transformers requires
    assert from_yaml.generation_kwargs == {"compile_config": CompileConfig(backend="eager"), "top_k": 5}


# ------------------------------------------------------------------------------- static KV cache, compiled decoding
class CountingStaticCache(generation_utils.StaticCache):
    made = 0

    def __init__(self, *args, **kwargs):
        type(self).made += 1
        super().__init__(*args, **kwargs)


class PerStep(TrainerCallback):
    """After each step: forward hooks on the input embeddings, and graphs torch.compile has made so far."""

    def __init__(self, embeddings):
        self.embeddings, self.hooks, self.graphs = embeddings, [], []

    def on_step_end(self, args, state, control, **kwargs):
        self.hooks.append(len(self.embeddings._forward_hooks))
        self.graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def run_and_caption(tiny_dir, pipe, processor, config, photos_dataset, **generation):
    """Three seeded GRPO steps of a LoRA policy (gradient checkpointing on, TRL's default); then greedy captions of two
    photos with the trained policy and the trainer's own generation config (its cache and compile settings)."""
    captions = CaptionLog()
    args = config(max_steps=3, **generation)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_dir / "encoder")
    per_step = PerStep(model.get_input_embeddings())
    trainer = UnifiedGRPOTrainer(model=model, decoder=pipe, args=args, train_dataset=photos_dataset,
                                 processing_class=processor, reward_funcs=[captions], peft_config=LoraConfig(**LORA),
                                 callbacks=[per_step])
    trainer.train()
    greedy = copy.deepcopy(trainer.generation_config)
    greedy.update(do_sample=False, no_repeat_ngram_size=1, max_new_tokens=12)
    prompt = processor.apply_chat_template(caption_messages(), add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[prompt] * 2, images=photos_dataset["image"][:2], padding=True, padding_side="left",
                       return_tensors="pt")
    policy = trainer.accelerator.unwrap_model(trainer.model).eval()
    with torch.no_grad():
        tokens = policy.generate(**inputs, generation_config=greedy)
    return captions.steps, tokens[:, inputs["input_ids"].shape[1]:].tolist(), trainer, per_step


def test_static_cache_and_compiled_decoding_give_the_dynamic_cache_captions(
    tiny_dir, pipe, processor, config, photos_dataset, monkeypatch
):
    """A static KV cache (or a compiled decode step) that broke generation would change the captions: the seeded
    rollouts of three GRPO steps (each after an update) and the greedy captions of the trained policy must be the
    dynamic cache's, token for token."""
    monkeypatch.setattr(generation_utils, "StaticCache", CountingStaticCache)
    CountingStaticCache.made = 0
    run = functools.partial(run_and_caption, tiny_dir, pipe, processor, config, photos_dataset)

    rollouts, greedy, trainer, per_step = run()
    assert CountingStaticCache.made == 0
    assert len(rollouts) == 3 and all(len(set(step)) > 1 for step in rollouts)  # sampled, different within groups
    assert all(record["grad_norm"] > 0 for record in trainer.state.log_history[:-1])  # the policy trains
    assert len(greedy) == 2 and len(set(greedy[0])) > 4  # real greedy captions (no token twice), one per photo
    # TRL toggles gradient checkpointing twice a step, and transformers adds an input-embedding hook each time
    assert per_step.hooks == [1, 1, 1]

    static_rollouts, static_greedy, trainer, _ = run(cache_implementation="static")
    assert CountingStaticCache.made == 4  # one per rollout and one for the greedy captions: the static path ran
    assert static_rollouts == rollouts and static_greedy == greedy

    # compiled decode step (on CPU only with the opt-in flag; the eager backend keeps this fast, GPUs use inductor)
    compile_config = CompileConfig(backend="eager", mode="default", fullgraph=False, dynamic=False)
    compile_config._compile_all_devices = True
    torch._dynamo.reset()
    compiled_rollouts, compiled_greedy, trainer, per_step = run(
        cache_implementation="static", generation_kwargs={"compile_config": compile_config}
    )
    assert trainer.generation_config.disable_compile is False  # TRL's disable_compile=True would have dropped it
    assert hasattr(trainer.accelerator.unwrap_model(trainer.model), "_compiled_call")  # generate did compile
    assert per_step.graphs[0] > 0 and per_step.graphs[0] == per_step.graphs[-1]  # compiled once, no recompiles
    assert compiled_rollouts == rollouts and compiled_greedy == greedy
    torch._dynamo.reset()


# --------------------------------------------------------------------------------------------------- vLLM colocate
class EngineDouble:
    """Stands in for `vllm.LLM` in TRL's colocate path (trl/generation/vllm_generation.py): a copy of the checkpoint of
    its own, changed only through `load_weights` (the names vLLM is given), that samples with transformers and returns
    the processed log-probs vLLM would (log-softmax of logits / temperature)."""

    engines = []

    def __init__(self, model, **kwargs):
        self.model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model, dtype=torch.bfloat16).eval()
        self.processor = AutoProcessor.from_pretrained(model)
        self.syncs = self.completions = 0
        self.loaded_names = set()
        worker = SimpleNamespace(model_runner=SimpleNamespace(model=SimpleNamespace(load_weights=self.load_weights)))
        self.llm_engine = SimpleNamespace(model_executor=SimpleNamespace(driver_worker=worker))
        EngineDouble.engines.append(self)

    def load_weights(self, weights):
        for name, tensor in weights:
            self.model.get_parameter(name).data.copy_(tensor)  # an unknown name raises, as vLLM's loader would
            self.loaded_names.add(name)

    def reset_prefix_cache(self):
        self.syncs += 1  # TRL resets the prefix cache at the end of every sync

    @torch.no_grad()
    def generate(self, prompts, sampling_params, use_tqdm=False):
        results = []
        for prompt in prompts:
            ids = torch.tensor([prompt["prompt_token_ids"]])
            vision = self.processor.image_processor(images=[prompt["multi_modal_data"]["image"]], return_tensors="pt")
            out = self.model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), **vision, do_sample=True,
                temperature=sampling_params.temperature, top_k=0, top_p=1.0,
                max_new_tokens=sampling_params.max_tokens, output_logits=True, return_dict_in_generate=True,
            )
            tokens = out.sequences[0, ids.shape[1]:].tolist()
            logprobs = [torch.log_softmax(logits[0].float() / sampling_params.temperature, -1)[token].item()
                        for logits, token in zip(out.logits, tokens)]
            step = [{token: SimpleNamespace(logprob=logprob, rank=1)} for token, logprob in zip(tokens, logprobs)]
            self.completions += 1
            results.append(SimpleNamespace(prompt_token_ids=prompt["prompt_token_ids"],
                                           outputs=[SimpleNamespace(token_ids=tokens, logprobs=step)]))
        return results


def test_vllm_colocate_keeps_the_frozen_text_path_on_the_base_weights(
    tiny_dir, pipe, processor, config, photos_dataset, monkeypatch
):
    """bf16 policy with a LoRA adapter, the decoder reading captions with that same model (adapter disabled), and TRL's
    vLLM colocate rollouts: TRL merges the adapter into the base weights to push them to vLLM and unmerges it after."""
    monkeypatch.setattr(vllm_generation, "is_vllm_available", lambda: True)
    monkeypatch.setattr(vllm_generation, "LLM", EngineDouble, raising=False)
    monkeypatch.setattr(vllm_generation, "SamplingParams", SimpleNamespace, raising=False)
    for name, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="localhost",
                            MASTER_PORT="29500").items():
        monkeypatch.setenv(name, value)  # TRL sets these for vLLM; restored after the test
    EngineDouble.engines.clear()

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_dir / "encoder", dtype=torch.bfloat16)
    pristine = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_dir / "encoder", dtype=torch.bfloat16).eval()
    decoder = UAEReconstructionPipeline.from_pipe(pipe, vlm=model)  # one copy of the encoder in memory
    captions = CaptionLog()
    args = config(max_steps=3, use_vllm=True, vllm_mode="colocate", max_completion_length=6, learning_rate=5e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = UnifiedGRPOTrainer(model=model, decoder=decoder, args=args, train_dataset=photos_dataset,
                                     processing_class=processor, peft_config=LoraConfig(**LORA),
                                     reward_funcs=[captions])
    policy = trainer.accelerator.unwrap_model(trainer.model)
    assert isinstance(policy, PeftModel)
    lora_before = {n: p.detach().clone() for n, p in policy.named_parameters() if "lora_B" in n}
    trainer.train()

    (engine,) = EngineDouble.engines
    assert engine.syncs == 3  # TRL pushed the policy once per step
    assert engine.loaded_names and not any("lora" in n or "base_layer" in n for n in engine.loaded_names)
    assert engine.completions == 12 and len(captions.steps) == 3  # every caption the reward read came from the engine
    assert all(len(step) == 4 and all(step) for step in captions.steps)
    assert any(not torch.equal(p, lora_before[n]) for n, p in policy.named_parameters() if n in lora_before)
    logs = [record for record in trainer.state.log_history if "sampling/sampling_logp_difference/max" in record]
    # the engine sampled from the merged policy: its log-probs are the trainer's (up to bf16 rounding)
    assert len(logs) == 3 and max(record["sampling/sampling_logp_difference/max"] for record in logs) < 0.05

    # the frozen text path: base weights bit for bit as loaded, so the decoder's conditioning is the base model's
    pristine_params = dict(pristine.named_parameters())
    base = policy.get_base_model()
    for name, param in base.named_parameters():
        if "lora_" not in name:
            assert torch.equal(param, pristine_params[name.replace(".base_layer", "")]), name
    with torch.no_grad(), trainer._decoder_text_path():
        inside = encode_generate_prompts(decoder.vlm, processor.tokenizer, pipe.projector, ["a cat on a mat"])
    frozen = encode_generate_prompts(pristine, processor.tokenizer, pipe.projector, ["a cat on a mat"])
    assert torch.equal(inside.prompt_embeds, frozen.prompt_embeds)
