"""Random-weight Llama checkpoints at real shapes, written shard by shard without building the model.

:func:`write_synthetic_llama` writes a Hugging Face ``LlamaForCausalLM`` folder (``config.json``,
one safetensors shard per decoder block plus one for the embeddings / final norm / ``lm_head``, the
standard ``model.safetensors.index.json``, and a byte-level tokenizer) whose tensors are drawn from a
seeded normal distribution like a real initialisation (std 0.02, RMSNorm weights 1). The model is
never built: each tensor is drawn in chunks of rows (each chunk from its own seeded generator, so the
bytes do not depend on the thread count) and each chunk goes straight into its shard, so memory stays
at one chunk per thread (a 70B-shaped block, 855M weights, raised peak RSS by 85 MiB at 2 threads).

It exists to measure the quantization pipeline at the sizes of real models (1B-70B) offline, where no
model hub is reachable: :data:`SHAPES` holds the real shapes of TinyLlama-1.1B, Llama-3-8B and
Llama-3-70B, and :func:`model_params` counts a whole model's parameters for extrapolation.

    from rvqllm.synthetic import SHAPES, synthetic_kwargs, write_synthetic_llama
    write_synthetic_llama("out/l3-8b-2", **synthetic_kwargs("llama-3-8b", blocks=2))
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

#: std of the normal init of every linear and embedding weight (transformers' ``initializer_range``)
INIT_STD = 0.02
#: elements per independently seeded chunk of a tensor (fixed: it defines the bytes written)
CHUNK_ELEMENTS = 1 << 22
#: file name of the record of the arguments a folder was written with
RECORD_NAME = "rvqllm_synthetic.json"
#: the tokenizer's special tokens, at ids 0, 1, 2 (Llama's convention: unk 0, bos 1, eos 2)
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")

_SAFETENSORS_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.float64: "F64"}

#: Real shapes of whole models: ``blocks`` decoder blocks, ``vocab`` their real vocabulary, ``params``
#: the whole model's parameter count (embeddings and ``lm_head`` included; equals the published counts:
#: TinyLlama-1.1B 1,100,048,384; Llama-3-8B 8,030,261,248; Llama-3-70B 70,553,706,496).
SHAPES: dict[str, dict] = {
    "tinyllama-1.1b": {"hidden": 2048, "intermediate": 5632, "heads": 32, "kv_heads": 4, "blocks": 22,
                       "vocab": 32000, "tie_embeddings": False, "rope_theta": 10000.0,
                       "max_position_embeddings": 2048, "rms_norm_eps": 1e-5},
    "llama-3-8b": {"hidden": 4096, "intermediate": 14336, "heads": 32, "kv_heads": 8, "blocks": 32,
                   "vocab": 128256, "tie_embeddings": False, "rope_theta": 500000.0,
                   "max_position_embeddings": 8192, "rms_norm_eps": 1e-5},
    "llama-3-70b": {"hidden": 8192, "intermediate": 28672, "heads": 64, "kv_heads": 8, "blocks": 80,
                    "vocab": 128256, "tie_embeddings": False, "rope_theta": 500000.0,
                    "max_position_embeddings": 8192, "rms_norm_eps": 1e-5},
}


def block_shapes(hidden: int, intermediate: int, heads: int, kv_heads: int, head_dim: int | None = None,
                 index: int = 0) -> dict[str, tuple[int, ...]]:
    """``{state_dict name: shape}`` of decoder block ``index`` of a ``LlamaForCausalLM``.

    q/o: ``[heads*head_dim, hidden]`` / ``[hidden, heads*head_dim]``; k, v: ``[kv_heads*head_dim, hidden]``;
    gate, up: ``[intermediate, hidden]``; down: ``[hidden, intermediate]``; the two RMSNorms: ``[hidden]``.
    ``head_dim`` defaults to ``hidden // heads``.
    """
    hd = head_dim or hidden // heads
    p = f"model.layers.{index}."
    return {
        p + "input_layernorm.weight": (hidden,),
        p + "mlp.down_proj.weight": (hidden, intermediate),
        p + "mlp.gate_proj.weight": (intermediate, hidden),
        p + "mlp.up_proj.weight": (intermediate, hidden),
        p + "post_attention_layernorm.weight": (hidden,),
        p + "self_attn.k_proj.weight": (kv_heads * hd, hidden),
        p + "self_attn.o_proj.weight": (hidden, heads * hd),
        p + "self_attn.q_proj.weight": (heads * hd, hidden),
        p + "self_attn.v_proj.weight": (kv_heads * hd, hidden),
    }


def rest_shapes(hidden: int, vocab: int, tie_embeddings: bool = False) -> dict[str, tuple[int, ...]]:
    """``{name: shape}`` of everything outside the blocks: embeddings ``[vocab, hidden]``, final norm
    ``[hidden]`` and, unless tied to the embeddings (then it is not stored), ``lm_head`` ``[vocab, hidden]``."""
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    if not tie_embeddings:
        shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def block_params(hidden: int, intermediate: int, heads: int, kv_heads: int, head_dim: int | None = None) -> int:
    """Parameters of one decoder block (its 7 linear layers and 2 norms); e.g. Llama-3-8B: 218,112,000."""
    return sum(_numel(s) for s in block_shapes(hidden, intermediate, heads, kv_heads, head_dim).values())


def block_linear_params(hidden: int, intermediate: int, heads: int, kv_heads: int,
                        head_dim: int | None = None) -> int:
    """Weights of one block's 7 linear layers (what rvqllm quantizes): :func:`block_params` minus the norms."""
    return block_params(hidden, intermediate, heads, kv_heads, head_dim) - 2 * hidden


