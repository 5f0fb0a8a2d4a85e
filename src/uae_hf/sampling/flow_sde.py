"""Stochastic sampling with log-probabilities for rectified-flow decoders (Flow-GRPO, DESIGN.md §4).

Convention (diffusers' flow matching): `x_σ = (1 - σ) x0 + σ ε`, velocity `v = ε - x0`, σ runs from 1 to 0,
`dt = σ_next - σ`. With `noise_level = 0` both steps reduce to diffusers' deterministic Euler step. `"dpm2"` is a
deterministic second-order multistep solver (DiffusionNFT's rollout sampler). The sampler knows no model family: the
decoder's schedule and velocity come from its [`~uae_hf.decoders.DecoderFamily`].
"""

import math
from dataclasses import dataclass

import torch
from diffusers.utils.torch_utils import randn_tensor
from torch.utils.checkpoint import checkpoint


@dataclass
class FlowStepOutput:
    """One stochastic step.

    Attributes:
        prev_sample (`torch.Tensor`): the next latent `x_{σ_next}`.
        log_prob (`torch.Tensor` of shape `(batch,)`): `log π(prev_sample | sample)`, averaged over latent elements.
        mean (`torch.Tensor`): the Gaussian's mean.
        std (`torch.Tensor`): the Gaussian's standard deviation (broadcastable to the latents).
        std_t (`torch.Tensor`, *optional*): the noise scale Flow-GRPO's KL divides by (`2·std_t²`): `std / sqrt(-dt)`
            for the SDE step (no `|dt|`, DESIGN.md §4), `std` itself for the CPS step.
    """

    prev_sample: torch.Tensor
    log_prob: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    std_t: torch.Tensor | None = None


