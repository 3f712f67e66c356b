"""RVQConfig: strict for users' files, lenient for recipes recorded by newer versions."""

import pytest

import rvqllm
from rvqllm.errors import RVQError

pytestmark = pytest.mark.unit


def test_recorded_recipe_from_a_newer_version_still_reads():
    """A checkpoint's recorded rvq_config may carry fields a newer rvqllm added: reading it drops them
    (the layers' own specs are what decoding needs), while a user's config file stays strict."""
    data = {**rvqllm.RVQConfig().to_dict(), "some_future_option": 3}
    assert rvqllm.RVQConfig.from_dict(data, strict=False) == rvqllm.RVQConfig()
    with pytest.raises(RVQError, match="unknown config field"):
        rvqllm.RVQConfig.from_dict(data)


def test_distill_lr_takes_auto_or_a_rate():
    """``distill_lr``: "auto" (the default: set from the code's bits per weight) or a number in (0, 1);
    anything else is a one-line error naming both choices."""
    assert rvqllm.RVQConfig().distill_lr == "auto"
    assert rvqllm.RVQConfig(distill_lr=2e-4).distill_lr == 2e-4
    for bad in (0, -1e-3, 1.5, "fast", True, None):
        with pytest.raises(RVQError, match="distill_lr=.*'auto'"):
            rvqllm.RVQConfig(distill_lr=bad)


def test_finetune_retries_takes_a_non_negative_integer():
    """``finetune_retries`` (default 0: an undone block tuning is not tried again) counts retries: a bool,
    a negative or a fractional count is a one-line error that names the field and what it takes."""
    assert rvqllm.RVQConfig().finetune_retries == 0
    assert rvqllm.RVQConfig(finetune_retries=2).finetune_retries == 2
    for bad in (-1, 1.5, True, "1", None):
        with pytest.raises(RVQError, match="finetune_retries=.* non-negative integer"):
            rvqllm.RVQConfig(finetune_retries=bad)


def _bench_kernels():
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("bench_kernels", root / "scripts" / "bench_kernels.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench, root


def test_every_config_takes_the_kernel_benchmarks_cheap_fields():
    """scripts/bench_kernels.py --e2e quantizes a preset with cheap fields (speed does not depend on quality):
    every shipped config must still validate with them (a rotated preset needs its error feedback)."""
    bench, root = _bench_kernels()
    paths = sorted((root / "configs").glob("*.yaml")) + sorted((root / "configs" / "experiments").glob("*.yaml"))
    assert len(paths) > 4
    for path in paths:
        cfg = bench.cheap_config(str(path))
        assert cfg.beam_width == 1 and cfg.calib_sequences == 4, path


def test_the_kernel_table_times_every_code_shape_a_preset_may_give_a_layer():
    """A ``bpw_budget`` preset is timed at each candidate (the model's sensitivity picks among them), a
    ``layer_shapes`` one at the layer's own shape, any other at its one shape."""
    bench, _ = _bench_kernels()
    two = rvqllm.RVQConfig.load("2bit")
    got = bench._variants("2bit", two, "self_attn.q_proj")
    assert [(c.vector_dim, c.stages, c.bits, c.bpw_budget) for c, _ in got] == [(d, 2, 8, None) for d in (6, 8, 9)]
    assert [label for _, label in got] == [f"2bit (d={d} S=2 b=8)" for d in (6, 8, 9)]
    ruled = rvqllm.RVQConfig(layer_shapes={".k_proj": {"vector_dim": 6}})
    ((c, label),) = bench._variants("x", ruled, "self_attn.k_proj")
    assert c.vector_dim == 6 and not c.layer_shapes and label == "x (k_proj: d=6 S=2 b=8)"
    assert bench._variants("3bit", rvqllm.RVQConfig.load("3bit"), "mlp.up_proj")[0][1] == "3bit"


def test_layer_shapes_give_named_layers_their_own_code_shape():
    """``layer_shapes``: the first key a layer's qualified name contains supplies the fields it names; every
    other layer (and every field not named) keeps the config's own."""
    cfg = rvqllm.RVQConfig(bits=8, layer_shapes={".k_proj": {"vector_dim": 6}, "mlp": {"vector_dim": 9, "stages": 3}})
    assert cfg.shape_for("model.layers.3.self_attn.k_proj") == {"vector_dim": 6, "stages": 2, "bits": 8}
    assert cfg.shape_for("model.layers.3.mlp.down_proj") == {"vector_dim": 9, "stages": 3, "bits": 8}
    assert cfg.shape_for("model.layers.3.self_attn.o_proj") == {"vector_dim": 8, "stages": 2, "bits": 8}
    assert rvqllm.RVQConfig().shape_for("anything") == {"vector_dim": 8, "stages": 2, "bits": 8}
    # the first key found wins, in the order written
    both = rvqllm.RVQConfig(layer_shapes={"mlp.up": {"bits": 4}, "mlp": {"bits": 6}})
    assert both.shape_for("x.mlp.up_proj")["bits"] == 4 and both.shape_for("x.mlp.gate_proj")["bits"] == 6


@pytest.mark.parametrize(("shapes", "extra", "message"), [
    (["k_proj"], {}, "layer_shapes must map layer-name substrings"),
    ({"k_proj": 6}, {}, "layer_shapes must map layer-name substrings"),
    ({"k_proj": {}}, {}, "layer_shapes must map layer-name substrings"),
    ({"k_proj": {"dim": 6}}, {}, "layer_shapes must map layer-name substrings"),
    ({"": {"vector_dim": 6}}, {}, "layer_shapes must map layer-name substrings"),
    ({"k_proj": {"vector_dim": 0}}, {}, r"layer_shapes\['k_proj'\]: vector_dim=0 is out of range"),
    ({"k_proj": {"bits": 17}}, {}, r"layer_shapes\['k_proj'\]: bits=17 is out of range"),
    ({"proj": {"bits": 6}, ".k_proj": {"bits": 4}}, {}, "'.k_proj' can never apply.*earlier key 'proj'.*list '.k_proj' first"),
    ({"k_proj": {"bits": 6}}, {"bpw_budget": 2.0, "mixed_candidates": [{"vector_dim": 8, "stages": 2, "bits": 8}]},
     "layer_shapes and bpw_budget both choose"),
    ({"k_proj": {"bits": 6}}, {"shared_codebook": "gaussian-65536", "vector_dim": 8, "stages": 1, "bits": 16},
     "shared_codebook cannot be combined with bpw_budget or layer_shapes"),
    ({"k_proj": {"bits": 6}}, {"coder": "trellis", "rotate": True}, "trellis cannot be combined with bpw_budget or layer_shapes"),
])
def test_bad_layer_shapes_are_one_line_naming_the_fix(shapes, extra, message):
    with pytest.raises(RVQError, match=message):
        rvqllm.RVQConfig(layer_shapes=shapes, **extra)
