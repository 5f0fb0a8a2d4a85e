"""Unified-Bench for any unified model: the Janus and Emu3 systems round-trip seeded per image, `uae-hf bench
--system` records, resumes and refuses stale reuse per system, and `--compare` puts runs of several systems in one
table and one grid, refusing runs that do not compare."""

import json
import re

import numpy as np
import PIL.Image
import pytest
import torch

from uae_hf import Emu3RoundTrip, JanusRoundTrip
from uae_hf.cli import BENCH_SYSTEMS, main
from uae_hf.round_trip import ROUND_TRIP_SYSTEMS, round_trip

CAPTION = dict(max_new_tokens=6)


@pytest.fixture(scope="session")
def janus(tiny_dir):
    return JanusRoundTrip.from_pretrained(tiny_dir / "janus")


@pytest.fixture(scope="session")
def emu3(tiny_dir):
    return Emu3RoundTrip.from_pretrained(tiny_dir / "emu3" / "chat", tiny_dir / "emu3" / "gen")


EMU3_SIZE = dict(height=32, width=48)  # 4 x 6 image tokens


@pytest.fixture(scope="session")
def references(photos, tmp_path_factory):
    folder = tmp_path_factory.mktemp("references")
    for name, photo in zip(("astronaut", "coffee", "chelsea"), photos):
        photo.save(folder / f"{name}.png")
    return folder


@pytest.fixture(scope="session")
def bench(references, backbone_checkpoints):
    """`uae-hf bench` on the reference photos, scored with the CLIP twin; returns the command's start."""

    def command(out, *args, backbones="clip"):
        checkpoints = [arg for name in backbones.split("+") for arg in
                       ("--checkpoint", f"{name}={backbone_checkpoints[name]}")]
        return ["bench", "--images-dir", str(references), "--output-dir", str(out), "--backbones", backbones,
                *checkpoints, "--max-new-tokens", "6", "--num-inference-steps", "2", *args]

    return command


def _arrays(images):
    return [np.asarray(image) for image in images]


def test_janus_round_trip_is_seeded_per_image_whatever_the_batch(janus, photos):
    """Image i's caption and image depend on its generator alone: the batch of three, the loop two at a time and
    each image alone give the same captions and pixels; another seed gives another image."""
    batch = janus(image=photos, generator=[torch.Generator().manual_seed(5 + i) for i in range(3)], **CAPTION)
    assert len(set(batch.captions)) == 3 and all(batch.captions)
    assert [image.size for image in batch.images] == [(32, 32)] * 3  # the twin's 8 x 8 tokens, decoded 4x
    looped = list(round_trip(janus, photos, batch_size=2, seed=5, **CAPTION))
    assert [item.caption for item in looped] == batch.captions
    alone = janus(image=photos[1:2], generator=[torch.Generator().manual_seed(6)], **CAPTION)
    assert alone.captions == batch.captions[1:2]
    for got, want in zip(_arrays([item.reconstruction for item in looped]) + _arrays(alone.images),
                         _arrays(batch.images) + _arrays(batch.images[1:2])):
        np.testing.assert_array_equal(got, want)
    other = janus.generate(batch.captions[:1], generator=[torch.Generator().manual_seed(99)])
    assert not np.array_equal(_arrays(other.images)[0], _arrays(batch.images)[0])
    with pytest.raises(ValueError, match="always runs classifier-free guidance"):
        janus.generate(batch.captions[:1], guidance_scale=1.0)


