"""Data-parallel training on torch.distributed (DDP): process groups, collectives, launching.

`torchrun --nproc-per-node N -m dsmr train ...` (or `dsmr train --nproc N`, which re-launches itself
through torch.distributed.run) starts N processes; dsmr.training.trainer.train calls `init_distributed`, which joins
the process group torchrun describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT): gloo on CPU, nccl on CUDA (one GPU per process, cuda:LOCAL_RANK).

What the trainer does with it (see docs/distributed.md):
  * each rank streams lanes [r*B, (r+1)*B) of one shared `world_size * B`-lane PieceStream, so whole
    pieces stay on one rank (the recurrent state never crosses processes) and every rank takes the same
    number of steps;
  * the loss of a step is (sum of NLL over the real targets of all ranks) / (their count, all-reduced),
    scaled by world_size because DDP averages gradients: the step equals one process reading all lanes;
  * only rank 0 writes; the per-rank recurrent state and RNG states are gathered into its checkpoint;
  * validation pieces are split across ranks and the NLL sums and token counts are all-reduced.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable, Sequence, TypeVar

import torch
import torch.distributed as dist

from dsmr.errors import DsmrError
from dsmr.model.losses import ppl_by_bucket

T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: rank, world size, its device, and whether it created the group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # init_distributed created the process group, so `close` destroys it

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum over ranks (float64); the values themselves when single-process."""
        return self._all_reduce(values, dist.ReduceOp.SUM)

    def all_max(self, values: Sequence[float]) -> list[float]:
        """Element-wise maximum over ranks (float64); the values themselves when single-process."""
        return self._all_reduce(values, dist.ReduceOp.MAX)

    def _all_reduce(self, values: Sequence[float], op) -> list[float]:
        if not self.enabled:
            return [float(v) for v in values]
        t = torch.tensor(list(values), dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(t, op=op)
        return t.tolist()

    def gather_to_main(self, obj) -> list | None:
        """Every rank's `obj` (picklable) in rank order on rank 0; None on the other ranks."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def from_main(self, fn: Callable[[], T]) -> T:
        """Run `fn` on rank 0 and hand its result to every rank. A DsmrError raised there is raised on
        every rank (with the same message), so no rank waits forever on one that gave up."""
        if not self.enabled:
            return fn()
        box: list = [None, None]
        if self.is_main:
            try:
                box = [fn(), None]
            except DsmrError as err:
                box = [None, str(err)]
        dist.broadcast_object_list(box, src=0)
        if box[1] is not None:
            raise DsmrError(box[1])
        return box[0]

    def check_same(self, what: str, value) -> None:
        """DsmrError on every rank when ranks disagree on `value` (say, a data fingerprint)."""
        values = self.gather_all(value)
        if any(v != values[0] for v in values):
            listing = "; ".join(f"rank {r}: {v}" for r, v in enumerate(values))
            raise DsmrError(f"the {self.world_size} processes disagree on {what} ({listing}); every process "
                            "must see the same data and options")

    def gather_all(self, obj) -> list:
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    @property
    def _comm_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    def close(self, finished: bool = True) -> None:
        """Destroy the group this context created. After a run that `finished` on every rank, wait for the
        others first, so no rank tears its connections down while a peer still sends on them; after an
        error, do not wait (the other ranks may never get here)."""
        if self.owns_group and dist.is_initialized():
            if finished:
                dist.barrier()
            dist.destroy_process_group()


def launched_by_torchrun() -> bool:
    """True in a worker that torchrun (or torch.multiprocessing with the same variables) started."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise DsmrError(f"environment variable {name}={value!r} is not an integer") from None


def init_distributed(device: torch.device) -> DistContext:
    """Join the process group this process belongs to, if any; a single-process context otherwise.

    Uses a group the caller already initialized (rank and world size from it), else the torchrun
    environment (`init_process_group` from env://, gloo on CPU, nccl on CUDA). On CUDA each process
    takes cuda:LOCAL_RANK unless the device names an index. Returns the context with the device to use.
    """
    if dist.is_available() and dist.is_initialized():
        rank, world, owns = dist.get_rank(), dist.get_world_size(), False
    elif launched_by_torchrun() and _env_int("WORLD_SIZE", 1) > 1:
        if not dist.is_available():
            raise DsmrError("this PyTorch build has no torch.distributed")
        rank, world, owns = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1), True
    else:
        return DistContext(device=device)
    local_rank = _env_int("LOCAL_RANK", rank)
    if device.type == "cuda":
        if device.index is None:
            if local_rank >= torch.cuda.device_count():
                raise DsmrError(f"local rank {local_rank} has no GPU: this machine has "
                                f"{torch.cuda.device_count()} (start at most that many processes per node)")
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if owns:
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, **kwargs)
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=device, owns_group=owns)


