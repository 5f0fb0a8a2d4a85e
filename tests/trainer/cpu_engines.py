"""Let accelerate run its sharding engines (FSDP2, DeepSpeed) on a CPU-only host, for the multi-process tests.

accelerate enables FSDP and DeepSpeed only for accelerator devices: on a CPU host an FSDP config with `use_cpu: true`
silently runs DDP, and DeepSpeed finds no backend. Importing this module (before accelerate builds its state) flips
two guards. `PartialState._prepare_backend` reports a process that `accelerate launch` started for FSDP or DeepSpeed
(with `use_cpu: false`) as one of a multi-accelerator launch with the gloo backend, and the device stays the CPU
(`ACCELERATE_TORCH_DEVICE=cpu`); DDP needs no flip: `use_cpu: true` is accelerate's own CPU DDP. And transformers
accepts a recipe's `bf16: true` as on a bf16 GPU (it asks for `use_cpu` otherwise, which would turn the engine into
CPU DDP), so a recipe trains in the precision it names. DeepSpeed runs on its CPU accelerator (`DS_ACCELERATOR=cpu`).
Everything after that, accelerate's preparation and mixed precision, FSDP2's `fully_shard`, DeepSpeed's engine, bf16
mode and ZeRO stages, is the engines' own code. One thing is skipped: DeepSpeed's CPU accelerator compiles a
shared-memory all-reduce at its first process group (45 s of C++ compilation per fresh cache or DeepSpeed install) that
only its tensor-parallel inference uses; training's collectives are gloo's either way.
"""

import importlib
import os

import transformers.training_args
from accelerate.state import PartialState
from accelerate.utils import DistributedType

os.environ["ACCELERATE_TORCH_DEVICE"] = "cpu"
os.environ["DS_ACCELERATOR"] = "cpu"

_prepare_backend = PartialState._prepare_backend


def _gloo_as_accelerator_backend(self, cpu=False, sagemaker_dp=False, backend=None):
    backend_name, distributed_type = _prepare_backend(self, cpu, sagemaker_dp, backend)
    engine = any(os.environ.get(flag, "false").lower() == "true"
                 for flag in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"))
    if engine and not cpu and distributed_type == DistributedType.NO and int(os.environ.get("LOCAL_RANK", -1)) != -1:
        return "gloo", DistributedType.MULTI_GPU
    return backend_name, distributed_type


PartialState._prepare_backend = _gloo_as_accelerator_backend
if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
    # the module itself: `deepspeed.comm.torch` as an attribute is the torch package (deepspeed.comm imports it)
    deepspeed_comm = importlib.import_module("deepspeed.comm.torch")
    if not hasattr(deepspeed_comm, "build_shm_op"):  # a renamed builder would otherwise be silently compiled again
        raise ImportError("deepspeed.comm.torch has no build_shm_op any more: update cpu_engines.py")
    deepspeed_comm.build_shm_op = lambda: None
transformers.training_args.is_torch_bf16_gpu_available = lambda *args, **kwargs: True
