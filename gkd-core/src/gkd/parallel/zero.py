"""DeepSpeed for the student side of the teacher-student parallel strategy.

Only the student and the auxiliary (method) parameters go through DeepSpeed: ZeRO shards
their optimizer state, gradients (and with stage 3 parameters) over the data-parallel group,
optionally offloading to CPU. Teachers stay outside: frozen, tensor-parallel, never in an
optimizer. Tensor parallelism comes from megatron-core's parallel state, which DeepSpeed sees
through :func:`megatron_mpu` so that gradient norms and clipping are TP-aware.
"""

from __future__ import annotations

import contextlib
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


def drop_stale_gradients(optimizer: Any) -> None:
    """Zero the gradient partitions DeepSpeed keeps between optimizer steps; call after each step.

    ZeRO-3, and ZeRO-1/2 with ``offload_optimizer``, copy each parameter's reduced gradient into a
    persistent buffer when its backward hook fires, and never clear that buffer. A parameter that
    takes no part in a step (a student layer Theseus replaced by its teacher block, a method's
    unused auxiliary weight) would then be updated with its gradient from an earlier step, while
    the gradient norm counts it as zero. Zeroed buffers give it a zero gradient, as ZeRO 0-2
    without offload do. A no-op for other optimizers (DeepSpeed 0.19.8 internals, checked by
    ``tests/gkd/parallel/test_equivalence.py``).
    """
    flat = getattr(optimizer, "grad_partitions_flat_buffer", None)  # ZeRO-3
    if isinstance(flat, torch.Tensor):
        flat.zero_()
    for name in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups"):  # offload: ZeRO-3, ZeRO-1/2
        for master in getattr(optimizer, name, None) or ():
            if master.grad is not None:
                master.grad.zero_()


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
    if ds_config["zero_optimization"].get("stage") == 3:
        _register_external_parameters(module)
    if (ds_optimizer is optimizer and not ds_config["zero_optimization"].get("stage")
            and not ds_config["bf16"]["enabled"] and not ds_config["fp16"]["enabled"]
            and engine.dp_world_size == 1):
        _skip_single_rank_reduction(engine, module)
    return engine, ds_optimizer, ds_scheduler


def _skip_single_rank_reduction(engine: Any, module: nn.Module) -> None:
    """Replace DeepSpeed's gradient reduction with what it amounts to on one data-parallel rank.

    Without ZeRO, DeepSpeed's backward flattens every gradient into a bucket, all-reduces it over
    the data-parallel group and copies it back, also when that group is this one process: three
    passes over the gradients per step for nothing (~3 % of a TinyBERT-sized step on a CPU). What
    remains of it is that a trainable parameter without a gradient (it took no part in the step)
    gets a zero one, so AdamW still decays and moves it, as on several ranks.
    """
    def reduce_gradients(bucket_size: int = 0) -> None:
        for param in module.parameters():
            if param.requires_grad and param.numel() and param.grad is None:
                param.grad = torch.zeros_like(param)

    engine.allreduce_gradients = reduce_gradients


def _register_external_parameters(module: nn.Module) -> None:
    """ZeRO-3 gathers a sub-module's own parameters around its forward; a model that reads a
    parameter elsewhere (a tied output layer reads the word embeddings) names it through
    ``external_parameters()`` and DeepSpeed then gathers it with that model."""
    from deepspeed.runtime.zero import register_external_parameter

    for sub in module.modules():
        external = getattr(sub, "external_parameters", None)
        if callable(external):
            for param in external():
                register_external_parameter(sub, param)


# ---------------------------------------------------------------------------------------------
# Full tensors of a DeepSpeed-partitioned optimizer (checkpoints: gkd.parallel.fullstate)
# ---------------------------------------------------------------------------------------------
#
# DeepSpeed keeps the fp32 master weights and the optimizer moments of ZeRO 1-3 (and of its
# bf16 optimizer) as flat per-rank partitions. The public ``deepspeed.utils.safe_*`` functions
# turn them into full tensors per parameter and back; the helpers below add what those
# functions leave to the caller (checked with DeepSpeed 0.19.8, torch AdamW client optimizer,
# ZeRO 1/2/3 with and without offload_optimizer):
#
# * the optimizer state exists only after the first step, so a freshly built engine that
#   resumes gets zero state first (:func:`prepare_partitioned_state`);
# * ZeRO 1/2 link each parameter to its slice of the moments once, after the first group has
#   stepped — later param groups are never linked — so links are refreshed before use;
# * ZeRO-3's ``safe_set_full_*`` cut the value into equal parts without the padding of the
#   last partition; the ``safe_set_local_*`` variants with gkd's own cut are used instead.


def partitioned_kind(optimizer: Any) -> str | None:
    """``"zero3"``, ``"fragments"`` (ZeRO 1/2, DeepSpeed's bf16 optimizer) or None (an optimizer
    that holds plain per-parameter state, as with ZeRO stage 0 in fp32)."""
    module = type(optimizer).__module__
    if not module.startswith("deepspeed."):
        return None
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if isinstance(optimizer, DeepSpeedZeroOptimizer_Stage3):
        return "zero3"
    if isinstance(optimizer, DeepSpeedZeroOptimizer | BF16_Optimizer):
        return "fragments"
    return None


