"""Model cards for what uae_hf saves and pushes."""

import json
import os
from importlib.resources import files
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

# The card templates: the repository's top-level model_cards/, installed as the package `uae_hf.model_cards`
# (pyproject.toml maps it), so this is that folder in an editable install and the installed copy in a wheel.
MODEL_CARDS = Path(files("uae_hf.model_cards"))

_MODE_DESCRIPTIONS = {
    "embeddings": "the encoder LLM's hidden states of the caption, through the projector, are the decoder's "
    "`prompt_embeds`",
    "text": "the caption is an ordinary prompt for the decoder's own text encoders",
}


LOCAL_CHECKPOINT = "a local checkpoint"


def _hub_id(name: str | None) -> str | None:
    """`name` if it is a Hub id; `None` for a local folder or nothing."""
    if not name or Path(name).is_absolute() or Path(name).exists() or name.startswith((".", "~")):
        return None
    return str(name)


def hub_id_of(module) -> str | None:
    """The Hub id a module was loaded from; `None` for a local folder (cards never carry a user's paths)."""
    return _hub_id(getattr(getattr(module, "config", None), "_name_or_path", None))


def make_adapter_config_portable(folder) -> None:
    """Rewrite `folder/adapter_config.json`'s `base_model_name_or_path` so that it names no folder of the writing
    machine: a Hub id stays; a local folder becomes its path relative to `folder` (it resolves wherever the two are
    moved together; one already written so stays); a path that no longer exists becomes `None`. No adapter config:
    nothing to do."""
    path = Path(folder) / "adapter_config.json"
    if not path.is_file():
        return
    config = json.loads(path.read_text())
    base = config.get("base_model_name_or_path")
    if base is None or _hub_id(base) is not None:
        return
    resolved = Path(base).expanduser()
    if not resolved.is_absolute() and (path.parent / resolved).exists():
        return  # already a path from the adapter folder
    config["base_model_name_or_path"] = (
        Path(os.path.relpath(resolved.resolve(), path.parent.resolve())).as_posix() if resolved.exists() else None
    )
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def model_source(module) -> str:
    """How a card names where a module came from: its Hub id, or `LOCAL_CHECKPOINT`."""
    return hub_id_of(module) or LOCAL_CHECKPOINT


def pipeline_model_card(pipe, repo_id: str, unified_bench: dict[str, float] | None = None,
                        encoder_adapter_folder: str | None = None) -> str:
    """Render the model card of a `UAEReconstructionPipeline` (base models, tags, usage, Unified-Bench scores).

    Args:
        pipe: the pipeline to describe.
        repo_id (`str`): where it will live (used in the loading snippet).
        unified_bench (`dict[str, float]`, *optional*): scores ×100 by backbone (and `overall`), rendered as a table.
        encoder_adapter_folder (`str`, *optional*): the folder's subfolder holding a PEFT adapter of the encoder that
            the pipeline runs with (loaded after the pipeline, as the card shows; the scores are with it).
    """
    encoder, decoder = model_source(pipe.vlm), model_source(pipe.transformer)
    mode = pipe.config.conditioning_mode
    base_models = [name for name in (encoder, decoder) if name != LOCAL_CHECKPOINT]
    card_data = ModelCardData(
        library_name="diffusers",
        pipeline_tag="image-to-image",
        license="other",
        base_model=base_models or None,
        tags=["uae", "uae_hf", "unified-multimodal", "image-to-text", "text-to-image", "sd3"],
    )
    transformer_config = pipe.transformer.config
    projector = None
    if pipe.projector is not None:
        config = pipe.projector.config
        projector = f"{config.in_features} → {config.hidden_features} → {config.out_features}, GELU"
    adapters = getattr(pipe.vlm, "peft_config", None) or {}
    card = ModelCard.from_template(
        card_data,
        template_path=str(MODEL_CARDS / "uae_reconstruction_pipeline.md"),
        model_name=repo_id.split("/")[-1],
        repo_id=repo_id,
        encoder=encoder,
        decoder=decoder,
        conditioning_mode=mode,
        conditioning_description=_MODE_DESCRIPTIONS[mode],
        decoder_details=f"MMDiT, {transformer_config.num_layers} layers, joint_attention_dim "
        f"{transformer_config.joint_attention_dim}",
        projector=projector,
        encoder_adapter=", ".join(adapters) or None,
        encoder_adapter_folder=encoder_adapter_folder,
        conditioning_without_encoder_adapters=not getattr(pipe.config, "conditioning_with_encoder_adapters", True),
        unified_bench=unified_bench,
    )
    return str(card)
