"""A GPT decoder with dense, MoE and Residual-MoE (PR-MoE) layers, written for one device and
parameterised by a `Parallel` context that `parallelize` fills in.

Legend: B batch, S sequence, H hidden, F FFN width, A local heads, D head dim, T tokens (B·S),
E experts (global), L local experts, C capacity, P expert-parallel group size.

`self.timer.to(x, phase)` marks where one cost-model phase ends and the next begins (see
timers.py); the default timer does nothing.

Every module reports `slices()`: for each parameter, how its local tensor is cut from the full
(single-device) one — a tuple of (dim, start, stop). That is the one description used to shard a
full model, to compare sharded gradients with single-device ones, and to write and read
plan-independent checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from moeplan.profiles.model import ModelSpec
from moeplan.runtime import comm as C
from moeplan.runtime import gating
from moeplan.runtime.a2a import FlatExchange
from moeplan.runtime.comm import Comm
from moeplan.runtime.kernels import REFERENCE, ffn_loop
from moeplan.runtime.timers import NULL_TIMER

Slice = tuple[tuple[int, int, int], ...]


@dataclass
class MoEParallel:
    ep: Comm
    es: Comm
    exchange: object  # FlatExchange | HierarchicalExchange
    coordinated: bool


@dataclass
class Parallel:
    tp: Comm = field(default_factory=Comm.solo)
    moe: dict[int, MoEParallel] = field(default_factory=dict)

    def for_layer(self, index: int) -> MoEParallel:
        if index in self.moe:
            return self.moe[index]
        solo = Comm.solo()
        return MoEParallel(ep=solo, es=solo, exchange=FlatExchange(solo), coordinated=False)


def _part(n: int, comm: Comm) -> tuple[int, int]:
    size = n // comm.size
    return comm.rank_in_group * size, (comm.rank_in_group + 1) * size


class Attention(nn.Module):
    """Causal self-attention; heads split over tp (q/k/v by rows, projection by columns)."""

    timer = NULL_TIMER

    def __init__(self, h: int, heads: int, tp: Comm):
        super().__init__()
        self.tp, self.d = tp, h // heads
        self.a0, self.a1 = (x * self.d for x in _part(heads, tp))
        width = self.a1 - self.a0
        self.q, self.k, self.v = (nn.Linear(h, width) for _ in range(3))
        self.proj = nn.Linear(width, h, bias=False)
        self.proj_bias = nn.Parameter(torch.zeros(h))

    def slices(self) -> dict[str, Slice]:
        rows = ((0, self.a0, self.a1),)
        return {"q.weight": rows, "q.bias": rows, "k.weight": rows, "k.bias": rows,
                "v.weight": rows, "v.bias": rows, "proj.weight": ((1, self.a0, self.a1),),
                "proj_bias": ()}

    def forward(self, x_BSH: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        B, S, _ = x_BSH.shape
        t = self.timer
        x = t.to(C.copy_to(t.to(x_BSH, "tp_comm"), self.tp), "attention")
        q, k, v = (m(x).view(B, S, -1, self.d).transpose(1, 2) for m in (self.q, self.k, self.v))
        past = cache is not None and "k" in cache
        if past:
            if S > 1:
                raise ValueError("several new tokens after a filled KV cache are not supported")
            k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
        if cache is not None:
            cache["k"], cache["v"] = k, v
        # a single new token attends to the whole cache; a prompt attends causally
        y_BASD = F.scaled_dot_product_attention(q, k, v, is_causal=not past and S > 1)
        y = self.proj(y_BASD.transpose(1, 2).reshape(B, S, -1))
        return t.to(C.reduce_from(t.to(y, "tp_comm"), self.tp), "attention") + self.proj_bias


class MLP(nn.Module):
    """h -> F -> h with GELU; F split over tp (fc1 by rows, fc2 by columns)."""

    timer = NULL_TIMER

    def __init__(self, h: int, f: int, tp: Comm):
        super().__init__()
        self.tp = tp
        self.f0, self.f1 = _part(f, tp)
        self.fc1 = nn.Linear(h, self.f1 - self.f0)
        self.fc2 = nn.Linear(self.f1 - self.f0, h, bias=False)
        self.fc2_bias = nn.Parameter(torch.zeros(h))

    def slices(self) -> dict[str, Slice]:
        rows = ((0, self.f0, self.f1),)
        return {"fc1.weight": rows, "fc1.bias": rows, "fc2.weight": ((1, self.f0, self.f1),),
                "fc2_bias": ()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.timer
        x = t.to(C.copy_to(t.to(x, "tp_comm"), self.tp), "mlp")
        y = self.fc2(F.gelu(self.fc1(x)))
        return t.to(C.reduce_from(t.to(y, "tp_comm"), self.tp), "mlp") + self.fc2_bias


class Experts(nn.Module):
    """L local experts, each FFN sliced over es."""

    def __init__(self, experts: int, h: int, f: int, ep: Comm, es: Comm):
        super().__init__()
        self.e0, self.e1 = _part(experts, ep)
        self.f0, self.f1 = _part(f, es)
        L, Fl = self.e1 - self.e0, self.f1 - self.f0
        self.es_rank0 = es.rank_in_group == 0
        self.w1 = nn.Parameter(torch.empty(L, h, Fl))
        self.b1 = nn.Parameter(torch.zeros(L, Fl))
        self.w2 = nn.Parameter(torch.empty(L, Fl, h))
        self.b2 = nn.Parameter(torch.zeros(L, h))
        nn.init.normal_(self.w1, std=0.02)
        nn.init.normal_(self.w2, std=0.02)

    def slices(self) -> dict[str, Slice]:
        e, f = (0, self.e0, self.e1), (self.f0, self.f1)
        return {"w1": (e, (2, *f)), "b1": (e, (1, *f)), "w2": (e, (1, *f)), "b2": (e,)}

    def forward(self, x_PLCH: torch.Tensor, ffn=ffn_loop) -> torch.Tensor:
        """[P, L, C, H] as received (source rank, local expert, slot) -> the same layout out.
        The output bias is added once per expert: by the first slice, before the es sum."""
        return ffn(x_PLCH, self.w1, self.b1, self.w2, self.b2, self.es_rank0)


class MoE(nn.Module):
    """Router + experts + (optionally) the PR-MoE residual MLP and its mixing coefficient."""

    timer = NULL_TIMER
    kernels = REFERENCE  # gating / dispatch / combine; kernels.use_kernels swaps in Triton

    def __init__(self, spec: ModelSpec, experts: int, tp: Comm, par: MoEParallel):
        super().__init__()
        self.spec, self.E, self.tp, self.par = spec, experts, tp, par
        h = spec.hidden
        self.router = nn.Linear(h, experts, bias=False)
        self.experts = Experts(experts, h, spec.ffn_hidden, par.ep, par.es)
        self.residual = MLP(h, spec.ffn_hidden, tp) if spec.residual else None
        self.coef = nn.Linear(h, 2) if spec.residual else None
        self.last: gating.Routing | None = None

    def slices(self) -> dict[str, Slice]:
        out = {f"experts.{k}": v for k, v in self.experts.slices().items()}
        if self.residual is not None:
            out.update({f"residual.{k}": v for k, v in self.residual.slices().items()})
        return out

    def _tokens(self, x_TH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """Tokens this rank routes: all (no padding mask), or its 1/tp share, padded, with the
        mask of real tokens, when TP-coordinated."""
        T = x_TH.shape[0]
        if not self.par.coordinated or self.tp.size == 1:
            return x_TH, None, T
        per = -(-T // self.tp.size)
        pad = per * self.tp.size - T
        valid = torch.arange(per * self.tp.size, device=x_TH.device) < T
        x = F.pad(x_TH, (0, 0, 0, pad)) if pad else x_TH
        return C.split_to(x, self.tp), C.split_to(valid, self.tp), per

    def forward(self, x_BSH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, S, H = x_BSH.shape
        x_TH = x_BSH.reshape(B * S, H)
        xr_TH, valid_T, gate_tokens = self._tokens(x_TH)
        cap = self.spec.capacity(self.E, gate_tokens, train=self.training)
        reduce = (lambda t: C.reduce_from(t, self.tp)) if self.par.coordinated else None
        logits_TE = F.linear(xr_TH.float(), self.router.weight.float())  # fp32 router
        r = self.kernels.gate(logits_TE, self.spec.top_k, cap, valid_T, reduce)
        self.last = r
        t = self.timer
        buf_ECH = self.kernels.dispatch(t.to(xr_TH, "dispatch"), r, self.E)
        y_ECH = t.to(self._experts(buf_ECH), "combine")
        out_TH = self.kernels.combine(y_ECH, r)
        if self.par.coordinated and self.tp.size > 1:
            out_TH = C.gather_from(t.to(out_TH, "tp_comm"), self.tp, dim=0)[: B * S]
        out = t.to(out_TH, "mlp").view(B, S, H)
        if self.residual is not None:
            c = F.softmax(self.coef(x_BSH), dim=-1)
            out = out * c[..., :1] + self.residual(x_BSH) * c[..., 1:]
        return out, r.aux_loss

    def _experts(self, buf_ECH: torch.Tensor) -> torch.Tensor:
        """Exchange over ep, (allgather over es), local experts, (reduce-scatter), exchange back."""
        P, es = self.par.ep.size, self.par.es
        E, Cap, H = buf_ECH.shape
        L = E // P
        t = self.timer
        recv = self.par.exchange(t.to(buf_ECH.reshape(P, L, Cap, H), "dispatch_a2a"))
        # expert slicing: every slice of an expert sees the tokens of all es ranks
        x_PLCH = t.to(C.gather_rows(t.to(recv, "es_comm"), es, dim=0), "experts")
        y_PLCH = self.experts(x_PLCH, self.kernels.ffn)
        y_PLCH = C.reduce_scatter_rows(t.to(y_PLCH, "es_comm"), es, dim=0)
        return self.par.exchange(t.to(y_PLCH, "combine_a2a")).reshape(E, Cap, H)


class Block(nn.Module):
    timer = NULL_TIMER

    def __init__(self, spec: ModelSpec, index: int, par: Parallel):
        super().__init__()
        self.index = index
        h = spec.hidden
        self.ln1, self.ln2 = nn.LayerNorm(h), nn.LayerNorm(h)
        self.attn = Attention(h, spec.heads, par.tp)
        E = spec.experts[index]
        self.ffn = MoE(spec, E, par.tp, par.for_layer(index)) if E else MLP(h, spec.ffn_hidden,
                                                                             par.tp)

    def slices(self) -> dict[str, Slice]:
        out = {f"attn.{k}": v for k, v in self.attn.slices().items()}
        out.update({f"ffn.{k}": v for k, v in self.ffn.slices().items()})
        return out

    def forward(self, x, cache=None):
        self.timer.layer = self.index
        x = self.timer.to(x, "attention")
        x = x + self.attn(self.ln1(x), cache)
        y = self.ffn(self.ln2(self.timer.to(x, "gate" if isinstance(self.ffn, MoE) else "mlp")))
        if isinstance(y, tuple):
            return x + y[0], y[1]
        return x + y, None


class GPT(nn.Module):
    timer = NULL_TIMER

    def __init__(self, spec: ModelSpec, par: Parallel | None = None):
        super().__init__()
        par = par or Parallel()
        self.spec, self.par = spec, par
        self.wte = nn.Embedding(spec.vocab_size, spec.hidden)
        self.wpe = nn.Embedding(spec.max_seq_len, spec.hidden)
        self.blocks = nn.ModuleList(Block(spec, i, par) for i in range(spec.num_layers))
        self.ln_f = nn.LayerNorm(spec.hidden)
        # GPT-2 initialisation: N(0, 0.02) weights, zero biases (a shared bias would give every
        # token the same preferred expert at step 0)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.wte.weight, std=0.02)
        nn.init.normal_(self.wpe.weight, std=0.02)

    def slices(self) -> dict[str, Slice]:
        out = {}
        for i, b in enumerate(self.blocks):
            out.update({f"blocks.{i}.{k}": v for k, v in b.slices().items()})
        return out

    def forward(self, idx_BS: torch.Tensor, caches: list[dict] | None = None, pos0: int = 0):
        """Logits [B, S, V] and the summed aux loss of the MoE layers."""
        S = idx_BS.shape[1]
        pos = torch.arange(pos0, pos0 + S, device=idx_BS.device)
        x = self.wte(idx_BS) + self.wpe(pos)
        aux = x.new_zeros(())
        for i, block in enumerate(self.blocks):
            x, a = block(x, None if caches is None else caches[i])
            if a is not None:
                aux = aux + a
        self.timer.layer = "head"
        x = self.timer.to(x, "head")
        logits = F.linear(self.ln_f(x), self.wte.weight)  # tied LM head
        return logits, aux

    def loss(self, idx_BS: torch.Tensor, targets_BS: torch.Tensor) -> tuple[torch.Tensor, dict]:
        logits, aux = self(idx_BS)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets_BS.reshape(-1))
        return ce + self.spec.aux_loss_coef * aux, {"ce": ce.detach(), "aux": aux.detach()}