def test_emu3_round_trip_is_seeded_per_image_whatever_the_batch(emu3, photos):
    """Emu3-Chat captions, Emu3-Gen draws at the size asked, each image from its generator alone: the batch of three,
    the loop two at a time and each image alone agree; the drawn tokens keep Emu3's layout (rows closed by an
    end-of-line token, then end-of-frame, end-of-image, end-of-sequence)."""
    batch = emu3(image=photos, generator=[torch.Generator().manual_seed(5 + i) for i in range(3)], **CAPTION,
                 **EMU3_SIZE)
    assert len(set(batch.captions)) == 3 and all(batch.captions)
    assert [image.size for image in batch.images] == [(48, 32)] * 3
    looped = list(round_trip(emu3, photos, batch_size=2, seed=5, **CAPTION, **EMU3_SIZE))
    assert [item.caption for item in looped] == batch.captions
    alone = emu3(image=photos[2:], generator=[torch.Generator().manual_seed(7)], **CAPTION, **EMU3_SIZE)
    assert alone.captions == batch.captions[2:]
    for got, want in zip(_arrays([item.reconstruction for item in looped]) + _arrays(alone.images),
                         _arrays(batch.images) + _arrays(batch.images[2:])):
        np.testing.assert_array_equal(got, want)
    other = emu3.generate(batch.captions[:1], generator=[torch.Generator().manual_seed(99)], **EMU3_SIZE)
    assert not np.array_equal(_arrays(other.images)[0], _arrays(batch.images)[0])

    from uae_hf.emu3_round_trip import _ImageTokenLayout

    tokenizer = emu3.model_processor.tokenizer
    layout = _ImageTokenLayout(tokenizer, emu3.model.vocabulary_mapping.image_tokens, height=4, width=6)
    prompt = tokenizer(["a cat" + tokenizer.image_wrapper_token], return_tensors="pt").input_ids[0]
    drawn = []
    for _ in range(layout.num_tokens + 1):
        allowed = layout(0, torch.cat([prompt, torch.tensor(drawn, dtype=torch.long)]))
        drawn.append(int(allowed[0]))
    names = tokenizer.convert_ids_to_tokens(drawn)
    assert names[:7] == ["<|visual token 000000|>"] * 6 + ["<|extra_200|>"] and names.count("<|extra_200|>") == 4
    assert names[-4:] == ["<|extra_201|>", "<|image end|>", "<|extra_204|>", "<|endoftext|>"]
    with pytest.raises(ValueError, match="runs classifier-free guidance against its negative prompt"):
        emu3.generate(batch.captions[:1], guidance_scale=1.0, **EMU3_SIZE)
    with pytest.raises(ValueError, match="pass positive multiples of 8"):
        emu3(image=photos[:1], height=30, width=32)


def test_emu3_draws_what_transformers_documented_emu3_gen_call_draws(tiny_dir):
    """Pinned to the stock model: with top-k 1, Emu3RoundTrip's image half gives the images of transformers' own
    documented Emu3-Gen call (its prompt suffix and negative prompt, CFG 3, a prefix constraint written as its docs
    write it, greedy decoding, `decode_image_tokens`, the processor's postprocess), token for token."""
    from uae_hf.emu3_round_trip import EMU3_NEGATIVE_PROMPT, EMU3_PROMPT_SUFFIX

    emu3 = Emu3RoundTrip.from_pretrained(tiny_dir / "emu3" / "chat", tiny_dir / "emu3" / "gen")
    emu3.model.generation_config.top_k = 1
    captions = ["a red cat on a mat", "two dogs"]
    ours = emu3.generate(captions, generator=[torch.Generator().manual_seed(i) for i in range(2)], **EMU3_SIZE)

    model, processor = emu3.model, emu3.model_processor
    tokenizer = processor.tokenizer
    inputs = processor(text=[caption + EMU3_PROMPT_SUFFIX for caption in captions], return_for_image_generation=True,
                       ratio="48:32", image_area=48 * 32, padding=True, padding_side="left", return_tensors="pt")
    negative = processor(text=[EMU3_NEGATIVE_PROMPT] * 2, return_tensors="pt")
    height, width = inputs.pop("image_sizes")[0]
    visual = model.vocabulary_mapping.image_tokens

    def allowed(batch_id, input_ids):
        offset = input_ids.shape[0] - torch.nonzero(input_ids == tokenizer.image_wrapper_token_id)[0][0]
        if offset % (width + 1) == 0:
            return [tokenizer.convert_tokens_to_ids("<|extra_200|>")]
        ends = [tokenizer.eof_token_id, tokenizer.eoi_token_id, tokenizer.eos_token_id]
        if offset > (width + 1) * height:
            return [ends[offset - (width + 1) * height - 1] if offset <= (width + 1) * height + 3
                    else tokenizer.pad_token_id]
        return visual

    out = model.generate(**inputs, prefix_allowed_tokens_fn=allowed, negative_prompt_ids=negative.input_ids,
                         negative_prompt_attention_mask=negative.attention_mask, guidance_scale=3.0, do_sample=False,
                         max_new_tokens=(width + 1) * height + 3)
    pixels = model.decode_image_tokens(image_tokens=out[:, inputs.input_ids.shape[1]:], height=height, width=width)
    stock = processor.postprocess(list(pixels.float()), return_tensors="PIL.Image.Image")["pixel_values"]
    assert [image.size for image in stock] == [(48, 32)] * 2
    for got, want in zip(_arrays(ours.images), _arrays(stock)):
        np.testing.assert_array_equal(got, want)


def test_emu3_loads_and_round_trips_in_bfloat16(tiny_dir, photos):
    emu3 = Emu3RoundTrip.from_pretrained(tiny_dir / "emu3" / "chat", tiny_dir / "emu3" / "gen",
                                         torch_dtype=torch.bfloat16)
    assert emu3.dtype == torch.bfloat16
    for model in (emu3.vlm, emu3.model):
        assert {parameter.dtype for parameter in model.parameters()} == {torch.bfloat16}
    out = emu3(image=photos[:2], generator=[torch.Generator().manual_seed(i) for i in range(2)], **CAPTION,
               **EMU3_SIZE)
    assert all(out.captions) and [image.size for image in out.images] == [(48, 32)] * 2
    assert all(np.asarray(image).std() > 0 for image in out.images)


