"""DeepSpeed for the student side of the teacher-student parallel strategy.

Only the student and the auxiliary (method) parameters go through DeepSpeed: ZeRO shards
their optimizer state, gradients (and with stage 3 parameters) over the data-parallel group,
optionally offloading to CPU. Teachers stay outside: frozen, tensor-parallel, never in an
optimizer. Tensor parallelism comes from megatron-core's parallel state, which DeepSpeed sees
through :func:`megatron_mpu` so that gradient norms and clipping are TP-aware.
"""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from gkd.config.run import OptimizerConfig, ZeroConfig


def megatron_mpu() -> SimpleNamespace:
    """megatron-core's parallel state with the two functions DeepSpeed expects and it lacks."""
    from megatron.core import parallel_state as ps

    funcs = {name: getattr(ps, name) for name in dir(ps) if name.startswith("get_")}
    funcs["get_model_parallel_rank"] = lambda: torch.distributed.get_rank(ps.get_model_parallel_group())
    funcs["get_model_parallel_world_size"] = lambda: torch.distributed.get_world_size(ps.get_model_parallel_group())
    return SimpleNamespace(**funcs)


def deepspeed_config(*, micro_batch: int, grad_accum: int, max_grad_norm: float, precision: str,
                     zero: ZeroConfig, data_parallel: int) -> dict[str, Any]:
    """The DeepSpeed JSON config of a stage (the one place it is assembled)."""
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * data_parallel,
        "gradient_clipping": max_grad_norm,
        "zero_optimization": zero.to_deepspeed_dict(),
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "initial_scale_power": 16},
        # gkd hands DeepSpeed a torch AdamW: no CPU-Adam JIT build (minutes on a small CPU).
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def _skip_shm_build() -> None:
    # deepspeed.init_distributed on the CPU accelerator JIT-compiles a shared-memory
    # communication op (~40 s on 2 cores); gloo collectives work without it.
    import deepspeed.ops

    compatible: Any = getattr(deepspeed.ops, "__compatible_ops__", None)
    if isinstance(compatible, dict) and not torch.cuda.is_available():
        compatible["deepspeed_shm_comm"] = False


def param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on biases and norm weights (1-D tensors)."""
    decay, no_decay = [], []
    for _, p in module.named_parameters():
        if p.requires_grad:
            (no_decay if p.dim() < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def initialize_engine(module: nn.Module, optimizer_cfg: OptimizerConfig, scheduler_factory: Any,
                      ds_config: dict[str, Any]) -> tuple[Any, torch.optim.Optimizer, Any]:
    """Wrap ``module`` (student + auxiliary model) in a DeepSpeed engine.

    Returns ``(engine, optimizer, scheduler)``; ``scheduler_factory(optimizer)`` builds the LR
    schedule on the optimizer DeepSpeed will step.
    """
    import deepspeed

    _skip_shm_build()
    # DeepSpeed insists on LOCAL_RANK; launchers set it, a single in-process job has rank 0.
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() == 1:
        os.environ.setdefault("LOCAL_RANK", "0")
    optimizer = torch.optim.AdamW(
        param_groups(module, optimizer_cfg.weight_decay), lr=optimizer_cfg.lr, betas=optimizer_cfg.betas,
        eps=optimizer_cfg.eps,
    )
    scheduler = scheduler_factory(optimizer)
    engine, ds_optimizer, _, ds_scheduler = deepspeed.initialize(
        model=module, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, mpu=megatron_mpu(),
        dist_init_required=False,
    )
    return engine, ds_optimizer, ds_scheduler
