"""Shared builders for small, fully enumerable planning instances."""

from __future__ import annotations

import os

# Triton kernels run on CPU through Triton's interpreter in the tests. It must be chosen before
# anything imports triton (torch.optim may, through torch._dynamo), so here, first.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from moeplan.spec import ClusterProfile, ModelSpec, load_cluster  # noqa: E402

GiB = 2 ** 30


def tiny_spec(experts=(0, 4, 0, 8), hidden=256, heads=4, residual=True, top_k=1,
              seq=256) -> ModelSpec:
    return ModelSpec(name="tiny-test", num_layers=len(experts), hidden=hidden, heads=heads,
                     ffn_hidden=4 * hidden, vocab_size=1000, max_seq_len=seq,
                     experts=list(experts), residual=residual, top_k=top_k)


def small_cluster(gpus_per_node=4, memory_bytes=80 * GiB, reserved=0, nics=1,
                  base="ndv4-a100-40gb") -> ClusterProfile:
    c = load_cluster(base)
    device = c.device.model_copy(update={"memory_bytes": memory_bytes, "reserved_bytes": reserved})
    return c.model_copy(update={"name": "small-test", "device": device,
                                "gpus_per_node": gpus_per_node, "nics_per_node": nics})


@pytest.fixture
def tiny():
    return tiny_spec()
