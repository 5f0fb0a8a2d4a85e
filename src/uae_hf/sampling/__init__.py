from .flow_sde import (
    FlowStepOutput,
    Trajectory,
    cps_step,
    dpm2_step,
    flow_step,
    gaussian_log_prob,
    sample_trajectory,
    sde_step,
)
