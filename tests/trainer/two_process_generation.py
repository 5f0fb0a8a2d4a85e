"""Run by test_two_processes_end_with_identical_decoder_weights under torch.distributed.run (2 CPU processes, gloo)."""

import os
import sys

from safetensors.torch import save_file

from uae_hf import UnifiedGRPOConfig, UnifiedGRPOTrainer, load_uae_pipeline
from uae_hf.sample_data import skimage_photos

tiny_dir, out = sys.argv[1], sys.argv[2]
rank = int(os.environ["RANK"])
pipe = load_uae_pipeline(f"{tiny_dir}/decoder", f"{tiny_dir}/encoder", f"{tiny_dir}/projector")
args = UnifiedGRPOConfig(
    stage="generation", output_dir=f"{out}/run", max_steps=3, per_device_train_batch_size=4, num_generations=4,
    max_completion_length=8, learning_rate=5e-2, logging_steps=1, report_to=[], use_cpu=True, seed=0,
    save_strategy="no", decoder_height=64, decoder_width=64, decoder_num_inference_steps=3, ddp_backend="gloo",
    backbone_checkpoints={"clip": f"{tiny_dir}/backbones/clip"}, decoder_lora_r=4, decoder_lora_alpha=8,
    log_reconstructions_steps=0, bf16=False,
)
trainer = UnifiedGRPOTrainer(model=pipe.vlm, decoder=pipe, args=args, train_dataset=skimage_photos(32),
                             processing_class=pipe.processor)


def lora_weights():
    return {name: p.detach().clone().contiguous() for name, p in pipe.transformer.named_parameters() if "lora" in name}


save_file(lora_weights(), f"{out}/initial{rank}.safetensors")
trainer.train()
save_file(lora_weights(), f"{out}/rank{rank}.safetensors")