def mean_kl(step: FlowStepOutput, reference: FlowStepOutput) -> torch.Tensor:
    """Flow-GRPO's KL of a step to the reference's: per sample, `mean((μ - μ_ref)²) / (2·std_t²)` (the reference
    implementation's scale; the exact Gaussian KL would divide by `2·std²`, `|dt|` times smaller)."""
    squared = ((step.mean - reference.mean) ** 2).mean(dim=tuple(range(1, step.mean.ndim)))
    return squared / (2 * step.std_t**2)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Per-sample mean over elements of `log N(x; mean, std²)`; zero where `std == 0` (a deterministic step)."""
    std = torch.as_tensor(std, dtype=torch.float32, device=x.device)
    safe = torch.where(std > 0, std, torch.ones_like(std))
    log_prob = -((x.float() - mean.float()) ** 2) / (2 * safe**2) - torch.log(safe) - 0.5 * math.log(2 * math.pi)
    log_prob = torch.where(std > 0, log_prob, torch.zeros_like(log_prob))
    return log_prob.mean(dim=tuple(range(1, x.ndim)))


def sde_step(
    velocity: torch.Tensor,
    sample: torch.Tensor,
    sigma: torch.Tensor | float,
    sigma_next: torch.Tensor | float,
    noise_level: float = 0.7,
    sigma_max: torch.Tensor | float | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    prev_sample: torch.Tensor | None = None,
) -> FlowStepOutput:
    """Euler–Maruyama step of the SDE with the flow ODE's marginals.

    `std_t = a·sqrt(σ / (1 - σ))` (at σ = 1 the denominator uses `sigma_max`, the schedule's second sigma),
    `mean = x (1 + std_t²/(2σ) dt) + v (1 + std_t² (1 - σ)/(2σ)) dt`, `x_next = mean + std_t sqrt(-dt) ε`.

    Args:
        velocity: the model's `v` at `sample`; sample: `x_σ`; sigma, sigma_next: the step's noise levels.
        noise_level (`float`, defaults to 0.7): `a`; 0 gives the deterministic Euler step.
        sigma_max: replaces σ in `1 - σ` when σ == 1 (required then).
        generator: for the step's noise; prev_sample: score this given next latent instead of sampling one.
    """
    sample = sample.float()
    velocity = velocity.float()
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=sample.device)
    sigma_next = torch.as_tensor(sigma_next, dtype=torch.float32, device=sample.device)
    dt = sigma_next - sigma
    if noise_level > 0:
        denominator_sigma = sigma
        if bool(sigma >= 1):
            if sigma_max is None:
                raise ValueError("sde_step at sigma = 1 needs sigma_max (the schedule's second sigma)")
            denominator_sigma = torch.as_tensor(sigma_max, dtype=torch.float32, device=sample.device)
        std_t = noise_level * torch.sqrt(sigma / (1 - denominator_sigma))
    else:
        std_t = torch.zeros((), dtype=torch.float32, device=sample.device)
    mean = sample * (1 + std_t**2 / (2 * sigma) * dt) + velocity * (1 + std_t**2 * (1 - sigma) / (2 * sigma)) * dt
    std = std_t * torch.sqrt(-dt)
    if prev_sample is None:
        noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
        prev_sample = mean + std * noise if noise_level > 0 else mean
    return FlowStepOutput(prev_sample, gaussian_log_prob(prev_sample, mean, std), mean, std, std_t)


def cps_step(
    velocity: torch.Tensor,
    sample: torch.Tensor,
    sigma: torch.Tensor | float,
    sigma_next: torch.Tensor | float,
    noise_level: float = 0.7,
    generator: torch.Generator | list[torch.Generator] | None = None,
    prev_sample: torch.Tensor | None = None,
    log_prob_form: str = "gaussian",
) -> FlowStepOutput:
    """Coefficients-preserving step: `std = σ_next sin(aπ/2)`, `x0 = x - σv`, `x1 = x + (1 - σ)v`,
    `mean = x0 (1 - σ_next) + x1 sqrt(σ_next² - std²)`, `x_next = mean + std ε`.

    Args:
        log_prob_form (`str`, defaults to `"gaussian"`): `"gaussian"`, the per-element mean of `log N(x_next; mean,
            std²)`, or `"squared_error"`, the CPS reference's `-mean((x_next - mean)²)` (no `1/(2 std²)`, no
            normaliser), which [`flow_step`] (so the sampler and Flow-GRPO) uses.
    """
    if log_prob_form not in ("gaussian", "squared_error"):
        raise ValueError(f"log_prob_form must be 'gaussian' or 'squared_error', got {log_prob_form!r}")
    sample = sample.float()
    velocity = velocity.float()
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=sample.device)
    sigma_next = torch.as_tensor(sigma_next, dtype=torch.float32, device=sample.device)
    std = sigma_next * math.sin(noise_level * math.pi / 2)
    x0 = sample - sigma * velocity
    x1 = sample + (1 - sigma) * velocity
    mean = x0 * (1 - sigma_next) + x1 * torch.sqrt(sigma_next**2 - std**2)
    if prev_sample is None:
        noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
        prev_sample = mean + std * noise if noise_level > 0 else mean
    if log_prob_form == "squared_error":
        log_prob = -((prev_sample.float() - mean) ** 2).mean(dim=tuple(range(1, sample.ndim)))
    else:
        log_prob = gaussian_log_prob(prev_sample, mean, std)
    return FlowStepOutput(prev_sample, log_prob, mean, std, torch.as_tensor(std, dtype=torch.float32))


STEPS = {"sde": sde_step, "cps": cps_step}


def flow_step(method: str, velocity, sample, sigmas: torch.Tensor, index: int, noise_level: float, **kwargs):
    """Step `index` of a schedule `sigmas` (length T + 1) with `method` (`"sde"` or `"cps"`; CPS scores with the
    reference's squared-error log-prob, see [`cps_step`])."""
    if method not in STEPS:
        raise ValueError(f"unknown sampling method {method!r}; choose from {sorted(STEPS)}")
    if method == "sde":
        kwargs["sigma_max"] = sigmas[1]
    else:
        kwargs.setdefault("log_prob_form", "squared_error")
    return STEPS[method](velocity, sample, sigmas[index], sigmas[index + 1], noise_level, **kwargs)


def dpm2_step(velocity: torch.Tensor, sample: torch.Tensor, sigmas: torch.Tensor, index: int,
              previous_x0: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Step `index` of DPM-Solver++(2M) on the flow ODE, in data prediction `x0 = x - σ·v` and half-log-SNR
    `λ = log((1 - σ)/σ)`: `x_next = (σ_next/σ)·x - (1 - σ_next)·expm1(-h)·D`, `h = λ_next - λ`, with
    `D = (1 + h/(2h'))·x0 - h/(2h')·x0_previous` (h' the previous step's h). First order (Euler's step) when there is
    no finite previous step (the first two steps from σ = 1) and into σ = 0. Returns `(x_next, x0)`."""
    sigma, sigma_next = float(sigmas[index]), float(sigmas[index + 1])
    x0 = sample - sigma * velocity
    if sigma_next == 0:
        return x0, x0

    def half_log_snr(value: float) -> float:
        return math.log((1 - value) / value) if value < 1 else -math.inf

    h = half_log_snr(sigma_next) - half_log_snr(sigma)
    data = x0
    if previous_x0 is not None and index > 0:
        h_previous = half_log_snr(sigma) - half_log_snr(float(sigmas[index - 1]))
        if math.isfinite(h_previous):
            correction = h / (2 * h_previous)
            data = (1 + correction) * x0 - correction * previous_x0
    return (sigma_next / sigma) * sample - (1 - sigma_next) * math.expm1(-h) * data, x0


@dataclass
class Trajectory:
    """A batch of sampled trajectories.

    Attributes:
        latents (`torch.Tensor` of shape `(batch, T + 1, C, H, W)`): `x` before each step and the final sample.
        log_probs (`torch.Tensor` of shape `(batch, T)`): log-prob of each step's sampled next latent.
        timesteps (`torch.Tensor` of shape `(T,)`), sigmas (`torch.Tensor` of shape `(T + 1,)`): the schedule.
    """

    latents: torch.Tensor
    log_probs: torch.Tensor
    timesteps: torch.Tensor
    sigmas: torch.Tensor


def sample_trajectory(
    family,
    conditioning: dict,
    latents: torch.Tensor,
    num_inference_steps: int,
    guidance_scale: float,
    noise_level: float = 0.7,
    method: str = "sde",
    generator: torch.Generator | list[torch.Generator] | None = None,
    transformer=None,
    checkpoint_steps: bool = False,
    integer_timesteps: bool = False,
) -> Trajectory:
    """Sample a batch from initial `latents` (spatial noise, `family.initial_noise`), recording every step.

    The one sampler of `uae_hf`: Flow-GRPO's rollouts (stochastic, under `torch.no_grad()`) and cold start's
    differentiable reconstructions (`noise_level=0`: diffusers' Euler step, gradients enabled) both run it.

    Args:
        family (`DecoderFamily`): the decoder (`uae_hf.decoders.decoder_family(pipe)`): its schedule, velocity and,
            unless `transformer` is given, its DiT.
        conditioning: from `family.encode_captions`.
        latents: `(batch, C, H, W)` initial noise.
        num_inference_steps, guidance_scale: as in the pipeline.
        noise_level (`float`, defaults to 0.7), method (`"sde"` or `"cps"`): the stochastic step; or `"dpm2"`, the
            deterministic second-order solver ([`dpm2_step`]; no noise, log-probs 0).
        generator: one per sample (reproducible per item) or one for the batch.
        transformer: the DiT to run, e.g. a training wrapper of `pipe.transformer`.
        checkpoint_steps (`bool`, defaults to `False`): recompute each step in the backward pass instead of keeping
            its activations (deterministic steps only: a recomputed stochastic step would draw other noise).
        integer_timesteps (`bool`, defaults to `False`): give the DiT `⌊1000σ⌋` instead of the scheduler's float
            timesteps (as DiffusionNFT's reference samples); the trajectory records the scheduler's.
    """
    if method not in (*STEPS, "dpm2"):
        raise ValueError(f"unknown sampling method {method!r}; choose from {sorted(STEPS) + ['dpm2']}")
    if method == "dpm2" and noise_level > 0:
        raise ValueError(f"method='dpm2' is deterministic: pass noise_level=0, got {noise_level}")
    if checkpoint_steps and noise_level > 0:
        raise ValueError("checkpoint_steps recomputes steps in the backward pass, so they must be deterministic "
                         f"(noise_level=0), got noise_level={noise_level}")
    transformer = transformer if transformer is not None else family.transformer
    height, width = family.image_size(latents)
    timesteps, sigmas = family.schedule(num_inference_steps, height, width, latents.device)

    def step(x: torch.Tensor, index: int, previous_x0: torch.Tensor | None):
        """`(x_next, log_prob, x0)`: x0 is kept for the multistep solver's next step."""
        timestep = (sigmas[index].float() * 1000).long() if integer_timesteps else timesteps[index]
        v = family.velocity(transformer, x, timestep, conditioning, guidance_scale)
        if method == "dpm2":
            x_next, x0 = dpm2_step(v, x, sigmas, index, previous_x0)
            return x_next, torch.zeros(len(x), device=x.device), x0
        output = flow_step(method, v, x, sigmas, index, noise_level, generator=generator)
        return output.prev_sample, output.log_prob, None

    states, log_probs = [latents.float()], []
    x, x0 = latents.float(), None
    for index in range(len(timesteps)):
        if checkpoint_steps:
            x, log_prob, x0 = checkpoint(step, x, index, x0, use_reentrant=False)
        else:
            x, log_prob, x0 = step(x, index, x0)
        states.append(x)
        log_probs.append(log_prob)
    return Trajectory(torch.stack(states, dim=1), torch.stack(log_probs, dim=1), timesteps, sigmas)
