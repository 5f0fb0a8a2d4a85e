"""Offline tiny twins of the real architectures, saved in the standard `save_pretrained` layouts.

Every twin uses the same model, tokenizer and processor classes as its real counterpart, so loading a twin by path
runs the code path a Hub checkpoint runs. Weights are random but seeded: building twice gives the same bytes.

Layout written by [`build_tiny_models`]:

    OUT_DIR/encoder                Qwen2.5-VL-Instruct twin (model, tokenizer + chat template, processors)
    OUT_DIR/encoders/qwen3_vl      Qwen3-VL-Instruct twin (interleaved M-RoPE, DeepStack vision features)
    OUT_DIR/encoders/gemma3        Gemma 3 (-it) twin (SigLIP tower, pooled soft image tokens, token_type_ids,
                                   sliding-window layers, a byte-fallback BPE tokenizer like Gemma's)
    OUT_DIR/decoder                StableDiffusion3Pipeline twin (MMDiT with qk-norm + dual attention, VAE,
                                   CLIP-L/G with projection, optional T5)
    OUT_DIR/projector              UAEProjector: encoder hidden size → decoder joint_attention_dim
    OUT_DIR/decoders/flux1         FluxPipeline twin (FLUX.1-dev-like: guidance embedding, double + single blocks,
                                   16-channel VAE, CLIP-L pooled + T5, dynamic shift)
    OUT_DIR/decoders/flux2_klein   Flux2KleinPipeline twin (FLUX.2 [klein] base-like: Flux2 DiT without guidance
                                   embedding, batch-norm VAE, Qwen3 text encoder + chat template, not step-distilled)
    OUT_DIR/decoders/qwen_image    QwenImagePipeline twin (dual-stream DiT, 3-D causal VAE, exponential dynamic shift,
                                   Qwen2.5-VL-Instruct text encoder whose template prefix is Qwen's 34 tokens;
                                   text_encoder/ also holds its processor: an encoder twin)
    OUT_DIR/janus                  JanusForConditionalGeneration twin (Janus-Pro-like: Llama text model, SigLIP-like
                                   understanding tower, VQ model + generation head for image tokens) + JanusProcessor
    OUT_DIR/emu3/{chat,gen}        Emu3ForConditionalGeneration twins (Emu3-Chat-hf / Emu3-Gen-hf-like: one Llama-like
                                   LM over text and VQ image tokens, the same tokenizer, processor and VQ model; the
                                   chat twin captions through a chat template, the gen twin draws image tokens)
    OUT_DIR/backbones/{clip,dinov2,dinov3,longclip,siglip}
"""

from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import diffusers
import huggingface_hub
import torch
import transformers
from diffusers import (
    AutoencoderKL,
    AutoencoderKLFlux2,
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Transformer2DModel,
    FluxPipeline,
    FluxTransformer2DModel,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from tokenizers import pre_tokenizers
from transformers import (
    BitImageProcessor,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    Dinov2Config,
    Dinov2Model,
    DINOv3ViTConfig,
    DINOv3ViTImageProcessor,
    DINOv3ViTModel,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3ImageProcessor,
    Gemma3Processor,
    GemmaTokenizer,
    Emu3Config,
    Emu3ForConditionalGeneration,
    Emu3ImageProcessor,
    Emu3Processor,
    GPT2Tokenizer,
    JanusConfig,
    JanusForConditionalGeneration,
    JanusImageProcessor,
    JanusProcessor,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2Tokenizer,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
    SiglipConfig,
    SiglipImageProcessor,
    SiglipModel,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from .models.projector import UAEProjector

SEED = 0

# Text the twins' tokenizers learn their merges from: UAE-like prompts and the kind of captions the round trip sees.
# Only a training corpus (the first line is an earlier wording of the captioning instruction, not the one in use:
# `CAPTION_INSTRUCTION`); changing any of it changes the merges and so every twin built from them.
_CORPUS = [
    "You are an expert vision-language model. Your task is: Given an input image, generate a textual description "
    'of the image. If there is text in the image, transcribe it inside double quotes "". Now, carefully analyze '
    "the input image and output the full description.",
    "Generate a random, low quality, ugly, blur, bad and anime, cartoon image.",
    "You are a helpful assistant.",
    "A photograph of an astronaut in a white suit standing in front of an American flag, with a space shuttle model.",
    "A close-up of a grey cat with green eyes sitting on a wooden floor next to a red ball of yarn.",
    "A black and white photo of a man holding a camera on a tripod in a grassy field under a cloudy sky.",
    "Several gold coins arranged in rows on a dark background; each coin shows a face and small letters.",
    "A small red circle at the top left of a white image, a large blue square in the center, a green triangle.",
    "The scene is lit from the right; shadows fall to the left. The colours are warm: orange, yellow and brown.",
    "Text in the image reads \"OPEN 24 HOURS\" in bold capital letters above a glass door.",
    "A rocket launching at night, bright flames and smoke below it, stars in the sky, 1 2 3 4 5 6 7 8 9 0.",
    "A bowl of fruit on a table: apples, bananas, grapes and an orange, with a knife and a plate beside it.",
]

# Qwen2.5 special tokens, in the order the real vocabulary appends them after its BPE tokens.
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Same message format as Qwen2.5-VL-Instruct's template: a default system turn, `<|im_start|>ROLE\n...<|im_end|>`
# for any role (UAE's "generate" role included), vision placeholders for images and videos.
QWEN_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

ENCODER_HIDDEN_SIZE = 64
# the decoder twins' VAE layout (SD3's, FLUX.1's and FLUX.2's VAEs take these; each sets its latent channels)
TINY_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 16, 16), layers_per_block=1,
                norm_num_groups=4, sample_size=64)
