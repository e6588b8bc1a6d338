"""Data-parallel training with PyTorch's own engine: torchrun + DDP (default) or FSDP2 (`fully_shard`).

    torchrun --nproc_per_node 8 -m mlmfast train ...            # one node, 8 GPUs (NCCL)
    torchrun --nproc_per_node 2 -m mlmfast train --device cpu   # CPU processes (gloo): what the tests run

`setup_distributed` reads the variables torchrun sets (WORLD_SIZE, RANK, LOCAL_RANK) and joins the process group;
without them everything here is a no-op and the run is a plain single process.

The contract the trainer keeps (see mlmfast/trainer.py):
- every rank builds the same model from the same seed; DDP broadcasts rank 0's weights anyway, FSDP2 shards them;
- micro-batch k of an epoch is the slice [k*G, (k+1)*G) of the epoch's sample order (G = batch size B x world
  size W); rank r reads its part [k*G + r*B, k*G + (r+1)*B), so the ranks read disjoint data;
- micro-batch i of optimizer step s is masked with the step's seed and row offset (i*W + r)*B: a row's mask
  depends on its place in the step's global batch, not on how that batch is cut into micro-batches and ranks
  (with the counter-based kernel, mlmfast.ops.mask_select; the reference fallback seeds each part apart);
- the loss of a step is the mean over all masked tokens of the global batch (every rank and micro-batch), so the
  gradients equal those of one process with the whole global batch.
Only rank 0 logs, evaluates into the metrics file and writes checkpoints.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch

from .errors import UserError

STRATEGIES = ("ddp", "fsdp")


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: Optional[str] = None  # "nccl" | "gloo" | None (single process)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum_(self, t: torch.Tensor) -> torch.Tensor:
        """In-place sum over ranks (a collective, no host sync on CUDA); identity in a single process."""
        if self.enabled:
            torch.distributed.all_reduce(t)
        return t

    def all_reduce_max_(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return t

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def gather_object(self, obj: Any) -> list[Any]:
        """[obj of rank 0, obj of rank 1, ...] on every rank ([obj] in a single process)."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's obj, on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]


def env_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise UserError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer; launch with torchrun") from None


def setup_distributed(device_name: str) -> tuple[DistEnv, Optional[torch.device]]:
    """Join the torchrun process group if there is one. Returns (env, device) where device is this rank's
    device (cuda:LOCAL_RANK with NCCL, or cpu with gloo), or None in a single process (the caller resolves
    `device_name` itself)."""
    world = env_world_size()
    if world <= 1:
        return DistEnv(), None
    import torch.distributed as dist

    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    want_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if want_cuda:
        if not torch.cuda.is_available():
            raise UserError(f"--device {device_name} asked for, but CUDA is not available; use --device cpu (gloo)")
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} GPU(s): "
                            "use --nproc_per_node <= the number of GPUs")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device_name in ("auto", "cpu"):
        device = torch.device("cpu")
        backend = "gloo"
    else:
        raise UserError(f"--device {device_name} cannot be used with torchrun; use auto, cpu or cuda "
                        "(each process takes cuda:LOCAL_RANK)")
    if not dist.is_initialized():
        # Rank 0 may work alone for a while (training the tokenizer on a large corpus, hashing a checkpoint) while
        # the others wait in a collective: NCCL's default watchdog (10 min) would kill the job.
        # MLMFAST_DIST_TIMEOUT_MIN sets it.
        timeout = datetime.timedelta(minutes=float(os.environ.get("MLMFAST_DIST_TIMEOUT_MIN", "60")))
        dist.init_process_group(backend, timeout=timeout, **({"device_id": device} if backend == "nccl" else {}))
    return DistEnv(rank, world, local_rank, backend), device


def shutdown_distributed(env: DistEnv) -> None:
    if env.enabled and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def wrap_model(model: torch.nn.Module, env: DistEnv, strategy: str, device: torch.device,
               param_dtype: Optional[torch.dtype] = None) -> torch.nn.Module:
    """DDP (replicated weights, gradients all-reduced) or FSDP2 (`fully_shard` on every encoder layer and the
    root: weights, gradients and optimizer state sharded). A single process gets the model back unchanged.
    param_dtype (FSDP2, the run's bf16 autocast dtype): FSDP2's MixedPrecisionPolicy gathers the weights in that
    dtype (half the all-gather traffic and the gathered copies' memory) and reduces gradients in fp32; the
    sharded master weights and the optimizer stay fp32. None: weights gathered as stored (fp32)."""
    if strategy not in STRATEGIES:
        raise UserError(f"distributed strategy {strategy!r} is not known; use {' or '.join(STRATEGIES)}")
    if not env.enabled:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # The mesh on the run's device: without one, fully_shard takes the host's accelerator (CUDA on a GPU machine
    # even for a --device cpu / gloo run) and moves every parameter there.
    mesh = init_device_mesh(device.type, (env.world_size,))
    kw: dict = dict(mesh=mesh)
    if param_dtype is not None:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for layer in model.bert["encoder"]["layer"]:
        fully_shard(layer, **kw)
    fully_shard(model, **kw)  # the root unit: embeddings and the head (whose decoder is tied to the embeddings)
    return model


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The BertForMLM inside a DDP wrapper (FSDP2 shards in place: the module itself)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def is_fsdp(model: torch.nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return False
    return isinstance(model, FSDPModule)


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict on CPU; with FSDP2 a collective that every rank must call, and only
    rank 0 receives the tensors (other ranks get {})."""
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}


def load_full_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a full state dict (every rank passes the same one); FSDP2 shards it."""
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))
        return
    unwrap(model).load_state_dict(state)


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state in `optimizer.state_dict()` form; with FSDP2 gathered (a collective) to rank 0."""
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return optimizer.state_dict()


def load_full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
        return
    optimizer.load_state_dict(state)
