"""The processes of one run: which one this is, and the few collective steps the loop needs.

    ranks = process_ranks()            # Ranks(rank=0, world=1) unless started by `accelerate launch`
    mine = ranks.batches(n, 16)        # this rank's share of n items in fixed batches of 16
    rows = ranks.gather(my_rows)       # every rank's list, concatenated in rank order, on every rank
    ranks.barrier()                    # nobody goes on until all arrive

Under ``accelerate launch --multi_gpu --num_processes N`` or ``torchrun --nproc_per_node N`` (RANK,
WORLD_SIZE, LOCAL_RANK in the environment) the first call joins the process group through
``accelerate.PartialState``, so TRL's trainers, the base stages' ``Accelerator`` and the loop share one
group: NCCL on GPUs, gloo on CPUs (no GPU, or ``ACCELERATE_USE_CPU=1``). With one process nothing is
initialised and every collective is a no-op. (``accelerate launch --cpu --num_processes N`` starts one
process, not N, in accelerate 1.x: ``speechalign run --nproc N`` launches CPU processes the way that works.)

Batches are cut from the whole item list before they are dealt out (batch b to rank b mod N), and each
batch draws from a seed that depends on its start in that list, so a batch samples the same tokens
whichever rank runs it: 1 and N processes give the same samples (``stages.sample``) and evaluations.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from functools import lru_cache

from models.data import batch_slices

log = logging.getLogger("speechalign.dist")

# A barrier waits while rank 0 alone pairs a round or writes a policy; at paper scale that can take far
# longer than torch's 30-minute default. A rank that dies is noticed by the launcher, not by this timeout.
BARRIER_TIMEOUT = timedelta(hours=6)


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def gather(self, items: list) -> list:
        """Every rank's ``items`` concatenated in rank order, returned on every rank (picklable objects)."""
        if self.world == 1:
            return list(items)
        import torch.distributed as dist

        parts: list = [None] * self.world
        dist.all_gather_object(parts, list(items))
        return [x for part in parts for x in part]

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def batches(self, n: int, batch_size: int) -> list[tuple[int, int]]:
        """This rank's (start, stop) slices of ``n`` items cut into batches of ``batch_size``."""
        return batch_slices(n, batch_size, self.rank, self.world)

    def accelerator(self, device: str):
        """An ``accelerate.Accelerator`` for ``fit``'s data-parallel steps when there are several processes;
        None with one, so a one-process run trains exactly as it always has."""
        if self.world == 1:
            return None
        from accelerate import Accelerator

        return Accelerator(cpu=not device.startswith("cuda"))

    def device(self, device: str) -> str:
        """A resolved device name for this process: ``cuda`` becomes ``cuda:<local rank>``."""
        if device == "cuda" and self.world > 1:
            return f"cuda:{self.local_rank}"
        return device


@lru_cache(maxsize=1)
def process_ranks() -> Ranks:
    """This process's place in the launch (read once; joins the process group when there are several)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    import torch
    from accelerate import PartialState

    # CPU processes (gloo) when asked (ACCELERATE_USE_CPU, as `speechalign run --nproc N` sets it without a GPU)
    # or when there is no GPU to give each rank
    cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or not torch.cuda.is_available()
    state = PartialState(cpu=cpu, timeout=BARRIER_TIMEOUT)
    ranks = Ranks(state.process_index, state.num_processes, state.local_process_index)
    log.info("process %d of %d (local rank %d, backend %s)", ranks.rank, ranks.world, ranks.local_rank,
             state.backend)
    if not ranks.is_main:  # one voice on the console: rank 0's log and progress bars (others warn only)
        logging.getLogger("speechalign").setLevel(logging.WARNING)
        os.environ["TQDM_DISABLE"] = "1"
    return ranks