DECODER_JOINT_ATTENTION_DIM = 64


@contextmanager
def _quietly():
    """transformers' and diffusers' logs and progress bars (one per saved model) off; as they were afterwards.

    The twins are built from known-good configs, so what they would print (shard bars, warnings about the tiny
    vocabularies) says nothing to act on. Also a decorator."""
    hub_bars_off = huggingface_hub.utils.are_progress_bars_disabled()
    saved = [(library.utils.logging, library.utils.logging.get_verbosity(),
              library.utils.logging.is_progress_bar_enabled()) for library in (transformers, diffusers)]
    for logging, _, _ in saved:
        logging.set_verbosity_error()
        logging.disable_progress_bar()
    try:
        yield
    finally:
        for logging, verbosity, bars in saved:
            logging.set_verbosity(verbosity)
            if bars:
                logging.enable_progress_bar()
        # transformers' switch also flips the Hub's bars: put those back as they were too
        if hub_bars_off:
            huggingface_hub.utils.disable_progress_bars()
        else:
            huggingface_hub.utils.enable_progress_bars()


def _train_bpe(num_merges: int, lowercase: bool = False, end_of_word_suffix: str = "", corpus=_CORPUS):
    """Byte-level BPE vocabulary and merges learned from `corpus`.

    A plain greedy learner with ties broken by the pair itself, so the result never depends on hash order.
    """
    splitter = pre_tokenizers.ByteLevel(add_prefix_space=False)
    words = Counter(
        word.replace("Ġ", "") if end_of_word_suffix else word  # CLIP-style: words carry no leading-space marker
        for line in corpus
        for word, _ in splitter.pre_tokenize_str(line.lower() if lowercase else line)
    )
    words.pop("", None)
    segmented = {word: [*word[:-1], word[-1] + end_of_word_suffix] for word in words}
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    word_ends = [char + end_of_word_suffix for char in alphabet] if end_of_word_suffix else []
    vocab = {symbol: index for index, symbol in enumerate(alphabet + word_ends)}
    merges = []
    for _ in range(num_merges):
        pairs = Counter()
        for word, symbols in segmented.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += words[word]
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        vocab.setdefault(best[0] + best[1], len(vocab))
        for word, symbols in segmented.items():
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            segmented[word] = merged
    return vocab, merges


def build_qwen_tokenizer(corpus=_CORPUS, num_merges: int = 300) -> Qwen2Tokenizer:
    vocab, merges = _train_bpe(num_merges=num_merges, corpus=corpus)
    for token in QWEN_SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=merges, errors="replace", eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL_TOKENS[1:]})
    tokenizer.chat_template = QWEN_VL_CHAT_TEMPLATE
    tokenizer.model_max_length = 32768
    return tokenizer


@_quietly()
def build_tiny_encoder(
    path: str | Path,
    corpus=_CORPUS,
    num_merges: int = 300,
    text_config: dict | None = None,
    vision_config: dict | None = None,
    pixel_bounds: tuple[int, int] = (3136, 65536),
) -> None:
    """Qwen2.5-VL-Instruct twin: same classes as `Qwen/Qwen2.5-VL-3B-Instruct`, tied embeddings, M-RoPE.

    `text_config` / `vision_config` override the twin's sizes, `corpus` is what its BPE merges are learned from and
    `pixel_bounds` are the image processor's (min_pixels, max_pixels)."""
    tokenizer = build_qwen_tokenizer(corpus, num_merges)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIAL_TOKENS}
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=ENCODER_HIDDEN_SIZE,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=True,
    ) | (text_config or {})
    vision = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=112,
        out_hidden_size=text["hidden_size"],
        fullatt_block_indexes=[1],
    ) | (vision_config or {})
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    torch.manual_seed(SEED)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    model.generation_config.bos_token_id = ids["<|endoftext|>"]
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(path)

    # By default the paper's captioning resolution bounds (min_pixels=3136, max_pixels=65536).
    image_processor = Qwen2VLImageProcessor(
        size={"shortest_edge": pixel_bounds[0], "longest_edge": pixel_bounds[1]},
        patch_size=vision["patch_size"],
        merge_size=vision["spatial_merge_size"],
        temporal_patch_size=vision["temporal_patch_size"],
    )
    video_processor = Qwen2VLVideoProcessor()
    processor = Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=QWEN_VL_CHAT_TEMPLATE,
    )
    processor.save_pretrained(path)


