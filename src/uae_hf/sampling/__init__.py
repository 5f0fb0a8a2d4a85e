from .flow_sde import (
    FlowStepOutput,
    Trajectory,
    cps_step,
    decode_latents,
    dpm2_step,
    flow_step,
    gaussian_log_prob,
    sample_trajectory,
    schedule,
    sde_step,
    velocity,
)
