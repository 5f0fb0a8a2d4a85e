"""The Gradio app (`uae_hf.app`, `uae-hf app`): its round trip and bench on the twins, the Space it writes, and the
whole page driven in a real headless browser (Debian's Chromium through its chromedriver, with Selenium)."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from network_block import BLOCK_NETWORK

pytest.importorskip("gradio", reason="the app needs the app extra: pip install 'uae-hf[app]'")

FAST = {"steps": 2, "guidance": 5.0, "temperature": 0.0, "max_tokens": 8, "seed": 0}


@pytest.fixture(scope="module")
def app(pipe, backbone_checkpoints):
    from uae_hf.app import RoundTripApp

    checkpoints = {name: backbone_checkpoints[name] for name in ("clip", "dinov2")}
    return RoundTripApp(pipe, "tiny twins", "clip+dinov2", checkpoints, height=64, width=64)


def test_round_trip_shows_the_caption_its_length_the_scores_and_the_settings(app, pipe, photos, tmp_path):
    import torch

    result = app.round_trip(photos[0], **FAST)
    alone = pipe(image=[photos[0]], generator=[torch.Generator().manual_seed(0)], num_inference_steps=2,
                 guidance_scale=5.0, max_new_tokens=8, do_sample=False, height=64, width=64)
    assert result["caption"] == alone.captions[0]  # the seed draws the same round trip as a direct call
    assert np.array_equal(np.asarray(result["reconstruction"]), np.asarray(alone.images[0]))
    # the tokens the encoder drew, as the limit counts them: the twins draw 8 special ones, which the caption drops
    # (counted from the caption, that was 0 tokens and not cut; elsewhere 10 for 8, as a "�" is several tokens)
    assert result["tokens"] == 8 and result["cut_by_length_limit"]
    assert set(result["scores"]) == {"clip", "dinov2", "overall"}
    assert result["scores"]["overall"] == pytest.approx((result["scores"]["clip"] + result["scores"]["dinov2"]) / 2)
    assert result["settings"]["seed"] == 0 and result["settings"]["num_inference_steps"] == 2
    assert result["settings"]["scoring"]["config_name"] == "clip+dinov2"
    (broken := tmp_path / "broken.png").write_bytes(b"not an image")  # an upload, as the page hands it over
    with pytest.raises(ValueError, match=r"^Cannot read broken.png: it is not an image file, or a damaged one\."):
        app.round_trip(str(broken), **FAST)


def test_round_trip_with_a_vlm_and_a_flux_decoder_is_the_paired_round_trip(tiny_dir, backbone_checkpoints, photos):
    """`uae-hf app --pipeline <FluxPipeline> --encoder <VLM>` serves a `PairedRoundTrip`: the page's round trip is
    its direct call's for the seed."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from uae_hf import PairedRoundTrip, load_saved_pipeline
    from uae_hf.app import RoundTripApp

    pair = PairedRoundTrip(AutoModelForImageTextToText.from_pretrained(tiny_dir / "encoder"),
                           AutoProcessor.from_pretrained(tiny_dir / "encoder"),
                           load_saved_pipeline(tiny_dir / "decoders" / "flux1"))
    app = RoundTripApp(pair, "FLUX.1 twin", "clip", {"clip": backbone_checkpoints["clip"]}, height=32, width=32)
    result = app.round_trip(photos[0], **FAST | {"guidance": 3.5})
    alone = pair(image=[photos[0]], generator=[torch.Generator().manual_seed(0)], num_inference_steps=2,
                 guidance_scale=3.5, max_new_tokens=8, do_sample=False, height=32, width=32)
    assert result["caption"] == alone.captions[0]
    assert np.array_equal(np.asarray(result["reconstruction"]), np.asarray(alone.images[0]))
    assert result["settings"]["dtype"] == "float32" and set(result["scores"]) == {"clip", "overall"}