# Qwen3-VL-Instruct's message format: no default system turn, `<|im_start|>ROLE\n...<|im_end|>` for the system, user and
# assistant roles only (any other role, UAE's "generate" included, renders nothing), vision placeholders as Qwen2.5-VL's.
QWEN3_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] in ('system', 'user', 'assistant') %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@_quietly()
def build_tiny_qwen3_vl_encoder(path: str | Path) -> None:
    """Qwen3-VL-Instruct twin: same classes as `Qwen/Qwen3-VL-4B-Instruct` (interleaved M-RoPE, a vision tower with
    learned position embeddings and DeepStack features merged into the first text layers, 16-pixel patches merged
    2x2, tied embeddings), its generation config's sampling (top-k 20, top-p 0.8) and message format, with the
    Qwen2.5-VL twin's offline BPE vocabulary and the paper's captioning pixel bounds."""
    tokenizer = build_qwen_tokenizer()
    tokenizer.chat_template = QWEN3_VL_CHAT_TEMPLATE
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIAL_TOKENS}
    config = Qwen3VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=ENCODER_HIDDEN_SIZE, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         max_position_embeddings=4096, bos_token_id=ids["<|endoftext|>"],
                         eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], tie_word_embeddings=True,
                         rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [4, 2, 2],
                                          "mrope_interleaved": True}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16,
                           spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=ENCODER_HIDDEN_SIZE,
                           num_position_embeddings=16, deepstack_visual_indexes=[0]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    torch.manual_seed(SEED)
    model = Qwen3VLForConditionalGeneration(config).eval()
    model.generation_config.update(bos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"],
                                   eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]], do_sample=True, top_k=20,
                                   top_p=0.8, temperature=0.7)
    model.save_pretrained(path)
    image_processor = Qwen2VLImageProcessor(size={"shortest_edge": 3136, "longest_edge": 65536}, patch_size=16,
                                            merge_size=2, temporal_patch_size=2, image_mean=[0.5] * 3,
                                            image_std=[0.5] * 3)
    Qwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=Qwen3VLVideoProcessor(),
                     chat_template=QWEN3_VL_CHAT_TEMPLATE).save_pretrained(path)


GEMMA3_HIDDEN_SIZE = 48  # its own, unlike the other encoder twins' 64 (Gemma 3 4B: 2560, Qwen2.5-VL-3B: 2048)
# Gemma 3's special tokens (ids 0-4 as in its vocabulary), turn markers and image tokens (`extra_special_tokens`, which
# Gemma3Processor reads as `boi_token`, `eoi_token` and `image_token`)
GEMMA_SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
GEMMA_IMAGE_TOKENS = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
# Gemma 3's message format: BOS, a system turn folded into the first user turn, user/assistant turns that must
# alternate (any other role is refused), "model" for the assistant, text trimmed, `<start_of_image>` per image.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}{% set turns = messages[1:] %}"
    "{% set prefix = (messages[0]['content'] if messages[0]['content'] is string "
    "else messages[0]['content'][0]['text']) + '\n\n' %}"
    "{% else %}{% set turns = messages %}{% set prefix = '' %}{% endif %}"
    "{% for message in turns %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% if loop.first %}{{ prefix }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<start_of_image>{% elif item['type'] == 'text' %}{{ item['text'] | trim }}"
    "{% endif %}{% endfor %}{% endif %}<end_of_turn>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def build_gemma_tokenizer(num_merges: int = 300) -> GemmaTokenizer:
    """Gemma's tokenizer layout (BPE on text whose spaces are "▁", byte fallback `<0x00>`-`<0xFF>`, BOS added) with the
    byte-level merges learned from the corpus, written in "▁" form."""
    byte_level_vocab, byte_level_merges = _train_bpe(num_merges=num_merges)

    def plain(token: str) -> str:
        return token.replace("Ġ", "▁")  # the corpus is ASCII: its byte-level symbols are its characters, but a space

    tokens = [*GEMMA_SPECIAL_TOKENS, *GEMMA_IMAGE_TOKENS.values(), *(f"<0x{byte:02X}>" for byte in range(256)),
              "▁", *(chr(code) for code in range(33, 127)),
              *(plain(token) for token in byte_level_vocab if len(token) > 1)]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(tokens))}
    merges = [(plain(left), plain(right)) for left, right in byte_level_merges]
    tokenizer = GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, extra_special_tokens=GEMMA_IMAGE_TOKENS)
    tokenizer.add_special_tokens({"additional_special_tokens": GEMMA_SPECIAL_TOKENS[5:]})
    tokenizer.chat_template = GEMMA3_CHAT_TEMPLATE
    return tokenizer


