"""Tiny random-weight models end to end: quantize, save, load, identical logits."""

import json

import pytest
import torch

import rvqllm
from rvqllm.nn import QuantizedLinear
from tests.conftest import tiny_gpt2, tiny_llama

pytestmark = pytest.mark.integration

CFG = rvqllm.RVQConfig(vector_dim=8, stages=2, bits=6, kmeans_iters=5, calib_batch_size=4)


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_quantize_save_load_identical_logits(build, calib_ids, tmp_path):
    model = build()
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        before = model(ids).logits
    report = rvqllm.quantize(model, CFG, calib_ids)
    quantized = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert len(quantized) == len(report.layers) == (14 if build is tiny_llama else 8)
    assert not any(isinstance(m, torch.nn.Linear) for n, m in model.named_modules() if ".layers." in n or ".h." in n)
    with torch.no_grad():
        after = model(ids).logits
    assert torch.isfinite(after).all()
    assert not torch.equal(before, after)  # it really is quantized ...
    rel = (after - before).norm() / before.norm()
    assert rel < 0.5  # ... and still close to the original

    out = rvqllm.save(model, tmp_path / "ckpt")
    config = json.loads((out / "config.json").read_text())
    q = config["quantization_config"]
    assert q["quant_method"] == "rvq" and q["format_version"] == 1
    assert len(q["layers"]) == len(quantized)
    loaded = rvqllm.load(out)
    with torch.no_grad():
        again = loaded(ids).logits
    assert torch.equal(again, after)


def test_lm_head_and_embeddings_stay_unquantized(calib_ids):
    model = tiny_llama()
    rvqllm.quantize(model, CFG, calib_ids)
    assert isinstance(model.lm_head, torch.nn.Linear)
    assert isinstance(model.model.embed_tokens, torch.nn.Embedding)


def test_skip_keeps_named_layers(calib_ids):
    model = tiny_llama()
    rvqllm.quantize(model, CFG.replace(skip=["lm_head", "mlp.down_proj"]), calib_ids)
    assert isinstance(model.model.layers[0].mlp.down_proj, torch.nn.Linear)
    assert isinstance(model.model.layers[0].mlp.up_proj, QuantizedLinear)


def test_same_seed_same_codes(calib_ids):
    a, b = tiny_llama(), tiny_llama()
    rvqllm.quantize(a, CFG, calib_ids)
    rvqllm.quantize(b, CFG, calib_ids)
    for (na, ta), (nb, tb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert na == nb and torch.equal(ta, tb), na


def test_calib_dtype_reaches_the_calibration_passes_and_stays_close_to_float32(calib_ids, monkeypatch):
    """``calib_dtype``: the Hessians' pass and the quantized block's pass run under bfloat16 autocast
    ("bfloat16", or "auto" where native; "auto" elsewhere says once that it falls back, "bfloat16" there
    once that it is emulated), the latter through decoded dense layers; the coded model is about as close
    to the float model as the float32-calibrated one; a model that computes in 16 bits already keeps its
    dtype under "auto"."""
    import warnings

    import rvqllm.pipeline as P

    seen: list[tuple[str, bool, bool]] = []
    real_collector, real_forward = P.HessianCollector, P._forward

    class Spy(real_collector):
        def new_pass(self):  # called before each batch's forward, inside the calibration's contexts
            if not self._seen and not self.hessians:
                seen.append(("hessians", torch.is_autocast_enabled("cpu"), False))
            super().new_pass()

    def forward(block, *a, **kw):
        quantized = any(isinstance(m, QuantizedLinear) for m in block.modules())
        seen.append(("forward", torch.is_autocast_enabled("cpu"), quantized))
        return real_forward(block, *a, **kw)

    monkeypatch.setattr(P, "HessianCollector", Spy)
    monkeypatch.setattr(P, "_forward", forward)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(7))
    logits = {}
    for dtype, native, bf16 in (("float32", True, False), ("bfloat16", False, True), ("auto", True, True),
                                ("auto", False, False)):
        seen.clear()
        monkeypatch.setattr(P, "native_bf16", lambda device, native=native: native)
        monkeypatch.setattr("rvqllm.kernels.cpu_build._warned", set())
        model = tiny_llama()
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            rvqllm.quantize(model, CFG.replace(calib_dtype=dtype), calib_ids)
        # two blocks: each has a Hessian pass; the first feeds the second through its dense, decoded layers
        assert seen == [("hessians", bf16, False), ("forward", bf16, False), ("hessians", bf16, False)], seen
        fell_back = [w for w in said if "calib_dtype auto" in str(w.message)]
        assert len(fell_back) == (dtype == "auto" and not native), fell_back
        emulated = [w for w in said if "calib_dtype bfloat16" in str(w.message) and "emulated" in str(w.message)]
        assert len(emulated) == (dtype == "bfloat16" and not native), emulated  # said once, not per block
        with torch.no_grad():
            logits[dtype, native] = model(ids).logits
    with torch.no_grad():
        ref = tiny_llama()(ids).logits
    f32, bf = logits["float32", True], logits["bfloat16", False]
    assert not torch.equal(f32, bf)  # the calibration really ran in bfloat16 ...
    assert torch.equal(f32, logits["auto", False])  # ... and "auto" without native bfloat16 is float32
    err = {k: ((v - ref).norm() / ref.norm()).item() for k, v in logits.items()}
    assert err["bfloat16", False] < 1.2 * err["float32", True]  # ... and codes as well as it
    seen.clear()  # a model that computes in 16 bits already: "auto" leaves it so
    monkeypatch.setattr(P, "native_bf16", lambda device: True)
    rvqllm.quantize(tiny_llama().to(torch.bfloat16), CFG.replace(calib_dtype="auto"), calib_ids)
    assert [s[1] for s in seen] == [False, False, False], seen
    with pytest.raises(rvqllm.RVQError, match="calib_dtype='fp16' is unknown"):
        rvqllm.RVQConfig(calib_dtype="fp16")


