import os

# Offline before any Hugging Face library is imported.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_EVALUATE_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Two threads per test process: with pytest-xdist's workers (pyproject's addopts), the cores shared among them. Set
# before torch loads, so that this process starts as the subprocesses tests start (CLI, demo), which inherit it.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
THREADS = max(1, min(2, len(os.sched_getaffinity(0)) // WORKERS))
os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))

import socket  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from network_block import BLOCK_NETWORK  # noqa: E402

torch.set_num_threads(THREADS)


def pytest_xdist_auto_num_workers(config):
    """`-n auto`: one worker per core, at most 4 (each builds its own twins; the multi-process module keeps one busy)."""
    return max(1, min(4, len(os.sched_getaffinity(0))))


@pytest.fixture(autouse=True, scope="session")
def block_network():
    """Any socket connection beyond this machine fails loudly in the test session; only its own names resolve."""
    saved = socket.socket.connect, socket.socket.connect_ex, socket.create_connection, socket.getaddrinfo
    block = {}
    exec(BLOCK_NETWORK, block)
    yield
    socket.socket.connect, socket.socket.connect_ex, socket.create_connection, socket.getaddrinfo = saved


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from uae_hf import build_tiny_models

    return build_tiny_models(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session")
def encoder(tiny_dir):
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    vlm = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_dir / "encoder").eval()
    return vlm, AutoProcessor.from_pretrained(tiny_dir / "encoder")


@pytest.fixture(scope="session")
def projector(tiny_dir):
    from uae_hf import UAEProjector

    return UAEProjector.from_pretrained(tiny_dir / "projector")


def _load_pipe(tiny_dir):
    from uae_hf import load_uae_pipeline

    pipeline = load_uae_pipeline(tiny_dir / "decoder", tiny_dir / "encoder", tiny_dir / "projector")
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="session")
def pipe(tiny_dir):
    return _load_pipe(tiny_dir)


@pytest.fixture()
def fresh_pipe(tiny_dir):
    """A pipeline of the test's own, for tests that train its parts in place."""
    return _load_pipe(tiny_dir)


@pytest.fixture(scope="session")
def photos():
    """Real photographs bundled with scikit-image, downsized for speed."""
    import PIL.Image
    from skimage import data

    return [
        PIL.Image.fromarray(getattr(data, name)()).convert("RGB").resize((96, 96))
        for name in ("astronaut", "coffee", "chelsea")
    ]


@pytest.fixture(scope="session")
def backbone_checkpoints(tiny_dir):
    return {name: str(tiny_dir / "backbones" / name) for name in ("clip", "dinov2", "dinov3", "longclip", "siglip")}


# Modules whose tests each start several processes (2-process `accelerate launch`es): one xdist scope, so that one
# worker runs their launches one at a time. With the engines' launches spread over both workers (4 busy processes on
# 2 cores) the suite had done 22% of its tests after 16 minutes; it took 16-17 minutes in all before (2026-12-07).
LAUNCHING_MODULES = ("trainer/test_multi_process.py",)
# The longest xdist scopes, longest first, as measured on 2 cores (2026-12-07): they are handed out first, so that no
# long scope starts last and runs alone; the rest follow, those holding `slow` tests first. pyproject's addopts keep
# this order (`--no-loadscope-reorder`: xdist would otherwise order scopes by test count).
LONGEST_SCOPES = ("trainer/test_multi_process.py", "toy_world/test_demo.py", "test_cli.py")


def scope_of(nodeid: str) -> str:
    """The xdist scope of a test: its class, or its module (a launching module whole)."""
    module, _, rest = nodeid.partition("::")
    if module.endswith(LAUNCHING_MODULES) or "::" not in rest:
        return module
    return f"{module}::{rest.split('::')[0]}"


def pytest_xdist_make_scheduler(config, log):
    """xdist's scope scheduling, with `scope_of`'s scopes."""
    from xdist.scheduler import LoadScopeScheduling

    class Scheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return scope_of(nodeid)

    return Scheduling(config, log)


def pytest_collection_modifyitems(items):
    """The longest scopes first, then the scopes holding `slow` tests, then the rest."""
    slow_scopes = {scope_of(item.nodeid) for item in items if item.get_closest_marker("slow")}

    def rank(item) -> int:
        scope = scope_of(item.nodeid)
        return next((i for i, name in enumerate(LONGEST_SCOPES) if scope.endswith(name)),
                    len(LONGEST_SCOPES) + (scope not in slow_scopes))

    items.sort(key=rank)