@_quietly()
def build_tiny_gemma3_encoder(path: str | Path) -> None:
    """Gemma 3 twin: same classes as `google/gemma-3-4b-it` (a SigLIP vision tower without its pooling head, image
    features average-pooled to a fixed count of soft tokens, bidirectional attention over each image's tokens through
    `token_type_ids`, sliding-window and global layers, q/k-norm, tied embeddings), its generation config (top-k 64,
    top-p 0.95, stops at `<end_of_turn>`) and message format. 32 x 32 images, 16 tokens each."""
    tokenizer = build_gemma_tokenizer()
    ids = {token: tokenizer.convert_tokens_to_ids(token)
           for token in (*GEMMA_SPECIAL_TOKENS, *GEMMA_IMAGE_TOKENS.values())}
    image_size, tokens_per_image = 32, 16
    config = Gemma3Config(
        # a UAE projector for it is sized from its hidden size (not the tiny projector's 64); heads x head size differ
        # from the hidden size, as in Gemma 3
        text_config=dict(vocab_size=len(tokenizer), hidden_size=GEMMA3_HIDDEN_SIZE, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         query_pre_attn_scalar=16, sliding_window=32, layer_types=["sliding_attention", "full_attention"],
                         max_position_embeddings=4096, pad_token_id=ids["<pad>"], eos_token_id=ids["<eos>"],
                         bos_token_id=ids["<bos>"], tie_word_embeddings=True,
                         rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                          "full_attention": {"rope_type": "linear", "factor": 8.0,
                                                             "rope_theta": 1000000.0}}),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=image_size, patch_size=4, vision_use_head=False),
        mm_tokens_per_image=tokens_per_image, boi_token_index=ids["<start_of_image>"],
        eoi_token_index=ids["<end_of_image>"], image_token_index=ids["<image_soft_token>"], tie_word_embeddings=True,
    )
    torch.manual_seed(SEED)
    model = Gemma3ForConditionalGeneration(config).eval()
    # Gemma 3 initialises the image-to-text projection at zero: images would not reach a random twin's captions
    torch.nn.init.normal_(model.model.multi_modal_projector.mm_input_projection_weight, std=0.1)
    model.generation_config.update(bos_token_id=ids["<bos>"], pad_token_id=ids["<pad>"],
                                   eos_token_id=[ids["<eos>"], ids["<end_of_turn>"]], do_sample=True, top_k=64,
                                   top_p=0.95)
    model.save_pretrained(path)
    image_processor = Gemma3ImageProcessor(size={"height": image_size, "width": image_size}, image_mean=[0.5] * 3,
                                           image_std=[0.5] * 3, resample=2)
    Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer, chat_template=GEMMA3_CHAT_TEMPLATE,
                    image_seq_length=tokens_per_image).save_pretrained(path)


def _clip_tokenizer(model_max_length: int) -> CLIPTokenizer:
    vocab, merges = _train_bpe(num_merges=200, lowercase=True, end_of_word_suffix="</w>")
    for token in ("<|startoftext|>", "<|endoftext|>"):
        vocab[token] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges)
    tokenizer.model_max_length = model_max_length
    return tokenizer


def _t5_tokenizer() -> T5Tokenizer:
    """Unigram vocabulary: every corpus word as a piece, plus single characters so any text encodes."""
    words = sorted({word for line in _CORPUS for word in line.split()})
    chars = sorted({char for line in _CORPUS for char in line if not char.isspace()})
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(f"▁{word}", -5.0) for word in words]
    pieces += [(char, -10.0) for char in chars] + [(f"▁{char}", -10.0) for char in chars]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def _clip_text_encoder(tokenizer: CLIPTokenizer, hidden_size: int, projection_dim: int,
                       model_class=CLIPTextModelWithProjection) -> CLIPTextModel | CLIPTextModelWithProjection:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=projection_dim,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_act="gelu",
    )
    torch.manual_seed(SEED)
    return model_class(config).eval()


@_quietly()
def build_tiny_decoder(
    path: str | Path, with_t5: bool = True, transformer_config: dict | None = None, vae: AutoencoderKL | None = None
) -> None:
    """SD3.5 twin: MMDiT (qk RMS-norm, dual attention in the first block), 16-channel VAE, CLIP-L/G (+ T5).

    `transformer_config` overrides the MMDiT's sizes; `vae` replaces the random 16-channel VAE (e.g. a trained one).
    """
    tokenizer, tokenizer_2 = _clip_tokenizer(77), _clip_tokenizer(77)
    text_encoder = _clip_text_encoder(tokenizer, hidden_size=32, projection_dim=32)  # CLIP-L stand-in
    text_encoder_2 = _clip_text_encoder(tokenizer_2, hidden_size=32, projection_dim=32)  # CLIP-G stand-in
    tokenizer_3 = text_encoder_3 = None
    if with_t5:
        tokenizer_3 = _t5_tokenizer()
        torch.manual_seed(SEED)
        text_encoder_3 = T5EncoderModel(
            T5Config(
                vocab_size=len(tokenizer_3),
                d_model=DECODER_JOINT_ATTENTION_DIM,
                d_kv=16,
                d_ff=128,
                num_layers=2,
                num_heads=4,
                relative_attention_num_buckets=8,
                decoder_start_token_id=0,
            )
        ).eval()
    torch.manual_seed(SEED)
    transformer = SD3Transformer2DModel(
        **dict(
            sample_size=16,
            patch_size=2,
            in_channels=16,
            num_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=DECODER_JOINT_ATTENTION_DIM,
            caption_projection_dim=32,
            pooled_projection_dim=64,  # CLIP-L + CLIP-G projections
            out_channels=16,
            pos_embed_max_size=32,
            dual_attention_layers=(0,),
            qk_norm="rms_norm",
        )
        | (transformer_config or {})
    ).eval()
    torch.manual_seed(SEED)
    vae = vae or AutoencoderKL(
        **TINY_VAE,
        latent_channels=16,
        scaling_factor=1.5305,
        shift_factor=0.0609,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ).eval()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
    pipe.save_pretrained(path)


