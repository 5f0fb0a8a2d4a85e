"""A UAE pipeline's frozen models sharded for inference on several processes (run by
tests/trainer/test_multi_process.py as a run of the DDP launch, CPU, gloo) compute what they compute whole: each
process captions its own photo with the encoder (seeded sampling, with a different length limit per process, so that one
process's generation ends before the other's) and redraws it from that caption in both conditioning modes (the
LLM's hidden states through the projector; SD3's CLIP text encoders), whole and then sharded.

Usage: sharded_inference.py TINY_MODELS_DIR OUTPUT_DIR
"""

import json
import os
import sys

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from uae_hf import load_uae_pipeline
from uae_hf.pipelines.uae_reconstruction.captioning import caption_images
from uae_hf.sample_data import skimage_photos
from uae_hf.trainer.frozen_sharding import decoder_models, shard_for_inference

tiny_dir, out = sys.argv[1:3]
dist.init_process_group("gloo")
rank = dist.get_rank()
pipe = load_uae_pipeline(f"{tiny_dir}/decoder", f"{tiny_dir}/encoder", f"{tiny_dir}/projector")
pipe.set_progress_bar_config(disable=True)
photo = [skimage_photos(32)[rank]["image"]]


def round_trip(**generate_kwargs) -> dict:
    caption = caption_images(pipe.vlm, pipe.processor, photo, max_new_tokens=4 + 8 * rank, do_sample=True,
                             temperature=1.0, generator=torch.Generator().manual_seed(rank), **generate_kwargs)
    images = {mode: pipe.generate(caption, height=32, width=32, num_inference_steps=2, conditioning_mode=mode,
                                  generator=torch.Generator().manual_seed(0), output_type="np").images
              for mode in ("embeddings", "text")}
    return {"caption": caption, "images": images}


whole = round_trip()
models = {name: model for name, model in decoder_models(pipe).items() if model is not None}
for name, model in models.items():
    shard_for_inference(model.requires_grad_(False), methods=("encode", "decode") if name == "vae" else ())
sharded = round_trip(synced_gpus=True)  # a sharded model gathers its weights with every process at each token
os.makedirs(out, exist_ok=True)
with open(f"{out}/rank{rank}.json", "w") as file:
    json.dump({
        "captions": [whole["caption"], sharded["caption"]],
        "max_image_difference": {mode: float(np.abs(whole["images"][mode] - sharded["images"][mode]).max())
                                 for mode in whole["images"]},
        "sharded": {name: all(isinstance(p, DTensor) for p in model.parameters()) for name, model in models.items()},
        "local_share": {name: sum(p.to_local().numel() for p in model.parameters())
                        / sum(p.numel() for p in model.parameters()) for name, model in models.items()},
    }, file)
dist.destroy_process_group()
