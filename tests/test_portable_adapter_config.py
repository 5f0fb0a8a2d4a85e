"""What an adapter config names as its base never is the writing machine's own path."""

import json

import pytest

from uae_hf.hub import make_adapter_config_portable


@pytest.mark.parametrize("base, expected", [
    ("ABSOLUTE", "../../models/encoder"),  # a local folder: its path from the adapter folder
    ("Qwen/Qwen2.5-VL-3B-Instruct", "Qwen/Qwen2.5-VL-3B-Instruct"),  # a Hub id stays
    ("/no/such/folder", None),  # nothing to point at
])
def test_base_becomes_a_hub_id_or_a_path_from_the_adapter_folder(base, expected, tmp_path, monkeypatch):
    (tmp_path / "models" / "encoder").mkdir(parents=True)
    adapter = tmp_path / "stages" / "understanding"
    adapter.mkdir(parents=True)
    base = str(tmp_path / "models" / "encoder") if base == "ABSOLUTE" else base
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": base, "r": 8}))
    for _ in range(2):  # twice (a trainer and the demo both do it): the second leaves the first's result
        make_adapter_config_portable(adapter)
        config = json.loads((adapter / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == expected and config["r"] == 8
    monkeypatch.chdir(tmp_path)  # a path relative to the working directory becomes one from the adapter folder
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "models/encoder"}))
    make_adapter_config_portable(adapter)
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == "../../models/encoder"