@_quietly()
def build_tiny_flux_decoder(path: str | Path) -> None:
    """FLUX.1-dev twin: `FluxTransformer2DModel` with the guidance embedding (one double and one single block), a
    16-channel VAE with FLUX's scaling and shift, CLIP-L (`CLIPTextModel`, pooled) and T5, FLUX.1-dev's dynamically
    shifted scheduler."""
    tokenizer, tokenizer_2 = _clip_tokenizer(77), _t5_tokenizer()
    text_encoder = _clip_text_encoder(tokenizer, hidden_size=32, projection_dim=32, model_class=CLIPTextModel)
    torch.manual_seed(SEED)
    text_encoder_2 = T5EncoderModel(
        T5Config(vocab_size=len(tokenizer_2), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                 relative_attention_num_buckets=8, decoder_start_token_id=0)
    ).eval()
    torch.manual_seed(SEED)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,  # 16 latent channels, packed 2x2
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,  # T5's d_model
        pooled_projection_dim=32,  # CLIP's hidden size
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    ).eval()
    torch.manual_seed(SEED)
    vae = AutoencoderKL(
        **TINY_VAE,
        latent_channels=16,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5,
        max_shift=1.15,
    )
    FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                 text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer).save_pretrained(path)


# Qwen3's chat template for one plain turn per message (no tools): no default system turn, and with
# `enable_thinking=False` an empty thinking block opens the assistant's turn, as FLUX.2 [klein] reads prompts.
QWEN3_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
FLUX2_KLEIN_TEXT_LAYERS = 28  # FLUX.2 [klein] stacks Qwen3's hidden states 9, 18 and 27: all intermediate here


@_quietly()
def build_tiny_flux2_klein_decoder(path: str | Path, is_distilled: bool = False) -> None:
    """FLUX.2 [klein] twin: `Flux2Transformer2DModel` without a guidance embedding (two double- and two
    single-stream blocks), `AutoencoderKLFlux2` (4 latent channels, 16 after 2x2 patchify, seeded batch-norm
    statistics), a Qwen3 text encoder (`Qwen3ForCausalLM`, tied embeddings, q/k-norm) with Qwen3's chat template
    and thinking tokens, the dynamically shifted scheduler. `is_distilled`: a step-distilled checkpoint (no CFG)."""
    tokenizer = build_qwen_tokenizer(num_merges=200)
    tokenizer.add_tokens(["<think>", "</think>"])
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    hidden = 16  # small: 28 layers read 512 tokens per caption
    torch.manual_seed(SEED)
    text_encoder = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=32, num_hidden_layers=FLUX2_KLEIN_TEXT_LAYERS,
        num_attention_heads=1, num_key_value_heads=1, head_dim=16, max_position_embeddings=1024,
        initializer_range=0.5,  # hidden states of a size that moves the DiT (at 0.02 captions barely would)
        tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )).eval()
    torch.manual_seed(SEED)
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels, patchified 2x2
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=3 * hidden,  # three Qwen3 layers stacked
        timestep_guidance_channels=32,
        axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=False,
    ).eval()
    torch.manual_seed(SEED)
    vae = AutoencoderKLFlux2(**TINY_VAE, latent_channels=4).eval()
    vae.bn.running_mean.copy_(0.5 * torch.randn(vae.bn.num_features))  # so that de-normalising is not the identity
    vae.bn.running_var.copy_(0.5 + torch.rand(vae.bn.num_features))
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5,
        max_shift=1.15,
    )
    Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                       transformer=transformer, is_distilled=is_distilled).save_pretrained(path)


