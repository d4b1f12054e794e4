"""Training state in one layout-independent form: full tensors in the TP=1 layout, by name.

A checkpoint written under any layout (tensor parallelism × data parallelism × ZeRO stage ×
offload) holds the same thing: every weight and every optimizer moment as the full tensor a
one-process run would have, keyed by parameter name. Here is the conversion both ways.

* **Weights.** A parameter sharded over tensor parallelism is gathered along its split
  (:mod:`gkd.models.sharding`; vocabulary padding is dropped, so the tensor is the one a TP=1
  model holds) and cut again for the loading layout (padded for its TP size). Under ZeRO-3 the
  data-parallel partitions are gathered first; where DeepSpeed keeps an fp32 master copy
  (ZeRO 1-3, bf16), the master is what is saved and both copies are set on load.
* **Optimizer state.** Per-element tensors (AdamW: ``exp_avg``, ``exp_avg_sq``) are full
  tensors named ``<key>.<qualified name>``, whatever partitions DeepSpeed keeps them in; the
  step counts and the param groups' hyper-parameters are JSON.
* **RNG streams** are per rank (every rank's torch, NumPy, Python and megatron streams).

Every function that touches a model or an optimizer is **collective**: every rank of the job
calls it, in the same order. Only ``keep=True`` ranks (global rank 0 when saving) hold the
gathered tensors afterwards.

Parameters of a :class:`~gkd.models.GkdModel` are split by :func:`~gkd.models.sharding.shard_kind`;
other modules (method parameters) are replicated over TP unless megatron marked a parameter
``tensor_model_parallel`` (then it is gathered along its ``partition_dim``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from gkd.models.sharding import ShardKind, gather_full, shard_kind
from gkd.parallel import state as pstate
from gkd.parallel import zero

MODEL = "model"
AUXILIARY = "auxiliary"
"""Prefixes of the qualified parameter names in the optimizer state (``model.<name>``)."""


@dataclass(frozen=True)
class ShardRule:
    """How one tensor of a module is split over tensor parallelism on this rank."""

    kind: ShardKind = ShardKind.REPLICATED
    tp: int = 1
    rows: int | None = None
    """Vocabulary rows of the full tensor (the TP=1 layout; sharded tensors are padded past it)."""

    @property
    def sharded(self) -> bool:
        """Split over more than one rank (gathering it is a collective)."""
        return self.tp > 1 and self.kind is not ShardKind.REPLICATED

    def full(self, local: torch.Tensor) -> torch.Tensor:
        """The TP=1-layout tensor from every TP rank's ``local`` part (collective over TP)."""
        if not self.sharded:
            return local.detach()
        out = gather_full(local, self.kind, pstate.tp_group(), self.tp)
        return out[: self.rows] if self.rows is not None else out

    def local(self, full: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """This rank's part of ``full`` (which must give ``shape``; a replicated tensor is
        returned as it is, for ``load_state_dict`` and its overrides to judge)."""
        if not self.sharded:
            return full
        rank = pstate.tp_rank()
        if self.rows is not None and full.shape[0] < shape[0] * self.tp:
            pad = torch.zeros((shape[0] * self.tp - full.shape[0], *full.shape[1:]), dtype=full.dtype)
            full = torch.cat([full, pad])
        if self.kind is ShardKind.ROW:
            out = full.chunk(self.tp, dim=1)[rank]
        elif self.kind is ShardKind.GLU:
            gate, up = full.chunk(2, dim=0)
            out = torch.cat([gate.chunk(self.tp)[rank], up.chunk(self.tp)[rank]])
        else:
            out = full.chunk(self.tp, dim=0)[rank]
        if out.shape != shape:
            raise ValueError(f"holds shape {tuple(full.shape)}, which does not give this rank's shape {tuple(shape)} "
                             f"({self.kind.value}, tensor parallel {self.tp})")
        return out


_BY_ATTRS = {(0, 1): ShardKind.COLUMN, (0, 2): ShardKind.GLU, (1, 1): ShardKind.ROW}


def shard_rules(module: nn.Module) -> dict[str, ShardRule]:
    """The :class:`ShardRule` of every parameter and buffer of ``module`` (tied names included)."""
    from gkd.models import GkdModel

    rules: dict[str, ShardRule] = {}
    for prefix, sub in module.named_modules():
        if isinstance(sub, GkdModel):
            tp, cfg = sub.config.tensor_model_parallel_size, sub.model_config
            for name, _ in sub.named_parameters(remove_duplicate=False):
                kind = shard_kind(name, cfg)
                rows = cfg.vocab_size if kind is ShardKind.VOCAB else None
                rules[f"{prefix}.{name}" if prefix else name] = ShardRule(kind, tp, rows)
    for name, p in module.named_parameters(remove_duplicate=False):
        if name not in rules and getattr(p, "tensor_model_parallel", False):
            key = (int(getattr(p, "partition_dim", 0)), int(getattr(p, "partition_stride", 1)))
            rules[name] = ShardRule(_BY_ATTRS.get(key, ShardKind.COLUMN), pstate.tp_world_size())
    return rules


def _entries(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The module's state-dict entries as live tensors (parameters as themselves); empty extra
    states (megatron's local layers declare them) carry nothing and are skipped."""
    for name, value in module.state_dict(keep_vars=True).items():
        if torch.is_tensor(value):
            yield name, value


def _weight(p: torch.Tensor, partitioned: bool) -> torch.Tensor:
    """This rank's full TP-local value of ``p``: DeepSpeed's fp32 master when it keeps one."""
    if partitioned and isinstance(p, nn.Parameter):
        master = zero.full_master(p)
        if master is not None:
            return master
    with zero.gathered([p]):  # type: ignore[list-item]
        return p.detach().clone() if hasattr(p, "ds_id") else p.detach()


def gather_module(module: nn.Module, *, keep: bool, partitioned: bool) -> dict[str, torch.Tensor]:
    """Full (TP=1 layout) CPU tensors of ``module``'s state dict; empty unless ``keep``.

    Args:
        module: The model (or auxiliary model), in this rank's layout.
        keep: Return the tensors (the writing rank); others only take part in the collectives.
        partitioned: DeepSpeed partitions its weights or keeps fp32 masters (ZeRO 1-3, bf16).
    """
    rules = shard_rules(module)
    out: dict[str, torch.Tensor] = {}
    seen: dict[int, torch.Tensor] = {}
    for name, value in _entries(module):
        if id(value) in seen:  # tied: one tensor, saved once
            if keep:
                out[name] = seen[id(value)]
            continue
        rule = rules.get(name, ShardRule())
        if not keep and not (partitioned or hasattr(value, "ds_id") or rule.sharded):
            continue  # nothing to take part in
        full = rule.full(_weight(value, partitioned)).cpu()
        if keep:
            seen[id(value)] = out[name] = full
    return out


def load_module(module: nn.Module, read: Callable[[str], torch.Tensor], names: set[str], *, strict: bool,
                partitioned: bool) -> None:
    """Set ``module`` (in this rank's layout) from full tensors.

    Args:
        module: Receives the weights; under DeepSpeed its fp32 masters too.
        read: The full tensor of a name.
        names: The names ``read`` knows.
        strict: Refuse missing or unexpected names (as ``load_state_dict``).
        partitioned: As in :func:`gather_module`.

    Raises:
        ValueError: Names or shapes do not fit (the message names them).
    """
    rules = shard_rules(module)
    entries = dict(_entries(module))
    missing, unexpected = sorted(set(entries) - names), sorted(names - set(entries))
    if strict and (missing or unexpected):
        raise ValueError(f"missing {missing}, unexpected {unexpected}")
    local: dict[str, torch.Tensor] = {}
    for name, target in entries.items():
        if name in names:
            try:
                local[name] = rules.get(name, ShardRule()).local(read(name), zero.local_shape(target))  # type: ignore[arg-type]
            except ValueError as e:
                raise ValueError(f"{name} {e}") from None
    # ZeRO-3 parameters hold only a partition: each is gathered, set and partitioned again.
    partitions = {n: t for n, t in entries.items() if n in local and hasattr(t, "ds_id")}
    for name, target in partitions.items():
        with torch.no_grad(), zero.gathered([target], modify=True):  # type: ignore[list-item]
            try:
                target.copy_(local[name])
            except RuntimeError as e:
                raise ValueError(f"{name}: {e}") from None
    # The rest through load_state_dict, which modules may extend (buffers whose shape changes).
    try:
        module.load_state_dict({n: t for n, t in local.items() if n not in partitions}, strict=False)
    except RuntimeError as e:
        raise ValueError(str(e).replace("\n", " ")) from None
    if partitioned:
        done: set[int] = set()
        for name, target in entries.items():
            if name in local and isinstance(target, nn.Parameter) and id(target) not in done:
                done.add(id(target))
                zero.set_master(target, local[name])


# ---------------------------------------------------------------------------------------------
# Optimizer state
# ---------------------------------------------------------------------------------------------

def qualified_parameters(model: nn.Module | None, auxiliary: nn.Module | None) -> dict[str, nn.Parameter]:
    """``{"model.<name>" | "auxiliary.<name>": parameter}``, each parameter once."""
    out: dict[str, nn.Parameter] = {}
    for prefix, module in ((MODEL, model), (AUXILIARY, auxiliary)):
        if isinstance(module, nn.Module):
            out.update({f"{prefix}.{n}": p for n, p in module.named_parameters()})
    return out


def qualified_rules(model: nn.Module | None, auxiliary: nn.Module | None) -> dict[str, ShardRule]:
    out: dict[str, ShardRule] = {}
    for prefix, module in ((MODEL, model), (AUXILIARY, auxiliary)):
        if isinstance(module, nn.Module):
            out.update({f"{prefix}.{n}": r for n, r in shard_rules(module).items()})
    return out


def _hyper_parameters(optimizer: Any) -> list[dict[str, Any]]:
    groups = []
    for group in optimizer.param_groups:
        kept = {}
        for k, v in group.items():
            v = list(v) if isinstance(v, tuple) else v
            if k != "params" and (v is None or isinstance(v, bool | int | float | str | list)):
                kept[k] = v
        groups.append(kept)
    return groups


def _set_hyper_parameters(optimizer: Any, saved: list[dict[str, Any]]) -> None:
    if len(saved) != len(optimizer.param_groups):
        raise ValueError(f"{len(saved)} param groups saved, the optimizer has {len(optimizer.param_groups)}")
    for group, values in zip(optimizer.param_groups, saved, strict=True):
        for k, v in values.items():
            if k in group and k != "params":
                group[k] = tuple(v) if isinstance(group[k], tuple) else v


def gather_optimizer(optimizer: Any, params: Mapping[str, nn.Parameter], rules: Mapping[str, ShardRule], *,
                     keep: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The optimizer state as full tensors ``<key>.<qualified name>`` plus JSON.

    The JSON holds ``step`` (``{qualified name: steps}``, for parameters with state),
    ``state_keys``, ``param_groups`` (hyper-parameters by group, learning rate included) and
    the optimizer's ``type``.

    Raises:
        ValueError: The optimizer updates a parameter that ``params`` does not name.
    """
    tensors: dict[str, torch.Tensor] = {}
    steps: dict[str, int] = {}
    kind = zero.partitioned_kind(optimizer)
    if kind is not None:
        zero.link_partitioned_state(optimizer)
        keys = zero.partitioned_state_keys(optimizer)
        step = zero.partitioned_step(optimizer)
        for name, p in params.items():
            if not p.requires_grad or step is None:
                continue
            steps[name] = step
            for key in keys:
                full = rules.get(name, ShardRule()).full(zero.full_moment(p, key)).cpu()
                if keep:
                    tensors[f"{key}.{name}"] = full
    else:
        names = {id(p): n for n, p in params.items()}
        key_set: set[str] = set()
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) not in names:
                    raise ValueError(f"the optimizer updates a parameter of shape {tuple(p.shape)} that is not part "
                                     "of the model or the auxiliary model")
                name, state = names[id(p)], optimizer.state.get(p, {})
                if "step" in state:
                    steps[name] = int(float(state["step"]))
                for key, value in state.items():
                    if torch.is_tensor(value) and value.shape == p.shape:
                        key_set.add(key)
                        rule = rules.get(name, ShardRule())
                        if keep or rule.sharded:
                            full = rule.full(value).cpu()
                            if keep:
                                tensors[f"{key}.{name}"] = full
        keys = sorted(key_set)
    inner = getattr(optimizer, "optimizer", optimizer)
    meta = {"type": type(inner).__name__, "state_keys": keys, "step": steps,
            "param_groups": _hyper_parameters(optimizer)}
    return tensors, meta


def load_optimizer(optimizer: Any, params: Mapping[str, nn.Parameter], rules: Mapping[str, ShardRule],
                   read: Callable[[str], torch.Tensor], meta: Mapping[str, Any]) -> None:
    """Set the optimizer state (in this rank's layout) from :func:`gather_optimizer`'s output.

    Parameters without saved state (none was there when it was saved) start with none under
    ZeRO 0 and with zeros under ZeRO 1-3, as a fresh optimizer would after its first step.

    Raises:
        ValueError: The saved state does not fit (names, shapes, param groups).
    """
    keys: list[str] = list(meta["state_keys"])
    steps: dict[str, int] = {k: int(v) for k, v in meta["step"].items()}
    unknown = sorted(set(steps) - set(params))
    if unknown:
        raise ValueError(f"state of parameters this model does not have: {unknown[:5]}")

    def local(name: str, key: str, p: nn.Parameter) -> torch.Tensor:
        try:
            return rules.get(name, ShardRule()).local(read(f"{key}.{name}"), zero.local_shape(p))
        except ValueError as e:
            raise ValueError(f"{key}.{name} {e}") from None

    if zero.partitioned_kind(optimizer) is not None:
        if steps:
            zero.prepare_partitioned_state(optimizer, keys, max(steps.values()))
            for name, p in params.items():
                if p.requires_grad and name in steps:
                    for key in keys:
                        zero.set_moment(p, local(name, key, p), key)
        _set_hyper_parameters(optimizer, meta["param_groups"])
        return
    index = {id(p): i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    names = {id(p): n for n, p in params.items()}
    state: dict[int, dict[str, Any]] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = names.get(id(p))
            if name is None:
                raise ValueError(f"the optimizer updates a parameter of shape {tuple(p.shape)} that is not part of "
                                 "the model or the auxiliary model")
            if name in steps:
                state[index[id(p)]] = {"step": torch.tensor(float(steps[name]), dtype=torch.float32),
                                       **{key: local(name, key, p) for key in keys}}
    groups = [dict(g, params=[index[id(p)] for p in g["params"]]) for g in optimizer.param_groups]
    if len(meta["param_groups"]) != len(groups):
        raise ValueError(f"{len(meta['param_groups'])} param groups saved, the optimizer has {len(groups)}")
    for group, saved in zip(groups, meta["param_groups"], strict=True):
        group.update({k: tuple(v) if isinstance(group.get(k), tuple) else v for k, v in saved.items() if k in group})
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# ---------------------------------------------------------------------------------------------
# Per-rank values (RNG streams) gathered to one writer
# ---------------------------------------------------------------------------------------------

def all_gather_bytes(data: bytes) -> list[bytes]:
    """Every rank's ``data`` (ranks in order); ``[data]`` without a process group."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [data]
    world = dist.get_world_size()
    size = torch.tensor([len(data)], dtype=torch.int64)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    mine = torch.zeros(longest, dtype=torch.uint8)
    mine[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else mine[:0]
    parts = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(parts, mine)
    return [p[: int(s.item())].numpy().tobytes() for p, s in zip(parts, sizes, strict=True)]


def layout() -> dict[str, int]:
    """This job's layout: world size, tensor- and data-parallel sizes, this rank's TP rank."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    ready = pstate.is_initialized()
    return {"world_size": world, "tensor_parallel": pstate.tp_world_size() if ready else 1,
            "data_parallel": pstate.dp_world_size(), "tp_rank": pstate.tp_rank() if ready else 0}


def rank() -> int:
    """Global rank of this process (0 without a process group)."""
    return dist.get_rank() if dist.is_initialized() else 0


__all__ = ["AUXILIARY", "MODEL", "ShardRule", "all_gather_bytes", "gather_module", "gather_optimizer", "layout",
           "load_module", "load_optimizer", "qualified_parameters", "qualified_rules", "rank", "shard_rules"]
