"""Checkpoints in transformers' saved layout (MoE experts one matrix each) read block by block.

transformers 5 fuses each MoE block's experts into 3-D parameters when it builds a model, but its
``save_pretrained`` (like the hub's checkpoints) stores one matrix per expert under the older names. The
streaming reader (:class:`rvqllm.source.ShardSource`) must make every fused tensor exactly as
``from_pretrained`` does, and ``rvqllm quantize`` of such a folder must equal quantizing the loaded model
in memory.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from test_architectures import _config

import rvqllm
from rvqllm.cli import main
from rvqllm.data import calibration_tokens, load_text
from rvqllm.errors import RVQError
from rvqllm.keymap import Recipe
from rvqllm.source import ShardSource
from rvqllm.synthetic import build_tokenizer

CHEAP = {"vector_dim": 4, "stages": 1, "bits": 4, "beam_width": 1, "kmeans_iters": 2, "kmeans_points": 8,
         "calib_sequences": 4, "calib_seq_len": 32, "calib_batch_size": 2}


def _saved(arch: str, folder: Path, vocab: int | None = None) -> tuple[Path, torch.nn.Module]:
    """A tiny random ``arch`` model saved by transformers' own ``save_pretrained``, and the model."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = _config(arch)
    if vocab is not None:
        cfg.vocab_size = vocab
    model = AutoModelForCausalLM.from_config(cfg).eval()
    model.save_pretrained(folder)
    return folder, model


def _stored_names(folder: Path) -> list[str]:
    with safe_open(folder / "model.safetensors", framework="pt") as f:
        return list(f.keys())


@pytest.mark.integration
@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_per_expert_checkpoints_read_like_from_pretrained(tmp_path, arch):
    """Every tensor of every block, and those outside the blocks, as ``from_pretrained`` makes them."""
    from transformers import AutoModelForCausalLM

    folder, _ = _saved(arch, tmp_path / arch)
    stored = _stored_names(folder)
    assert any(".experts.0." in n for n in stored), "the checkpoint must hold one matrix per expert"
    reference = AutoModelForCausalLM.from_pretrained(folder).eval()
    ref = reference.state_dict()
    src = ShardSource(folder)
    fused = [n for n in src.recipes if src.recipes[n].steps]
    assert fused and all(n in ref for n in fused)
    for i in range(len(src)):
        block = src.load_block(i, torch.device("cpu"))
        pre = f"{src.prefix}.{i}."
        got = block.state_dict()
        want = {n.removeprefix(pre): t for n, t in ref.items() if n.startswith(pre)}
        assert got.keys() == want.keys()
        for n in want:
            assert torch.equal(got[n], want[n].float()), (i, n)
        src.release_block(i)
    src.load_rest(torch.device("cpu"))
    for n, t in src.model.state_dict().items():
        if not n.startswith(f"{src.prefix}."):
            assert torch.equal(t, ref[n].float()), n
    # the bytes outside the blocks are those of the stored tensors outside the blocks (renamed or not)
    with safe_open(folder / "model.safetensors", framework="pt") as f:
        rest = sum(torch.Size(f.get_slice(n).get_shape()).numel() for n in stored if not n.startswith("model.layers."))
    assert src.other_bytes() == 4 * rest  # saved in float32


@pytest.mark.integration
def test_cli_quantizes_a_per_expert_checkpoint_like_the_library(tmp_path, capsys):
    """``rvqllm quantize`` streams a saved Mixtral block by block: the same checkpoint as quantizing the
    model ``from_pretrained`` loads, in memory."""
    import yaml

    tok = build_tokenizer()
    folder, _ = _saved("mixtral", tmp_path / "mixtral", vocab=320)
    tok.save_pretrained(folder)
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(CHEAP))
    torch.set_num_threads(1)
    code = main(["quantize", str(folder), "--config", str(cfg_path), "--out", str(tmp_path / "streamed"),
                 "--calib", "kjv", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err[-2000:]

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    cfg = rvqllm.RVQConfig.from_dict(CHEAP)
    calib = calibration_tokens([load_text("kjv", "calib")], tok, cfg.calib_sequences, cfg.calib_seq_len, cfg.seed)
    rvqllm.quantize(model, cfg, calib)
    ids = torch.randint(3, 259, (1, 12), generator=torch.Generator().manual_seed(0))
    streamed = rvqllm.load(tmp_path / "streamed")
    with torch.no_grad():
        assert torch.equal(streamed(ids).logits, model(ids).logits)
    experts = [n for n, _ in streamed.named_modules() if ".experts.gate_up_proj." in n]
    assert len(experts) == 2 * 4  # every expert of both blocks quantized


@pytest.mark.integration
def test_a_missing_expert_is_one_line(tmp_path):
    """A per-expert checkpoint that lost one expert's matrix is refused when the folder is opened, naming
    the tensor and the shapes, before any work."""
    from safetensors.torch import load_file, save_file

    folder, _ = _saved("mixtral", tmp_path / "mixtral")
    path = folder / "model.safetensors"
    tensors = load_file(path)
    del tensors["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(RVQError) as err:
        ShardSource(folder)
    msg = str(err.value)
    assert "\n" not in msg and "model.layers.1.mlp.experts.gate_up_proj" in msg and "re-download" in msg


@pytest.mark.unit
def test_recipe_shapes_and_tensors_follow_the_steps():
    """Stack each pattern's experts, then concatenate the patterns: the shape from the headers and the
    tensor from the data agree with torch's own stack/cat, and a mismatch is a ValueError."""
    g = torch.Generator().manual_seed(0)
    t = {f"{p}{e}": torch.randn(3, 5, generator=g) for p in "ab" for e in range(4)}
    r = Recipe((tuple(f"a{e}" for e in range(4)), tuple(f"b{e}" for e in range(4))), (("stack", 0), ("cat", 1)))
    want = torch.cat([torch.stack([t[f"a{e}"] for e in range(4)]), torch.stack([t[f"b{e}"] for e in range(4)])], 1)
    assert torch.equal(r.make(t), want)
    assert r.shape({n: tuple(v.shape) for n, v in t.items()}) == tuple(want.shape) == (4, 6, 5)
    assert Recipe((("a0",),)).make(t) is t["a0"]
    bad = {**{n: tuple(v.shape) for n, v in t.items()}, "b3": (3, 6)}
    with pytest.raises(ValueError):
        r.shape(bad)
    short = Recipe((("a0", "a1"), ("b0",)), (("stack", 0), ("cat", 1)))
    with pytest.raises(ValueError):
        short.shape({n: tuple(v.shape) for n, v in t.items()})