def _master_partitions(optimizer: Any) -> list[torch.Tensor]:
    if partitioned_kind(optimizer) == "zero3":
        return list(optimizer.fp32_partitioned_groups_flat)
    if hasattr(optimizer, "single_partition_of_fp32_groups"):
        return list(optimizer.single_partition_of_fp32_groups)
    return list(optimizer.fp32_groups_flat_partition)


def link_partitioned_state(optimizer: Any) -> None:
    """Point every parameter at its slice of the current optimizer state (ZeRO 1/2, bf16);
    call it before :func:`full_moment`."""
    if partitioned_kind(optimizer) == "fragments":
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()


def partitioned_state_keys(optimizer: Any) -> list[str]:
    """Names of the per-element optimizer state tensors (``exp_avg``, ``exp_avg_sq`` ...)."""
    keys: set[str] = set()
    for flat in _master_partitions(optimizer):
        state = optimizer.optimizer.state.get(flat, {})
        keys |= {k for k, v in state.items() if torch.is_tensor(v) and v.shape == flat.shape}
    return sorted(keys)


def partitioned_step(optimizer: Any) -> int | None:
    """The optimizer's step count (None before its first step)."""
    steps = {float(s["step"]) for flat in _master_partitions(optimizer)
             if "step" in (s := optimizer.optimizer.state.get(flat, {}))}
    if len(steps) > 1:
        raise RuntimeError(f"the optimizer's partitions have different step counts: {sorted(steps)}")
    return int(steps.pop()) if steps else None


def prepare_partitioned_state(optimizer: Any, keys: list[str], step: int) -> None:
    """Give every master partition optimizer state (zeros where it has none yet) holding
    ``keys`` and ``step``, and link the parameters to it, so that the ``set_*`` helpers can
    fill it. Torch's Adam(W) finds the state on its next step and continues from it."""
    base = optimizer.optimizer
    for flat in _master_partitions(optimizer):
        state = base.state[flat]
        for key in keys:
            if key not in state:
                state[key] = torch.zeros_like(flat, memory_format=torch.preserve_format)
        if torch.is_tensor(state.get("step")):
            state["step"].fill_(step)
        else:
            state["step"] = torch.tensor(float(step), dtype=torch.float32)
    link_partitioned_state(optimizer)


def full_master(param: nn.Parameter) -> torch.Tensor | None:
    """The full (over data parallelism) fp32 master weight of a trainable parameter, or None
    when DeepSpeed keeps none for it. Collective over the parameter's data-parallel group."""
    from deepspeed.utils import safe_get_full_fp32_param

    return safe_get_full_fp32_param(param) if param.requires_grad else None


def full_moment(param: nn.Parameter, key: str) -> torch.Tensor:
    """The full optimizer state ``key`` of ``param``. Collective over data parallelism."""
    from deepspeed.utils import safe_get_full_optimizer_state

    value = safe_get_full_optimizer_state(param, key)
    if value is None:
        raise RuntimeError(f"DeepSpeed holds no optimizer state '{key}' for a parameter of shape {tuple(param.shape)}")
    return value


def _zero3_part(param: Any, value: torch.Tensor) -> torch.Tensor:
    """This rank's ZeRO-3 partition of ``value`` (the last one padded with zeros)."""
    size = param.ds_tensor.numel()
    rank = torch.distributed.get_rank(group=param.ds_process_group)
    world = torch.distributed.get_world_size(group=param.ds_process_group)
    flat = value.detach().reshape(-1).float()
    flat = torch.nn.functional.pad(flat, (0, size * world - flat.numel()))
    return flat[rank * size:(rank + 1) * size]


def set_master(param: nn.Parameter, value: torch.Tensor) -> None:
    """Set this rank's part of ``param``'s fp32 master weight from the full ``value`` (local)."""
    if not param.requires_grad:
        return
    if hasattr(param, "ds_id"):
        from deepspeed.utils import safe_set_local_fp32_param

        safe_set_local_fp32_param(param, _zero3_part(param, value))
    elif hasattr(param, "_hp_mapping"):
        from deepspeed.utils import safe_set_full_fp32_param

        safe_set_full_fp32_param(param, value.float().reshape(param.shape))


def set_moment(param: nn.Parameter, value: torch.Tensor, key: str) -> None:
    """Set this rank's part of optimizer state ``key`` of ``param`` from the full ``value`` (local)."""
    if hasattr(param, "ds_id"):
        from deepspeed.utils import safe_set_local_optimizer_state

        safe_set_local_optimizer_state(param, _zero3_part(param, value), key)
    elif hasattr(param, "_hp_mapping"):
        from deepspeed.utils import safe_set_full_optimizer_state

        safe_set_full_optimizer_state(param, value.float().reshape(param.shape), key)


def gathered(params: list[nn.Parameter], *, modify: bool = False) -> Any:
    """Context in which ZeRO-3 partitioned ``params`` hold their full data (a no-op for others).
    With ``modify``, what data-parallel rank 0 writes into them is kept on exit."""
    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None)


def local_shape(param: nn.Parameter) -> torch.Size:
    """The parameter's shape on this rank before ZeRO-3 partitioning (its TP-local shape)."""
    return param.ds_shape if hasattr(param, "ds_shape") else param.shape
