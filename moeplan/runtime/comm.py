"""Autograd-aware collectives over one process group.

`Comm` wraps a torch.distributed group (or nothing, for a group of one rank: every collective is
then the identity, so the single-device model runs the same code). The differentiable operations
follow Megatron's conjugate pairs and Tutel's all-to-all:
  all_to_all(x)        exchange dim-0 chunks; backward: the same exchange of the gradient
  copy_to(x)           forward identity,  backward allreduce   (input of a tensor-sliced block)
  reduce_from(x)       forward allreduce, backward identity    (output of a tensor-sliced block)
  gather_from(x, dim)  forward allgather, backward own slice   (replicated result)
  split_to(x, dim)     forward own slice, backward allgather
  gather_rows(x, dim)  forward allgather, backward reduce-scatter (expert slicing input)
  reduce_scatter_rows  forward reduce-scatter, backward allgather (expert slicing output)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


def backend(cuda: bool) -> str:
    """The job's torch.distributed backend: on GPUs NCCL for device tensors and gloo for the
    host ones (timings, flags; NCCL alone refuses a CPU tensor), gloo on CPU ranks."""
    return "cpu:gloo,cuda:nccl" if cuda else "gloo"


# torch >= 2.13 names them *_single (the *_tensor spellings warn); older releases lack them
all_gather_tensor = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_tensor = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass(frozen=True)
class Comm:
    group: object | None  # torch ProcessGroup, None when size == 1
    ranks: tuple[int, ...]
    rank_in_group: int

    @property
    def size(self) -> int:
        return len(self.ranks)

    @staticmethod
    def solo() -> "Comm":
        return Comm(group=None, ranks=(0,), rank_in_group=0)


def _a2a(x: torch.Tensor, comm: Comm) -> torch.Tensor:
    x = x.contiguous()
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=comm.group)
    return out


def _allreduce(x: torch.Tensor, comm: Comm) -> torch.Tensor:
    x = x.clone()
    dist.all_reduce(x, group=comm.group)
    return x


def _allgather(x: torch.Tensor, comm: Comm, dim: int) -> torch.Tensor:
    x = x.movedim(dim, 0).contiguous()
    out = torch.empty((comm.size * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype,
                      device=x.device)
    all_gather_tensor(out, x, group=comm.group)
    return out.movedim(0, dim)


def _reduce_scatter(x: torch.Tensor, comm: Comm, dim: int) -> torch.Tensor:
    x = x.movedim(dim, 0).contiguous()
    out = torch.empty((x.shape[0] // comm.size,) + tuple(x.shape[1:]), dtype=x.dtype,
                      device=x.device)
    reduce_scatter_tensor(out, x, group=comm.group)
    return out.movedim(0, dim)


def _slice(x: torch.Tensor, comm: Comm, dim: int) -> torch.Tensor:
    return x.chunk(comm.size, dim=dim)[comm.rank_in_group].contiguous()


def _identity(x: torch.Tensor, comm: Comm, dim: int) -> torch.Tensor:
    return x.view_as(x)


def _conjugate(name: str, forward, backward) -> type:
    """An autograd Function whose forward and backward are the given collectives."""

    def fwd(ctx, x, comm, dim):
        ctx.comm, ctx.dim = comm, dim
        return forward(x, comm, dim)

    def bwd(ctx, g):
        return backward(g, ctx.comm, ctx.dim), None, None

    return type(name, (torch.autograd.Function,), {"forward": staticmethod(fwd),
                                                   "backward": staticmethod(bwd)})


_AllToAll = _conjugate("_AllToAll", lambda x, c, d: _a2a(x, c), lambda g, c, d: _a2a(g, c))
_CopyTo = _conjugate("_CopyTo", _identity, lambda g, c, d: _allreduce(g, c))
_ReduceFrom = _conjugate("_ReduceFrom", lambda x, c, d: _allreduce(x, c), _identity)
_GatherFrom = _conjugate("_GatherFrom", _allgather, _slice)
_SplitTo = _conjugate("_SplitTo", _slice, _allgather)
_GatherRows = _conjugate("_GatherRows", _allgather, _reduce_scatter)
_ReduceScatterRows = _conjugate("_ReduceScatterRows", _reduce_scatter, _allgather)


def all_to_all(x: torch.Tensor, comm: Comm) -> torch.Tensor:
    return x if comm.size == 1 else _AllToAll.apply(x, comm, 0)


def copy_to(x: torch.Tensor, comm: Comm) -> torch.Tensor:
    return x if comm.size == 1 else _CopyTo.apply(x, comm, 0)


def reduce_from(x: torch.Tensor, comm: Comm) -> torch.Tensor:
    return x if comm.size == 1 else _ReduceFrom.apply(x, comm, 0)


def gather_from(x: torch.Tensor, comm: Comm, dim: int = 0) -> torch.Tensor:
    return x if comm.size == 1 else _GatherFrom.apply(x, comm, dim)


def split_to(x: torch.Tensor, comm: Comm, dim: int = 0) -> torch.Tensor:
    return x if comm.size == 1 else _SplitTo.apply(x, comm, dim)


def gather_rows(x: torch.Tensor, comm: Comm, dim: int) -> torch.Tensor:
    return x if comm.size == 1 else _GatherRows.apply(x, comm, dim)


def reduce_scatter_rows(x: torch.Tensor, comm: Comm, dim: int) -> torch.Tensor:
    return x if comm.size == 1 else _ReduceScatterRows.apply(x, comm, dim)


def allreduce_(x: torch.Tensor, comm: Comm) -> None:
    """In-place sum (no autograd): gradient synchronisation."""
    if comm.size > 1:
        dist.all_reduce(x, group=comm.group)
