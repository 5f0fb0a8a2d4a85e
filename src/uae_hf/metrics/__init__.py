"""Evaluation modules shipped with uae_hf, loadable by bare name with `evaluate.load` once uae_hf is imported."""

from pathlib import Path

METRICS_DIR = Path(__file__).parent
_SHIPPED = {"unified_bench"}


def metric_path(name: str) -> str:
    """Folder of a shipped evaluate module, for `evaluate.load(metric_path("unified_bench"))`."""
    if name not in _SHIPPED:
        raise ValueError(f"uae_hf ships no evaluation module {name!r}; available: {sorted(_SHIPPED)}")
    return str(METRICS_DIR / name)


def _shipped_module_resolver(original):
    def evaluation_module_factory(path, *args, **kwargs):
        # A real local ./unified_bench folder or file still wins, as evaluate itself would resolve it.
        local = Path(path)
        if path in _SHIPPED and not (local / f"{path}.py").is_file() and not Path(f"{path}.py").is_file():
            path = metric_path(path)
        return original(path, *args, **kwargs)

    evaluation_module_factory.uae_hf_original = original
    return evaluation_module_factory


def _patch_evaluate_loading(loading) -> None:
    # `evaluate.load` looks `evaluation_module_factory` up in its module's globals on every call.
    current = loading.evaluation_module_factory
    if not hasattr(current, "uae_hf_original"):
        loading.evaluation_module_factory = _shipped_module_resolver(current)


def install_evaluate_hook() -> None:
    """Make `evaluate.load("unified_bench")` find the module shipped in uae_hf (idempotent).

    Patches `evaluate.loading` now if evaluate is already imported, else right after it is imported, so importing
    uae_hf does not import evaluate.
    """
    from .. import _after_import

    _after_import("evaluate.loading", _patch_evaluate_loading)