def wrap_model(module: torch.nn.Module, ctx: DistContext, find_unused: bool) -> torch.nn.Module:
    """DistributedDataParallel around `module` when several processes train (broadcasts rank 0's weights
    at construction); the module itself otherwise. `find_unused`: some parameters may get no gradient on
    a step (gates of h = 0 layers, or of every layer on a step without memory)."""
    if not ctx.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel

    import inspect

    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    # the model's only buffers are constants (rotary frequencies): no need to broadcast them every step
    # (the option's name changed in torch 2.13)
    sync = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
            else "broadcast_buffers")
    return DistributedDataParallel(module, device_ids=device_ids, find_unused_parameters=find_unused,
                                   **{sync: False})


def split_pieces(lengths: Sequence[int], world_size: int) -> list[list[int]]:
    """Piece indices for each rank, balanced by length (longest first onto the least-loaded rank), each
    rank's list in corpus order. Deterministic, so every rank computes the same split."""
    loads = [0] * world_size
    shares: list[list[int]] = [[] for _ in range(world_size)]
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        r = min(range(world_size), key=lambda r: (loads[r], r))
        shares[r].append(i)
        loads[r] += int(lengths[i])
    return [sorted(s) for s in shares]


def reduce_evaluation(result: dict | None, ctx: DistContext, n_buckets: int) -> dict | None:
    """Combine per-rank dsmr.evaluation.perplexity.evaluate results (None for a rank with no pieces) into the result
    of the whole split: NLL sums and token counts added per position bucket, pieces added, seconds and
    peak memory the largest of any rank. Every rank gets the combined result."""
    if not ctx.enabled:
        return result
    buckets = result["nll_by_position"] if result is not None else [None] * n_buckets
    sums = [b["nll"] * b["tokens"] if b and b["tokens"] else 0.0 for b in buckets]
    counts = [b["tokens"] if b else 0 for b in buckets]
    pieces = result["pieces"] if result is not None else 0
    totals = ctx.all_sum(sums + counts + [pieces])
    seconds, peak = ctx.all_max([result["seconds"] if result else 0.0,
                                 result["peak_memory_bytes"] if result else 0])
    template = ctx.gather_all(result)
    base = next(r for r in template if r is not None)
    sums, counts = totals[:n_buckets], totals[n_buckets:2 * n_buckets]
    tokens = int(sum(counts))
    nll, by_position = ppl_by_bucket(sums, counts, [b["start"] for b in base["nll_by_position"]])
    return dict(base, ppl=math.exp(nll), nll=nll, tokens=tokens, pieces=int(totals[-1]), seconds=seconds,
                tokens_per_s=tokens / seconds if seconds > 0 else float("inf"), peak_memory_bytes=int(peak),
                nll_by_position=by_position, world_size=ctx.world_size)


def torchrun_command(nproc: int, argv: Sequence[str], nnodes: str | None = None, node_rank: int | None = None,
                     master_addr: str | None = None, master_port: int | None = None) -> list[str]:
    """The `python -m torch.distributed.run ... -m dsmr ARGV` command line for `nproc` processes per node.

    One node: `--standalone` (a local rendezvous on a free port). Several: a static rendezvous at
    master_addr:master_port (every node runs the same command with its own node_rank)."""
    if nproc < 1:
        raise DsmrError(f"--nproc must be >= 1, got {nproc}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
    if nnodes in (None, "1"):
        cmd.append("--standalone")
    else:
        if master_addr is None or node_rank is None:
            raise DsmrError("several nodes need --master-addr and --node-rank (the same master on every node)")
        cmd += ["--nnodes", str(nnodes), "--node-rank", str(node_rank), "--master-addr", master_addr,
                "--master-port", str(master_port or 29500)]
    return cmd + ["-m", "dsmr", *argv]


def launch(cmd: Sequence[str]) -> int:
    """Run a torchrun command and return its exit code (130 after a Ctrl-C). Ctrl-C reaches torchrun and
    its workers (the same process group), which stop at a step boundary and save; this process waits."""
    proc = subprocess.Popen(list(cmd))
    interrupted = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: interrupted.append(signum))
    try:
        code = proc.wait()
    finally:
        signal.signal(signal.SIGINT, previous)
    # torchrun exits 1 after forwarding a Ctrl-C, even when the workers saved and stopped cleanly
    return 130 if interrupted else code
