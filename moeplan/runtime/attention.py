"""Self-attention for one device, parameterised by the tensor-slicing group: multi-head and
grouped-query attention (`Attention`) and DeepSeek's multi-head latent attention
(`LatentAttention`), rotary positions, and the static KV caches generation writes into.

Legend: B batch, S sequence, H hidden, A local heads, D head dim, M positions of the KV cache
(prompt + new tokens), C latent width, R rotary key width. Every module reports `slices()`: how
each local parameter is cut from the full one (see model.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from moeplan.runtime import comm as C
from moeplan.runtime.comm import Comm
from moeplan.runtime.timers import NULL_TIMER
from moeplan.spec.model import ModelSpec
from moeplan.spec.phases import Phase

Slice = tuple[tuple[int, int, int], ...]


def part(n: int, comm: Comm) -> tuple[int, int]:
    size = n // comm.size
    return comm.rank_in_group * size, (comm.rank_in_group + 1) * size


@dataclass
class LayerKV:
    """One layer's keys and values for every position of a generation."""
    k_BAMD: torch.Tensor
    v_BAMD: torch.Tensor

    def write(self, pos_1: torch.Tensor, k_BA1D: torch.Tensor, v_BA1D: torch.Tensor) -> None:
        self.k_BAMD.index_copy_(2, pos_1, k_BA1D)
        self.v_BAMD.index_copy_(2, pos_1, v_BA1D)


@dataclass
class KVCache:
    """Every layer's keys and values, allocated once per generation (`GPT.new_cache`)."""
    layers: list[LayerKV | LatentKV]
    positions_M: torch.Tensor  # 0 … M-1, for the visibility mask of a decode step

    @property
    def max_len(self) -> int:
        return self.positions_M.shape[0]

    @property
    def nbytes(self) -> int:
        """The cache's bytes on this rank (the plan's `kv_cache` term)."""
        return sum(t.numel() * t.element_size() for layer in self.layers
                   for t in vars(layer).values())


