"""The model card templates have one home, the repository's top-level `model_cards/`, installed as the package
`uae_hf.model_cards`. A wheel built from the repository carries each of them exactly once, and that wheel,
installed away from the repository, finds and renders every one (`uae_hf.hub.MODEL_CARDS`) and writes the
pipeline's card the way `save_pretrained` does."""

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from importlib.metadata import version
from pathlib import Path

import jinja2
import jinja2.meta
import pytest
from network_block import BLOCK_NETWORK

REPO = Path(__file__).resolve().parents[1]
TEMPLATE_DIR = REPO / "model_cards"
TEMPLATES = sorted(path.name for path in TEMPLATE_DIR.glob("*.md"))
# What .gitignore leaves out: a stale build/ or egg-info must not leak into the wheel under test.
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "*.pyc",
                                    ".pytest_cache", ".hypothesis", "outputs", "results.json")

# Variables for each template, every `{% if %}` true so that every fixed line renders. A template missing here
# gets a string for each variable it reads (enough for a template without loops).
TEMPLATE_VARIABLES = {
    "decoder_rl_lora.md": dict(
        model_name="tiny-decoder-lora", full_finetune=True, algorithm="DiffusionNFT", trainer="DiffusionNFTTrainer", base_model="org/decoder", hub_model_id="user/lora",
        loading_note="The stock diffusers `FluxPipeline` (FLUX.1) reads it:", pipeline_class="FluxPipeline",
        load_arguments='"org/decoder", torch_dtype=torch.bfloat16', call="image = pipe(prompt=...).images[0]",
        weight_name="pytorch_lora_weights.safetensors", settings={"sampler": "sde, 8 steps", "KL beta": "0.01"},
        metrics={"reward/mean": 0.25},
    ),
    "uae_reconstruction_pipeline.md": dict(
        model_name="tiny-uae", repo_id="user/tiny-uae", encoder="org/encoder", decoder="org/decoder",
        conditioning_mode="embeddings", conditioning_description="hidden states through the projector",
        decoder_details="MMDiT, 2 layers", projector="8 → 16 → 32, GELU", encoder_adapter="default",
        encoder_adapter_folder="encoder_adapter", conditioning_without_encoder_adapters=True,
        unified_bench={"clip": 51.5, "overall": 50.25},
    ),
    "uae_stage_weights.md": dict(
        model_name="tiny-stage", trainer="DecoderPretrainingTrainer", stage_description="the decoder learns", decoder="org/decoder",
        files=[["projector/", "UAEProjector", "`UAEProjector.from_pretrained(...)`"]], metrics={"loss": 0.5},
    ),
    "unified_grpo_encoder.md": dict(
        model_name="tiny-encoder", stage="understanding", base_model="org/encoder", base_model_path="org/encoder",
        decoder="org/decoder", conditioning_mode="text", decoder_settings="64x64, 2 steps",
        reward_backbones="clip", heldout_backbones="none", grpo_settings="4 generations", metrics={"reward": 0.75},
        hub_model_id="user/encoder",
    ),
}

INSTALLED_SCRIPT = BLOCK_NETWORK + """
import json, re, sys
from pathlib import Path
from types import SimpleNamespace

import uae_hf
import uae_hf.model_cards
from huggingface_hub import ModelCard, ModelCardData
from uae_hf.hub import MODEL_CARDS, pipeline_model_card

variables, out = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
cards = {}
for name, kwargs in variables.items():
    card = ModelCard.from_template(ModelCardData(license="other", tags=["uae_hf"]),
                                   template_path=str(MODEL_CARDS / name), **kwargs)
    card.save(out / name)
    cards[name] = (out / name).read_text()

# The pipeline's card, written as `UAEReconstructionPipeline.save_pretrained(..., model_card=...)` writes it.
def module(name_or_path, **config):
    return SimpleNamespace(config=SimpleNamespace(_name_or_path=name_or_path, **config))
pipe = SimpleNamespace(
    vlm=module("org/encoder"), transformer=module("org/decoder", num_layers=2, joint_attention_dim=32),
    projector=SimpleNamespace(config=SimpleNamespace(in_features=8, hidden_features=16, out_features=32)),
    config=SimpleNamespace(conditioning_mode="embeddings"),
)
(out / "README.md").write_text(pipeline_model_card(pipe, "user/tiny-uae", unified_bench={"overall": 50.0}))

package = Path(uae_hf.__file__).parent
used = sorted({match for path in package.rglob("*.py")
               for match in re.findall(r'MODEL_CARDS\\s*/\\s*"([^"]+)"', path.read_text(encoding="utf-8"))})
print(json.dumps({
    "uae_hf": uae_hf.__file__, "model_cards_module": uae_hf.model_cards.__file__,
    "MODEL_CARDS": str(MODEL_CARDS), "is_path": isinstance(MODEL_CARDS, Path),
    "templates": sorted(path.name for path in MODEL_CARDS.glob("*.md")), "used": used,
    "cards": cards, "pipeline_card": (out / "README.md").read_text(),
}))
"""


