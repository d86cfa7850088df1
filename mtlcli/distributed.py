"""Training on several processes: what each rank exchanges, and with whom.

A run on ``world`` processes (started by ``mtl train --nproc N`` or by ``torchrun``) trains one
model on one global batch order: rank r takes its slice of every global batch. The loop keeps one
invariant: after a step's backward pass, every gradient a rank holds is its *contribution*, and
one sum over the ranks (``sum_gradients``) makes it the gradient of the one-process step.

- a task's loss is the rank's loss sum over the global count of the task's rows, and the
  strategies see the global values (``global_losses``: one all-reduce of the T sums and T counts;
  the value is the global mean, the gradient the rank's own part), so the ranks' losses add up
  to the global loss, a loss-based strategy computes the same weights on every rank, and its own
  parameters get the same gradient everywhere (averaged, not summed);
- a gradient strategy sums the per-task gradients [T, P] over the ranks before combining them
  (``Ranks.sum``), and leaves 1/world of the combined gradient on each rank;
- a table that trains row-wise gathers the union of the ranks' ids (``Ranks.union``) so that every
  rank holds the same rows;
- evaluation splits each batch over the ranks and gathers the outputs (``Ranks.gather``).

One process is ``Ranks()`` (world 1): every exchange is the identity and costs nothing.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from mtlcli.errors import MtlError


@dataclass(frozen=True)
class Ranks:
    """This process's place among the training processes, and the collectives between them."""

    rank: int = 0
    world: int = 1
    device: str = "cpu"  # where the collectives' own tensors live (cuda under NCCL)

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def writes(self) -> bool:
        """Rank 0 alone writes the run directory."""
        return self.rank == 0

    def sum(self, x: Tensor) -> Tensor:
        """The sum of ``x`` over the ranks (a new tensor; ``x`` itself when alone)."""
        if not self.active:
            return x
        out = x.detach().clone()
        dist.all_reduce(out)
        return out

    def any(self, flag: bool) -> bool:
        """True when ``flag`` is true on some rank (stop requests, failures)."""
        if not self.active:
            return flag
        return bool(self.sum(torch.tensor([1.0 if flag else 0.0], device=self.device)).item() > 0)

    def gather(self, x: Tensor) -> Tensor:
        """The ranks' ``x`` (rows may differ in number) concatenated in rank order."""
        if not self.active:
            return x
        sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(self.world)]
        dist.all_gather(sizes, torch.tensor([x.shape[0]], device=x.device))
        longest = int(max(s.item() for s in sizes))
        padded = torch.zeros((longest, *x.shape[1:]), dtype=x.dtype, device=x.device)
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded.contiguous())
        return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes, strict=True)])

    def share(self, text: str) -> str:
        """Rank 0's ``text`` on every rank."""
        if not self.active:
            return text
        box = [text]
        dist.broadcast_object_list(box, src=0)
        return str(box[0])

    def union(self, ids: Tensor) -> Tensor:
        """The sorted distinct ids that some rank holds (``ids`` sorted and distinct on each)."""
        return torch.unique(self.gather(ids)) if self.active else ids


SINGLE = Ranks()
_current = SINGLE


def current() -> Ranks:
    """The ranks this process joined (``SINGLE`` outside a distributed run). Read where a
    training's exchange is chosen (``Exchange.choose``), nowhere else: models and weightings get
    the ranks from the exchange."""
    return _current


_backward_ranks: ContextVar[Ranks] = ContextVar("backward_ranks", default=SINGLE)


def backward_ranks() -> Ranks:
    """The ranks a weighting strategy's backward pass sums its task gradients over: the run's,
    for the length of that pass (``across``, which the training's exchange opens around it);
    one process anywhere else."""
    return _backward_ranks.get()


@contextmanager
def across(ranks: Ranks) -> Iterator[None]:
    """Within: ``backward_ranks()`` is ``ranks``."""
    token = _backward_ranks.set(ranks)
    try:
        yield
    finally:
        _backward_ranks.reset(token)


