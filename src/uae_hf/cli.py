"""The `uae-hf` command line: a thin shell over the library."""

import argparse
import json
import os
import sys
from pathlib import Path

def load_images(paths: list[Path]) -> list:
    """Open every image up front, so a bad file stops the run before any model loads."""
    import PIL.Image

    if not paths:
        raise SystemExit("uae-hf: no images given")
    images = []
    for path in paths:
        try:
            with PIL.Image.open(path) as image:
                image.load()
                images.append(image.copy())
        except (OSError, ValueError, PIL.Image.DecompressionBombError) as error:
            raise SystemExit(f"uae-hf: cannot read image {path}: {error}") from error
    return images


def reconstruct(
    pipeline,
    image_paths: list[Path],
    originals: list,
    output_dir: Path,
    batch_size: int = 4,
    seed: int = 0,
    **generate_kwargs,
) -> list[dict]:
    """Round-trip each image through `pipeline`; write reconstructions, `captions.jsonl` and `grid.png`."""
    import torch
    from tqdm.auto import tqdm

    from .visualization import reconstruction_grid

    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "reconstructions").mkdir(exist_ok=True)
    pipeline.set_progress_bar_config(disable=True)
    rows, reconstructions = [], []
    with tqdm(total=len(originals), desc="reconstructing", unit="image") as progress:
        for start in range(0, len(originals), batch_size):
            batch = originals[start : start + batch_size]
            # one generator per image, seeded by its index: results do not depend on the batch size
            generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(batch))]
            output = pipeline(image=batch, generator=generators, **generate_kwargs)
            for offset, (caption, image) in enumerate(zip(output.captions, output.images)):
                path = image_paths[start + offset]
                target = output_dir / "reconstructions" / f"{path.stem}.png"
                image.save(target)
                reconstructions.append(image)
                rows.append({"image": str(path), "caption": caption, "reconstruction": str(target)})
            progress.update(len(batch))
    with open(output_dir / "captions.jsonl", "w") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    reconstruction_grid(originals, reconstructions, [row["caption"] for row in rows]).save(output_dir / "grid.png")
    return rows


def _generate_kwargs(args) -> dict:
    kwargs = {
        "num_inference_steps": args.num_inference_steps,
        "guidance_scale": args.guidance_scale,
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "do_sample": args.temperature > 0,
    }
    if args.height:
        kwargs["height"] = args.height
    if args.width:
        kwargs["width"] = args.width
    if args.conditioning_mode:
        kwargs["conditioning_mode"] = args.conditioning_mode
    return kwargs


def _add_generation_arguments(parser: argparse.ArgumentParser, steps: int, tokens: int) -> None:
    parser.add_argument("--num-inference-steps", type=int, default=steps, help="decoder sampling steps")
    parser.add_argument("--guidance-scale", type=float, default=5.0, help="classifier-free guidance scale")
    parser.add_argument("--height", type=int, default=None, help="output height (default: the decoder's native size)")
    parser.add_argument("--width", type=int, default=None, help="output width (default: the decoder's native size)")
    parser.add_argument("--max-new-tokens", type=int, default=tokens, help="caption length limit")
    parser.add_argument("--temperature", type=float, default=0.7, help="caption sampling temperature (0: greedy)")
    parser.add_argument(
        "--conditioning-mode", choices=["embeddings", "text"], default=None, help="override the pipeline's mode"
    )
    _add_model_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=4, help="images per pipeline call")
    parser.add_argument("--seed", type=int, default=0, help="noise seed of the first image (image i uses seed + i)")
    parser.add_argument("--encoder-adapter", default=None, metavar="DIR",
                        help="a PEFT adapter folder to load on the encoder (e.g. a stage-2 output)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run the pipeline folder's own code (by default a UAE pipeline is rebuilt from uae_hf's "
                        "classes and no code from the folder or repo runs)")


DTYPES = ("auto", "bfloat16", "float16", "float32")


def _add_model_arguments(parser: argparse.ArgumentParser, device: bool = True) -> None:
    if device:
        parser.add_argument("--device", default=None, help="where the models run (default: cuda when available, else cpu)")
    parser.add_argument("--dtype", choices=DTYPES, default="auto",
                        help="dtype of every model loaded; auto (default): bfloat16 on a GPU, else as stored on disk")


