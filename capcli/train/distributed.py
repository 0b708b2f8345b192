"""Several processes under ``torchrun``: which rank this is, the few collectives training needs, DDP wrapping."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class Dist:
    """This process's place in the run: rank 0 of 1 without ``torchrun``."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def setup(cls, device: str) -> Dist:
        """Join the process group that ``torchrun`` describes in the environment (WORLD_SIZE > 1)."""
        from ..runtime import resolve_device

        dev = resolve_device(device)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls(device=torch.device(dev))
        import torch.distributed as tdist

        local = int(os.environ.get("LOCAL_RANK", "0"))
        if dev.startswith("cuda"):
            dev = f"cuda:{local}"
            torch.cuda.set_device(dev)
        owns = False
        if not tdist.is_initialized():
            tdist.init_process_group("nccl" if dev.startswith("cuda") else "gloo")
            owns = True
        return cls(tdist.get_rank(), tdist.get_world_size(), torch.device(dev), owns)

    def wrap(self, module: nn.Module | None) -> nn.Module | None:
        """``module`` in DistributedDataParallel with several ranks (gradients averaged), else itself."""
        if module is None or self.world == 1:
            return module
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(module, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as tdist

            tdist.barrier()

    def broadcast(self, values: list[float]) -> list[float]:
        """Rank 0's values, on every rank."""
        if self.world == 1:
            return values
        import torch.distributed as tdist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        tdist.broadcast(t, 0)
        return t.tolist()

    def mean(self, value: float) -> float:
        if self.world == 1:
            return value
        import torch.distributed as tdist

        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        tdist.all_reduce(t)
        return float(t) / self.world

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as tdist

            tdist.destroy_process_group()