def test_calib_dtype_reaches_the_float_models_pass_and_the_teachers_head(calib_ids, monkeypatch):
    """With a teacher to compute (distillation), ``calib_dtype`` also covers the float model's own pass and
    the teacher's top-k head; the check that the head is the model's runs as the model computes. The
    teacher under bfloat16 stays close to the float32 one (the same top-1 word almost everywhere)."""
    import rvqllm.pipeline as P

    seen: list[tuple[str, bool]] = []
    tops: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    real_forward, real_top, real_check = P._forward, P.teacher_topk_from_hidden, P.check_lm_head_fn
    real_collector = P.HessianCollector

    class Spy(real_collector):
        def new_pass(self):
            if not self._seen and not self.hessians:
                seen.append(("hessians", torch.is_autocast_enabled("cpu")))
            super().new_pass()

    def forward(block, *a, **kw):
        seen.append(("forward", torch.is_autocast_enabled("cpu")))
        return real_forward(block, *a, **kw)

    def top(*a, **kw):
        seen.append(("teacher", torch.is_autocast_enabled("cpu")))
        result = real_top(*a, **kw)
        tops[dtype].append(result)
        return result

    def check(*a, **kw):
        seen.append(("check", torch.is_autocast_enabled("cpu")))
        return real_check(*a, **kw)

    monkeypatch.setattr(P, "HessianCollector", Spy)
    monkeypatch.setattr(P, "_forward", forward)
    monkeypatch.setattr(P, "teacher_topk_from_hidden", top)
    monkeypatch.setattr(P, "check_lm_head_fn", check)
    monkeypatch.setattr(P, "native_bf16", lambda device: True)
    for dtype in ("float32", "bfloat16"):
        seen.clear()
        tops[dtype] = []
        rvqllm.quantize(tiny_llama(), CFG.replace(calib_dtype=dtype, distill_epochs=1), calib_ids)
        bf16 = dtype == "bfloat16"
        # block 0: the float model's pass, the Hessians' pass, the coded block's pass feeding block 1;
        # block 1 (the last): the float model's pass, then the teacher of every batch, then the Hessians
        teacher = [("teacher", bf16)] * len(tops[dtype])
        assert seen == [("forward", bf16), ("hessians", bf16), ("forward", bf16), ("forward", bf16),
                        ("check", False), *teacher, ("hessians", bf16)], seen
        assert len(tops[dtype]) == 2  # 8 calibration sequences, 4 to a batch
    for (lp32, i32), (lp16, i16) in zip(tops["float32"], tops["bfloat16"], strict=True):
        assert not torch.equal(lp32, lp16)  # the head really ran in bfloat16 ...
        assert (i32[..., 0] == i16[..., 0]).float().mean() > 0.9  # ... and picks the same top word
        assert (lp32[..., 0] - lp16[..., 0]).abs().mean() < 0.05