def launched() -> bool:
    """Started by torchrun (or ``mtl train --nproc``) as one of several processes."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def join(
    backend: str = "gloo", init_method: str | None = None, rank: int = -1, world: int = -1, device: str = "cpu"
) -> Ranks:
    """Join the process group (torchrun's, described in the environment, unless ``init_method``,
    ``rank`` and ``world`` are given); set the current ranks. NCCL wants ``device`` a GPU."""
    global _current
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world)
    _current = Ranks(dist.get_rank(), dist.get_world_size(), device)
    return _current


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def resolve_device(setting: str) -> str:
    """``train.device`` resolved once for the whole run: ``cpu``, or ``cuda`` (a clear error
    without a GPU; ``auto`` takes it when torch sees one). Each rank then trains on its own GPU
    (``rank_device``)."""
    if setting == "cpu":
        return "cpu"
    if not torch.cuda.is_available():
        if setting == "cuda":
            build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            raise MtlError(
                f"train.device: cuda, and torch {torch.__version__} ({build}) finds no CUDA GPU",
                "set train.device: cpu, or auto to use a GPU only where there is one",
            )
        return "cpu"
    return "cuda"


def rank_device(kind: str) -> torch.device:
    """This process's device of the resolved kind: its local rank's GPU under cuda."""
    if kind == "cpu":
        return torch.device("cpu")
    return torch.device("cuda", local_rank() % torch.cuda.device_count())


def leave() -> None:
    global _current
    if dist.is_initialized():
        dist.destroy_process_group()
    _current = SINGLE


def global_losses(sums: Tensor, counts: Tensor, ranks: Ranks) -> Tensor:
    """Each task's mean loss over the global batch [T], from this rank's loss sums [T] and row
    counts [T] (one all-reduce carries both): its value is the global mean, its gradient this
    rank's part (the rank's sums over the global counts), so the ranks' gradients add up to the
    global loss's."""
    if not ranks.active:
        return sums / counts.clamp_min(1.0)
    tasks = sums.shape[0]
    total = ranks.sum(torch.cat([sums.detach(), counts.to(sums.dtype)]))
    scale = total[tasks:].clamp_min(1.0)
    local = sums / scale
    return local + (total[:tasks] / scale - local.detach())


def data_parallel(model: nn.Module, ranks: Ranks) -> nn.Module:
    """``model`` under ``DistributedDataParallel``, its gradients *summed* over the ranks (each
    rank's loss is already its share of the global loss: see ``global_losses``) by DDP's bucketed
    all-reduce, which runs while the backward pass goes on. The ranks' models start equal (same
    seed, or the same checkpoint), so DDP's initial broadcast is skipped: it would copy every
    embedding table, row-wise ones included, however large."""
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [model_device(model)] if model_device(model).type == "cuda" else None
    wrapped = DistributedDataParallel(model, device_ids=device_ids, init_sync=False, forward_sync_buffers=False)
    wrapped.register_comm_hook(None, _sum_hook)
    return wrapped


class SameOnEveryRank(MtlError):
    """An error every rank raises at the same step (it comes from values they share): said once,
    by rank 0."""


@contextmanager
def alike_on_every_rank(ranks: Ranks) -> Iterator[None]:
    """Errors raised inside come from what every rank shares (the recipe, the encoded data): on
    several ranks they become ``SameOnEveryRank``, said once."""
    try:
        yield
    except SameOnEveryRank:
        raise
    except MtlError as exc:
        if not ranks.active:
            raise
        raise SameOnEveryRank(exc.message, exc.hint) from None


def check_all_used(model: nn.Module) -> None:
    """After a step's backward pass under DDP: every trainable parameter took part (DDP leaves
    the gradients of a bucket holding an unused one unsummed, and stops at the next step)."""
    unused = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    if unused:
        raise SameOnEveryRank(
            f"training on several processes: the model's parameter {', '.join(unused[:5])} took no part in "
            "the step's loss (DistributedDataParallel needs every trainable parameter in each step)",
            "freeze it (requires_grad False) or leave it out of the scheme; one process trains as before",
        )


def _sum_hook(state: object, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    """DDP's all-reduce without its division by the world size."""
    work = dist.all_reduce(bucket.buffer(), async_op=True)
    assert work is not None
    return work.get_future().then(lambda done: done.value()[0])


# DDP checks a hook's annotations as objects (this module's are strings: postponed evaluation)
_sum_hook.__annotations__ = {"state": object, "bucket": dist.GradBucket, "return": torch.futures.Future[Tensor]}


def model_device(model: nn.Module) -> torch.device:
    """Where the model's parameters are (train.device)."""
    return next(iter(model.parameters()), torch.zeros(())).device


def sum_gradients(
    model: nn.Module, strategy_parameters: list[nn.Parameter], ranks: Ranks, summed_by_ddp: bool = False
) -> None:
    """Make every rank's gradients the one-process step's: the model's summed over the ranks
    (unless DDP did it during the backward pass; row-wise tables' rows are not parameters and
    are summed here), the strategy's own (computed from the same global values everywhere)
    averaged."""
    if not ranks.active:
        return
    grads = [] if summed_by_ddp else [p.grad for p in model.parameters() if p.grad is not None]
    grads += [rows.grad for rows in row_leaves(model) if rows.grad is not None]
    strategy = [p.grad for p in strategy_parameters if p.grad is not None]
    _all_reduce_flat(grads + strategy)  # one exchange for both
    for g in strategy:
        g /= ranks.world


def row_leaves(model: nn.Module) -> list[Tensor]:
    """The rows of the last forward pass of every table that trains row-wise (not parameters)."""
    from mtlcli.models.blocks import sparse_embeddings

    return [m.rows for _, m in sparse_embeddings(model) if m.rows is not None]


def _all_reduce_flat(grads: list[Tensor]) -> None:
    """One all-reduce for a list of tensors (flattened together), results written back."""
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
