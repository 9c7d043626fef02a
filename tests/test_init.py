"""moerun's fresh initialisation (`parallel.init_seeded`): drawn one parameter (one expert) at a
time, so no rank ever builds the whole model, and every plan still holds slices of one model."""

from __future__ import annotations

import math

import pytest
import torch
from dist_cases import mla_spec, modern_spec

from moeplan.runtime.a2a import FlatExchange
from moeplan.runtime.comm import Comm
from moeplan.runtime.model import GPT, MoEParallel, Parallel
from moeplan.runtime.parallel import INIT_STD, cut, init_seeded
from moeplan.spec import load_model

SPECS = {"DeepSpeed-MoE blocks": lambda: load_model("tiny-pr-moe"),
         "today's blocks": modern_spec, "latent attention": mla_spec}


def _constant(p: torch.Tensor) -> bool:
    return bool((p == p.reshape(-1)[0]).all())


def _std_close(p: torch.Tensor) -> bool:
    """The sample standard deviation of n N(0, σ) draws is σ within 5 standard errors
    (σ/√(2n))."""
    n = p.numel()
    return abs(float(p.detach().std()) - INIT_STD) <= 5 * INIT_STD / math.sqrt(2 * n)


@pytest.mark.parametrize("name", SPECS)
def test_drawn_weights_follow_the_models_own_initialisation(name):
    """Whatever GPT's construction draws at random it draws from N(0, INIT_STD) — the one law
    `init_seeded` redraws from — and what it sets constant stays as constructed."""
    spec = SPECS[name]()
    torch.manual_seed(0)
    built = GPT(spec)
    drawn = GPT(spec)
    init_seeded(drawn, seed=3)
    for (n, a), (_, b) in zip(built.named_parameters(), drawn.named_parameters()):
        if _constant(a):
            assert torch.equal(a, b), n
        else:
            assert _std_close(a), (n, float(a.std()))
            assert _std_close(b) and not torch.equal(a, b), n


def _comm(size: int, rank: int) -> Comm:
    return Comm(group=None, ranks=tuple(range(size)), rank_in_group=rank)


@pytest.mark.parametrize("name", SPECS)
@pytest.mark.parametrize("tp, ep, es, rank", [(2, 1, 1, 1), (1, 2, 1, 1), (1, 2, 2, 3),
                                               (2, 2, 2, 2)])
def test_every_plan_holds_slices_of_one_model(name, tp, ep, es, rank):
    """A rank of any layout (tp, and on every MoE layer ep experts-parallel × es slices)
    initialises exactly its slice of the single-device model drawn with the same seed."""
    spec = SPECS[name]()
    whole = GPT(spec)
    init_seeded(whole, seed=11)
    t, e, s = rank % tp, (rank // tp) % ep, (rank // (tp * ep)) % es
    moe = {i: MoEParallel(ep=_comm(ep, e), es=_comm(es, s), exchange=FlatExchange(_comm(ep, e)),
                          coordinated=False)
           for i, E in enumerate(spec.experts) if E and E % ep == 0}
    shard = GPT(spec, Parallel(tp=_comm(tp, t), moe=moe))
    init_seeded(shard, seed=11)
    full = dict(whole.named_parameters())
    slices = shard.slices()
    assert any(slices.values())
    for n, p in shard.named_parameters():
        assert torch.equal(p, cut(full[n], slices.get(n, ()))), n


def test_seeds_differ():
    spec = load_model("tiny-pr-moe")
    a, b = GPT(spec), GPT(spec)
    init_seeded(a, 1)
    init_seeded(b, 2)
    assert not torch.equal(a.blocks[1].ffn.experts.w1, b.blocks[1].ffn.experts.w1)
