"""Several processes, one run: `palpcompose train` under torchrun or `accelerate launch` (docs/training.md).

A launcher starts N copies of the same command and tells each one its place through the environment (RANK,
WORLD_SIZE, LOCAL_RANK from torchrun and `accelerate launch`; the MPI variables from mpirun). Every process loads
the model, caches its own latents and runs the same steps on its own samples; accelerate wraps the UNet and the
text encoder in DistributedDataParallel, which averages the gradients of the LoRA weights and of the placeholder
rows (they live inside the text encoder, train.PlaceholderEmbedding). Only the main process (rank 0) writes under
out/; the others meet it at the collectives below.

Everything here is a no-op with one process, so a plain `palpcompose train` runs the same code.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch

from palpcompose.errors import PalpcomposeError, UserError

# What accelerate itself reads, in its order (accelerate/state.py): torchrun and `accelerate launch` set the first
RANK_VARS = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")
WORLD_SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
LOCAL_RANK_VARS = ("LOCAL_RANK", "MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_RANK")


def _first_int(names: tuple[str, ...], default: int, environ) -> int:
    for name in names:
        value = environ.get(name)
        if value not in (None, ""):
            try:
                return int(value)
            except ValueError:
                raise UserError(f"environment variable {name}={value!r} is not a number; the launcher sets it "
                                "(torchrun, accelerate launch): unset it to run as one process") from None
    return default


@dataclass(frozen=True)
class Launch:
    """Where the launcher put this process. One process (no launcher): rank 0 of 1."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def multi(self) -> bool:
        return self.world_size > 1


def launch(environ=None) -> Launch:
    """This process's place, read from the launcher's environment variables."""
    environ = os.environ if environ is None else environ
    return Launch(rank=_first_int(RANK_VARS, 0, environ), world_size=_first_int(WORLD_SIZE_VARS, 1, environ),
                  local_rank=_first_int(LOCAL_RANK_VARS, 0, environ))


def launcher_prefix(num_processes: int | None = None, environ=None) -> str:
    """How to start `palpcompose` again with as many processes as this run (or `num_processes`), for the
    messages that give a command: "torchrun --nproc_per_node 2 $(which palpcompose)" on one machine, a pointer to
    the launcher on several (each machine runs its own command), "" with one process."""
    environ = os.environ if environ is None else environ
    where = launch(environ)
    n = where.world_size if num_processes is None else num_processes
    if n <= 1:
        return ""
    if _first_int(("LOCAL_WORLD_SIZE",), where.world_size, environ) != where.world_size:
        return f"(your launcher's command on every machine, {n} processes in all) palpcompose"
    return f"torchrun --nproc_per_node {n} $(which palpcompose)"


def refuse_launcher(command: str) -> None:
    """`render`, `eval` and `export` run as one process: under a launcher of N processes each copy would write the
    same files. Exit 2 before anything is loaded; only rank 0 says why (the others exit quietly)."""
    where = launch()
    if where.multi:
        raise UserError(
            f"`palpcompose {command}` runs as one process, but this one was started by a launcher as rank "
            f"{where.rank} of {where.world_size} (torchrun / accelerate launch); each copy would write the same "
            f"files. Run it directly: palpcompose {command} DIR ... (only `train` uses several processes)",
            quiet=not where.is_main)


def make_accelerator(mixed_precision: str, gradient_accumulation_steps: int):
    """The Accelerator for this process: data parallel over the launcher's processes, NCCL on CUDA, gloo on CPU.

    accelerate picks a distributed backend from the device; on a machine without CUDA it only uses gloo when asked
    for the CPU (cpu=True). Without that, N processes would each train alone, unaware of the others. The launcher's
    --mixed_precision is not used: train.mixed_precision (palp.toml) decides, as in a single-process run.
    """
    from accelerate import Accelerator

    where = launch()
    accelerator = Accelerator(cpu=where.multi and not torch.cuda.is_available(), mixed_precision=mixed_precision,
                              gradient_accumulation_steps=gradient_accumulation_steps)
    if accelerator.num_processes != where.world_size:
        raise UserError(
            f"the launcher started {where.world_size} processes but accelerate joined {accelerator.num_processes} "
            f"({accelerator.distributed_type}); launch with torchrun --nproc_per_node N or the accelerate launch "
            "command in docs/training.md")
    return accelerator


def data_seed(seed: int, rank: int) -> int:
    """The seed of rank `rank`'s data generator (subjects, images, flips, timesteps, noise).

    Rank 0 uses train.seed itself, so a single-process run draws what it always drew. Other ranks get a value
    derived from (seed, rank) above 2^32, where no train.seed can be (project.MAX_SEED caps it at 2^32 - 1): seed 0 on
    rank 1 never replays seed 1 on rank 0, as seed + rank would.
    """
    if rank == 0:
        return seed
    digest = hashlib.sha256(f"palpcompose data seed {seed} rank {rank}".encode()).digest()
    return 2**32 + int.from_bytes(digest[:7], "big")