def _variables(template: str) -> set[str]:
    return jinja2.meta.find_undeclared_variables(jinja2.Environment().parse(template)) - {"card_data"}


def _fixed_lines(template: str) -> list[str]:
    """The template's lines without Jinja, outside the YAML header: with every `if` true, each renders as is."""
    body = template.split("---\n", 2)[2]
    return [line for line in body.splitlines() if line.strip() and not re.search(r"{{|{%|{#", line)]


@pytest.fixture(scope="module")
def wheel_and_site(tmp_path_factory):
    """A wheel built (offline, with the venv's own setuptools) from a clean copy of the repository, and a
    folder it is installed into, away from the repository."""
    setuptools_version = version("setuptools")
    assert int(setuptools_version.split(".")[0]) >= 77, (
        f"setuptools {setuptools_version} cannot build uae-hf: run scripts/setup.sh (the test extra brings "
        "setuptools>=77)")
    tmp = tmp_path_factory.mktemp("wheel")
    source, wheels, site = tmp / "source", tmp / "wheels", tmp / "site"
    shutil.copytree(REPO, source, ignore=NOT_SOURCE)
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    pip = [sys.executable, "-m", "pip"]
    build = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(wheels),
                            str(source)], capture_output=True, text=True, timeout=300, env=env)
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = wheels.glob("uae_hf-*.whl")
    install = subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)],
                             capture_output=True, text=True, timeout=300, env=env)
    assert install.returncode == 0, install.stdout + install.stderr
    return wheel, source, site


def test_repository_has_the_templates_only_at_top_level():
    assert TEMPLATES, f"no templates in {TEMPLATE_DIR}"
    assert not (REPO / "src" / "uae_hf" / "model_cards").exists()
    import uae_hf
    from uae_hf.hub import MODEL_CARDS

    if Path(uae_hf.__file__).resolve().is_relative_to(REPO / "src"):  # the editable install maps it onto the folder
        assert Path(MODEL_CARDS).resolve() == TEMPLATE_DIR.resolve()
    assert {name: (MODEL_CARDS / name).read_text() for name in TEMPLATES} == {
        name: (TEMPLATE_DIR / name).read_text() for name in TEMPLATES}


def test_wheel_holds_each_template_once_and_nothing_stray(wheel_and_site):
    wheel, source, _ = wheel_and_site
    names = zipfile.ZipFile(wheel).namelist()
    assert len(names) == len(set(names))
    dist_info = f"uae_hf-{wheel.name.split('-')[1]}.dist-info/"
    assert [name for name in names if not name.startswith(("uae_hf/", dist_info))] == []
    for template in TEMPLATES:
        assert [name for name in names if name.endswith("/" + template)] == [f"uae_hf/model_cards/{template}"]
    cards = sorted(name.removeprefix("uae_hf/model_cards/") for name in names if name.startswith("uae_hf/model_cards/"))
    assert cards == sorted(["__init__.py", *TEMPLATES])
    # The package list in pyproject.toml is explicit: every file of src/uae_hf must still make it into the wheel.
    package = source / "src" / "uae_hf"
    expected = {f"uae_hf/{path.relative_to(package).as_posix()}" for path in package.rglob("*") if path.is_file()}
    assert sorted(expected - set(names)) == []


def test_installed_wheel_renders_every_template(wheel_and_site, tmp_path):
    _, _, site = wheel_and_site
    variables = {}
    for name in TEMPLATES:
        template = (TEMPLATE_DIR / name).read_text(encoding="utf-8")
        kwargs = TEMPLATE_VARIABLES.get(name) or {key: f"dummy {key}" for key in _variables(template)}
        assert _variables(template) <= set(kwargs), f"{name}: add its new variables to TEMPLATE_VARIABLES"
        variables[name] = kwargs
    (tmp_path / "variables.json").write_text(json.dumps(variables))
    (tmp_path / "out").mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "HF_HUB_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", INSTALLED_SCRIPT, str(tmp_path / "variables.json"), str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])

    # The installed copy answers, not the repository (the editable install's finder is still on sys.meta_path).
    for key in ("uae_hf", "model_cards_module", "MODEL_CARDS"):
        assert Path(report[key]).is_relative_to(site), (key, report[key])
    assert report["is_path"]
    assert report["templates"] == TEMPLATES
    assert report["used"] and set(report["used"]) <= set(TEMPLATES), report["used"]

    for name in TEMPLATES:
        card = report["cards"][name]
        assert card.startswith("---\n") and "license: other" in card and "{{" not in card and "{%" not in card
        rendered = set(card.splitlines())
        missing = [line for line in _fixed_lines((TEMPLATE_DIR / name).read_text(encoding="utf-8"))
                   if line not in rendered]
        assert missing == [], (name, missing)
    readme = report["pipeline_card"]
    assert "library_name: diffusers" in readme and "\n# tiny-uae\n" in readme
    assert "| projector | UAEProjector | 8 → 16 → 32, GELU |" in readme and "## Unified-Bench" in readme