def test_bench_tab_scores_uploaded_references_and_skips_an_unreadable_one(app, photos, tmp_path):
    from uae_hf.app import _bench_grid, _bench_summary, _bench_table

    uploads = []
    for index, photo in enumerate(photos[:2]):
        photo.save(path := tmp_path / f"photo{index}.png")
        uploads.append(str(path))
    (broken := tmp_path / "broken.png").write_bytes(b"not an image")
    report = app.bench([*uploads, str(broken)], None, "default", **FAST, output_dir=tmp_path / "run")
    assert report["num_images"] == 2 and [item["image"] for item in report["skipped"]] == ["broken"]
    assert set(report["backbones"]) == {"clip", "dinov2"} and 0 < report["unified_bench"] <= 100
    assert PIL.Image.open(tmp_path / "run" / "report" / "grid.png").width > 100
    # scoring uploaded reconstructions instead, each paired with its reference by name; the page shows every score
    # ×100 (the backbones' cosines were unscaled in its text, ×100 in its table)
    reconstruction = str(tmp_path / "run" / "report" / "reconstructions" / "photo0.png")
    again = app.bench(uploads, [reconstruction], "default", **FAST, output_dir=tmp_path / "scored")
    summary = _bench_summary(again)
    assert again["num_images"] == 1 and summary.startswith(f"**Unified-Bench: {again['unified_bench']:.2f}** over 1")
    assert f"{again['backbones']['clip']['mean']:.4f}" not in summary and "Skipped photo1" in summary
    assert _bench_table(again) == [
        *([name, round(100 * s["mean"], 2), round(100 * s["min"], 2), round(100 * s["max"], 2)]
          for name, s in again["backbones"].items()),
        ["overall (Unified-Bench)", round(again["unified_bench"], 2), None, None],
    ]
    grid = _bench_grid(again, tmp_path / "scored" / "references", tmp_path / "grid.png")
    assert PIL.Image.open(grid).width > 100  # drawn again with the pair's score ×100
    with pytest.raises(ValueError, match="upload the reference images"):
        app.bench([], None, "default", **FAST, output_dir=tmp_path / "none")


def test_bench_tab_round_trips_with_a_picked_system_as_uae_hf_bench_does(pipe, tiny_dir, backbone_checkpoints,
                                                                          photos, tmp_path, capsys):
    """`uae-hf app --bench-janus MODEL --bench-emu3 CHAT GEN`: the bench tab picks the app's pipeline, Janus or Emu3;
    a picked system's scores are those of `uae-hf bench --system NAME` on the same files and settings."""
    from uae_hf.cli import _app_round_trips, _check_app, build_parser, main

    pipe.save_pretrained(tmp_path / "pipeline")
    backbones = ["--backbones", "clip", "--checkpoint", f"clip={backbone_checkpoints['clip']}"]
    janus, chat, gen = (str(tiny_dir / name) for name in ("janus", "emu3/chat", "emu3/gen"))
    args = build_parser().parse_args(["app", "--pipeline", str(tmp_path / "pipeline"), *backbones, "--bench-janus",
                                      janus, "--bench-emu3", chat, gen, "--height", "32", "--width", "32"])
    _check_app(args)
    app = _app_round_trips(args)
    labels = list(app.systems)
    assert labels == [f"uae (pipeline: {tmp_path / 'pipeline'})", f"janus (model: {Path(janus).resolve()})",
                      f"emu3 (encoder: {Path(chat).resolve()}, decoder: {Path(gen).resolve()})"]
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    for index, photo in enumerate(photos[:2]):
        photo.save(uploads / f"photo{index}.png")
    files = sorted(map(str, uploads.iterdir()))
    settings = {"steps": 2, "guidance": 4.0, "temperature": 0.7, "max_tokens": 6, "seed": 3}
    for label, name, flags in ((labels[1], "janus", ["--model", janus]),
                               (labels[2], "emu3", ["--encoder", chat, "--model", gen, "--height", "32", "--width",
                                                    "32"])):
        report = app.bench(files, None, "default", **settings, output_dir=tmp_path / "app" / name, system=label)
        assert report["system"]["name"] == name and report["num_images"] == 2
        main(["bench", "--system", name, *flags, "--images-dir", str(uploads), *backbones, "--guidance-scale", "4",
              "--temperature", "0.7", "--max-new-tokens", "6", "--seed", "3", "--output-dir", str(tmp_path / name)])
        cli = json.loads((tmp_path / name / "scores.json").read_text())
        assert [row["caption"] for row in report["per_image"]] == [row["caption"] for row in cli["per_image"]]
        assert {key: report[key] for key in ("overall", "unified_bench")} == pytest.approx(
            {key: cli[key] for key in ("overall", "unified_bench")}, abs=1e-6)
        assert report["system"] == cli["system"]
    with pytest.raises(ValueError, match="no round-trip system 'flux' in this app: pick one of uae \\(pipeline"):
        app.bench(files, None, "default", **settings, output_dir=tmp_path / "none", system="flux")


