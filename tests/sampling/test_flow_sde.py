"""The SDE / CPS steps and the trajectory sampler (DESIGN.md §4)."""

import pytest
import torch

from uae_hf.decoders import SD3Family
from uae_hf.sampling import cps_step, dpm2_step, flow_step, sample_trajectory, sde_step


def generators(n, offset=0):
    return [torch.Generator().manual_seed(offset + i) for i in range(n)]


CAPTIONS = ["a cat", "an astronaut in an orange suit next to a flag and a model of a space shuttle " * 2]


@pytest.mark.parametrize("mode", ["embeddings", "text"])
def test_noise_level_zero_reproduces_the_diffusers_sd3_euler_sampler_exactly(pipe, mode):
    expected = pipe.generate(CAPTIONS, conditioning_mode=mode, generator=generators(2), num_inference_steps=5,
                             output_type="latent").images
    conditioning = pipe.encode_captions(CAPTIONS, mode)
    latents = pipe.prepare_latents(2, pipe.transformer.config.in_channels, 64, 64, torch.float32,
                                   torch.device("cpu"), generators(2))
    trajectory = sample_trajectory(SD3Family(pipe), conditioning, latents, 5, 5.0, noise_level=0.0, method="sde")
    assert torch.equal(trajectory.latents[:, -1], expected)
    assert trajectory.latents.shape == (2, 6, *latents.shape[1:]) and trajectory.log_probs.shape == (2, 5)


def _state(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)


@pytest.mark.parametrize("sigma, sigma_next", [(0.8, 0.6), (1.0, 0.9), (0.2, 0.0)])
def test_sde_log_prob_is_the_normal_log_density_per_element(sigma, sigma_next):
    x, v = _state()
    step = sde_step(v, x, sigma, sigma_next, noise_level=0.7, sigma_max=0.9, generator=torch.Generator().manual_seed(1))
    sigma_denominator = 0.9 if sigma == 1.0 else sigma
    std_t = 0.7 * (sigma / (1 - sigma_denominator)) ** 0.5
    dt = sigma_next - sigma
    expected_std = std_t * (-dt) ** 0.5
    torch.testing.assert_close(step.std, torch.tensor(expected_std), rtol=1e-6, atol=0)
    mean = x * (1 + std_t**2 / (2 * sigma) * dt) + v * (1 + std_t**2 * (1 - sigma) / (2 * sigma)) * dt
    torch.testing.assert_close(step.mean, mean, rtol=1e-5, atol=1e-6)
    normal = torch.distributions.Normal(step.mean, step.std)
    torch.testing.assert_close(step.log_prob, normal.log_prob(step.prev_sample).mean(dim=(1, 2, 3)), rtol=1e-5, atol=1e-5)
    # scoring a given next latent (the update's recomputation) gives the same number as sampling it did
    again = sde_step(v, x, sigma, sigma_next, noise_level=0.7, sigma_max=0.9, prev_sample=step.prev_sample)
    torch.testing.assert_close(again.log_prob, step.log_prob, rtol=0, atol=0)


