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
    dist.all_gather_into_tensor(out, x, group=comm.group)
    return out.movedim(0, dim)


def _reduce_scatter(x: torch.Tensor, comm: Comm, dim: int) -> torch.Tensor:
    x = x.movedim(dim, 0).contiguous()
    out = torch.empty((x.shape[0] // comm.size,) + tuple(x.shape[1:]), dtype=x.dtype,
                      device=x.device)
    dist.reduce_scatter_tensor(out, x, group=comm.group)
    return out.movedim(0, dim)


def _slice(x: torch.Tensor, comm: Comm, dim: int) -> torch.Tensor:
    return x.chunk(comm.size, dim=dim)[comm.rank_in_group].contiguous()


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, comm):
        ctx.comm = comm
        return _a2a(x, comm)

    @staticmethod
    def backward(ctx, g):
        return _a2a(g, ctx.comm), None


class _CopyTo(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, comm):
        ctx.comm = comm
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return _allreduce(g, ctx.comm), None


class _ReduceFrom(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, comm):
        return _allreduce(x, comm)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _GatherFrom(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, comm, dim):
        ctx.comm, ctx.dim = comm, dim
        return _allgather(x, comm, dim)

    @staticmethod
    def backward(ctx, g):
        return _slice(g, ctx.comm, ctx.dim), None, None


class _SplitTo(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, comm, dim):
        ctx.comm, ctx.dim = comm, dim
        return _slice(x, comm, dim)

    @staticmethod
    def backward(ctx, g):
        return _allgather(g, ctx.comm, ctx.dim), None, None


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, comm, dim):
        ctx.comm, ctx.dim = comm, dim
        return _allgather(x, comm, dim)

    @staticmethod
    def backward(ctx, g):
        return _reduce_scatter(g, ctx.comm, ctx.dim), None, None


class _ReduceScatterRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, comm, dim):
        ctx.comm, ctx.dim = comm, dim
        return _reduce_scatter(x, comm, dim)

    @staticmethod
    def backward(ctx, g):
        return _allgather(g, ctx.comm, ctx.dim), None, None


def all_to_all(x: torch.Tensor, comm: Comm) -> torch.Tensor:
    return x if comm.size == 1 else _AllToAll.apply(x, comm)


def copy_to(x: torch.Tensor, comm: Comm) -> torch.Tensor:
    return x if comm.size == 1 else _CopyTo.apply(x, comm)


def reduce_from(x: torch.Tensor, comm: Comm) -> torch.Tensor:
    return x if comm.size == 1 else _ReduceFrom.apply(x, comm)


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
