"""UAE reconstruction: image → caption (vision-language encoder) → image (SD3-family flow-matching decoder).

This file and its sibling modules import only torch, transformers and diffusers, never `uae_hf`: `save_pretrained`
writes this file as the saved folder's `pipeline.py` with the siblings beside it, so
`DiffusionPipeline.from_pretrained(folder_or_repo, trust_remote_code=True)` works without `uae_hf` installed.
"""

import inspect
import json
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.models.modeling_utils import ModelMixin
from transformers import (
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    PreTrainedModel,
    ProcessorMixin,
    SiglipImageProcessor,
    SiglipVisionModel,
    T5EncoderModel,
    T5TokenizerFast,
)

# The modules a saved folder carries beside `pipeline.py`. diffusers copies only the ones `pipeline.py` imports itself
# (so each is imported here), and on a later load in the same process it re-runs `pipeline.py` but keeps the siblings
# of the earlier load (every local folder shares one `diffusers_modules.local` package): forget those first.
SIBLING_MODULES = ("attention_processor", "captioning", "conditioning", "hub_access", "image_input", "pipeline_output")
if __package__ and __package__.split(".")[0] == "diffusers_modules":
    for _name in SIBLING_MODULES:
        sys.modules.pop(f"{__package__}.{_name}", None)

# (some names are imported only for code that still imports them from this module)
from .attention_processor import MaskedJointAttnProcessor, masked_attention  # noqa: E402
from .captioning import (  # noqa: E402
    CAPTION_INSTRUCTION,
    _derived_generators,
    caption_images,
    caption_messages,
    check_encoder,
)
from .conditioning import (  # noqa: E402
    NEGATIVE_PROMPT,
    GenerateConditioning,
    adapters_disabled,
    clip_pooled_embeds,
    encode_generate_prompts,
    generate_prompt_ids,
)
from .hub_access import push_access_problem  # noqa: E402
from .image_input import array_to_image, to_rgb  # noqa: E402
from .pipeline_output import UAEReconstructionPipelineOutput  # noqa: E402

CONDITIONING_MODES = ("embeddings", "text")
# Float32 weights beyond this many parameters on an accelerator: a bf16 load was almost certainly intended.
FLOAT32_WARNING_PARAMETERS = 1_000_000_000
FLOAT32_WARNING_DEVICES = ("cuda",)


_NOT_SET = object()


def _is_adapter_layer(module: torch.nn.Module) -> bool:
    """A PEFT wrapper around a base layer: an adapter layer (e.g. a LoRA `Linear`) or a `modules_to_save` copy."""
    return (hasattr(module, "base_layer") and hasattr(module, "get_base_layer")) or (
        hasattr(module, "original_module") and hasattr(module, "modules_to_save")
    )


def _plain_layer(module: torch.nn.Module) -> torch.nn.Module:
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module.original_module


EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> from diffusers import DiffusionPipeline
        >>> from PIL import Image

        >>> pipe = DiffusionPipeline.from_pretrained("path/to/uae-pipeline", trust_remote_code=True)
        >>> out = pipe(image=Image.open("photo.jpg"), generator=torch.Generator().manual_seed(0))
        >>> out.captions[0], out.images[0]
        ```
"""


class UAEReconstructionPipeline(StableDiffusion3Pipeline):
    r"""Image → caption → image with a vision-language encoder and an SD3-family decoder (the UAE round trip).

    Components are SD3's own (`transformer`, `vae`, `scheduler`, CLIP-L/G `text_encoder(_2)`/`tokenizer(_2)`, optional
    T5 `text_encoder_3`/`tokenizer_3`) plus the encoder `vlm`, its `processor` and the `projector`.

    Args:
        conditioning_mode (`str`, defaults to `"embeddings"`): `"embeddings"` conditions the decoder on the encoder
            LLM's hidden states of the caption through the projector (UAE-native); `"text"` uses the caption as an
            ordinary SD3 prompt through the decoder's own text encoders.
        conditioning_with_encoder_adapters (`bool`, defaults to `True`): whether an adapter loaded on the encoder
            also changes how the decoder reads captions. `False` reads them with the LLM's base weights, as a decoder
            trained with the encoder adapter disabled (the trainer's `decoder_text_encoder="frozen"`) expects.

    Captions of different lengths share a batch exactly: [`generate`] masks each item's text padding with
    [`MaskedJointAttnProcessor`], installed in the transformer only while it denoises, so a transformer shared with
    another pipeline (`from_pipe`) is given back with its own processors. To call the transformer yourself with a
    mask, do it inside `with pipe.masked_attention():`.
    """

    model_cpu_offload_seq = "vlm->text_encoder->text_encoder_2->text_encoder_3->projector->transformer->vae"
    _optional_components = [
        "text_encoder_3", "tokenizer_3", "image_encoder", "feature_extractor", "vlm", "processor", "projector"
    ]

    def __init__(
        self,
        transformer: SD3Transformer2DModel,
        scheduler: FlowMatchEulerDiscreteScheduler,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        text_encoder_2: CLIPTextModelWithProjection,
        tokenizer_2: CLIPTokenizer,
        vlm: PreTrainedModel = None,
        processor: ProcessorMixin = None,
        projector: ModelMixin = None,
        text_encoder_3: T5EncoderModel = None,
        tokenizer_3: T5TokenizerFast = None,
        image_encoder: SiglipVisionModel = None,
        feature_extractor: SiglipImageProcessor = None,
        conditioning_mode: str = "embeddings",
        conditioning_with_encoder_adapters: bool = True,
    ):
        super().__init__(
            transformer=transformer,
            scheduler=scheduler,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
            text_encoder_3=text_encoder_3,
            tokenizer_3=tokenizer_3,
            image_encoder=image_encoder,
            feature_extractor=feature_extractor,
        )
        self.register_modules(vlm=vlm, processor=processor, projector=projector)
        self._check_conditioning_mode(conditioning_mode)
        if vlm is not None and processor is not None:
            check_encoder(vlm, processor, f"vlm ({type(vlm).__name__})")
        self.register_to_config(
            conditioning_mode=conditioning_mode, conditioning_with_encoder_adapters=conditioning_with_encoder_adapters
        )
        if projector is not None and transformer is not None:
            width, expected = projector.config.out_features, transformer.config.joint_attention_dim
            if width != expected:
                raise ValueError(
                    f"projector output width ({width}) != transformer.config.joint_attention_dim ({expected}): "
                    "the projector was trained for another decoder"
                )
        if projector is not None and vlm is not None:
            width, expected = projector.config.in_features, vlm.config.get_text_config().hidden_size
            if width != expected:
                raise ValueError(
                    f"projector input width ({width}) != the encoder LLM's hidden_size ({expected}): the projector "
                    "was trained for another encoder"
                )
        # The transformer may be shared (`from_pipe`, `Pipeline(**other.components)`): its attention processors are left
        # as they are; `generate` installs the masked ones only while it denoises (see `masked_attention`).
        self._pooled_cache = None
        self._warned_float32 = False
        self._warn_if_float32_on_accelerator()

    def to(self, *args, **kwargs):
        """diffusers' `to`, then a one-time warning if large float32 weights now sit on a CUDA device."""
        pipeline = super().to(*args, **kwargs)
        pipeline._warn_if_float32_on_accelerator()
        return pipeline

    def _warn_if_float32_on_accelerator(self) -> None:
        if self._warned_float32:
            return
        count = sum(
            parameter.numel()
            for module in self.components.values() if isinstance(module, torch.nn.Module)
            for parameter in module.parameters()
            if parameter.dtype == torch.float32 and parameter.device.type in FLOAT32_WARNING_DEVICES
        )
        if count > FLOAT32_WARNING_PARAMETERS:
            self._warned_float32 = True
            warnings.warn(
                f"{count / 1e9:.1f}B parameters of this pipeline are float32 on a GPU: twice the memory and several "
                "times slower than bfloat16. Load with torch_dtype=torch.bfloat16 (or pipe.to(dtype=torch.bfloat16))",
                UserWarning,
                stacklevel=3,
            )

    @classmethod
    def from_pipe(cls, pipeline, dtype: torch.dtype | None = None, torch_dtype: torch.dtype | None = None, **kwargs):
        """A UAE pipeline sharing `pipeline`'s components (no copies), e.g. from a `StableDiffusion3Pipeline`.

        Unlike diffusers' `DiffusionPipeline.from_pipe`, which casts every component to `dtype` (float32 when it is
        not given, silently upcasting a bf16 pipeline and the shared modules of `pipeline` with it), each component
        keeps its own dtype unless `dtype` is given. Keyword arguments replace components (`vlm=`,
        `processor=`, `projector=`, ...) or set options (`conditioning_mode=`); the rest, projector and options
        included, carries over from `pipeline`.

        Nothing of `pipeline` is modified (the transformer's attention processors included) unless `dtype` is given.

        Args:
            pipeline (`DiffusionPipeline`): an SD3-family pipeline (a `UAEReconstructionPipeline` included).
            dtype (`torch.dtype`, *optional*): cast every model component to this dtype (shared modules are cast in
                place, so `pipeline` sees it too); `torch_dtype` is accepted as its other name, as in diffusers.
        """
        component_names, option_names = cls._get_signature_keys(cls)
        unknown = set(kwargs) - set(component_names) - set(option_names)
        if unknown:
            raise TypeError(f"from_pipe got unknown arguments {sorted(unknown)}; components are {sorted(component_names)} "
                            f"and options {sorted(option_names)}")
        components = {name: value for name, value in pipeline.components.items() if name in component_names}
        options = {name: pipeline.config[name] for name in option_names if name in pipeline.config}
        new_pipeline = cls(**(components | options | kwargs))
        if pipeline.config.get("_name_or_path") is not None:
            new_pipeline.register_to_config(_name_or_path=pipeline.config["_name_or_path"])
        if (dtype or torch_dtype) is not None:
            new_pipeline.to(dtype=dtype or torch_dtype)
        return new_pipeline

    def _check_conditioning_mode(self, mode):
        if mode not in CONDITIONING_MODES:
            raise ValueError(f"conditioning_mode={mode!r} is not one of {CONDITIONING_MODES}")
        if mode == "embeddings" and (self.projector is None or self.vlm is None or self.processor is None):
            raise ValueError(
                'conditioning_mode="embeddings" needs the encoder `vlm`, its `processor` and a `projector`; pass them '
                'or use conditioning_mode="text"'
            )

    def uae_pooled_prompt_embeds(
        self,
        batch_size: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """The constant pooled embedding of embeddings-mode conditioning (CLIP-L/G of the empty prompt), computed once
        per pipeline.

        Args:
            batch_size (`int`, *optional*): rows to return, an expanded view of the one row (clone it before writing
                in place); by default the cached `(1, P)` tensor itself.
            device (`torch.device` or `str`, *optional*), dtype (`torch.dtype`, *optional*): where and in which dtype;
                by default the cache's (CPU, the text encoders' dtype).

        Returns:
            `torch.Tensor` of shape `(batch_size, P)`, `P` being the decoder's `pooled_projection_dim`.
        """
        if self._pooled_cache is None:
            text_encoders = [self.text_encoder, self.text_encoder_2]
            self._pooled_cache = clip_pooled_embeds(text_encoders, [self.tokenizer, self.tokenizer_2]).cpu()
        pooled = self._pooled_cache
        if device is not None or dtype is not None:
            pooled = pooled.to(device=device, dtype=dtype)
        return pooled if batch_size is None else pooled.expand(batch_size, -1)

    def masked_attention(self):
        """A context manager in which the decoder transformer honours `joint_attention_kwargs={"encoder_attention_mask":
        mask}`, as [`encode_captions`] returns it for captions of different lengths; its own attention processors are
        back afterwards (a no-op when it already masks). For calling `self.transformer` outside [`generate`]
        (samplers, training); with gradient checkpointing, keep it open through `backward`, which reruns the forward.

        Examples:
            ```py
            >>> conditioning = pipe.encode_captions(["a cat", "a cup on a wooden table, seen from above"])
            >>> with pipe.masked_attention():
            ...     velocity = pipe.transformer(
            ...         hidden_states=latents, timestep=timestep, encoder_hidden_states=conditioning["prompt_embeds"],
            ...         pooled_projections=conditioning["pooled_prompt_embeds"],
            ...         joint_attention_kwargs=conditioning["joint_attention_kwargs"], return_dict=False,
            ...     )[0]
            ...     loss = (velocity.float() - target).pow(2).mean()
            ...     loss.backward()
            ```
        """
        return masked_attention(self.transformer)

    @staticmethod
    def _as_image_list(image) -> list[PIL.Image.Image]:
        images = image if isinstance(image, (list, tuple)) else [image]
        if len(images) == 0:
            raise ValueError("`image` is an empty list: pass at least one image")
        converted = []
        for index, item in enumerate(images):
            if isinstance(item, np.ndarray):
                item = array_to_image(item, f"image[{index}]")
            if not isinstance(item, PIL.Image.Image):
                raise TypeError(
                    f"`image[{index}]` is a {type(item).__name__}; pass PIL images or HxW(xC) numpy arrays"
                )
            converted.append(to_rgb(item, f"image[{index}]"))
        return converted

    def caption(
        self,
        image,
        instruction: str = CAPTION_INSTRUCTION,
        max_new_tokens: int = 512,
        do_sample: bool = True,
        temperature: float = 0.7,
        top_p: float | None = None,
        **generate_kwargs,
    ) -> list[str]:
        """Caption one image or a list of images in one batch (see [`caption_images`] for the arguments)."""
        images = self._as_image_list(image)
        if self.vlm is None or self.processor is None:
            raise ValueError("this pipeline has no encoder (`vlm` and `processor`): pass `captions=` to skip captioning")
        return caption_images(
            self.vlm, self.processor, images, instruction, max_new_tokens, do_sample, temperature, top_p,
            **generate_kwargs,
        )

    def caption_truncation(self, captions: list[str], max_sequence_length: int = 256) -> list[bool]:
        """Whether each caption is longer than a decoder text encoder reads (CLIP: 77 tokens; T5: `max_sequence_length`)."""
        limits = [(self.tokenizer, self.tokenizer.model_max_length), (self.tokenizer_2, self.tokenizer_2.model_max_length)]
        if self.tokenizer_3 is not None:
            limits.append((self.tokenizer_3, max_sequence_length))
        lengths = [[len(ids) for ids in tokenizer(captions)["input_ids"]] for tokenizer, _ in limits]
        return [any(per_tokenizer[i] > limit for per_tokenizer, (_, limit) in zip(lengths, limits)) for i in range(len(captions))]

    @torch.no_grad()
    def generate(
        self,
        captions: str | list[str],
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 40,
        guidance_scale: float = 5.0,
        negative_prompt: str | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        conditioning_mode: str | None = None,
        max_sequence_length: int = 256,
        return_dict: bool = True,
    ):
        """Draw images from captions (the decoder half of the round trip), all captions in one batch.

        Args:
            captions (`str` or `list[str]`): the captions.
            height, width (`int`, *optional*): output size; defaults to the decoder's native size (1024 for SD3.5).
            num_inference_steps (`int`, defaults to 40), guidance_scale (`float`, defaults to 5.0): the paper's values.
            negative_prompt (`str`, *optional*): defaults to the UAE negative prompt in embeddings mode and to SD3's
                empty prompt in text mode.
            num_images_per_prompt (`int`, defaults to 1): images per caption.
            generator (`torch.Generator` or a list of one per image, *optional*): for reproducible noise.
            output_type (`str`, defaults to `"pil"`): `"pil"`, `"np"`, `"pt"` or `"latent"`.
            conditioning_mode (`str`, *optional*): overrides the pipeline's mode for this call.
            max_sequence_length (`int`, defaults to 256): T5 length in text mode.

        Returns:
            [`UAEReconstructionPipelineOutput`] (or a tuple `(images, captions)` if `return_dict=False`).
        """
        # 1. Check inputs (each caption is checked as it is encoded)
        captions = [captions] if isinstance(captions, str) else list(captions)
        mode = conditioning_mode or self.config.conditioning_mode

        # 2. Encode the captions: the decoder's conditioning, `num_images_per_prompt` rows per caption
        conditioning = self.encode_captions(captions, mode, negative_prompt, num_images_per_prompt, max_sequence_length)

        # 3. Prepare latents, denoise and decode: SD3's own loop, its transformer masking each item's text padding
        #    only while this runs (a transformer shared with another pipeline is given back as it was)
        with self.masked_attention():
            images = StableDiffusion3Pipeline.__call__(
                self,
                height=height,
                width=width,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                generator=generator,
                latents=latents,
                output_type=output_type,
                num_images_per_prompt=1,
                return_dict=False,
                **conditioning,
            )[0]

        # 4. Report which captions a decoder text encoder cut (text mode)
        truncated = self.caption_truncation(captions, max_sequence_length) if mode == "text" else None
        if not return_dict:
            return images, captions
        return UAEReconstructionPipelineOutput(images=images, captions=captions, truncated=truncated)

    def generate_conditioning(self, captions: list[str], negative_prompt: str | None = None) -> GenerateConditioning:
        """[`encode_generate_prompts`] with this pipeline's `vlm`, tokenizer and `projector`, reading captions with or
        without encoder adapters as `conditioning_with_encoder_adapters` says. Gradients flow if enabled."""
        return encode_generate_prompts(
            self.vlm, self.processor.tokenizer, self.projector, captions, negative_prompt or NEGATIVE_PROMPT,
            with_adapters=self.config.get("conditioning_with_encoder_adapters", True),
        )

    def encode_captions(
        self,
        captions: list[str],
        conditioning_mode: str | None = None,
        negative_prompt: str | None = None,
        num_images_per_prompt: int = 1,
        max_sequence_length: int = 256,
    ) -> dict:
        """The decoder's conditioning for captions (item-major, `num_images_per_prompt` rows per caption).

        Returns the keyword arguments SD3's denoising takes: `prompt_embeds`, `negative_prompt_embeds`,
        `pooled_prompt_embeds`, `negative_pooled_prompt_embeds` and `joint_attention_kwargs` (the text key mask when
        captions of different lengths share the batch, else `None`). Gradients flow if enabled.
        """
        if len(captions) == 0:
            raise ValueError("`captions` is empty: pass at least one caption")
        for index, caption in enumerate(captions):
            if not isinstance(caption, str):
                raise TypeError(f"captions[{index}] is a {type(caption).__name__}: pass a string or a list of strings")
        mode = conditioning_mode or self.config.conditioning_mode
        self._check_conditioning_mode(mode)
        repeat = num_images_per_prompt
        if mode == "text":
            embeds, negative_embeds, pooled, negative_pooled = self.encode_prompt(
                prompt=captions,
                prompt_2=None,
                prompt_3=None,
                negative_prompt=negative_prompt,
                do_classifier_free_guidance=True,
                num_images_per_prompt=repeat,
                max_sequence_length=max_sequence_length,
            )
            return dict(
                prompt_embeds=embeds,
                negative_prompt_embeds=negative_embeds,
                pooled_prompt_embeds=pooled,
                negative_pooled_prompt_embeds=negative_pooled,
                joint_attention_kwargs=None,
            )
        conditioning = self.generate_conditioning(captions, negative_prompt)
        dtype = self.transformer.dtype
        prompt_embeds = conditioning.prompt_embeds.to(dtype).repeat_interleave(repeat, dim=0)
        negative_embeds = conditioning.negative_prompt_embeds.to(dtype).repeat_interleave(repeat, dim=0)
        pooled = self.uae_pooled_prompt_embeds(len(prompt_embeds), prompt_embeds.device, dtype)
        lengths = conditioning.lengths
        attention_kwargs = None
        if bool((lengths != lengths.max()).any()):
            attention_kwargs = {"encoder_attention_mask": conditioning.text_mask().repeat_interleave(repeat, dim=0)}
        return dict(
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_embeds,
            pooled_prompt_embeds=pooled,
            negative_pooled_prompt_embeds=pooled,
            joint_attention_kwargs=attention_kwargs,
        )

    @torch.no_grad()
    def __call__(
        self,
        image=None,
        captions: list[str] | None = None,
        instruction: str = CAPTION_INSTRUCTION,
        max_new_tokens: int = 512,
        do_sample: bool = True,
        temperature: float = 0.7,
        top_p: float | None = None,
        **generate_kwargs,
    ):
        """Reconstruct images: caption each with the encoder, then redraw it with the decoder.

        Args:
            image (`PIL.Image.Image`, `np.ndarray` or a list of them): the originals, converted to RGB by [`to_rgb`]
                and [`array_to_image`] (any PIL mode; uint8, uint16 or [0, 1] float arrays).
            captions (`list[str]`, *optional*): skip captioning and use these (one per image when images are given;
                none may be blank).
            instruction, max_new_tokens, do_sample, temperature, top_p: caption sampling (paper: 0.7, 512 tokens),
                with the checkpoint's own `generation_config` for the rest; each caption is drawn with a generator
                seeded from that image's `generator` (which is not advanced), so a seeded call is reproducible.
            **generate_kwargs: passed to [`~UAEReconstructionPipeline.generate`] (`height`, `width`,
                `num_inference_steps`, `guidance_scale`, `num_images_per_prompt`, `generator`, `output_type`, ...).

        Examples:
        """
        # 1. Check inputs
        if image is None and captions is None:
            raise ValueError("pass `image` (to caption and reconstruct) or `captions` (to skip captioning)")
        if captions is not None:
            captions = [captions] if isinstance(captions, str) else list(captions)
            for index, caption in enumerate(captions):
                if isinstance(caption, str) and not caption.strip():
                    raise ValueError(
                        f"captions[{index}] is empty or whitespace-only: the decoder draws from the caption alone; "
                        "pass a description, or leave `captions` out to caption `image`"
                    )
            if image is not None and len(captions) != len(images := self._as_image_list(image)):
                raise ValueError(
                    f"`captions` has {len(captions)} entries but `image` has {len(images)}: pass one caption per image"
                )

        # 2. Caption the images with the encoder, each with a generator derived from its noise generator
        if captions is None:
            generator = generate_kwargs.get("generator")
            per_image = generate_kwargs.get("num_images_per_prompt", 1)
            if isinstance(generator, (list, tuple)) and per_image > 1:  # one per output row: an image's first one
                generator = generator[::per_image]
            caption_generator = _derived_generators(generator)
            captions = self.caption(image, instruction, max_new_tokens, do_sample, temperature, top_p,
                                    generator=caption_generator)

        # 3. Reconstruct: encode the captions, denoise, decode
        return self.generate(captions, **generate_kwargs)

    __call__.__doc__ += EXAMPLE_DOC_STRING

    def load_encoder_adapter(self, adapter_path: str, adapter_name: str = "default", **kwargs) -> None:
        """Attach a PEFT adapter folder (`adapter_config.json` + `adapter_model.safetensors`) to the encoder and
        make it active. Captioning and embeddings-mode conditioning then run through it."""
        if not getattr(self.vlm, "peft_config", None):
            # transformers installs checkpoint key renamings for the adapter that would also rename the base
            # weights when saving later: keep what was there to restore it when the last adapter goes
            self._vlm_weight_conversions = vars(self.vlm).get("_weight_conversions", _NOT_SET)
        self.vlm.load_adapter(adapter_path, adapter_name=adapter_name, **kwargs)
        self.vlm.set_adapter(adapter_name)

    def disable_encoder_adapters(self) -> None:
        """Run the encoder's base weights (adapters stay loaded)."""
        self.vlm.disable_adapters()

    def enable_encoder_adapters(self) -> None:
        self.vlm.enable_adapters()

    def unload_encoder_adapter(self, adapter_name: str = "default") -> None:
        """Remove an adapter from the encoder; after the last one, the plain layers are put back."""
        self.vlm.delete_adapter(adapter_name)
        if not getattr(self.vlm, "peft_config", None):
            for name, module in list(self.vlm.named_modules()):
                if _is_adapter_layer(module):
                    parent, _, child = name.rpartition(".")
                    setattr(self.vlm.get_submodule(parent), child, _plain_layer(module))
            self.vlm._hf_peft_config_loaded = False
            vars(self.vlm).pop("peft_config", None)
            saved = getattr(self, "_vlm_weight_conversions", _NOT_SET)
            if saved is _NOT_SET:
                vars(self.vlm).pop("_weight_conversions", None)
            else:
                self.vlm._weight_conversions = saved

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, adapter_name=None, **kwargs):
        """diffusers' SD3 LoRA loading, failing loudly when nothing reaches the decoder transformer.

        A PEFT-format folder (`adapter_model.safetensors`) is not a diffusers LoRA file: diffusers would load nothing
        from it without a word.
        """
        before = set(self.get_list_adapters().get("transformer", []))
        super().load_lora_weights(pretrained_model_name_or_path_or_dict, adapter_name=adapter_name, **kwargs)
        if set(self.get_list_adapters().get("transformer", [])) == before:
            raise ValueError(
                f"no LoRA weights for the decoder transformer were found in {pretrained_model_name_or_path_or_dict!r} "
                f"(weight_name={kwargs.get('weight_name')!r}); pass a diffusers LoRA file such as "
                "`pytorch_lora_weights.safetensors` written by `save_lora_weights`, not a PEFT adapter folder"
            )

    def save_pretrained(self, save_directory, model_card: str | None = None, **kwargs):
        """Save as a self-loading folder: components, this file as `pipeline.py` with its sibling modules, the
        projector's code in its subfolder.

        The folder reloads with `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`, without
        `uae_hf` installed. `model_card` (Markdown with a YAML header), if given, is written as `README.md`. The saved
        configs name their source (`_name_or_path`) only when it is a Hub id, never a folder of this machine.
        """
        if self.vlm is not None and any(_is_adapter_layer(module) for module in self.vlm.modules()):
            raise ValueError(
                "the encoder has PEFT adapters loaded; saving would write the adapter in place of the model. Save the "
                "adapter itself (`pipe.vlm.save_pretrained(dir)`), or merge it first, then unload it"
            )
        if any(_is_adapter_layer(module) for module in self.transformer.modules()):
            raise ValueError(
                "the decoder transformer has LoRA layers loaded; save them with `save_lora_weights`, or "
                "`fuse_lora()` then `unload_lora_weights()` to save merged weights"
            )
        if kwargs.pop("push_to_hub", False):
            raise ValueError("use `push_to_hub(repo_id, model_card=...)` to upload a UAE pipeline")
        super().save_pretrained(save_directory, **kwargs)
        save_directory = Path(save_directory)
        source = Path(inspect.getfile(UAEReconstructionPipeline))
        shutil.copyfile(source, save_directory / "pipeline.py")
        for name in SIBLING_MODULES:
            shutil.copyfile(source.with_name(f"{name}.py"), save_directory / f"{name}.py")
        index_path = save_directory / "model_index.json"
        index = json.loads(index_path.read_text())
        index["_class_name"] = ["pipeline", type(self).__name__]
        if self.projector is not None:
            source = Path(inspect.getfile(type(self.projector)))
            shutil.copyfile(source, save_directory / "projector" / source.name)
            index["projector"] = [source.stem, type(self.projector).__name__]
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        # diffusers writes where the pipeline and each model were loaded from (`_name_or_path`): keep a Hub id, drop
        # a local folder (a path of the machine that saved; a Hub download's is its cache snapshot). Loading never
        # reads it: `from_pretrained` records the folder it loads from.
        from huggingface_hub.errors import HFValidationError
        from huggingface_hub.utils import validate_repo_id

        def is_hub_id(name) -> bool:
            if not isinstance(name, str):
                return False
            try:
                validate_repo_id(name)
            except HFValidationError:
                return False
            return not Path(name).exists()

        for config_path in sorted(save_directory.rglob("*.json")):
            text = config_path.read_text()
            if "name_or_path" not in text:
                continue
            config = json.loads(text)
            if not isinstance(config, dict):
                continue
            local = [key for key in ("_name_or_path", "name_or_path") if key in config and not is_hub_id(config[key])]
            for key in local:
                del config[key]
            if local:  # in the layout diffusers wrote it (key order kept, two-space indent)
                config_path.write_text(json.dumps(config, indent=2) + "\n")
        if model_card is not None:
            (save_directory / "README.md").write_text(model_card)

    def push_to_hub(
        self,
        repo_id: str,
        model_card: str | None = None,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | None = None,
        create_pr: bool = False,
    ) -> str:
        """Upload the self-loading folder (see `save_pretrained`) to the Hub and return the commit URL. Without a
        reachable Hub or an accepted token, raises `ConnectionError` before saving anything."""
        import tempfile

        from huggingface_hub import HfApi

        problem = push_access_problem(token)
        if problem is not None:
            raise ConnectionError(f"cannot push to {repo_id}: {problem}. The pipeline is unchanged; "
                                  "`save_pretrained(folder)` keeps it until you can push")
        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, model_card=model_card)
            return api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                commit_message=commit_message or "Upload UAEReconstructionPipeline",
                create_pr=create_pr,
            )
