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


def test_every_config_takes_the_kernel_benchmarks_cheap_fields():
    """scripts/bench_kernels.py --e2e quantizes a preset with cheap fields (speed does not depend on quality):
    every shipped config must still validate with them (a rotated preset needs its error feedback)."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("bench_kernels", root / "scripts" / "bench_kernels.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    paths = sorted((root / "configs").glob("*.yaml")) + sorted((root / "configs" / "experiments").glob("*.yaml"))
    assert len(paths) > 4
    for path in paths:
        cfg = bench.cheap_config(str(path))
        assert cfg.beam_width == 1 and cfg.calib_sequences == 4, path