def effective_batch(num_processes: int, batch_size: int, gradient_accumulation_steps: int) -> int:
    """Samples behind one optimizer step: every process draws batch_size samples per micro-step."""
    return num_processes * batch_size * gradient_accumulation_steps


def describe_batch(num_processes: int, batch_size: int, gradient_accumulation_steps: int) -> str:
    total = effective_batch(num_processes, batch_size, gradient_accumulation_steps)
    return (f"effective batch {total} = {num_processes} process{'es' if num_processes != 1 else ''} x batch_size "
            f"{batch_size} x gradient_accumulation_steps {gradient_accumulation_steps}")


# ---------------------------------------------------------------------------------------------------------------
# Collectives: every process must call each of them at the same point, in the same order


def _distributed(accelerator) -> bool:
    return accelerator is not None and accelerator.num_processes > 1


def any_process(accelerator, flag: bool) -> bool:
    """True on every process when `flag` is true on any one of them (a stop request, an error)."""
    if not _distributed(accelerator):
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=accelerator.device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())


def mean(accelerator, values: dict[str, float]) -> dict[str, float]:
    """The mean over processes of each value (the logged losses: the whole effective batch's, not rank 0's)."""
    if not _distributed(accelerator) or not values:
        return values
    stacked = torch.tensor(list(values.values()), dtype=torch.float64, device=accelerator.device)
    torch.distributed.all_reduce(stacked, op=torch.distributed.ReduceOp.SUM)
    return dict(zip(values, (stacked / accelerator.num_processes).tolist(), strict=True))


def gather(accelerator, obj) -> list:
    """Every process's `obj` (picklable), in rank order, on every process."""
    if not _distributed(accelerator):
        return [obj]
    out = [None] * accelerator.num_processes
    torch.distributed.all_gather_object(out, obj)
    return out


def broadcast(accelerator, obj):
    """The main process's `obj` (picklable) on every process; the others' argument is ignored."""
    if not _distributed(accelerator):
        return obj
    box = [obj if accelerator.is_main_process else None]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


class FailedOnMain(PalpcomposeError):
    """What a non-main process raises when the main one failed at a step `decided_by_main` shares: the main
    process prints the error, this one exits with the same code, quietly."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message, quiet=True)
        self.exit_code = exit_code


def decided_by_main(accelerator, decide):
    """`decide()` on the main process only (the plan, the lock, reading the checkpoint), its result on every
    process; when it raises, the main process re-raises and every other process raises FailedOnMain with the
    same exit code. The others never read out/, so they cannot disagree with the main process about it (nor
    refuse to train because the main process has just taken the lock)."""
    if not _distributed(accelerator):
        return decide()
    result, failure, error = None, None, None
    if accelerator.is_main_process:
        try:
            result = decide()
        except Exception as exc:  # noqa: BLE001 - the others must learn of any failure, or they wait forever
            error = exc
            failure = (str(exc), exc.exit_code if isinstance(exc, PalpcomposeError) else 1)
    result, failure = broadcast(accelerator, (result, failure))
    if error is not None:
        raise error
    if failure is not None:
        raise FailedOnMain(*failure)
    return result


def barrier(accelerator) -> None:
    if _distributed(accelerator):
        accelerator.wait_for_everyone()


class ProcessLost(PalpcomposeError):
    """Another process of the run stopped (killed, out of memory, a crash): a collective failed here. Exit 1."""


def lost_peer(accelerator, exc: BaseException) -> bool:
    """`exc` is a collective failing because another process is gone: torch's DistError (NCCL), or gloo's plain
    RuntimeError from its TCP transport."""
    if not _distributed(accelerator) or not isinstance(exc, RuntimeError):
        return False
    return isinstance(exc, torch.distributed.DistError) or "gloo" in str(exc) or "by peer" in str(exc)


def check_all_reduced(accelerator, models: list, params: list) -> None:
    """Every trained parameter must sit inside one of the DistributedDataParallel-wrapped `models`: DDP averages
    the gradients of its own module's parameters only, and one outside would silently train apart on each
    process (its copies drifting, rank 0's saved). A bug of ours, not of the user's input: ValueError."""
    if not _distributed(accelerator):
        return
    from torch.nn.parallel import DistributedDataParallel

    inside = {id(p) for m in models if isinstance(m, DistributedDataParallel) for p in m.module.parameters()}
    outside = [tuple(p.shape) for p in params if id(p) not in inside]
    if outside:
        raise ValueError(f"{len(outside)} trained parameters {outside[:4]} are outside the data-parallel models: "
                         "their gradients would not be averaged across processes")
