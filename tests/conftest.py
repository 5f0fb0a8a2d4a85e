import os

# Offline before any Hugging Face library is imported.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_EVALUATE_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import socket  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)

# Prepended to scripts run in fresh interpreters: the same network block as the test session. Only this machine's own
# addresses are reachable (the app's server and the browser driver listen there), and only its own names resolve, as
# on a machine without a network, whatever the machine running the tests has.
BLOCK_NETWORK = """
import socket
_LOCAL = (None, "localhost", "127.0.0.1", "::1")
def _local(address):
    return isinstance(address, tuple) and address[0] in _LOCAL
def _blocked(*args, **kwargs):
    raise RuntimeError("network access attempted in an offline test")
_connect, _connect_ex, _create_connection, _getaddrinfo = (
    socket.socket.connect, socket.socket.connect_ex, socket.create_connection, socket.getaddrinfo)
def _connect_locally(sock, address):
    return _connect(sock, address) if _local(address) else _blocked()
def _connect_ex_locally(sock, address):
    return _connect_ex(sock, address) if _local(address) else _blocked()
def _create_connection_locally(address, *args, **kwargs):
    return _create_connection(address, *args, **kwargs) if _local(address) else _blocked()
def _resolve_local_only(host, *args, **kwargs):
    if host not in _LOCAL:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known (offline test)")
    return _getaddrinfo(host, *args, **kwargs)
socket.socket.connect = _connect_locally
socket.socket.connect_ex = _connect_ex_locally
socket.create_connection = _create_connection_locally
socket.getaddrinfo = _resolve_local_only
"""


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
