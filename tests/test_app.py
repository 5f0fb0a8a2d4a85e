"""The Gradio app (`uae_hf.app`, `uae-hf app`): its round trip and bench on the twins, the Space it writes, and the
whole page driven in a real headless browser (Debian's Chromium through its chromedriver, with Selenium)."""

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


def test_round_trip_shows_the_caption_its_length_the_scores_and_the_settings(app, pipe, photos):
    import torch

    result = app.round_trip(photos[0], **FAST)
    alone = pipe(image=[photos[0]], generator=[torch.Generator().manual_seed(0)], num_inference_steps=2,
                 guidance_scale=5.0, max_new_tokens=8, do_sample=False, height=64, width=64)
    assert result["caption"] == alone.captions[0]  # the seed draws the same round trip as a direct call
    assert np.array_equal(np.asarray(result["reconstruction"]), np.asarray(alone.images[0]))
    assert result["tokens"] == len(pipe.processor.tokenizer(result["caption"], add_special_tokens=False).input_ids)
    assert result["cut_by_length_limit"] == (result["tokens"] >= 8)
    assert set(result["scores"]) == {"clip", "dinov2", "overall"}
    assert result["scores"]["overall"] == pytest.approx((result["scores"]["clip"] + result["scores"]["dinov2"]) / 2)
    assert result["settings"]["seed"] == 0 and result["settings"]["num_inference_steps"] == 2
    assert result["settings"]["scoring"]["config_name"] == "clip+dinov2"


def test_bench_tab_scores_uploaded_references_and_skips_an_unreadable_one(app, photos, tmp_path):
    uploads = []
    for index, photo in enumerate(photos[:2]):
        photo.save(path := tmp_path / f"photo{index}.png")
        uploads.append(str(path))
    (broken := tmp_path / "broken.png").write_bytes(b"not an image")
    report = app.bench([*uploads, str(broken)], None, "default", **FAST, output_dir=tmp_path / "run")
    assert report["num_images"] == 2 and [item["image"] for item in report["skipped"]] == ["broken"]
    assert set(report["backbones"]) == {"clip", "dinov2"} and 0 < report["unified_bench"] <= 100
    assert PIL.Image.open(tmp_path / "run" / "report" / "grid.png").width > 100
    # scoring uploaded reconstructions instead: each paired with its reference by name
    again = app.bench(uploads, [str(tmp_path / "run" / "report" / "reconstructions" / "photo0.png")], "default",
                      **FAST, output_dir=tmp_path / "scored")
    assert again["num_images"] == 1
    with pytest.raises(ValueError, match="upload the reference images"):
        app.bench([], None, "default", **FAST, output_dir=tmp_path / "none")


def test_app_help_and_a_bad_backbone_are_one_line_errors(capsys):
    from uae_hf.cli import CommandLineError, main

    with pytest.raises(SystemExit):
        main(["app", "--help"])
    assert "--write-space" in capsys.readouterr().out
    with pytest.raises(CommandLineError, match="--write-space needs --pipeline"):
        main(["app", "--write-space", "space"])


def test_written_space_has_its_front_matter_and_runs_the_app_with_the_flags_given(tmp_path):
    from huggingface_hub import SpaceCard

    from uae_hf.cli import main

    main(["app", "--pipeline", "someone/uae-pipeline", "--checkpoint", "clip=openai/clip-vit-base-patch32",
          "--port=7000", "--num-inference-steps", "20", "--write-space", str(tmp_path / "space")])
    card = SpaceCard.load(tmp_path / "space" / "README.md")
    assert card.data.sdk == "gradio" and card.data.app_file == "app.py" and card.data.models == ["someone/uae-pipeline"]
    app_py = (tmp_path / "space" / "app.py").read_text()
    assert "['app', '--pipeline', 'someone/uae-pipeline', '--checkpoint', 'clip=openai/clip-vit-base-patch32', " \
           "'--num-inference-steps', '20']" in app_py  # where it listens is the Space's to choose
    compile(app_py, "app.py", "exec")
    assert (tmp_path / "space" / "requirements.txt").read_text().startswith("uae-hf[app]\ngradio==")


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
    Space's users call it (gradio_client)."""
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
    finally:
        server.terminate()
        server.wait(timeout=60)
    assert note.startswith("Caption: ") and settings["pipeline"].startswith("tiny twins")
    assert [row[0] for row in scores["data"]] == ["clip", "dinov2", "dinov3", "longclip", "overall"]
    assert settings["num_inference_steps"] == 2 and settings["seed"] == 0 and isinstance(caption, str)


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