def test_cps_step_follows_its_definition():
    x, v = _state(1)
    step = cps_step(v, x, 0.7, 0.5, noise_level=0.7, generator=torch.Generator().manual_seed(2))
    std = 0.5 * torch.sin(torch.tensor(0.7 * torch.pi / 2))
    mean = (x - 0.7 * v) * 0.5 + (x + 0.3 * v) * torch.sqrt(0.25 - std**2)
    torch.testing.assert_close(step.mean, mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(step.std, std, rtol=1e-6, atol=0)
    normal = torch.distributions.Normal(step.mean, step.std)
    torch.testing.assert_close(step.log_prob, normal.log_prob(step.prev_sample).mean(dim=(1, 2, 3)), rtol=1e-5, atol=1e-5)


def test_deterministic_step_is_euler_and_has_zero_log_prob():
    x, v = _state(2)
    step = sde_step(v, x, 0.6, 0.4, noise_level=0.0)
    assert torch.equal(step.prev_sample, x + (0.4 - torch.tensor(0.6)) * v) and torch.equal(step.log_prob, torch.zeros(3))


def test_bad_arguments():
    x, v = _state()
    with pytest.raises(ValueError, match="sigma_max"):
        sde_step(v, x, 1.0, 0.9)
    with pytest.raises(ValueError, match="choose from"):
        flow_step("ddim", v, x, torch.tensor([1.0, 0.5, 0.0]), 0, 0.7)


def _gaussian_flow_error(steps: int, solver: str, scale: float = 0.3) -> float:
    """Signed error at σ = 0 of the flow ODE of data N(0, scale²) from x = 1 at σ = 1, with the exact velocity
    `E[ε - x0 | x_σ]`; the exact solution is `x_σ = sqrt((1 - σ)²·scale² + σ²)`, so `x_0 = scale`."""
    sigmas = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    x, x0 = torch.ones(1, dtype=torch.float64), None
    for index in range(steps):
        sigma = float(sigmas[index])
        variance = (1 - sigma) ** 2 * scale**2 + sigma**2
        v = (sigma - (1 - sigma) * scale**2) * x / variance
        if solver == "euler":
            x = sde_step(v, x, sigma, sigmas[index + 1], noise_level=0.0, sigma_max=sigmas[1]).prev_sample
        else:
            x, x0 = dpm2_step(v, x, sigmas, index, x0)
    return float(x) - scale


def test_dpm2_is_a_second_order_solver_of_the_flow_ode():
    """On a flow whose exact solution is known, DPM-Solver++(2M)'s error at 10 steps is under half of Euler's, and
    halving the step divides it by more than 3 (Euler's by 2)."""
    assert abs(_gaussian_flow_error(10, "dpm2")) < abs(_gaussian_flow_error(10, "euler")) / 2
    assert abs(_gaussian_flow_error(160, "dpm2") / _gaussian_flow_error(320, "dpm2")) > 3
    assert abs(_gaussian_flow_error(160, "euler") / _gaussian_flow_error(320, "euler")) == pytest.approx(2, abs=0.05)


def test_dpm2_without_a_previous_step_is_euler_s_step():
    x, v = _state(5)
    sigmas = torch.tensor([1.0, 0.7, 0.4, 0.0])
    for index in range(3):
        first_order, x0 = dpm2_step(v, x, sigmas, index)
        torch.testing.assert_close(first_order, x + (sigmas[index + 1] - sigmas[index]) * v, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x0, x - sigmas[index] * v)
    second_order, _ = dpm2_step(v, x, sigmas, 2 - 1, previous_x0=torch.zeros_like(x))  # after σ = 1: still first order
    torch.testing.assert_close(second_order, x + (sigmas[2] - sigmas[1]) * v, rtol=1e-5, atol=1e-5)


def test_dpm2_trajectories_are_deterministic_and_differ_from_euler_after_two_steps(pipe):
    conditioning = pipe.encode_captions(CAPTIONS)
    latents = pipe.prepare_latents(2, 16, 64, 64, torch.float32, torch.device("cpu"), generators(2))
    euler = sample_trajectory(SD3Family(pipe), conditioning, latents, 5, 1.0, noise_level=0.0)
    dpm2 = sample_trajectory(SD3Family(pipe), conditioning, latents, 5, 1.0, noise_level=0.0, method="dpm2")
    assert torch.equal(dpm2.log_probs, torch.zeros(2, 5))
    torch.testing.assert_close(dpm2.latents[:, :3], euler.latents[:, :3], rtol=1e-5, atol=1e-5)  # first order from σ = 1
    assert not torch.allclose(dpm2.latents[:, 3], euler.latents[:, 3], atol=1e-4)  # the multistep correction
    with pytest.raises(ValueError, match="deterministic"):
        sample_trajectory(SD3Family(pipe), conditioning, latents, 5, 1.0, noise_level=0.7, method="dpm2")
    with pytest.raises(ValueError, match="choose from"):
        sample_trajectory(SD3Family(pipe), conditioning, latents, 5, 1.0, method="heun")


def test_trajectories_are_reproducible_per_sample(pipe):
    conditioning = pipe.encode_captions(CAPTIONS)
    latents = pipe.prepare_latents(2, 16, 64, 64, torch.float32, torch.device("cpu"), generators(2))
    first = sample_trajectory(SD3Family(pipe), conditioning, latents, 4, 4.5, generator=generators(2, 10))
    second = sample_trajectory(SD3Family(pipe), conditioning, latents, 4, 4.5, generator=generators(2, 10))
    assert torch.equal(first.latents, second.latents) and torch.equal(first.log_probs, second.log_probs)
    timesteps, sigmas = SD3Family(pipe).schedule(4, 64, 64, "cpu")
    assert torch.equal(first.timesteps, timesteps) and sigmas[0] == 1 and sigmas[-1] == 0


def test_cps_scores_with_the_reference_squared_error():
    """CPS's reference log-prob is `-(x_next - mean)²`, a per-element mean (no 1/(2 std²), no normaliser)."""
    x, v = _state(3)
    sigmas = torch.tensor([1.0, 0.7, 0.5, 0.0])
    step = flow_step("cps", v, x, sigmas, 1, 0.7, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(step.log_prob, -((step.prev_sample - step.mean) ** 2).mean(dim=(1, 2, 3)), rtol=0, atol=0)
    again = cps_step(v, x, 0.7, 0.5, noise_level=0.7, prev_sample=step.prev_sample, log_prob_form="squared_error")
    torch.testing.assert_close(again.log_prob, step.log_prob, rtol=0, atol=0)
    assert torch.equal(step.std_t, step.std)  # the KL's scale: CPS's std has no dt in it


def test_a_text_mask_on_a_dit_without_the_masked_processor_is_refused(pipe, tiny_dir):
    """diffusers' own processor would drop the mask (a logged warning) and attend each caption's batch padding."""
    from diffusers import SD3Transformer2DModel

    velocity = SD3Family(pipe).velocity

    conditioning = pipe.encode_captions(CAPTIONS, "embeddings")
    assert conditioning["joint_attention_kwargs"] is not None  # unequal lengths: a mask
    stock = SD3Transformer2DModel.from_pretrained(tiny_dir / "decoder", subfolder="transformer")
    latents = torch.randn(2, stock.config.in_channels, 8, 8)
    with pytest.raises(ValueError, match="needs the masked joint attention, but the DiT runs JointAttnProcessor"):
        velocity(stock, latents, torch.tensor(500.0), conditioning, 1.0)
    with pipe.masked_attention():
        velocity(pipe.transformer, latents, torch.tensor(500.0), conditioning, 1.0)  # the pipeline's own: masked


def test_detaching_the_unconditional_branch_trains_the_conditional_one_alone(pipe):
    """`v = sg(u) + w·(c - sg(u))` has the guided value and backpropagates as `w·c`; undetached it is
    `(1 - w)·u + w·c`, whose gradient differs."""
    velocity = SD3Family(pipe).velocity

    conditioning = pipe.encode_captions(CAPTIONS, "embeddings")
    timestep = SD3Family(pipe).schedule(4, 64, 64, "cpu")[0][1]
    latents = torch.randn(2, pipe.transformer.config.in_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    direction = torch.randn(latents.shape, generator=torch.Generator().manual_seed(1))
    w = 4.5

    def run(guidance, **kwargs):
        x = latents.clone().requires_grad_(True)
        v = velocity(pipe.transformer, x, timestep, conditioning, guidance, **kwargs)
        (gradient,) = torch.autograd.grad((v.float() * direction).sum(), x)
        return v.detach(), gradient

    with pipe.masked_attention():
        detached, detached_gradient = run(w, detach_unconditional=True)
        guided, guided_gradient = run(w)
        _, conditional_gradient = run(1.0)  # the conditional branch alone
    assert torch.equal(detached, guided)  # the same velocity: only its gradient changes
    torch.testing.assert_close(detached_gradient, w * conditional_gradient, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(guided_gradient, detached_gradient, rtol=1e-2, atol=1e-4)