@_quietly()
def build_tiny_qwen_image_decoder(path: str | Path) -> None:
    """Qwen-Image twin: `QwenImageTransformer2DModel` (two dual-stream blocks, 3-axis RoPE, no guidance embedding),
    the 3-D causal VAE (16 latent channels with Qwen-Image's `latents_mean`/`latents_std`, 8x spatial downsampling),
    Qwen-Image's scheduler (resolution-dependent exponential shift, terminal sigma 0.02) and a Qwen2.5-VL-Instruct
    text encoder whose BPE learnt the pipeline's prompt template: its system turn is the very
    `prompt_template_encode_start_idx` tokens the pipeline drops, as with Qwen2.5-VL's own vocabulary.

    `text_encoder/` holds a whole encoder twin (model and processor, as [`build_tiny_encoder`] writes one), so
    `AutoModelForImageTextToText` / `AutoProcessor` load it as the VLM that a pipeline built with
    `text_encoder=<that VLM>` shares with the encoder being trained."""
    path = Path(path)
    template = QwenImagePipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None,
                                 transformer=None).prompt_template_encode
    # the template's words learnt whole (the corpus runs out of pairs before 1000 merges)
    corpus = [*_CORPUS, template.replace("<|im_start|>", "").replace("<|im_end|>", "").format("")]
    build_tiny_encoder(path / "text_encoder", corpus=corpus, num_merges=1000)
    text_encoder = Qwen2_5_VLForConditionalGeneration.from_pretrained(path / "text_encoder").eval()
    torch.manual_seed(SEED)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=64,  # 16 latent channels, packed 2x2
        out_channels=16,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=ENCODER_HIDDEN_SIZE,  # the text encoder's hidden size
        axes_dims_rope=(4, 6, 6),
    ).eval()
    torch.manual_seed(SEED)
    vae = AutoencoderKLQwenImage(base_dim=4, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                 temperal_downsample=[False, True, True]).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=1.0, use_dynamic_shifting=True, base_image_seq_len=256, max_image_seq_len=8192, base_shift=0.5,
        max_shift=0.9, shift_terminal=0.02, time_shift_type="exponential",
    )
    QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                      tokenizer=Qwen2Tokenizer.from_pretrained(path / "text_encoder"),
                      transformer=transformer).save_pretrained(path)


# DeepSeek's special tokens as Janus-Pro's tokenizer names them, and its image tokens (`extra_special_tokens`, which
# JanusProcessor reads as `image_token`, `boi_token`, `eoi_token`)
JANUS_BOS, JANUS_EOS, JANUS_PAD = "<\uff5cbegin\u2581of\u2581sentence\uff5c>", "<\uff5cend\u2581of\u2581sentence\uff5c>", "<\uff5c\u2581pad\u2581\uff5c>"
JANUS_IMAGE_TOKENS = {"image_token": "<image_placeholder>", "boi_token": "<begin_of_image>", "eoi_token": "<end_of_image>"}
# Janus-Pro's message format: "<|User|>: {text}\n<image_placeholder>\n\n<|Assistant|>:" (contents in order, text trimmed)
JANUS_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}<|User|>: {% elif message['role'] == 'assistant' %}<|Assistant|>: "
    "{% else %}{{ message['role'] | capitalize }}: {% endif %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{% if not loop.first %}\n{% endif %}<image_placeholder>"
    "{% if not loop.last %}\n{% endif %}"
    "{% elif content['type'] == 'text' %}{{ content['text'] | trim }}{% endif %}"
    "{% endfor %}"
    "{% if message['role'] == 'user' %}\n\n{% else %}" + JANUS_EOS + "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|Assistant|>:{% endif %}"
)