def model_params(hidden: int, intermediate: int, heads: int, kv_heads: int, blocks: int, vocab: int,
                 tie_embeddings: bool = False, head_dim: int | None = None, **_ignored) -> int:
    """Parameters of a whole ``LlamaForCausalLM`` (a tied ``lm_head`` counted once, as transformers does).

    Extra keys (``rope_theta``, ...) are ignored, so ``model_params(**SHAPES[name])`` works.
    """
    rest = sum(_numel(s) for s in rest_shapes(hidden, vocab, tie_embeddings).values())
    return blocks * block_params(hidden, intermediate, heads, kv_heads, head_dim) + rest


for _shape in SHAPES.values():
    _shape["params"] = model_params(**_shape)


def synthetic_kwargs(name: str, blocks: int | None = None, real_vocab: bool = False) -> dict:
    """Keyword arguments of :func:`write_synthetic_llama` for a :data:`SHAPES` entry, with ``blocks`` decoder
    blocks (default: the real count) and the real vocabulary or (default) the tokenizer's own."""
    if name not in SHAPES:
        raise KeyError(f"unknown shape {name!r}: one of {', '.join(SHAPES)}")
    s = SHAPES[name]
    kw = {k: s[k] for k in ("hidden", "intermediate", "heads", "kv_heads", "tie_embeddings", "rope_theta",
                            "max_position_embeddings", "rms_norm_eps")}
    kw["blocks"] = s["blocks"] if blocks is None else blocks
    kw["vocab"] = s["vocab"] if real_vocab else None
    return kw


# ---------------------------------------------------------------------------------------------- tokenizer

def _byte_to_unicode() -> dict[int, str]:
    """The byte -> printable character map of byte-level BPE (GPT-2's): printable Latin-1 bytes map to
    themselves, the other 68 to code points 256, 257, ... in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def build_tokenizer():
    """A byte-level tokenizer: ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, then the 256 bytes (ids 3..258).

    Any text tokenizes (one token per UTF-8 byte, no merges); ``add_special_tokens=True`` prepends ``<s>``
    as Llama's tokenizers do. Returns a ``transformers.PreTrainedTokenizerFast`` (259 tokens).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for b, ch in sorted(_byte_to_unicode().items()):
        vocab[ch] = len(SPECIAL_TOKENS) + b
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                        special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   model_max_length=1 << 30)


# ---------------------------------------------------------------------------------------------- tensors

