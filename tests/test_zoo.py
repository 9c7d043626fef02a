"""Model zoo: every size of DESIGN.md reproduced from the spec within 3%; loaders and validation."""

from __future__ import annotations

import json

import pytest

from moeplan.cost_models.params import active_params, layer_params, total_params
from moeplan.spec import ModelSpec, cluster_names, load_cluster, load_model, model_names
from moeplan.spec.errors import SpecError, UnknownNameError

# Published sizes (DeepSpeed-MoE, ICML 2022: Tables 1, 3, 4, 6), typed here independently of the
# JSON files so the test cannot agree with itself.
PUBLISHED = {
    "350m": 0.35e9, "1.3b": 1.3e9, "6.7b": 6.7e9,
    "350m-moe-128": 13e9, "1.3b-moe-128": 52e9,
    "350m-pr-moe": 4e9, "1.3b-pr-moe": 31e9,
    "350m-pr-moe-mos": 3.5e9, "1.3b-pr-moe-mos": 27e9,
    "2.4b-moe-128": 107.7e9, "8b-moe-128": 349e9, "24b-moe-128": 1046.9e9,
    "47b-moe-128": 2024e9,
}


def test_zoo_has_every_model_of_the_design():
    # The paper's models plus the runtime's laptop-sized demo model.
    assert set(model_names()) == set(PUBLISHED) | {"tiny-pr-moe", "tiny-pr-moe-mos"}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_count_within_3_percent(name):
    spec = load_model(name)
    total = total_params(spec)
    assert abs(total / PUBLISHED[name] - 1) <= 0.03, f"{name}: {total / 1e9:.2f}B"
    if spec.reported_params:
        assert spec.reported_params == PUBLISHED[name]


def test_pyramid_and_students_layouts():
    pr = load_model("1.3b-pr-moe")
    assert [i + 1 for i in pr.moe_layers] == list(range(2, 25, 2))
    assert [pr.experts[i] for i in pr.moe_layers] == [64] * 10 + [128] * 2
    mos = load_model("1.3b-pr-moe-mos")
    assert mos.num_layers == 21 and [i + 1 for i in mos.moe_layers] == list(range(2, 21, 2))
    assert [mos.experts[i] for i in mos.moe_layers] == [64] * 8 + [128] * 2
    assert mos.distillation.teacher == "1.3b-pr-moe"


def test_active_params_count_top1_plus_residual_mlp():
    dense, pr = load_model("1.3b"), load_model("1.3b-pr-moe")
    mlp = layer_params(pr, 1).per_expert
    extra = active_params(pr) - total_params(dense)
    # every MoE layer adds one expert beside the residual MLP, plus router and coefficient
    assert extra == pytest.approx(12 * mlp, rel=0.01)
    moe = load_model("1.3b-moe-128")
    assert active_params(moe) == pytest.approx(total_params(dense), rel=0.01)


def test_builtin_clusters_cite_sources():
    assert {"ndv4-a100-40gb", "dgx-a100-80gb", "dgx-h100-80gb"} <= set(cluster_names())
    for name in cluster_names():
        c = load_cluster(name)
        for part in (c, c.device, c.device.gemm_efficiency, c.intra, c.inter, c.host):
            assert part.source, f"{name}: {type(part).__name__} has no source"


def test_unknown_names_list_the_known_ones():
    with pytest.raises(UnknownNameError, match="known: .*1.3b-pr-moe"):
        load_model("1.3b-pr-mo")
    with pytest.raises(UnknownNameError, match="ndv4-a100-40gb"):
        load_cluster("dgx-z100")


def test_user_spec_file_roundtrip_and_errors(tmp_path):
    spec = load_model("350m-pr-moe")
    good = tmp_path / "mine.json"
    good.write_text(spec.model_dump_json())
    assert load_model(str(good)) == spec
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{ not json")
    with pytest.raises(SpecError, match="not valid JSON"):
        load_model(str(bad_json))
    data = json.loads(spec.model_dump_json())
    data["experts"] = data["experts"][:-1]
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps(data))
    with pytest.raises(SpecError, match="experts has 23 entries"):
        load_model(str(wrong))
    with pytest.raises(SpecError, match="does not exist"):
        load_model(str(tmp_path / "missing.json"))


@pytest.mark.parametrize("change,message", [
    ({"experts": [0, 1]}, "0 \\(dense\\) or at least 2"),
    ({"hidden": 30}, "not divisible by heads"),
    ({"unknown_key": 1}, "Extra inputs"),
])
def test_spec_validation(change, message):
    base = dict(name="x", num_layers=2, hidden=64, heads=4, ffn_hidden=256, vocab_size=10,
                max_seq_len=16, experts=[0, 4])
    with pytest.raises(ValueError, match=message):
        ModelSpec(**{**base, **change})