@_quietly()
def build_tiny_janus(path: str | Path) -> None:
    """Janus-Pro twin: `JanusForConditionalGeneration` + `JanusProcessor` as `deepseek-community/Janus-Pro-1B` ships
    them (its default system prompt for understanding, images normalised to [-1, 1], the generation config's CFG
    weight 5, temperature 1 and begin-of-image token), with a byte-level BPE tokenizer learned offline that prepends
    BOS as DeepSeek's does. Understanding reads 64 x 64 images as 8 x 8 patches; generation draws 8 x 8 tokens from a
    64-code VQ model (one residual block per decoder level, none in its unused encoder), decoded 4x up to 32 x 32
    pixels."""
    vocab, merges = _train_bpe(num_merges=300)
    roles = ["<|User|>", "<|Assistant|>"]
    for token in (JANUS_BOS, JANUS_EOS, JANUS_PAD, *roles, *JANUS_IMAGE_TOKENS.values()):
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, bos_token=JANUS_BOS, eos_token=JANUS_EOS, pad_token=JANUS_PAD,
                               unk_token=None, add_bos_token=True, extra_special_tokens=JANUS_IMAGE_TOKENS)
    tokenizer.add_special_tokens({"additional_special_tokens": roles})
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in (JANUS_BOS, JANUS_EOS, JANUS_PAD)}
    image_size, patch_size = 64, 8
    config = JanusConfig(
        text_config=dict(model_type="llama", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, bos_token_id=ids[JANUS_BOS], eos_token_id=ids[JANUS_EOS],
                         pad_token_id=ids[JANUS_PAD], tie_word_embeddings=False),
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2,
                           image_size=image_size, patch_size=patch_size, projection_dim=32, depth=2,
                           num_image_tokens=(image_size // patch_size) ** 2),
        # GroupNorm with 32 groups: every VQ channel count a multiple of 32
        vq_config=dict(embed_dim=8, num_embeddings=64, latent_channels=32, base_channels=32,
                       channel_multiplier=[1, 1, 1], num_res_blocks=0, projection_dim=32, image_token_embed_dim=32),
        image_token_id=tokenizer.convert_tokens_to_ids(JANUS_IMAGE_TOKENS["image_token"]),
        tie_word_embeddings=False,
    )
    torch.manual_seed(SEED)
    model = JanusForConditionalGeneration(config).eval()
    generation = model.generation_config
    generation._from_model_config = False  # else the custom generation_kwargs are dropped on loading
    generation.update(temperature=1.0, guidance_scale=5.0, pad_token_id=ids[JANUS_PAD], bos_token_id=ids[JANUS_BOS],
                      eos_token_id=ids[JANUS_EOS])
    generation.generation_kwargs = {"boi_token_id": tokenizer.convert_tokens_to_ids(JANUS_IMAGE_TOKENS["boi_token"])}
    model.save_pretrained(path)
    image_processor = JanusImageProcessor(size={"height": image_size, "width": image_size}, image_mean=[0.5] * 3,
                                          image_std=[0.5] * 3)
    JanusProcessor(image_processor, tokenizer, chat_template=JANUS_CHAT_TEMPLATE, use_default_system_prompt=True,
                   num_image_tokens=config.vision_config.num_image_tokens).save_pretrained(path)


# Emu3's special tokens as BAAI's converted tokenizer names them (tiktoken's extra tokens; the processor reads the image
# ones from `extra_special_tokens`), and the VQ codes' BPE names, which `Emu3ImageVocabularyMapping` parses
EMU3_BOS, EMU3_EOS, EMU3_PAD, EMU3_EOL = "<|extra_203|>", "<|extra_204|>", "<|endoftext|>", "<|extra_200|>"
EMU3_IMAGE_TOKENS = {"image_token": "<image>", "boi_token": "<|image start|>", "eoi_token": "<|image end|>",
                     "image_wrapper_token": "<|image token|>", "eof_token": "<|extra_201|>"}
# Emu3-Chat's message format: "USER: <image>{text} ASSISTANT:" (a system turn's text with no role; images first)
EMU3_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'] | upper }}: {% endif %}"
    "{% for content in message['content'] if content['type'] == 'image' %}<image>{% endfor %}"
    "{% for content in message['content'] if content['type'] == 'text' %}{{ content['text'] }} {% endfor %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def _emu3_tokenizer(codebook_size: int) -> GPT2Tokenizer:
    vocab, merges = _train_bpe(num_merges=300)
    for token in (EMU3_PAD, EMU3_BOS, EMU3_EOS, EMU3_EOL, *EMU3_IMAGE_TOKENS.values()):
        vocab[token] = len(vocab)
    for code in range(codebook_size):
        vocab[f"<|visual token {code:06d}|>"] = len(vocab)
    special = [EMU3_EOL, *(f"<|visual token {code:06d}|>" for code in range(codebook_size))]
    tokenizer = GPT2Tokenizer(vocab=vocab, merges=merges, bos_token=EMU3_BOS, eos_token=EMU3_EOS, pad_token=EMU3_PAD,
                              unk_token=None, add_prefix_space=False, extra_special_tokens=EMU3_IMAGE_TOKENS)
    tokenizer.add_special_tokens({"additional_special_tokens": special})
    return tokenizer


@_quietly()
def build_tiny_emu3(path: str | Path) -> None:
    """Emu3 twins, as `BAAI/Emu3-Chat-hf` and `BAAI/Emu3-Gen-hf` ship them: two `Emu3ForConditionalGeneration`
    checkpoints (seeded differently) with one byte-level BPE tokenizer learned offline (BAAI's special tokens, a
    64-code visual vocabulary), one `Emu3Processor` and one VQ model shape. The VQ model downsamples 8x as Emu3's does
    (the processor's fixed ratio), with the fewest residual blocks it allows and no temporal downsampling (Emu3's is
    4, for video); understanding reads images of 32 x 32 to 64 x 64 pixels (4 x 4 to 8 x 8 codes). `path/chat` has Emu3-Chat's
    chat template; `path/gen` draws at whatever size its caller asks (Emu3-Gen's processor default is 720 x 720)."""
    codebook_size = 64
    tokenizer = _emu3_tokenizer(codebook_size)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in (EMU3_BOS, EMU3_EOS, EMU3_PAD)}
    config = Emu3Config(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=ids[EMU3_BOS], eos_token_id=ids[EMU3_EOS], pad_token_id=ids[EMU3_PAD]),
        # GroupNorm with 32 groups: every VQ channel count a multiple of 32
        vq_config=dict(codebook_size=codebook_size, embed_dim=4, latent_channels=4, base_channels=32,
                       channel_multiplier=[1, 1, 1, 1], num_res_blocks=0, attn_resolutions=[],
                       temporal_downsample_factor=1, hidden_size=32),
        vocabulary_map=tokenizer.get_vocab(),
        tie_word_embeddings=False,
    )
    image_processor = Emu3ImageProcessor(min_pixels=32 * 32, max_pixels=64 * 64, spatial_factor=8)
    for seed, name, template in ((SEED, "chat", EMU3_CHAT_TEMPLATE), (SEED + 1, "gen", None)):
        torch.manual_seed(seed)
        model = Emu3ForConditionalGeneration(config).eval()
        model.generation_config.update(pad_token_id=ids[EMU3_PAD], bos_token_id=ids[EMU3_BOS],
                                       eos_token_id=ids[EMU3_EOS])
        model.save_pretrained(Path(path, name))
        Emu3Processor(image_processor, tokenizer, chat_template=template).save_pretrained(Path(path, name))