_ROTARY: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def rotary_table(theta: float, D: int, length: int,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [length, D] (fp32) of positions 0 … length-1, pair (i, i + D/2) turned by
    pos · theta^(-2i/D); computed once per (theta, D, device) and shared by every layer."""
    key = (theta, D, str(device))
    table = _ROTARY.get(key)
    if table is None or table[0].shape[0] < length:
        # plain tensors whatever mode the first caller is in: every later pass shares them
        with torch.inference_mode(False), torch.no_grad():
            inv = theta ** (-torch.arange(0, D, 2, device=device, dtype=torch.float32) / D)
            angles = (torch.arange(length, device=device, dtype=torch.float32)[:, None]
                      * inv[None])
            table = tuple(torch.cat([f(angles)] * 2, dim=-1) for f in (torch.cos, torch.sin))
        _ROTARY[key] = table
    return table


def rotate(x_BASD: torch.Tensor, cos_SD: torch.Tensor, sin_SD: torch.Tensor) -> torch.Tensor:
    """Rotary positions (the half-split form of GPT-NeoX and Hugging Face's Llama family), by
    the table rows of the tokens' positions (`Rotary.at`)."""
    half = x_BASD.shape[-1] // 2
    rotated = torch.cat([-x_BASD[..., half:], x_BASD[..., :half]], dim=-1)
    return x_BASD * cos_SD + rotated * sin_SD


class Rotary:
    """A layer's rotary positions: the model's shared table, looked up once per pass for
    every tensor the layer turns (no per-call trigonometry: fewer kernels per decode step)."""

    def __init__(self, theta: float, D: int, positions: int):
        self.theta, self.D, self.positions = theta, D, positions

    def at(self, pos_S: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = rotary_table(self.theta, self.D, self.positions, pos_S.device)
        return cos[pos_S].to(dtype), sin[pos_S].to(dtype)


class Attention(nn.Module):
    """Causal self-attention; heads split over tp (q/k/v by rows, projection by columns).
    Grouped-query attention splits the kv heads over tp too (kv_heads divisible by tp), each
    serving heads / kv_heads query heads; rotary positions turn q and k; query/key norms per
    head, or over the whole projection ("full": its statistics summed over tp)."""

    timer = NULL_TIMER

    def __init__(self, spec: ModelSpec, tp: Comm):
        super().__init__()
        h, heads = spec.hidden, spec.heads
        g = spec.kv_heads or heads
        self.tp, self.d = tp, spec.head_dim or h // heads
        self.a0, self.a1 = (x * self.d for x in part(heads, tp))
        self.g0, self.g1 = (x * self.d for x in part(g, tp))
        self.group = heads // g
        qkv_bias = spec.bias if spec.qkv_bias is None else spec.qkv_bias
        self.q = nn.Linear(h, self.a1 - self.a0, bias=qkv_bias)
        self.k, self.v = (nn.Linear(h, self.g1 - self.g0, bias=qkv_bias) for _ in range(2))
        self.proj = nn.Linear(self.a1 - self.a0, h, bias=False)
        self.proj_bias = nn.Parameter(torch.zeros(h)) if spec.bias else None
        self.rope = (Rotary(spec.rope_theta, self.d, spec.max_seq_len)
                     if spec.positions == "rope" else None)
        self.qk_norm, self.eps = spec.qk_norm, spec.norm_eps
        if spec.qk_norm == "head":
            self.q_norm, self.k_norm = nn.RMSNorm(self.d, eps=spec.norm_eps), nn.RMSNorm(
                self.d, eps=spec.norm_eps)
        elif spec.qk_norm == "full":  # weights cut as the projections' rows
            self.q_norm_weight = nn.Parameter(torch.ones(self.a1 - self.a0))
            self.k_norm_weight = nn.Parameter(torch.ones(self.g1 - self.g0))
            self.widths = (heads * self.d, g * self.d)

    def slices(self) -> dict[str, Slice]:
        rows, kv = ((0, self.a0, self.a1),), ((0, self.g0, self.g1),)
        out = {"q.weight": rows, "q.bias": rows, "k.weight": kv, "k.bias": kv,
               "v.weight": kv, "v.bias": kv, "proj.weight": ((1, self.a0, self.a1),),
               "proj_bias": (), "q_norm_weight": rows, "k_norm_weight": kv}
        names = {n for n, _ in self.named_parameters()}
        return {k: v for k, v in out.items() if k in names}

    def new_cache(self, batch: int, max_len: int) -> LayerKV:
        """Zeros, not empty: masked positions still enter the attention product (times 0)."""
        w = self.q.weight
        shape = (batch, (self.g1 - self.g0) // self.d, max_len, self.d)
        return LayerKV(w.new_zeros(shape), w.new_zeros(shape))

    def _full_norm(self, x: torch.Tensor, weight: torch.Tensor, width: int) -> torch.Tensor:
        """RMSNorm over the whole projection, of which this rank holds a slice: the squares
        summed over tp, and in backward their gradients too (each rank's slice used the sum)."""
        sq = C.copy_to(C.reduce_from(x.float().pow(2).sum(-1, keepdim=True), self.tp), self.tp)
        return (x.float() * torch.rsqrt(sq / width + self.eps)).to(x.dtype) * weight

    def _heads(self, x_BSH: torch.Tensor, pos_S: torch.Tensor | None):
        B, S, _ = x_BSH.shape
        q, k, v = self.q(x_BSH), self.k(x_BSH), self.v(x_BSH)
        if self.qk_norm == "full":
            q = self._full_norm(q, self.q_norm_weight, self.widths[0])
            k = self._full_norm(k, self.k_norm_weight, self.widths[1])
        q, k, v = (t.view(B, S, -1, self.d).transpose(1, 2) for t in (q, k, v))
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None:
            cos, sin = self.rope.at(pos_S, q.dtype)
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        return q, k, v

    def forward(self, x_BSH: torch.Tensor, kv: LayerKV | None = None,
                pos_1: torch.Tensor | None = None,
                visible_1M: torch.Tensor | None = None) -> torch.Tensor:
        """Without `pos_1`: the tokens attend causally among themselves (and, with `kv`, fill
        its first S positions — a prompt). With `pos_1`: one token per sequence, written at that
        position, attending to the positions of `visible_1M` — a decode step."""
        B, S, _ = x_BSH.shape
        t = self.timer
        x = t.to(C.copy_to(t.to(x_BSH, Phase.TP_COMM), self.tp), Phase.ATTENTION)
        pos_S = None
        if self.rope is not None:
            pos_S = pos_1 if pos_1 is not None else torch.arange(S, device=x.device)
        q, k, v = self._heads(x, pos_S)
        if pos_1 is None:
            if kv is not None:
                kv.k_BAMD[:, :, :S] = k
                kv.v_BAMD[:, :, :S] = v
            # grouped-query: the kernel serves each kv head's queries (no repeated copies)
            y_BASD = F.scaled_dot_product_attention(q, k, v, is_causal=S > 1,
                                                    enable_gqa=self.group > 1)
        else:
            if S > 1:
                raise ValueError("a decode step takes one new token per sequence")
            kv.write(pos_1, k, v)
            y_BASD = F.scaled_dot_product_attention(q, kv.k_BAMD, kv.v_BAMD,
                                                    attn_mask=visible_1M,
                                                    enable_gqa=self.group > 1)
        y = self.proj(y_BASD.transpose(1, 2).reshape(B, S, -1))
        y = C.reduce_from(t.to(y, Phase.TP_COMM), self.tp)
        y = t.to(y, Phase.ATTENTION)
        return y + self.proj_bias if self.proj_bias is not None else y


@dataclass
class LatentKV:
    """One MLA layer's cache: the normalised latent and the rotated shared key part of every
    position, whole on every tp rank (each rank expands its own heads from them)."""
    latent_BMC: torch.Tensor
    kpe_BMR: torch.Tensor

    def write(self, pos_1: torch.Tensor, latent_B1C: torch.Tensor, kpe_B1R: torch.Tensor) -> None:
        self.latent_BMC.index_copy_(1, pos_1, latent_B1C)
        self.kpe_BMR.index_copy_(1, pos_1, kpe_B1R)


class LatentAttention(nn.Module):
    """DeepSeek's multi-head latent attention. Keys and values come from a shared latent
    (kv_a: h -> kv_lora_rank + rope, normed, then kv_b up to each head's key and value) plus a
    rotary key part shared by the heads; queries through an optional low-rank q_a -> q_b.
    Heads split over tp (q_b / q_proj and kv_b by rows, o_proj by columns); the down
    projections and their norms are whole on every rank, their gradients summed over tp."""

    timer = NULL_TIMER

    def __init__(self, spec: ModelSpec, tp: Comm):
        super().__init__()
        m, h = spec.latent_attention, spec.hidden
        self.tp, self.m = tp, m
        self.qk = m.qk_nope_head_dim + m.qk_rope_head_dim
        a0, a1 = part(spec.heads, tp)
        self.heads = a1 - a0
        self.q_rows = (a0 * self.qk, a1 * self.qk)
        self.kv_rows = (a0 * (m.qk_nope_head_dim + m.v_head_dim),
                        a1 * (m.qk_nope_head_dim + m.v_head_dim))
        self.o_cols = (a0 * m.v_head_dim, a1 * m.v_head_dim)
        if m.q_lora_rank:
            self.q_a = nn.Linear(h, m.q_lora_rank, bias=False)
            self.q_a_norm = nn.RMSNorm(m.q_lora_rank, eps=spec.norm_eps)
            self.q_b = nn.Linear(m.q_lora_rank, self.heads * self.qk, bias=False)
        else:
            self.q_proj = nn.Linear(h, self.heads * self.qk, bias=False)
        self.kv_a = nn.Linear(h, m.kv_lora_rank + m.qk_rope_head_dim, bias=False)
        self.kv_a_norm = nn.RMSNorm(m.kv_lora_rank, eps=spec.norm_eps)
        self.kv_b = nn.Linear(m.kv_lora_rank, self.heads * (m.qk_nope_head_dim + m.v_head_dim),
                              bias=False)
        self.o_proj = nn.Linear(self.heads * m.v_head_dim, h, bias=False)
        self.proj_bias = nn.Parameter(torch.zeros(h)) if spec.bias else None
        self.rope = (Rotary(spec.rope_theta, m.qk_rope_head_dim, spec.max_seq_len)
                     if spec.positions == "rope" else None)

    def slices(self) -> dict[str, Slice]:
        out = {"q_b.weight": ((0, *self.q_rows),), "q_proj.weight": ((0, *self.q_rows),),
               "kv_b.weight": ((0, *self.kv_rows),), "o_proj.weight": ((1, *self.o_cols),)}
        names = {n for n, _ in self.named_parameters()}
        return {k: v for k, v in out.items() if k in names}

    def new_cache(self, batch: int, max_len: int) -> LatentKV:
        w = self.kv_a.weight
        return LatentKV(w.new_zeros(batch, max_len, self.m.kv_lora_rank),
                        w.new_zeros(batch, max_len, self.m.qk_rope_head_dim))

    def _latent(self, x_BSH: torch.Tensor, turn: tuple | None):
        c = self.kv_a(x_BSH)
        latent, kpe = c.split([self.m.kv_lora_rank, self.m.qk_rope_head_dim], dim=-1)
        if turn is not None:
            kpe = rotate(kpe[:, None], *turn)[:, 0]
        return self.kv_a_norm(latent), kpe

    def _keys_values(self, latent_BMC: torch.Tensor, kpe_BMR: torch.Tensor):
        B, M, _ = latent_BMC.shape
        m = self.m
        kv = self.kv_b(latent_BMC).view(B, M, self.heads, m.qk_nope_head_dim + m.v_head_dim)
        k_nope, v = kv.transpose(1, 2).split([m.qk_nope_head_dim, m.v_head_dim], dim=-1)
        k_pe = kpe_BMR[:, None].expand(B, self.heads, M, m.qk_rope_head_dim)
        return torch.cat([k_nope, k_pe], dim=-1), v

    def forward(self, x_BSH: torch.Tensor, kv: LatentKV | None = None,
                pos_1: torch.Tensor | None = None,
                visible_1M: torch.Tensor | None = None) -> torch.Tensor:
        B, S, _ = x_BSH.shape
        t = self.timer
        x = t.to(C.copy_to(t.to(x_BSH, Phase.TP_COMM), self.tp), Phase.ATTENTION)
        pos_S = pos_1 if pos_1 is not None else torch.arange(S, device=x.device)
        q = self.q_b(self.q_a_norm(self.q_a(x))) if self.m.q_lora_rank else self.q_proj(x)
        q = q.view(B, S, self.heads, self.qk).transpose(1, 2)
        turn = self.rope.at(pos_S, q.dtype) if self.rope is not None else None
        if turn is not None:
            q_nope, q_pe = q.split([self.m.qk_nope_head_dim, self.m.qk_rope_head_dim], dim=-1)
            q = torch.cat([q_nope, rotate(q_pe, *turn)], dim=-1)
        latent, kpe = self._latent(x, turn)
        if pos_1 is None:
            if kv is not None:
                kv.latent_BMC[:, :S] = latent
                kv.kpe_BMR[:, :S] = kpe
            k, v = self._keys_values(latent, kpe)
            y_BASD = F.scaled_dot_product_attention(q, k, v, is_causal=S > 1)
        else:
            if S > 1:
                raise ValueError("a decode step takes one new token per sequence")
            kv.write(pos_1, latent, kpe)
            k, v = self._keys_values(kv.latent_BMC, kv.kpe_BMR)
            y_BASD = F.scaled_dot_product_attention(q, k, v, attn_mask=visible_1M)
        y = self.o_proj(y_BASD.transpose(1, 2).reshape(B, S, -1))
        y = C.reduce_from(t.to(y, Phase.TP_COMM), self.tp)
        y = t.to(y, Phase.ATTENTION)
        return y + self.proj_bias if self.proj_bias is not None else y