def test_app_help_and_a_bad_backbone_are_one_line_errors(capsys):
    from uae_hf.cli import CommandLineError, main

    with pytest.raises(SystemExit):
        main(["app", "--help"])
    assert "--write-space" in capsys.readouterr().out
    with pytest.raises(CommandLineError, match="--write-space needs --pipeline"):
        main(["app", "--write-space", "space"])


def test_app_bench_systems_are_checked_before_anything_loads(tiny_dir, tmp_path):
    from uae_hf.cli import CommandLineError, main

    emu3 = ["--bench-emu3", str(tiny_dir / "emu3" / "chat"), str(tiny_dir / "emu3" / "gen")]
    for argv, message in (([*emu3, "--height", "60", "--width", "64"], "must be multiples of 8"),
                          ([*emu3, "--height", "64"], "pass both or neither"),
                          (["--bench-janus", str(tmp_path / "missing")], "--bench-janus .*: no such folder"),
                          (["--pipeline", "org/uae", "--write-space", str(tmp_path / "space"), *emu3],
                           "is a local folder, which a Space does not hold: pass its Hub id")):
        with pytest.raises(CommandLineError, match=message):
            main(["app", *argv])
    assert not (tmp_path / "space").exists()


def test_written_space_holds_what_it_runs_and_installs_its_requirements(tiny_dir, tmp_path):
    """Hub ids stay Hub ids; local folders (a plain SD3 pipeline with its --encoder here, a backbone) and uae_hf itself
    are copied into the Space, whose requirements.txt pip resolves offline from what this environment installed (it
    named `uae-hf[app]`, which no package index serves)."""
    from huggingface_hub import SpaceCard
    from packaging.requirements import Requirement

    import uae_hf.cli
    from uae_hf.cli import CommandLineError, main

    main(["app", "--pipeline", "someone/uae-pipeline", "--checkpoint", "clip=openai/clip-vit-base-patch32",
          "--port=7000", "--num-inference-steps", "20", "--write-space", str(tmp_path / "hub")])
    card = SpaceCard.load(tmp_path / "hub" / "README.md")
    assert card.data.sdk == "gradio" and card.data.app_file == "app.py"
    assert card.data.models == ["someone/uae-pipeline", "openai/clip-vit-base-patch32"]
    app_py = (tmp_path / "hub" / "app.py").read_text()
    assert "main(['app', '--pipeline', 'someone/uae-pipeline', '--checkpoint', 'clip=openai/clip-vit-base-patch32', " \
           "'--num-inference-steps', '20'])" in app_py  # where it listens is the Space's to choose
    compile(app_py, "app.py", "exec")

    space = tmp_path / "space"
    main(["app", "--pipeline", str(tiny_dir / "decoder"), "--encoder", str(tiny_dir / "encoder"), "--backbones", "clip",
          "--checkpoint", f"clip={tiny_dir / 'backbones' / 'clip'}", "--write-space", str(space)])
    app_py = (space / "app.py").read_text()
    assert "main(['app', '--pipeline', str(HERE / 'pipeline'), '--encoder', str(HERE / 'encoder'), '--checkpoint', " \
           "'clip=' + str(HERE / 'backbones/clip'), '--backbones', 'clip'])" in app_py and str(tiny_dir) not in app_py
    for copy, original in (("pipeline", "decoder"), ("encoder", "encoder"), ("backbones/clip", "backbones/clip")):
        assert sorted(path.relative_to(space / copy) for path in (space / copy).rglob("*")) == sorted(
            path.relative_to(tiny_dir / original) for path in (tiny_dir / original).rglob("*")), copy
    assert (space / "uae_hf" / "cli.py").read_text() == Path(uae_hf.cli.__file__).read_text()
    assert (space / "uae_hf" / "model_cards" / "uae_reconstruction_pipeline.md").is_file()
    assert SpaceCard.load(space / "README.md").data.models is None
    requirements = (space / "requirements.txt").read_text().splitlines()
    names = [Requirement(line).name for line in requirements]
    assert "uae-hf" not in names and {"torch", "diffusers", "gradio", "scikit-image"} <= set(names)
    resolved = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "-r",
                               "requirements.txt"], cwd=space, capture_output=True, text=True, timeout=300)
    assert resolved.returncode == 0 and "Would install" not in resolved.stdout, resolved.stdout + resolved.stderr
    with pytest.raises(CommandLineError, match="overlap: write the Space to another folder"):
        main(["app", "--pipeline", str(space / "pipeline"), "--encoder", str(space / "encoder"),
              "--write-space", str(space / "pipeline" / "space")])