@pytest.mark.slow
def test_space_app_round_trips_an_uploaded_photo_in_a_real_browser(pipe, backbone_checkpoints, photos, browser,
                                                                     tmp_path):
    import torch
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from uae_hf.app import write_space

    pipe.save_pretrained(tmp_path / "pipeline")
    flags = ["--backbones", "clip+dinov2", "--checkpoint", f"clip={backbone_checkpoints['clip']}",
             "--checkpoint", f"dinov2={backbone_checkpoints['dinov2']}", "--num-inference-steps", "2",
             "--max-new-tokens", "8", "--temperature", "0.7", "--seed", "3", "--height", "64", "--width", "64"]
    space = write_space(tmp_path / "space", str(tmp_path / "pipeline"), flags)
    port = _free_port()
    # the server samples the caption on as many threads as this process, so that it draws the same tokens
    env = {**os.environ, "GRADIO_SERVER_PORT": str(port), "GRADIO_ANALYTICS_ENABLED": "False",
           "OMP_NUM_THREADS": str(torch.get_num_threads())}
    server = subprocess.Popen(
        [sys.executable, "-c", BLOCK_NETWORK + f"import runpy; runpy.run_path({str(space / 'app.py')!r})"],
        cwd=space, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}/"
        _wait_for_server(url, server)
        browser.get(url)
        wait = WebDriverWait(browser, 120)
        upload = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#original input[type=file]"))
        browser.find_element(By.ID, "run-round-trip").click()  # nothing uploaded yet: said in the page
        wait.until(lambda d: "Upload an image or pick a sample photo first" in d.find_element(By.TAG_NAME, "body").text)
        photos[1].save(photo := tmp_path / "coffee.png")
        upload.send_keys(str(photo))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#original img"))
        browser.find_element(By.ID, "run-round-trip").click()
        wait.until(lambda d: "overall" in d.find_element(By.ID, "scores").text)
        caption = browser.find_element(By.CSS_SELECTOR, "#caption textarea").get_attribute("value")
        table = browser.find_element(By.ID, "scores").text
        note = browser.find_element(By.ID, "caption-note").text
        browser.save_screenshot(str(shot := tmp_path / "app.png"))
    finally:
        server.terminate()
        server.wait(timeout=60)
    # the page shows the round trip that the same settings give in Python
    expected = pipe(image=[photos[1]], generator=[torch.Generator().manual_seed(3)], num_inference_steps=2,
                    max_new_tokens=8, do_sample=True, temperature=0.7, height=64, width=64).captions[0]
    tokens = len(pipe.processor.tokenizer(expected, add_special_tokens=False).input_ids)
    assert caption == expected and note.startswith(f"Caption: {tokens} tokens")
    overall = float(table.split("overall")[1].split()[0])
    assert 0 < overall <= 100 and "clip" in table and "dinov2" in table
    assert browser.find_elements(By.CSS_SELECTOR, "#reconstruction img")  # the redrawing is on the page
    pixels = np.asarray(PIL.Image.open(shot).convert("L"), dtype=float)
    assert pixels.shape[1] >= 1000 and pixels.std() > 10  # a rendered page, not a blank one
    if os.environ.get("UAE_APP_SCREENSHOT"):  # how docs/images/app.png is made
        shutil.copyfile(shot, os.environ["UAE_APP_SCREENSHOT"])