def _device(args) -> str:
    import torch

    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def _torch_dtype(args, device: str = "cpu"):
    """The `--dtype` choice as a `torch.dtype`; `None` (each model as stored) for auto off the GPU."""
    import torch

    if args.dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else None
    return getattr(torch, args.dtype)


def _load_pipeline(args):
    from .pipelines import load_saved_pipeline

    device = _device(args)
    pipeline = load_saved_pipeline(args.pipeline, trust_remote_code=args.trust_remote_code,
                                   torch_dtype=_torch_dtype(args, device))
    if args.encoder_adapter:
        pipeline.load_encoder_adapter(args.encoder_adapter)
    return pipeline.to(device)


def _cmd_tiny_models(args) -> None:
    from .tiny_models import build_tiny_models

    out = build_tiny_models(args.output_dir, with_t5=not args.no_t5)
    print(f"tiny twins written to {out}")


def _cmd_reconstruct(args) -> None:
    paths = [Path(p) for p in args.images]
    originals = load_images(paths)
    pipeline = _load_pipeline(args)
    rows = reconstruct(
        pipeline, paths, originals, Path(args.output_dir), args.batch_size, args.seed, **_generate_kwargs(args)
    )
    for row in rows:
        print(f"{row['image']}: {row['caption']!r}")
    print(f"wrote {len(rows)} reconstructions, captions.jsonl and grid.png to {args.output_dir}")


def _cmd_convert_release(args) -> None:
    from .release import load_uae_release

    pipeline = load_uae_release(args.source, torch_dtype=_torch_dtype(args))
    print(pipeline.release_load_report)  # what llm_lora replaced in llm/, as the release's own code loads it
    pipeline.save_pretrained(args.destination)
    print(f"converted {args.source} into a self-loading pipeline folder: {args.destination}")