# --- the page in a real browser ----------------------------------------------------------------------------------

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_server(url: str, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the app exited ({process.returncode}): {process.stderr.read()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"the app did not answer at {url} within {timeout} s")


@pytest.mark.slow
def test_app_on_the_twins_answers_gradio_clients(photos, tmp_path):
    """`uae-hf app` with no pipeline: the tiny twins, scored with the paper's four backbones' twins; its API as a
    Space's users call it (gradio_client), the bench tab with the Emu3 twins picked."""
    from gradio_client import Client, handle_file

    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-c", BLOCK_NETWORK + f"from uae_hf.cli import main; main(['app', '--port', '{port}'])"],
        env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for_server(f"http://127.0.0.1:{port}/", server)
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        photos[2].save(photo := tmp_path / "chelsea.png")
        _, caption, note, scores, settings = client.predict(handle_file(str(photo)), 2, 5.0, 0.7, 8, 0,
                                                            api_name="/run_round_trip")
        with pytest.raises(Exception, match="Upload an image"):
            client.predict(None, 2, 5.0, 0.7, 8, 0, api_name="/run_round_trip")
        summary, _, _, scores_file = client.predict([handle_file(str(photo))], None, "emu3 (tiny twins)", "default", 2,
                                                    3.0, 0.7, 8, 0, api_name="/run_bench")
    finally:
        server.terminate()
        server.wait(timeout=60)
    assert note.startswith("Caption: ") and settings["pipeline"].startswith("tiny twins")
    assert [row[0] for row in scores["data"]] == ["clip", "dinov2", "dinov3", "longclip", "overall"]
    assert settings["num_inference_steps"] == 2 and settings["seed"] == 0 and isinstance(caption, str)
    bench = json.loads(Path(scores_file).read_text())
    assert bench["system"]["name"] == "emu3" and summary.startswith("**Unified-Bench: ")
    assert PIL.Image.open(bench["per_image"][0]["reconstruction"]).size == (64, 64)


@pytest.fixture()
def browser(tmp_path):
    if not (CHROMIUM and CHROMEDRIVER):
        if os.environ.get("UAE_BROWSER_TESTS") == "required":  # .ci/run installs them: never skipped there
            pytest.fail("chromium and chromedriver are required (apt-get install chromium chromium-driver)")
        pytest.skip("needs Chromium and its driver: apt-get install chromium chromium-driver")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # headless, and nothing reaching out to the network (this machine has none; a closed network slows Chromium down)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-quic",
                 "--window-size=1280,1800", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def _page_result(browser, previous):
    """The round trip's caption, caption note and score table once the page shows a new one (else False)."""
    from selenium.webdriver.common.by import By

    caption = browser.find_element(By.CSS_SELECTOR, "#caption textarea").get_attribute("value")
    table = browser.find_element(By.ID, "scores").text
    busy = "captioning" in table + browser.find_element(By.ID, "caption").text  # the progress text
    result = caption, browser.find_element(By.ID, "caption-note").text, table
    return result if "overall" in table and not busy and result != previous else False


@pytest.mark.slow
def test_space_app_round_trips_uploads_as_the_cli_does_in_a_real_browser(pipe, backbone_checkpoints, photos, browser,
                                                                         tmp_path):
    """A Space written from local folders, run from its own copy of uae_hf: a 16-bit PNG and an RGBA PNG uploaded in
    the page get the caption and the scores that `uae-hf reconstruct` and `uae-hf bench` give those files (the page
    read a 16-bit PNG almost white, and dropped alpha); an unreadable upload and a click without one are each a
    one-line message in the page, with no traceback in the server's log."""
    import torch
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from uae_hf.app import write_space
    from uae_hf.cli import main

    pipe.save_pretrained(tmp_path / "pipeline")
    backbones = {name: backbone_checkpoints[name] for name in ("clip", "dinov2")}
    generation = ["--num-inference-steps", "2", "--max-new-tokens", "8", "--temperature", "0.7", "--seed", "3",
                  "--height", "64", "--width", "64"]
    space = write_space(tmp_path / "space", str(tmp_path / "pipeline"), ["--backbones", "clip+dinov2", *generation],
                        checkpoints=backbones)
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    deep = PIL.Image.fromarray(np.asarray(photos[1].convert("L")).astype(np.uint16) * 257)
    deep.save(uploads / "deep.png")  # 16-bit grey
    clear = photos[0].convert("RGBA")
    clear.putalpha(PIL.Image.linear_gradient("L").resize(clear.size))
    clear.save(uploads / "clear.png")  # transparent at the top, opaque at the bottom
    (broken := tmp_path / "broken.png").write_bytes(b"not an image")
    port = _free_port()
    # the server and the CLI below sample captions on 2 threads each: two processes agree bit for bit there, where at 1
    # thread (an xdist worker's share of 2 cores) their logits are up to ~4e-7 apart, enough to flip a sampled token
    env = {**os.environ, "GRADIO_SERVER_PORT": str(port), "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "2"}
    start = "import uae_hf; print('uae_hf from', uae_hf.__file__, flush=True); import runpy; "
    server = subprocess.Popen(
        [sys.executable, "-c", BLOCK_NETWORK + start + f"runpy.run_path({str(space / 'app.py')!r})"],
        cwd=space, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    page = {}
    try:
        url = f"http://127.0.0.1:{port}/"
        _wait_for_server(url, server)
        browser.get(url)
        wait = WebDriverWait(browser, 120, ignored_exceptions=[StaleElementReferenceException])  # the page redraws

        def upload(path):  # the file input is drawn again after each upload
            wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#original input[type=file]")).send_keys(str(path))

        wait.until(lambda d: d.find_element(By.ID, "run-round-trip")).click()  # nothing uploaded yet: said in the page
        wait.until(lambda d: "Upload an image or pick a sample photo first" in d.find_element(By.TAG_NAME, "body").text)
        upload(broken)
        browser.find_element(By.ID, "run-round-trip").click()
        wait.until(lambda d: "Cannot read broken.png: it is not an image file, or a damaged one. Upload a PNG"
                   in d.find_element(By.TAG_NAME, "body").text)
        result = None
        for name in ("deep.png", "clear.png"):
            upload(uploads / name)
            wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#original img").get_attribute("src").endswith(name))
            browser.find_element(By.ID, "run-round-trip").click()
            page[name] = result = wait.until(lambda d: _page_result(d, result))
        browser.save_screenshot(str(shot := tmp_path / "app.png"))
    finally:
        server.terminate()
        server.wait(timeout=60)
    assert "Traceback" not in server.stderr.read()
    assert f"uae_hf from {space / 'uae_hf' / '__init__.py'}" in server.stdout.read()
    # the CLI on the same files: each one's round trip, then the scores of its reconstruction
    reconstructions = tmp_path / "cli" / "reconstructions"
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    for name in page:
        main(["reconstruct", str(uploads / name), "--pipeline", str(tmp_path / "pipeline"), *generation,
              "--output-dir", str(tmp_path / "cli" / name)])
        shutil.copytree(tmp_path / "cli" / name / "reconstructions", reconstructions, dirs_exist_ok=True)
    torch.set_num_threads(threads)
    main(["bench", "--images-dir", str(uploads), "--reconstructions", str(reconstructions), "--backbones",
          "clip+dinov2", *(f"--checkpoint={name}={path}" for name, path in backbones.items()),
          "--output-dir", str(tmp_path / "cli" / "bench")])
    report = json.loads((tmp_path / "cli" / "bench" / "scores.json").read_text())
    scores = {row["file"]: row for row in report["per_image"]}
    for name, (caption, note, table) in page.items():
        row = json.loads((tmp_path / "cli" / name / "captions.jsonl").read_text())
        assert caption == row["caption"], name
        cells = table.split()
        shown = {key: float(cells[cells.index(key) + 1]) for key in ("clip", "dinov2", "overall")}
        assert shown == pytest.approx({key: 100 * scores[name][key] for key in shown}, abs=0.006), name  # 2 decimals
        assert note.startswith("Caption: 8 tokens; cut by the max-tokens limit (8:"), note  # the twins never stop
    assert page["deep.png"][0] != page["clear.png"][0]
    assert browser.find_elements(By.CSS_SELECTOR, "#reconstruction img")  # the redrawing is on the page
    pixels = np.asarray(PIL.Image.open(shot).convert("L"), dtype=float)
    assert pixels.shape[1] >= 1000 and pixels.std() > 10  # a rendered page, not a blank one
    if os.environ.get("UAE_APP_SCREENSHOT"):  # how docs/images/app.png is made
        shutil.copyfile(shot, os.environ["UAE_APP_SCREENSHOT"])