@_quietly()
def build_tiny_projector(
    path: str | Path, encoder_hidden_size: int = ENCODER_HIDDEN_SIZE, joint_attention_dim: int = DECODER_JOINT_ATTENTION_DIM
) -> None:
    torch.manual_seed(SEED)
    UAEProjector(encoder_hidden_size, 4 * encoder_hidden_size, joint_attention_dim).save_pretrained(path)


_CLIP_MEAN, _CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
_IMAGENET_MEAN, _IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
_TINY_VIT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


def _build_clip_backbone(path: Path, text_positions: int) -> None:
    tokenizer = _clip_tokenizer(text_positions)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            max_position_embeddings=text_positions,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **_TINY_VIT,
        ),
        vision_config=dict(image_size=224, patch_size=32, projection_dim=16, **_TINY_VIT),
        projection_dim=16,
    )
    torch.manual_seed(SEED)
    CLIPModel(config).eval().save_pretrained(path)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 224},
        crop_size={"height": 224, "width": 224},
        image_mean=_CLIP_MEAN,
        image_std=_CLIP_STD,
        resample=3,
    )
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)


@_quietly()
def build_tiny_backbones(path: str | Path) -> None:
    """Image-embedding backbones with the real classes and preprocessing (CLIP, DINOv2, DINOv3, LongCLIP, SigLIP)."""
    path = Path(path)
    _build_clip_backbone(path / "clip", text_positions=77)
    _build_clip_backbone(path / "longclip", text_positions=248)  # LongCLIP: CLIP layout, 248 text positions

    torch.manual_seed(SEED)
    Dinov2Model(Dinov2Config(image_size=224, patch_size=14, mlp_ratio=2, **_without_intermediate())).eval().save_pretrained(
        path / "dinov2"
    )
    BitImageProcessor(
        size={"shortest_edge": 256},
        crop_size={"height": 224, "width": 224},
        do_center_crop=True,
        resample=3,
        image_mean=_IMAGENET_MEAN,
        image_std=_IMAGENET_STD,
    ).save_pretrained(path / "dinov2")

    torch.manual_seed(SEED)
    DINOv3ViTModel(DINOv3ViTConfig(image_size=224, patch_size=16, num_register_tokens=4, **_TINY_VIT)).eval().save_pretrained(
        path / "dinov3"
    )
    DINOv3ViTImageProcessor(
        size={"height": 224, "width": 224}, image_mean=_IMAGENET_MEAN, image_std=_IMAGENET_STD
    ).save_pretrained(path / "dinov3")

    torch.manual_seed(SEED)
    siglip = SiglipConfig(
        text_config=dict(
            vocab_size=256, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, **_TINY_VIT
        ),
        vision_config=dict(image_size=224, patch_size=16, **_TINY_VIT),
    )
    SiglipModel(siglip).eval().save_pretrained(path / "siglip")
    SiglipImageProcessor(size={"height": 224, "width": 224}).save_pretrained(path / "siglip")


def _without_intermediate() -> dict:
    return {key: value for key, value in _TINY_VIT.items() if key != "intermediate_size"}


@_quietly()
def build_tiny_models(out_dir: str | Path, with_t5: bool = True) -> Path:
    """Write every twin under `out_dir` (see the module docstring for the layout) and return it."""
    out_dir = Path(out_dir)
    build_tiny_encoder(out_dir / "encoder")
    build_tiny_qwen3_vl_encoder(out_dir / "encoders" / "qwen3_vl")
    build_tiny_gemma3_encoder(out_dir / "encoders" / "gemma3")
    build_tiny_decoder(out_dir / "decoder", with_t5=with_t5)
    build_tiny_projector(out_dir / "projector")
    build_tiny_flux_decoder(out_dir / "decoders" / "flux1")
    build_tiny_flux2_klein_decoder(out_dir / "decoders" / "flux2_klein")
    build_tiny_qwen_image_decoder(out_dir / "decoders" / "qwen_image")
    build_tiny_janus(out_dir / "janus")
    build_tiny_emu3(out_dir / "emu3")
    build_tiny_backbones(out_dir / "backbones")
    return out_dir
