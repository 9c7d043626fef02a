"""`moeplan export`: the written arguments parse with the engines' own flag definitions
(tests/data/engine_flags.json, read from their parsers at the commits it names), satisfy the
engines' checks, and say what they cannot express."""

from __future__ import annotations

import argparse
import ast
import json
import shlex
from pathlib import Path

import pytest

from moeplan.cost_models.env import LayerChoice
from moeplan.planner.export import closest, export, plan_cluster
from moeplan.planner.planning import Request, fixed_plan, plan
from moeplan.spec import load_cluster, load_model

FLAGS = json.loads((Path(__file__).parent / "data" / "engine_flags.json").read_text())
NDV4 = load_cluster("ndv4-a100-40gb")
TYPES = {"int": int, "float": float, "str": str, None: None}


def engine_parser(engine: str) -> argparse.ArgumentParser:
    """An argparse parser with the engine's flags as its parser defines them (kinds, types,
    nargs, choices). Megatron-Core's --moe-layer-freq takes an int or a Python list expression
    (its `moe_freq_type`): parsed as text here and checked by the test."""
    p = argparse.ArgumentParser(prog=engine, exit_on_error=False, allow_abbrev=False)
    for f in FLAGS[engine]["flags"]:
        action = f["action"].strip("_").replace("Action", "").lower()
        action = {"store": "store", "storetrue": "store_true", "storefalse": "store_false"}.get(
            action, action)
        kw: dict = {"dest": f.get("dest") or f["flags"][0].lstrip("-").replace("-", "_")}
        if action in ("store_true", "store_false"):
            kw["action"] = action
        else:
            kw["type"] = TYPES.get(f["type"], str)
            if f["nargs"] == "+":
                kw["nargs"] = "+"
            if f["choices"]:
                kw["choices"] = f["choices"]
        p.add_argument(*f["flags"], **kw)
    return p


def parsed(ex, engine: str) -> argparse.Namespace:
    argv = shlex.split(ex.files["args.txt"])
    ns, unknown = engine_parser(engine).parse_known_args(argv)
    assert not unknown, unknown  # every written flag is one the engine defines
    return ns


@pytest.fixture(scope="module")
def pr_moe():
    return plan(load_model("1.3b-pr-moe"), NDV4, Request(gpus=64))[0]


def test_megatron_deepspeed_arguments_parse_and_pass_its_checks(pr_moe):
    ex = export(pr_moe, "megatron-deepspeed")
    a = parsed(ex, "megatron-deepspeed")
    spec = pr_moe.model
    # --num-experts: one entry per MoE layer, at the 1-based layers divisible by the interval
    assert len(a.num_experts) == spec.num_layers // a.expert_interval
    assert [E for E in spec.experts if E] == a.num_experts
    assert all(E % a.moe_expert_parallel_size == 0 for E in a.num_experts)
    assert 64 % a.moe_expert_parallel_size == 0  # DeepSpeed: (world / pp) % ep == 0
    dp = 64 // a.tensor_model_parallel_size
    assert a.global_batch_size % (a.micro_batch_size * dp) == 0
    assert a.mlp_type == "residual" and a.topk == 1 and a.create_moe_param_group
    ds = json.loads(ex.files["ds_config.json"])
    assert ds["train_batch_size"] == (ds["train_micro_batch_size_per_gpu"]
                                      * ds["gradient_accumulation_steps"] * dp)
    assert ds["train_micro_batch_size_per_gpu"] == a.micro_batch_size
    assert set(ds) <= set(FLAGS["deepspeed"]["config_keys"])


def test_megatron_core_arguments_parse_and_pass_its_checks(pr_moe):
    ex = export(pr_moe, "megatron-core")
    a = parsed(ex, "megatron-core")
    freq = ast.literal_eval(a.moe_layer_freq)
    assert freq == [1 if E else 0 for E in pr_moe.model.experts]
    assert a.num_experts % a.expert_model_parallel_size == 0
    assert 64 % (a.expert_tensor_parallel_size * a.expert_model_parallel_size) == 0
    assert a.moe_router_topk == 1 and a.moe_router_pre_softmax  # required at top-1
    assert a.moe_token_dispatcher_type == "alltoall"
    # the pyramid and the residual MLP are not expressible: said, one line each
    assert any("one expert count" in n for n in ex.notes)
    assert any("shared expert" in n for n in ex.notes)


def test_deepspeed_layer_arguments_are_moe_init_parameters(pr_moe):
    ex = export(pr_moe, "deepspeed")
    layers = json.loads(ex.files["moe_layers.json"])["layers"]
    allowed = set(FLAGS["deepspeed"]["moe_parameters"])
    assert len(layers) == sum(1 for E in pr_moe.model.experts if E)
    for layer in layers:
        kwargs = {k: v for k, v in layer.items() if k != "layer"}
        assert set(kwargs) <= allowed
        assert kwargs["num_experts"] % kwargs["ep_size"] == 0
        assert kwargs["noisy_gate_policy"] in FLAGS["deepspeed"]["noisy_gate_policies"]