def _seed(seed: int, name: str, chunk: int) -> int:
    digest = hashlib.sha256(f"{seed}/{name}/{chunk}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _chunks(shape: tuple[int, ...]) -> list[tuple[int, int]]:
    """Row ranges ``[(start, stop)]`` of the independently seeded chunks of a tensor of ``shape``."""
    step = max(1, CHUNK_ELEMENTS // max(1, _numel(shape[1:])))
    return [(r, min(r + step, shape[0])) for r in range(0, shape[0], step)]


def tensor_pieces(name: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int,
                  pool: ThreadPoolExecutor | None = None, per_piece: int = 1) -> Iterator[torch.Tensor]:
    """The tensor ``name`` of a synthetic checkpoint, as consecutive row blocks ``[rows_k, *shape[1:]]``
    whose concatenation along dim 0 is :func:`make_tensor`'s result.

    1-D tensors (RMSNorm weights) are ones, in one piece. Others are normal(0, :data:`INIT_STD`) drawn
    in chunks of whole rows (about :data:`CHUNK_ELEMENTS` elements each), chunk ``c`` from a generator
    seeded by ``(seed, name, c)``, so the bytes do not depend on the thread count. A piece holds
    ``per_piece`` chunks, filled in parallel by ``pool`` if given; memory: one piece at a time.
    """
    if len(shape) == 1:
        yield torch.ones(shape, dtype=dtype)
        return
    chunks = list(enumerate(_chunks(shape)))
    group = max(1, per_piece)
    for g in range(0, len(chunks), group):
        part = chunks[g:g + group]
        r0 = part[0][1][0]
        piece = torch.empty((part[-1][1][1] - r0, *shape[1:]), dtype=dtype)

        def fill(item: tuple[int, tuple[int, int]], piece=piece, r0=r0) -> None:
            c, (a, b) = item
            gen = torch.Generator().manual_seed(_seed(seed, name, c))
            piece[a - r0:b - r0].normal_(0.0, INIT_STD, generator=gen)

        if pool is None or len(part) == 1:
            for item in part:
                fill(item)
        else:
            list(pool.map(fill, part))
        yield piece
        del piece


def make_tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype = torch.bfloat16,
                seed: int = 0) -> torch.Tensor:
    """The whole tensor ``name`` (``shape``) of a checkpoint written with ``seed`` and ``dtype``: the
    bytes :func:`write_synthetic_llama` stores for it (see :func:`tensor_pieces`)."""
    return torch.cat(list(tensor_pieces(name, shape, dtype, seed)), dim=0)


def _write_shard(path: Path, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype,
                 pieces: Callable[[str], Iterator[torch.Tensor]]) -> int:
    """Write a safetensors file piece by piece: the header first, then for each name of ``shapes`` in
    sorted order the bytes of the row blocks ``pieces(name)`` yields (each dropped before the next is
    made: peak memory is one piece). Returns the data bytes."""
    code, size = _SAFETENSORS_DTYPES[dtype], torch.empty((), dtype=dtype).element_size()
    names = sorted(shapes)
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for n in names:
        nbytes = _numel(shapes[n]) * size
        header[n] = {"dtype": code, "shape": list(shapes[n]), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for n in names:
            rows = 0
            for piece in pieces(n):
                if tuple(piece.shape[1:]) != shapes[n][1:] or piece.dtype != dtype or not piece.is_contiguous():
                    raise ValueError(f"shard {path.name}: a piece of {n} is {tuple(piece.shape)} {piece.dtype}, "
                                     f"expected rows of {shapes[n]} {dtype}")
                f.write(memoryview(piece.view(torch.uint8).numpy()).cast("B"))
                rows += piece.shape[0]
                del piece  # before the next piece is made
            if rows != shapes[n][0]:
                raise ValueError(f"shard {path.name}: {n} has {rows} rows, expected {shapes[n][0]}")
    return offset


# ---------------------------------------------------------------------------------------------- the folder

def write_synthetic_llama(folder: str | os.PathLike, *, hidden: int, intermediate: int, heads: int, kv_heads: int,
                          blocks: int, vocab: int | None = None, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                          tie_embeddings: bool = False, head_dim: int | None = None, rope_theta: float = 10000.0,
                          max_position_embeddings: int = 2048, rms_norm_eps: float = 1e-5,
                          overwrite: bool = False, threads: int | None = None) -> Path:
    """Write a random-weight ``LlamaForCausalLM`` Hugging Face folder; returns its path.

    Layout: ``config.json``; ``model-00001-of-{N}.safetensors`` with ``model.embed_tokens.weight``
    ``[vocab, hidden]``, ``model.norm.weight`` ``[hidden]`` and (untied) ``lm_head.weight`` ``[vocab, hidden]``;
    then shard ``i + 2`` holds decoder block ``i`` (``model.layers.{i}.*``, shapes in :func:`block_shapes`);
    ``model.safetensors.index.json`` (``metadata.total_size`` + ``weight_map``); the byte-level tokenizer
    of :func:`build_tokenizer`; and :data:`RECORD_NAME`, the arguments it was written with.

    ``vocab`` defaults to the tokenizer's size (259) rounded up to a multiple of 64 (320); a larger one
    (the real 128256, say) only adds embedding rows no text reaches. Peak memory above the imports is
    one piece of :func:`tensor_pieces`: ``threads`` chunks of ~:data:`CHUNK_ELEMENTS` elements (8 MiB
    each in bf16), far below one block (a 70B block is 855M weights, 1.6 GiB in bf16). The folder is
    written under a temporary name and renamed at the end, so a killed call leaves no half-written model;
    an existing folder is replaced only with ``overwrite=True``. ``threads`` (default: torch's) draw the
    chunks of a tensor in parallel; the bytes are the same for any value.
    """
    from transformers import LlamaConfig

    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise FileExistsError(f"{folder} exists: pass overwrite=True to replace it")
    if hidden % heads or heads % kv_heads:
        raise ValueError(f"hidden {hidden} must divide by heads {heads}, and heads by kv_heads {kv_heads}")
    if dtype not in _SAFETENSORS_DTYPES:
        raise ValueError(f"dtype {dtype} not supported: one of {', '.join(map(str, _SAFETENSORS_DTYPES))}")
    tokenizer = build_tokenizer()
    vocab = vocab or -(-len(tokenizer) // 64) * 64
    if vocab < len(tokenizer):
        raise ValueError(f"vocab {vocab} is smaller than the tokenizer's {len(tokenizer)} tokens")
    head_dim = head_dim or hidden // heads
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=blocks,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
        max_position_embeddings=max_position_embeddings, rms_norm_eps=rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": float(rope_theta)},
        tie_word_embeddings=tie_embeddings, bos_token_id=1, eos_token_id=2, initializer_range=INIT_STD,
        architectures=["LlamaForCausalLM"], dtype=str(dtype).removeprefix("torch."),
    )
    record = {"format": 1, "hidden": hidden, "intermediate": intermediate, "heads": heads, "kv_heads": kv_heads,
              "head_dim": head_dim, "blocks": blocks, "vocab": vocab, "dtype": str(dtype).removeprefix("torch."),
              "seed": seed, "tie_embeddings": tie_embeddings, "rope_theta": float(rope_theta),
              "max_position_embeddings": max_position_embeddings, "rms_norm_eps": rms_norm_eps,
              "chunk_elements": CHUNK_ELEMENTS, "init_std": INIT_STD}

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        tmp.chmod(0o755)
        groups = [rest_shapes(hidden, vocab, tie_embeddings)]
        groups += [block_shapes(hidden, intermediate, heads, kv_heads, head_dim, i) for i in range(blocks)]
        n_shards = len(groups)
        weight_map, total = {}, 0
        workers = max(1, threads or torch.get_num_threads())
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for k, shapes in enumerate(groups):
                shard = f"model-{k + 1:05d}-of-{n_shards:05d}.safetensors"
                total += _write_shard(tmp / shard, shapes, dtype,
                                      lambda n, s=shapes: tensor_pieces(n, s[n], dtype, seed, pool, workers))
                weight_map.update(dict.fromkeys(shapes, shard))
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _portable_tokenizer_class(tmp)
        (tmp / RECORD_NAME).write_text(json.dumps(record, indent=2) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _portable_tokenizer_class(folder: Path) -> None:
    """Name the tokenizer class ``PreTrainedTokenizerFast`` (transformers 5 writes its new name,
    ``TokenizersBackend``, which transformers 4 does not know; both load the former)."""
    path = folder / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(cfg, indent=2) + "\n")


def read_record(folder: str | os.PathLike) -> dict | None:
    """The arguments a folder was written with (:data:`RECORD_NAME`), or None if it holds none."""
    path = Path(folder) / RECORD_NAME
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
