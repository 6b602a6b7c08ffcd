"""The processes of one RL run: rank, device and the few collective operations the loops need.

`mechrl grpo` / `mechrl ppo` started by `accelerate launch` (or `torchrun`) run as N processes.
The semantics, which make an N-process run compute the same update as one process on the same
global batch:

- `train.prompts_per_step` is the GLOBAL number of prompts per step. Every rank draws the whole
  global batch from its own copy of the environment (all copies hold the same seeded stream) and
  keeps its contiguous share (`Dist.share`): the union over ranks is exactly what one process
  would draw, and a GRPO group always stays on one rank.
- Each rank samples its share with its own generator, seeded deterministically from
  (seed, rank); rank 0's is the single-process generator.
- Gradients are averaged over ranks after the local micro-batches are accumulated
  (`average_gradients`), as DDP does, so each rank normalises its loss by (global count / N):
  for sequence-normalised losses that is the local sequence count (the shares are equal); for
  token-normalised ones the global token count is all-reduced first.
- Only rank 0 writes to the run directory; the others wait at barriers while it evaluates and saves.

Why no `DistributedDataParallel` wrapper: the loops call the Hugging Face model itself (the KV-cache
sampler, `completion_logprobs`, PEFT's `disable_adapter`, hooks that route gradients), and PPO's
value head lives beside it. One all-reduce of the accumulated gradients per optimiser step is what
DDP computes with `no_sync` on all micro-batches but the last; parameters are broadcast from rank 0
at the start, as DDP does when it wraps a model. `accelerate.Accelerator` starts the process group
(gloo on CPU, NCCL on GPU) and picks each rank's device. FSDP / DeepSpeed are for SFT (TRL's trainer);
the RL loops refuse them.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Iterable

import torch

from mechrl.errors import UserError


def env_rank() -> int:
    """This process's global rank as the launcher set it (0 when not launched as several)."""
    return int(os.environ.get("RANK", "0"))


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """True unless this process is a non-zero rank of a multi-process launch. Usable before any
    process group exists (reads the launcher's environment)."""
    return env_rank() == 0


def sampling_seed(seed: int, rank: int) -> int:
    """The sampling generator's seed on `rank`: `seed` itself on rank 0 (the single-process value),
    a hash of (seed, rank) elsewhere, so ranks never share a stream and runs of nearby seeds do not
    reuse each other's."""
    if rank == 0:
        return seed
    digest = hashlib.sha256(f"mechrl-sampling-{seed}-rank-{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class Dist:
    """Rank, world size, device and collectives of the current run. `Dist.single(device)` is the
    one-process case, where every collective is the identity; `Dist.launch(device_pref)` joins the
    process group the launcher described."""

    def __init__(self, rank: int, world: int, device: torch.device, accelerator=None):
        self.rank, self.world, self.device, self.accelerator = rank, world, device, accelerator

    @classmethod
    def single(cls, device: torch.device) -> "Dist":
        return cls(0, 1, device)

    @classmethod
    def launch(cls, device_pref: str) -> "Dist":
        """Join the launcher's process group through `accelerate.Accelerator`. `device_pref` is the
        config's `model.device` ("cpu" keeps every rank on the CPU, with gloo)."""
        from accelerate import Accelerator
        from accelerate.utils import DistributedType

        acc = Accelerator(cpu=device_pref == "cpu")
        if acc.distributed_type not in (DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
            raise UserError(f"mechrl's RL loops run data-parallel (accelerate's MULTI_CPU / MULTI_GPU); "
                            f"this launch is {acc.distributed_type.value}. Use configs/accelerate/ddp.yaml "
                            "(FSDP and DeepSpeed configs are for `mechrl sft`).")
        if acc.mixed_precision != "no":
            raise UserError(f"accelerate's mixed_precision={acc.mixed_precision!r} is not applied by the RL loops; "
                            "launch with --mixed_precision no and set model.dtype instead")
        if acc.num_processes != env_world_size():
            raise RuntimeError(f"accelerate sees {acc.num_processes} processes, WORLD_SIZE says {env_world_size()}")
        return cls(acc.process_index, acc.num_processes, acc.device, acc)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    # -- data ----------------------------------------------------------------------------------
    def share(self, n: int, what: str = "items") -> slice:
        """This rank's contiguous slice of `n` items (rank r gets [r n/N, (r+1) n/N))."""
        if n % self.world:
            raise UserError(f"{what}={n} must be divisible by the number of processes ({self.world})")
        k = n // self.world
        return slice(self.rank * k, (self.rank + 1) * k)

    # -- collectives (identity in one process) ----------------------------------------------------
    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def sum(self, x: torch.Tensor | float) -> torch.Tensor:
        """Sum over ranks of a scalar or tensor (a new tensor, float64 for Python numbers)."""
        t = x.detach().clone() if isinstance(x, torch.Tensor) else torch.tensor(float(x), dtype=torch.float64)
        if self.distributed:
            t = t.to(self.device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        return t

    def mean(self, x: torch.Tensor | float) -> torch.Tensor:
        return self.sum(x) / self.world

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenation over ranks along dim 0, in rank order (every rank gets it). Shapes must
        agree beyond dim 0."""
        if not self.distributed:
            return x
        x = x.detach().contiguous().to(self.device)
        sizes = [torch.zeros(1, dtype=torch.long, device=self.device) for _ in range(self.world)]
        torch.distributed.all_gather(sizes, torch.tensor([x.size(0)], device=self.device))
        n = max(int(s) for s in sizes)
        padded = torch.zeros((n, *x.shape[1:]), dtype=x.dtype, device=self.device)
        padded[:x.size(0)] = x
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        torch.distributed.all_gather(parts, padded)
        return torch.cat([p[:int(s)] for p, s in zip(parts, sizes)], 0)

    def gather_object(self, obj: Any) -> list[Any]:
        """[obj of rank 0, obj of rank 1, ...] on every rank (picklable objects)."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def mean_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """Average a dict of floats over ranks; every rank must hold the same keys."""
        if not self.distributed:
            return metrics
        keys = sorted(metrics)
        all_keys = self.gather_object(keys)
        if any(k != keys for k in all_keys):
            raise RuntimeError(f"rank {self.rank}: metric keys differ between ranks: {all_keys}")
        vals = self.mean(torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64))
        return dict(zip(keys, vals.tolist()))

    def broadcast_parameters(self, modules: Iterable[torch.nn.Module]) -> None:
        """Copy rank 0's parameters and buffers to every rank (what DDP does when it wraps a model)."""
        if not self.distributed:
            return
        for module in modules:
            for t in [*module.parameters(), *module.buffers()]:
                torch.distributed.broadcast(t.data, src=0)

    def average_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Replace each gradient by its mean over ranks, with one all-reduce. A parameter with no
        gradient on any rank keeps None (the optimiser skips it, as in one process); one with a
        gradient on some ranks only is averaged with zeros from the others (DDP's behaviour)."""
        if not self.distributed or not params:
            return
        has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=self.device)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([has, *[g.reshape(-1).float() for g in grads]])
        torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
        any_grad, flat = flat[:len(params)] > 0, flat[len(params):] / self.world
        offset = 0
        for p, g, keep in zip(params, grads, any_grad.tolist()):
            n = p.numel()
            if keep:
                p.grad = flat[offset:offset + n].view_as(p).to(g.dtype).clone()
            else:
                p.grad = None
            offset += n