def test_janus_loads_and_round_trips_in_bfloat16(tiny_dir, photos):
    janus = JanusRoundTrip.from_pretrained(tiny_dir / "janus", torch_dtype=torch.bfloat16)
    assert janus.dtype == torch.bfloat16
    assert {parameter.dtype for parameter in janus.model.parameters()} == {torch.bfloat16}
    out = janus(image=photos[:2], generator=[torch.Generator().manual_seed(i) for i in range(2)], **CAPTION)
    assert all(out.captions) and [image.size for image in out.images] == [(32, 32)] * 2
    assert all(np.asarray(image).std() > 0 for image in out.images)


def test_bench_systems_are_the_round_trip_systems():
    assert BENCH_SYSTEMS == ROUND_TRIP_SYSTEMS


def test_bench_janus_records_its_system_resumes_and_refuses_stale_reuse(bench, tiny_dir, tmp_path, capsys):
    out = tmp_path / "janus"
    command = bench(out, "--system", "janus", "--model", str(tiny_dir / "janus"))
    main(command)
    scores = json.loads((out / "scores.json").read_text())
    model = str((tiny_dir / "janus").resolve())
    assert scores["system"] == {"name": "janus", "checkpoints": {"model": model}}
    assert scores["num_images"] == 3 and len(list((out / "reconstructions").iterdir())) == 3
    round_trip_settings = json.loads((out / "settings.json").read_text())["round_trip"]
    assert {key: round_trip_settings[key] for key in ("system", "model", "max_new_tokens", "seed")} == {
        "system": "janus", "model": model, "max_new_tokens": 6, "seed": 0}
    assert "guidance_scale" not in round_trip_settings  # the checkpoint's own
    assert f"System: janus (model: {model})" in (out / "scores.md").read_text()
    capsys.readouterr()

    main(command)
    assert "reused 3 reconstruction(s)" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        main([*command, "--guidance-scale", "3"])
    assert info.value.code == 2
    assert "made with other settings: guidance_scale: (not set) → 3.0" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--system janus takes --model, not --pipeline"):
        main([*command, "--pipeline", str(tiny_dir / "decoder")])
    with pytest.raises(SystemExit, match="drop --height"):
        main([*command, "--height", "64"])
    with pytest.raises(SystemExit, match="--system pair captions with --encoder"):
        main(bench(out, "--system", "pair", "--pipeline", str(tiny_dir / "decoder")))


def test_bench_emu3_records_its_two_checkpoints_resumes_and_refuses_stale_reuse(bench, tiny_dir, tmp_path, capsys):
    out = tmp_path / "emu3"
    chat, gen = (str((tiny_dir / "emu3" / name).resolve()) for name in ("chat", "gen"))
    command = bench(out, "--system", "emu3", "--encoder", chat, "--model", gen, "--height", "32", "--width", "32")
    main(command)
    scores = json.loads((out / "scores.json").read_text())
    assert scores["system"] == {"name": "emu3", "checkpoints": {"encoder": chat, "decoder": gen}}
    assert {PIL.Image.open(path).size for path in (out / "reconstructions").iterdir()} == {(32, 32)}
    round_trip_settings = json.loads((out / "settings.json").read_text())["round_trip"]
    assert {key: round_trip_settings[key] for key in ("system", "encoder", "model", "height", "width")} == {
        "system": "emu3", "encoder": chat, "model": gen, "height": 32, "width": 32}
    assert f"System: emu3 (encoder: {chat}, decoder: {gen})" in (out / "scores.md").read_text()
    capsys.readouterr()

    main(command)
    assert "reused 3 reconstruction(s)" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        main([*command[:-4], "--height", "32", "--width", "48"])
    assert info.value.code == 2
    assert "made with other settings: width: 32 → 48" in capsys.readouterr().err
    for flags, message in ((["--model", gen], "--model was given, pass --encoder too"),
                           (["--encoder", chat, "--model", gen, "--height", "30", "--width", "32"],
                            "must be multiples of 8"),
                           (["--encoder", chat, "--model", gen, "--pipeline", str(tiny_dir / "decoder")],
                            "--system emu3 takes --encoder and --model, not --pipeline")):
        with pytest.raises(SystemExit) as info:
            main(bench(tmp_path / "refused", "--system", "emu3", *flags))
        assert info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()