def test_per_layer_degrees_become_one_ep_where_the_engine_has_one_flag():
    """DeepSpeed builds each MoE layer with its own ep_size; Megatron's engines take one: the
    export says so and costs the configuration it writes."""
    spec = load_model("1.3b-pr-moe")
    req = Request(gpus=64, mode="train", global_batch=512)
    choices = {i: LayerChoice(ep=64 if E == 64 else 32, es=1, a2a="flat", coordinated=False)
               for i, E in enumerate(spec.experts) if E}
    p = fixed_plan(spec, NDV4, req, 1, choices, micro_batch=1, recompute=True)
    ds = json.loads(export(p, "deepspeed").files["moe_layers.json"])["layers"]
    assert {layer["ep_size"] for layer in ds} == {32, 64}
    mds = export(p, "megatron-deepspeed")
    assert any("one expert-parallel degree" in n for n in mds.notes)
    assert parsed(mds, "megatron-deepspeed").moe_expert_parallel_size == 64
    near = closest(p, mds, plan_cluster(p, None))
    assert {layer.ep for layer in near.layers if layer.kind == "moe"} == {64}
    assert near.provenance.runtime == "deepspeed-sparse"  # DeepSpeed as pip installs it today
    old = closest(p, export(p, "megatron-deepspeed", "deepspeed"), plan_cluster(p, None))
    assert old.provenance.runtime == "deepspeed"
    assert old.predicted.step_time_s > near.predicted.step_time_s  # its [S, E, C] einsums


def test_an_inference_plan_exports_the_min_capacity_it_was_costed_with():
    """DeepSpeed's MoE layer has one min capacity for training and evaluation; an inference plan
    is costed at the model's eval_min_capacity, so that is the one written, with a note."""
    spec = load_model("1.3b-pr-moe")
    assert spec.min_capacity != spec.eval_min_capacity
    for mode, want in (("train", spec.min_capacity), ("infer", spec.eval_min_capacity)):
        p = plan(spec, NDV4, Request(gpus=64, mode=mode))[0]
        ds = export(p, "deepspeed")
        layers = json.loads(ds.files["moe_layers.json"])["layers"]
        assert {layer["min_capacity"] for layer in layers} == {want}, mode
        assert any(n.startswith("min capacity: this engine has one") for n in ds.notes)
        assert parsed(export(p, "megatron-deepspeed"), "megatron-deepspeed").moe_min_capacity \
            == want


def test_a_students_distillation_reaches_megatron_deepspeed():
    p = plan(load_model("tiny-pr-moe-mos"), load_cluster("local-cpu"),
             Request(gpus=2, global_batch=8, seq_len=32))[0]
    ex = export(p, "megatron-deepspeed")
    a = parsed(ex, "megatron-deepspeed")
    assert a.mos and a.kd and a.num_layers_teacher == 8
    assert a.num_experts_teacher == [2, 2, 4, 4]
    assert any("staged KD" in n for n in ex.notes)


def test_export_command_writes_and_refuses(tmp_path, monkeypatch, capsys):
    from test_cli import invoke

    from moeplan.cli import main as moeplan_cli

    monkeypatch.chdir(tmp_path)
    p = plan(load_model("1.3b-moe-128"), NDV4, Request(gpus=64, mode="infer"))[0]
    (tmp_path / "plan.json").write_text(p.to_json())
    argv = ["export", "plan.json", "--to", "megatron-core"]
    code, out, err = invoke(moeplan_cli, argv, monkeypatch, capsys)
    assert code == 0, err
    assert (tmp_path / "export-megatron-core" / "args.txt").is_file()
    assert "closest configuration: per-token latency" in out
    again = invoke(moeplan_cli, argv, monkeypatch, capsys)
    assert again[0] == 0  # its own folder: rewritten
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("keep")
    code, _, err = invoke(moeplan_cli, ["export", "plan.json", "--to", "deepspeed", "--out",
                                        "mine"], monkeypatch, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "not a moeplan export" in err
    assert (tmp_path / "mine" / "keep.txt").read_text() == "keep"
    code, _, err = invoke(moeplan_cli, argv + ["--runtime", "deepspeed"], monkeypatch, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--to deepspeed or" in err
    code, out, err = invoke(moeplan_cli, ["export", "plan.json", "--to", "deepspeed", "--runtime",
                                          "deepspeed"], monkeypatch, capsys)
    assert code == 0 and "costed with deepspeed's kernels" in out, err
