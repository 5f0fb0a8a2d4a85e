"""Model card templates (Jinja Markdown), one per thing `uae_hf` saves or pushes.

This top-level folder is their only home; it installs as the package `uae_hf.model_cards` (the `package-dir`
mapping in pyproject.toml), so `uae_hf.hub.MODEL_CARDS` finds them in an editable install and in a wheel alike.
"""
