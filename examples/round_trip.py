"""Image → caption → image with a UAE pipeline assembled from its parts.

Real run (GPU, Hub access; the projector must be a trained UAEProjector folder):

    python examples/round_trip.py photo.jpg --projector path/to/projector          # bf16 on the GPU

Offline with the tiny twins (`uae-hf tiny-models twins`):

    python examples/round_trip.py photo.jpg --decoder twins/decoder --encoder twins/encoder \
        --projector twins/projector --steps 4 --max-new-tokens 16
"""

import argparse

import PIL.Image
import torch

from uae_hf import load_uae_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+")
    parser.add_argument("--decoder", default="stabilityai/stable-diffusion-3.5-large")
    parser.add_argument("--encoder", default="Qwen/Qwen2.5-VL-3B-Instruct")
    parser.add_argument("--projector", required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="default: bfloat16 on a GPU, else each model as stored")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--output-prefix", default="reconstruction")
    args = parser.parse_args()

    dtype = getattr(torch, args.dtype) if args.dtype else torch.bfloat16 if args.device.startswith("cuda") else None
    pipe = load_uae_pipeline(args.decoder, args.encoder, args.projector, torch_dtype=dtype)
    pipe.to(args.device)
    images = [PIL.Image.open(path) for path in args.images]
    generators = [torch.Generator().manual_seed(i) for i in range(len(images))]
    out = pipe(image=images, generator=generators, num_inference_steps=args.steps, max_new_tokens=args.max_new_tokens)
    for index, (caption, image) in enumerate(zip(out.captions, out.images)):
        image.save(f"{args.output_prefix}-{index}.png")
        print(f"{args.images[index]} → {caption!r} → {args.output_prefix}-{index}.png")


if __name__ == "__main__":
    main()