def test_a_run_from_before_systems_were_named_resumes_as_uae(pipe, references, backbone_checkpoints, tmp_path):
    """settings.json of earlier runs has no `system`: a UAE pipeline's (no encoder) is the uae system's."""
    from uae_hf.metrics.round_trip_bench import references_from_folder, run_bench

    kwargs = dict(pipeline=pipe, config_name="clip", checkpoints={"clip": backbone_checkpoints["clip"]}, batch_size=3,
                  num_inference_steps=2, max_new_tokens=6)
    earlier = {"pipeline": pipe.name_or_path, "dtype": str(pipe.dtype)}  # as run_bench recorded it before
    run_bench(references_from_folder(references), tmp_path / "bench", pipeline_settings=earlier, **kwargs)
    again = run_bench(references_from_folder(references), tmp_path / "bench", **kwargs)
    assert again["reused"] == 3 and again["settings"]["round_trip"]["system"] == "uae"
    assert again["system"] == {"name": "uae", "checkpoints": {"pipeline": str(pipe.name_or_path)}}


def test_compare_puts_janus_pair_emu3_and_uae_runs_in_one_table_and_grid(bench, pipe, tiny_dir, tmp_path, capsys):
    """The done-when of issue 39: a janus run, a pair run (a chat VLM + a text-to-image pipeline), an emu3 run and a
    uae run on the same photos, compared; runs that do not compare are refused before anything is written."""
    pipe.save_pretrained(tmp_path / "pipeline")
    runs = {"janus": tmp_path / "janus", "pair": tmp_path / "pair", "emu3": tmp_path / "emu3", "uae": tmp_path / "uae"}
    main(bench(runs["janus"], "--system", "janus", "--model", str(tiny_dir / "janus")))
    main(bench(runs["emu3"], "--system", "emu3", "--encoder", str(tiny_dir / "emu3" / "chat"), "--model",
               str(tiny_dir / "emu3" / "gen"), "--height", "32", "--width", "32"))
    main(bench(runs["pair"], "--system", "pair", "--pipeline", str(tiny_dir / "decoder"), "--encoder",
               str(tiny_dir / "encoder")))
    main(bench(runs["uae"], "--pipeline", str(tmp_path / "pipeline")))
    assert json.loads((runs["pair"] / "scores.json").read_text())["system"] == {"name": "pair", "checkpoints": {
        "encoder": str((tiny_dir / "encoder").resolve()), "decoder": str((tiny_dir / "decoder").resolve())}}
    capsys.readouterr()

    out = tmp_path / "comparison"
    main(["bench", "--compare", *map(str, runs.values()), "--output-dir", str(out)])
    comparison = json.loads((out / "comparison.json").read_text())
    assert [row["system"] for row in comparison["runs"]] == ["janus", "pair", "emu3", "uae"]
    for row, run in zip(comparison["runs"], runs.values()):
        scores = json.loads((run / "scores.json").read_text())
        assert row["backbones"] == {"clip": scores["backbones"]["clip"]["mean"]}
        assert row["overall"] == scores["overall"] and row["num_images"] == 3
        words = [len(item["caption"].split()) for item in scores["per_image"]]
        assert row["mean_caption_words"] == pytest.approx(sum(words) / 3)
    assert comparison["backbones"]["backbones"] == ["clip"] and comparison["protocol"] == "default"
    table = (out / "comparison.md").read_text()
    assert table.count("\n| janus (model: ") == 1 and table.count("\n| pair (encoder: ") == 1
    assert table.count("\n| emu3 (encoder: ") == 1
    assert "| Unified-Bench | images | caption words |" in table and table in capsys.readouterr().out
    grid = PIL.Image.open(out / "comparison_grid.png")
    assert grid.height > 4.5 * grid.width / 3  # 5 rows (originals + 4 systems) of 3 columns

    refused = tmp_path / "refused"
    other = tmp_path / "other-backbones"
    main(bench(other, "--system", "janus", "--model", str(tiny_dir / "janus"), backbones="clip+dinov2"))
    fewer = tmp_path / "fewer-references"
    main([*bench(fewer, "--system", "janus", "--model", str(tiny_dir / "janus")), "--limit", "2"])
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    capsys.readouterr()
    for run, message in ((other, r"differ in their backbones: \{\"backbones\": \[\"clip\"\]"),
                         (fewer, r"differ in their scored references: 3 image\(s\) \(astronaut, chelsea, coffee\) vs "
                                 r"2 image\(s\) \(astronaut, chelsea\)"),
                         (unfinished, "is not a finished bench run \\(it has no scores.json\\)")):
        with pytest.raises(SystemExit) as info:
            main(["bench", "--compare", str(runs["janus"]), str(run), "--output-dir", str(refused)])
        assert info.value.code == 2
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and str(run) in error
        assert re.search(message, error), error
    assert not refused.exists()
