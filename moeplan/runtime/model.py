"""A GPT decoder with dense, MoE and Residual-MoE (PR-MoE) layers, written for one device and
parameterised by a `Parallel` context that `parallelize` fills in (its attention: attention.py).

Legend: B batch, S sequence, H hidden, F FFN width, A local heads, D head dim, T tokens (B·S),
E experts (global), L local experts, C capacity, P expert-parallel group size, M positions of
the KV cache (prompt + new tokens).

Generation uses a static KV cache (`KVCache`): buffers for all M positions allocated once, the
prompt written from position 0, then one token per step at a position held in a device tensor,
attending over the whole buffer under a mask — every decode step has the same shapes and reads
nothing back to the host, so it can be captured once in a CUDA graph (see infer.py).

`self.timer.to(x, phase)` marks where one cost-model phase ends and the next begins (see
timers.py); the default timer does nothing.

Every module reports `slices()`: for each parameter, how its local tensor is cut from the full
(single-device) one — a tuple of (dim, start, stop). That is the one description used to shard a
full model, to compare sharded gradients with single-device ones, and to write and read
plan-independent checkpoints.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from moeplan.runtime import comm as C
from moeplan.runtime import gating
from moeplan.runtime.a2a import FlatExchange, HierarchicalExchange
from moeplan.runtime.attention import (
    Attention,
    KVCache,
    LatentAttention,
    LayerKV,
    Slice,
    part,
)
from moeplan.runtime.comm import Comm
from moeplan.runtime.kernels import REFERENCE, ffn_loop
from moeplan.runtime.timers import NULL_TIMER
from moeplan.spec.model import ModelSpec
from moeplan.spec.phases import HEAD_LAYER, Phase


@dataclass
class MoEParallel:
    ep: Comm
    es: Comm
    exchange: FlatExchange | HierarchicalExchange
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


def norm_layer(spec: ModelSpec, width: int | None = None) -> nn.Module:
    width = width or spec.hidden
    if spec.norm == "rmsnorm":
        return nn.RMSNorm(width, eps=spec.norm_eps)
    return nn.LayerNorm(width, eps=spec.norm_eps)


class MLP(nn.Module):
    """h -> F -> h with GELU, or gated (SwiGLU: silu(fc1 x) · fc3 x); F split over tp (fc1
    and fc3 by rows, fc2 by columns)."""

    timer = NULL_TIMER

    def __init__(self, spec: ModelSpec, f: int, tp: Comm):
        super().__init__()
        h = spec.hidden
        self.tp, self.gated = tp, spec.mlp == "swiglu"
        self.f0, self.f1 = part(f, tp)
        self.fc1 = nn.Linear(h, self.f1 - self.f0, bias=spec.bias)
        if self.gated:
            self.fc3 = nn.Linear(h, self.f1 - self.f0, bias=spec.bias)
        self.fc2 = nn.Linear(self.f1 - self.f0, h, bias=False)
        self.fc2_bias = nn.Parameter(torch.zeros(h)) if spec.bias else None

    def slices(self) -> dict[str, Slice]:
        rows = ((0, self.f0, self.f1),)
        out = {"fc1.weight": rows, "fc1.bias": rows, "fc3.weight": rows, "fc3.bias": rows,
               "fc2.weight": ((1, self.f0, self.f1),), "fc2_bias": ()}
        names = {n for n, _ in self.named_parameters()}
        return {k: v for k, v in out.items() if k in names}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.timer
        x = t.to(C.copy_to(t.to(x, Phase.TP_COMM), self.tp), Phase.MLP)
        inner = F.silu(self.fc1(x)) * self.fc3(x) if self.gated else F.gelu(self.fc1(x))
        y = self.fc2(inner)
        y = t.to(C.reduce_from(t.to(y, Phase.TP_COMM), self.tp), Phase.MLP)
        return y + self.fc2_bias if self.fc2_bias is not None else y


class Experts(nn.Module):
    """L local experts, each FFN sliced over es; gated (SwiGLU) experts have a third matrix."""

    def __init__(self, experts: int, h: int, f: int, ep: Comm, es: Comm, gated: bool = False,
                 bias: bool = True):
        super().__init__()
        self.e0, self.e1 = part(experts, ep)
        self.f0, self.f1 = part(f, es)
        L, Fl = self.e1 - self.e0, self.f1 - self.f0
        self.es_rank0 = es.rank_in_group == 0
        self.gated, self.bias = gated, bias
        self.w1 = nn.Parameter(torch.empty(L, h, Fl))
        self.b1 = nn.Parameter(torch.zeros(L, Fl)) if bias else None
        self.w2 = nn.Parameter(torch.empty(L, Fl, h))
        self.b2 = nn.Parameter(torch.zeros(L, h)) if bias else None
        nn.init.normal_(self.w1, std=0.02)
        nn.init.normal_(self.w2, std=0.02)
        if gated:
            self.w3 = nn.Parameter(torch.empty(L, h, Fl))
            self.b3 = nn.Parameter(torch.zeros(L, Fl)) if bias else None
            nn.init.normal_(self.w3, std=0.02)

    def slices(self) -> dict[str, Slice]:
        e, f = (0, self.e0, self.e1), (self.f0, self.f1)
        out = {"w1": (e, (2, *f)), "b1": (e, (1, *f)), "w2": (e, (1, *f)), "b2": (e,),
               "w3": (e, (2, *f)), "b3": (e, (1, *f))}
        names = {n for n, _ in self.named_parameters()}
        return {k: v for k, v in out.items() if k in names}

    def forward(self, x_PLCH: torch.Tensor, ffn=ffn_loop) -> torch.Tensor:
        """[P, L, C, H] as received (source rank, local expert, slot) -> the same layout out.
        The output bias is added once per expert: by the first slice, before the es sum."""
        return ffn(x_PLCH, self.w1, self.b1, self.w2, self.b2, self.es_rank0,
                   *((self.w3, self.b3) if self.gated else ()))


def _es_infer(par: MoEParallel, tp: Comm) -> str | None:
    """How inference runs expert slicing. "gather": the es ranks hold different tokens (they
    are gathered before the gate); "shared": the es ranks are tp peers holding the same tokens
    (nothing to gather); None: no slicing, or es ranks of which only some share their tokens
    — then the training path (gather after the exchange) serves inference too."""
    es = set(par.es.ranks)
    if len(es) == 1:
        return None
    peers = es & set(tp.ranks)
    if par.coordinated or len(peers) == 1:
        return "gather"
    return "shared" if peers == es else None


def _autocast_dtype(kind: str) -> torch.dtype | None:
    """The dtype autocast computes in on this device type, or None where it is off."""
    if torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return None


def _no_autocast(kind: str):
    return (torch.autocast(kind, enabled=False) if _autocast_dtype(kind) is not None
            else contextlib.nullcontext())


class MoE(nn.Module):
    """Router + experts + (optionally) the PR-MoE residual MLP and its mixing coefficient."""

    timer = NULL_TIMER
    kernels = REFERENCE  # gating / dispatch / combine; kernels.use_kernels swaps in Triton

    def __init__(self, spec: ModelSpec, experts: int, tp: Comm, par: MoEParallel):
        super().__init__()
        self.spec, self.E, self.tp, self.par = spec, experts, tp, par
        h = spec.hidden
        self.router = nn.Linear(h, experts, bias=False)
        self.experts = Experts(experts, h, spec.expert_ffn, par.ep, par.es,
                               gated=spec.mlp == "swiglu", bias=spec.bias)
        self.residual = MLP(spec, spec.ffn_hidden, tp) if spec.residual else None
        self.coef = nn.Linear(h, 2) if spec.residual else None
        # shared experts (DeepSeek, Qwen2-MoE): an always-on MLP beside the routed experts
        self.shared = MLP(spec, spec.shared_ffn_hidden, tp) if spec.shared_ffn_hidden else None
        self.shared_gate = (nn.Linear(h, 1, bias=False) if self.shared is not None
                            and spec.shared_gate else None)
        self.last: gating.Routing | None = None
        self.es_infer = _es_infer(par, tp)
        # seeds this layer's training gate noise (`run.set_noise_keys`); 0 until the trainer sets it
        self.noise_key = 0

    def slices(self) -> dict[str, Slice]:
        out = {f"experts.{k}": v for k, v in self.experts.slices().items()}
        if self.residual is not None:
            out.update({f"residual.{k}": v for k, v in self.residual.slices().items()})
        if self.shared is not None:
            out.update({f"shared.{k}": v for k, v in self.shared.slices().items()})
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
        t = self.timer
        xr_TH, valid_T, gate_tokens = self._tokens(x_BSH.reshape(B * S, H))
        # the gate noise of every token of the micro-batch, cut as the tokens are: the same
        # numbers reach a token whichever rank routes it
        noise = self._noise(B * S, x_BSH.device) if self.training else None
        if noise is not None and xr_TH.shape[0] != B * S:
            noise = gating.Noise(*(None if t is None else self._my_rows(t)
                                   for t in (noise.gumbel_TE, noise.uniform_T)),
                                 noise.rsample, noise.second)
        es_mode = self.es_infer if not self.training else None
        if es_mode == "gather":
            xr_TH, valid_T, gate_tokens = self._gather_es(xr_TH, valid_T, gate_tokens)
        out_TH, aux = self._route(xr_TH, valid_T, gate_tokens, es_mode, noise)
        if es_mode == "gather":  # the partial outputs summed, this rank's rows kept
            out_TH = C.reduce_scatter_rows(t.to(out_TH, Phase.ES_COMM), self.par.es, 0)
        elif es_mode == "shared":
            out_TH = C.reduce_from(t.to(out_TH, Phase.ES_COMM), self.par.es)
        if self.par.coordinated and self.tp.size > 1:
            out_TH = C.gather_from(t.to(out_TH, Phase.TP_COMM), self.tp, dim=0)[: B * S]
        out = t.to(out_TH, Phase.MLP).view(B, S, H)
        if self.residual is not None:
            c = F.softmax(self.coef(x_BSH), dim=-1)
            out = out * c[..., :1] + self.residual(x_BSH) * c[..., 1:]
        if self.shared is not None:
            y = self.shared(x_BSH)
            if self.shared_gate is not None:
                y = torch.sigmoid(self.shared_gate(x_BSH)) * y
            out = out + y
        return out, aux

    def _my_rows(self, t: torch.Tensor) -> torch.Tensor:
        """This tp rank's share of a per-token tensor, padded as `_tokens` pads the tokens."""
        per = -(-t.shape[0] // self.tp.size)
        t = F.pad(t, (0, 0) * (t.dim() - 1) + (0, per * self.tp.size - t.shape[0]))
        return t[self.tp.rank_in_group * per:(self.tp.rank_in_group + 1) * per]

    def _route(self, xr_TH: torch.Tensor, valid_T: torch.Tensor | None, gate_tokens: int,
               es_mode: str | None, noise: gating.Noise | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Gate, dispatch, experts, combine: this rank's routed tokens -> their expert outputs
        (partial sums over the FFN slice when `es_mode` is set) and the aux loss."""
        dropless = not self.spec.drop_tokens
        # dropless (DeepSpeed's drop_tokens=False): route without a limit, then size the buffers
        # to the busiest expert across the exchange's ranks (`_dropless`)
        cap = (gate_tokens * self.spec.top_k if dropless
               else self.spec.capacity(self.E, gate_tokens, train=self.training))
        reduce = (lambda t: C.reduce_from(t, self.tp)) if self.par.coordinated else None
        with _no_autocast(xr_TH.device.type):  # an fp32 router, as DeepSpeed's
            logits_TE = F.linear(xr_TH.float(), self.router.weight.float())
        k, renormalize = self.spec.top_k, self.spec.renormalize_top_k
        kern = self.kernels
        r = kern.gate(logits_TE, k, cap, valid_T, reduce, with_aux=self.training, noise=noise,
                      renormalize=renormalize)
        if dropless:
            r = self._dropless(r)
        self.last = r
        t = self.timer
        x_TH = t.to(xr_TH, Phase.DISPATCH)
        low = _autocast_dtype(x_TH.device.type)
        if low is not None:  # the experts' GEMMs cast the tokens to it anyway: the exchanges
            x_TH = x_TH.to(low)  # move half the bytes
        buf_ECH = kern.dispatch(x_TH, r, self.E)
        y_ECH = t.to(self._experts(buf_ECH, gather_es=es_mode is None), Phase.COMBINE)
        return kern.combine(y_ECH, r), r.aux_loss

    def _dropless(self, r: gating.Routing) -> gating.Routing:
        """The routing with its capacity cut to the most choices any expert received on any
        rank of the exchange (every rank's buffers must have one shape): nothing is dropped.
        Reads that number back to the host, once per call — as DeepSpeed does."""
        load = gating.one_hot(r.expert_TK.reshape(-1), self.E)
        if r.valid_T is not None:
            load = load * r.valid_T[:, None].expand_as(r.expert_TK).reshape(-1, 1)
        most = load.sum(0).max().reshape(1)
        for comm in (self.par.ep, self.par.es, self.tp if self.par.coordinated else None):
            if comm is not None and comm.size > 1:
                dist.all_reduce(most, op=dist.ReduceOp.MAX, group=comm.group)
        return dataclasses.replace(r, capacity=max(1, int(most)))

    def _noise(self, T: int, device) -> gating.Noise | None:
        spec, E = self.spec, self.E
        if not (spec.use_rts or spec.second_expert_sampling or spec.noisy_gate_policy != "none"):
            return None
        g = torch.Generator(device=device)
        g.manual_seed(self.noise_key)
        return gating.draw_noise(g, T, E, spec.top_k, spec.use_rts,
                                 spec.noisy_gate_policy == "rsample",
                                 spec.second_expert_sampling, device)

    def _gather_es(self, x_TH: torch.Tensor, valid_T: torch.Tensor | None,
                   gate_tokens: int) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """Inference with expert slicing: the es group's tokens, gathered before the gate, so
        that each slice runs its part of every expert on the same rows (DeepSpeed-MoE)."""
        es, t = self.par.es, self.timer
        x_TH = t.to(C.gather_rows(t.to(x_TH, Phase.ES_COMM), es, 0), Phase.GATE)
        if valid_T is not None:  # gloo gathers no bool tensors
            valid_T = C.gather_rows(valid_T.to(torch.uint8), es, 0).bool()
        return x_TH, valid_T, gate_tokens * es.size

    def _experts(self, buf_ECH: torch.Tensor, gather_es: bool = True) -> torch.Tensor:
        """Exchange over ep, (allgather over es), local experts, (reduce-scatter), exchange back.
        Without `gather_es` every es rank holds the same rows already: each returns its slice's
        partial output, summed by the caller after the combine."""
        P, es = self.par.ep.size, self.par.es
        E, Cap, H = buf_ECH.shape
        L = E // P
        t = self.timer
        recv = self.par.exchange(t.to(buf_ECH.reshape(P, L, Cap, H), Phase.DISPATCH_A2A))
        if not gather_es:
            y_PLCH = self.experts(t.to(recv, Phase.EXPERTS), self.kernels.ffn)
            return self.par.exchange(t.to(y_PLCH, Phase.COMBINE_A2A)).reshape(E, Cap, H)
        # expert slicing: every slice of an expert sees the tokens of all es ranks
        x_PLCH = t.to(C.gather_rows(t.to(recv, Phase.ES_COMM), es, dim=0), Phase.EXPERTS)
        y_PLCH = self.experts(x_PLCH, self.kernels.ffn)
        y_PLCH = C.reduce_scatter_rows(t.to(y_PLCH, Phase.ES_COMM), es, dim=0)
        return self.par.exchange(t.to(y_PLCH, Phase.COMBINE_A2A)).reshape(E, Cap, H)


class Block(nn.Module):
    timer = NULL_TIMER

    def __init__(self, spec: ModelSpec, index: int, par: Parallel):
        super().__init__()
        self.index = index
        self.ln1, self.ln2 = norm_layer(spec), norm_layer(spec)
        self.attn = (LatentAttention(spec, par.tp) if spec.latent_attention is not None
                     else Attention(spec, par.tp))
        E = spec.experts[index]
        self.ffn = (MoE(spec, E, par.tp, par.for_layer(index)) if E
                    else MLP(spec, spec.ffn_hidden, par.tp))

    def slices(self) -> dict[str, Slice]:
        out = {f"attn.{k}": v for k, v in self.attn.slices().items()}
        out.update({f"ffn.{k}": v for k, v in self.ffn.slices().items()})
        return out

    def forward(self, x, kv: LayerKV | None = None, pos_1: torch.Tensor | None = None,
                visible_1M: torch.Tensor | None = None):
        self.timer.layer = self.index
        x = self.timer.to(x, Phase.ATTENTION)
        x = x + self.attn(self.ln1(x), kv, pos_1, visible_1M)
        first = Phase.GATE if isinstance(self.ffn, MoE) else Phase.MLP
        y = self.ffn(self.ln2(self.timer.to(x, first)))
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
        self.wpe = (nn.Embedding(spec.max_seq_len, spec.hidden) if spec.positions == "learned"
                    else None)
        self.blocks = nn.ModuleList(Block(spec, i, par) for i in range(spec.num_layers))
        self.ln_f = norm_layer(spec)
        self.lm_head = (None if spec.tied_embeddings
                        else nn.Linear(spec.hidden, spec.vocab_size, bias=False))
        # GPT-2 initialisation: N(0, 0.02) weights, zero biases (a shared bias would give every
        # token the same preferred expert at step 0)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.wte.weight, std=0.02)
        if self.wpe is not None:
            nn.init.normal_(self.wpe.weight, std=0.02)

    def slices(self) -> dict[str, Slice]:
        out = {}
        for i, b in enumerate(self.blocks):
            out.update({f"blocks.{i}.{k}": v for k, v in b.slices().items()})
        return out

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        """A static KV cache for `max_len` positions (prompt + new tokens)."""
        if max_len > self.spec.max_seq_len:
            raise ValueError(f"{max_len} positions exceed {self.spec.max_seq_len}")
        positions_M = torch.arange(max_len, device=self.wte.weight.device)
        return KVCache([b.attn.new_cache(batch, max_len) for b in self.blocks], positions_M)

    def forward(self, idx_BS: torch.Tensor, cache: KVCache | None = None,
                pos_1: torch.Tensor | None = None):
        """Logits [B, S, V] and the summed aux loss of the MoE layers. Without `pos_1` the
        tokens are a sequence from position 0 (with `cache`: the prompt, written into it); with
        `pos_1` (a device tensor [1]) one token per sequence at that position — a decode step."""
        S = idx_BS.shape[1]
        if pos_1 is None:
            pos_S = torch.arange(S, device=idx_BS.device)
            visible_1M = None
        else:
            pos_S = pos_1
            visible_1M = (cache.positions_M <= pos_1)[None]  # [query, key]
        x = self.wte(idx_BS) + self.wpe(pos_S) if self.wpe is not None else self.wte(idx_BS)
        aux = x.new_zeros(())
        for i, block in enumerate(self.blocks):
            kv = None if cache is None else cache.layers[i]
            x, a = block(x, kv, pos_1, visible_1M)
            if a is not None and self.training:  # inference gates compute no aux loss
                aux = aux + a
        self.timer.layer = HEAD_LAYER
        x = self.timer.to(x, Phase.HEAD)
        head = self.wte.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(self.ln_f(x), head)  # tied (GPT-2) or untied LM head
        return logits, aux

    def loss(self, idx_BS: torch.Tensor, targets_BS: torch.Tensor,
             teacher_BSV: torch.Tensor | None = None, alpha: float = 0.0,
             temperature: float = 1.0) -> tuple[torch.Tensor, dict]:
        """LM loss + aux loss; with a teacher's logits also alpha × the distillation loss."""
        logits, aux = self(idx_BS)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets_BS.reshape(-1))
        total = ce + self.spec.aux_loss_coef * aux
        parts = {"ce": ce.detach(), "aux": aux.detach()}
        if teacher_BSV is not None:
            kd = distillation_loss(logits, teacher_BSV, temperature)
            total = total + alpha * kd
            parts["kd"] = kd.detach()
        return total, parts


def distillation_loss(student_BSV: torch.Tensor, teacher_BSV: torch.Tensor,
                      temperature: float) -> torch.Tensor:
    """KL(teacher ‖ student) of the distributions softened by the temperature, times T² so its
    gradients keep their scale (Hinton et al., 2015), averaged over tokens — the soft-label
    term of the Mixture-of-Students loss (DeepSpeed-MoE §4.2)."""
    V = student_BSV.shape[-1]
    log_s = F.log_softmax(student_BSV.float().reshape(-1, V) / temperature, dim=-1)
    log_t = F.log_softmax(teacher_BSV.float().reshape(-1, V) / temperature, dim=-1)
    return F.kl_div(log_s, log_t, log_target=True, reduction="batchmean") * temperature ** 2
