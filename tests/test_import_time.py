"""`import uae_hf` stays light: the libraries behind the public names load on first use, and the package's two
import-time effects (the bare `unified_bench` name, the "toyworld" backbone) still hold when they are needed."""

import subprocess
import sys

import pytest
from network_block import BLOCK_NETWORK

import uae_hf
from uae_hf.toy_world import ToyWorldVisionModel, toy_image_processor
from uae_hf.toy_world.backbone import ToyWorldVisionConfig

# The command line imports the package too; neither may pull in a heavy library or a heavy part of uae_hf.
LIGHT_IMPORT = """
import sys
import uae_hf.cli
heavy = ("torch", "transformers", "trl", "diffusers", "evaluate", "uae_hf.toy_world", "uae_hf.trainer")
print("LOADED", [name for name in heavy if name in sys.modules])
for name in uae_hf.__all__:
    getattr(uae_hf, name)
exec(f"from uae_hf import {', '.join(uae_hf.__all__)}")
print("RESOLVED", len(uae_hf.__all__))
"""

LOAD_AFTER_IMPORT = BLOCK_NETWORK + """
import sys
import numpy as np
import PIL.Image
door, clip, toyworld = sys.argv[1:4]
image = PIL.Image.fromarray(np.arange(32 * 32 * 3, dtype=np.uint8).reshape(32, 32, 3))
import uae_hf  # before evaluate: the bare name must resolve once evaluate is imported later
assert "evaluate" not in sys.modules and "uae_hf.toy_world" not in sys.modules
if door == "metric":
    import evaluate
    for name, checkpoint in (("clip", clip), ("toyworld", toyworld)):
        bench = evaluate.load("unified_bench", name, checkpoints={name: checkpoint})
        print("RESULT", name, type(bench).__name__, bench.compute(predictions=[image], references=[image])[name])
else:
    from uae_hf import ImageSimilarity
    similarity = ImageSimilarity(("toyworld",), {"toyworld": toyworld})
    print("RESULT toyworld", type(similarity).__name__, float(similarity.scores([image], [image])["toyworld"][0]))
"""


def run_fresh(script: str, *args: str, cwd=None) -> str:
    result = subprocess.run([sys.executable, "-c", script, *args], cwd=cwd, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_import_loads_no_heavy_library_and_every_public_name_resolves():
    out = run_fresh(LIGHT_IMPORT)
    assert "LOADED []" in out and f"RESOLVED {len(uae_hf.__all__)}" in out
    assert set(uae_hf.__all__) <= set(dir(uae_hf))


@pytest.fixture(scope="module")
def toyworld_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("toyworld-backbone")
    ToyWorldVisionModel(ToyWorldVisionConfig()).save_pretrained(path)  # untrained: scores an image against itself
    toy_image_processor().save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("door", ["metric", "reward"])
def test_bare_name_and_toyworld_backbone_resolve_after_a_light_import(door, backbone_checkpoints,
                                                                     toyworld_checkpoint, tmp_path):
    out = run_fresh(LOAD_AFTER_IMPORT, door, backbone_checkpoints["clip"], toyworld_checkpoint, cwd=tmp_path)
    results = [line.split() for line in out.splitlines() if line.startswith("RESULT ")]
    expected = {"metric": ["clip", "toyworld"], "reward": ["toyworld"]}[door]
    assert [name for _, name, _, _ in results] == expected
    for _, _, kind, score in results:
        assert kind == ("UnifiedBench" if door == "metric" else "ImageSimilarity")
        assert float(score) == pytest.approx(1.0, abs=1e-4)  # an image against itself, a number not its text


def test_evaluate_hook_is_installed_once():
    import evaluate.loading

    uae_hf.install_evaluate_hook()
    uae_hf.install_evaluate_hook()
    factory = evaluate.loading.evaluation_module_factory
    assert hasattr(factory, "uae_hf_original") and not hasattr(factory.uae_hf_original, "uae_hf_original")


def test_release_loader_is_attached_to_the_pipeline():
    assert callable(uae_hf.UAEReconstructionPipeline.from_uae_release)

