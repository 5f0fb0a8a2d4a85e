import torch

from uae_hf import UAEProjector


def test_default_sizes_and_key_names_match_the_release():
    with torch.device("meta"):
        projector = UAEProjector()
    shapes = {name: tuple(param.shape) for name, param in projector.state_dict().items()}
    assert shapes == {
        "projector.0.weight": (8192, 2048),
        "projector.0.bias": (8192,),
        "projector.2.weight": (4096, 8192),
        "projector.2.bias": (4096,),
    }


def test_projects_every_token_and_round_trips(projector, tmp_path):
    hidden = torch.randn(2, 7, projector.config.in_features, generator=torch.Generator().manual_seed(0))
    out = projector(hidden)
    assert out.shape == (2, 7, projector.config.out_features)
    # token-wise: projecting one token alone gives its row of the batched output
    assert torch.allclose(projector(hidden[1:, 3:4]), out[1:, 3:4], atol=1e-6)
    projector.save_pretrained(tmp_path / "p")
    assert (tmp_path / "p" / "diffusion_pytorch_model.safetensors").exists()
    reloaded = UAEProjector.from_pretrained(tmp_path / "p")
    assert torch.equal(reloaded(hidden), out)
