"""The runtime off the CPU, on a machine without a GPU: the meta device (shapes, no data) stands
in for CUDA — any host tensor that meets a device tensor in an operation raises there, as it
does on CUDA, so code that builds a tensor without the job's device fails here too."""

from __future__ import annotations

import pytest
import torch
from dist_cases import mla_spec, modern_spec

from moeplan.runtime import optim
from moeplan.runtime.infer import generate
from moeplan.runtime.model import GPT
from moeplan.spec import load_model

# the gate's random options draw from a torch.Generator, which the meta device cannot hold
QUIET = {"use_rts": False, "noisy_gate_policy": "none", "second_expert_sampling": False}
SPECS = {"DeepSpeed-MoE blocks": lambda: load_model("tiny-pr-moe"),
         "today's blocks": modern_spec, "latent attention": mla_spec}


def test_host_tensors_do_not_mix_with_meta_ones():
    with pytest.raises(RuntimeError):
        torch.ones(2, device="meta") + torch.ones(2)


@pytest.mark.parametrize("name", SPECS)
def test_model_trains_and_generates_on_a_device(name):
    spec = SPECS[name]().model_copy(update=QUIET)
    model = GPT(spec).to("meta")
    idx = torch.zeros(2, 8, dtype=torch.long, device="meta")
    loss, _ = model.loss(idx, idx)
    loss.backward()
    assert all(p.grad is not None and p.grad.is_meta for p in model.parameters()
               if p.requires_grad and p.grad is not None)
    out = generate(model, idx, 3, graph=False)
    assert out.shape == (2, 3) and out.is_meta


def test_clipping_sums_on_the_gradients_device(monkeypatch):
    """The global norm's sum of squares stays where the gradients are (one read back after
    it, not one per tensor; and a host tensor cannot enter a NCCL allreduce)."""
    model = GPT(load_model("tiny-pr-moe")).to("meta")
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    seen = {}

    def scale(grads, sq, world, max_norm):
        seen["device"] = sq.device
        return 0.0

    monkeypatch.setattr(optim, "_scale_grads", scale)
    optim.clip_grads(model, {n: 1.0 for n, _ in model.named_parameters()}, 1, 1.0)
    assert seen["device"].type == "meta"


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU it runs for minutes")
def test_gpu_check_reports_nothing_without_a_gpu(tmp_path, capsys):
    """bench/gpu_check.py, the one-GPU check for a session that has one, measures nothing here
    and says so (exit 0, no results folder)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "bench" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--out", str(tmp_path / "out")]) == 0
    assert "no CUDA device" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


def test_clipping_square_sums_keep_their_precision_without_an_fp64_copy():
    """The global norm's Σ g² per tensor is summed in fp32 by torch's cascaded sum: its error
    is at most about log2(n) roundings of the total (Higham §4.2, pairwise summation), far
    below what moves a clipping factor; no fp64 copy of the gradient is made."""
    n = 2 ** 22
    g = torch.randn(n, generator=torch.Generator().manual_seed(0))
    exact = float(g.double().pow(2).sum())
    got = float(optim._square_sum(g))
    bound = 2 * 22 * torch.finfo(torch.float32).eps / 2 * exact  # two orders, log2(n) levels
    assert abs(got - exact) <= bound, (got, exact, bound)