def _cmd_demo(args) -> None:
    """The UAE recipe from nothing on the toy world (see `uae_hf.toy_world.demo`)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as error:
        raise SystemExit("uae-hf demo draws its report's plots with matplotlib: pip install 'uae-hf[demo]'") from error
    from .toy_world.demo import demo_config_from_args, run_demo

    config = demo_config_from_args(args)
    results = run_demo(config)
    out = Path(config.output_dir)
    print((out / "report.md").read_text().split("## Plots")[0])
    print(f"report: {out / 'report.md'}; pipeline: {out / 'pipeline'} ({results['timings_s']['total'] / 60:.1f} min)")


def _cmd_bench(args) -> None:
    from .metrics.round_trip_bench import references_from_dataset, references_from_folder, run_bench

    if bool(args.images_dir) == bool(args.dataset):
        raise SystemExit("uae-hf bench: pass exactly one of --images-dir or --dataset")
    if bool(args.pipeline) == bool(args.reconstructions):
        raise SystemExit("uae-hf bench: pass --pipeline (round trip) or --reconstructions (score only), not both")
    try:
        checkpoints = dict(item.split("=", 1) for item in args.checkpoint)
    except ValueError:
        raise SystemExit("uae-hf bench: --checkpoint takes BACKBONE=PATH_OR_ID") from None
    if args.protocol == "official" and args.backbone_dtype != "float32":
        raise SystemExit("uae-hf bench: --protocol official sets the backbones' precision as the official scorer does "
                         "(float32; LongCLIP float16 on CUDA): drop --backbone-dtype")
    try:
        if args.images_dir:
            references = references_from_folder(args.images_dir)
        else:
            references = references_from_dataset(args.dataset, args.split, args.image_column)
    except ValueError as error:
        raise SystemExit(f"uae-hf bench: {error}") from error
    references = references[: args.limit] if args.limit else references
    pipeline = None
    call_kwargs = {}
    if args.pipeline:
        pipeline = _load_pipeline(args)
        call_kwargs = _generate_kwargs(args)
    report = run_bench(
        references, args.output_dir, pipeline=pipeline, reconstructions_dir=args.reconstructions,
        config_name=args.backbones, checkpoints=checkpoints, device=_device(args), dtype=args.backbone_dtype,
        batch_size=args.batch_size, seed=args.seed, protocol=args.protocol, **call_kwargs,
    )
    print(Path(args.output_dir, "scores.md").read_text())
    if report["skipped"]:
        print(f"skipped {len(report['skipped'])} image(s): see scores.json")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="uae-hf", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    tiny = commands.add_parser("tiny-models", help="write the offline tiny twins of every model")
    tiny.add_argument("output_dir", help="folder to write encoder/, decoder/, projector/, backbones/ into")
    tiny.add_argument("--no-t5", action="store_true", help="build the decoder without its optional T5 encoder")
    tiny.set_defaults(func=_cmd_tiny_models)

    rec = commands.add_parser("reconstruct", help="image → caption → image with a saved UAE pipeline")
    rec.add_argument("images", nargs="+", help="image files")
    rec.add_argument("--pipeline", required=True, help="pipeline folder or Hub repo")
    rec.add_argument("--output-dir", required=True, help="where to write reconstructions, captions.jsonl, grid.png")
    _add_generation_arguments(rec, steps=40, tokens=512)
    rec.set_defaults(func=_cmd_reconstruct)

    bench = commands.add_parser("bench", help="Unified-Bench: round trip a set of images, then score and report")
    source = bench.add_argument_group("reference images (one of)")
    source.add_argument("--images-dir", help="a folder of reference images")
    source.add_argument("--dataset", help="a datasets id or local folder with an image column")
    bench.add_argument("--split", default="test", help="dataset split")
    bench.add_argument("--image-column", default="image", help="dataset image column")
    bench.add_argument("--pipeline", help="pipeline folder or Hub repo to round-trip with")
    bench.add_argument("--reconstructions", help="score this folder of reconstructions instead (names match the "
                       "references, optionally with a recon_ prefix)")
    bench.add_argument("--output-dir", required=True, help="where reconstructions and reports go (resumable)")
    bench.add_argument("--backbones", default="default", help='"default" (the paper\'s four) or e.g. "clip+dinov2"')
    bench.add_argument("--checkpoint", action="append", default=[], metavar="BACKBONE=PATH",
                       help="replace a backbone's checkpoint (repeatable)")
    bench.add_argument("--backbone-dtype", choices=DTYPES[1:], default="float32",
                       help="dtype of the scoring backbones (float32, as the official scorer; --dtype sets the pipeline's)")
    bench.add_argument("--protocol", choices=("default", "official"), default="default",
                       help="default: batched, references cached; official: as Unified-Bench's Score_i2i.py (one pair "
                       "at a time, its preprocessing and precision, its pairing and JSON fields in scores.json)")
    bench.add_argument("--limit", type=int, default=None, help="only the first N references")
    _add_generation_arguments(bench, steps=40, tokens=512)
    bench.set_defaults(func=_cmd_bench)

    convert = commands.add_parser("convert-release", help="the released UAE model → a self-loading pipeline folder")
    convert.add_argument("source", help="local copy of the release, or its Hub id (zhiyuanyan1/UAE)")
    convert.add_argument("destination", help="folder to write (loads with DiffusionPipeline.from_pretrained)")
    _add_model_arguments(convert, device=False)
    convert.set_defaults(func=_cmd_convert_release)

    commands.add_parser(
        "train", help="train a UAE stage: uae-hf train --config recipe.yaml [--any_config_field value ...]",
        add_help=False,
    )

    demo = commands.add_parser(
        "demo", help="the whole UAE recipe from nothing on a built-in toy world, with a report (offline, CPU)"
    )
    demo.add_argument("--output-dir", default="outputs/demo", help="where models, stages and the report go")
    demo.add_argument("--quick", action="store_true", help="the same path with tiny budgets (a couple of minutes)")
    for name, help_text in [("seed", "seed of the world, models and stages"),
                            ("pretrain_steps", "decoder pre-training steps"),
                            ("understanding_steps", "stage 2 (GRPO) steps"),
                            ("generation_steps", "stage 3 (Flow-GRPO) steps")]:
        demo.add_argument(f"--{name.replace('_', '-')}", dest=name, type=int, default=None, help=help_text)
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:  # TRL-style: every UnifiedGRPOConfig field from --config YAML or --flags
        from .trainer.train_script import main as train_main

        train_main(argv[1:])
        return
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main(sys.argv[1:])
