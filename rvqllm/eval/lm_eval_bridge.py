"""lm-eval on rvqllm models, through lm-eval's Python API, with a shipped offline task.

:func:`run_tasks` wraps an already-built model (quantized or not) in lm-eval's ``HFLM`` and runs any
tasks lm-eval knows (hub tasks need internet for their data) plus our shipped local tasks in
``rvqllm/eval/tasks/``:

- ``rvq_kjv_next_verse``: 64 multiple-choice questions built from the KJV New Testament (the
  offline reference's test text): given a verse and the first half of the next one, pick the real
  second half among four (three distractors are second halves of verses drawn, seeded, from
  elsewhere in the text). Metrics ``acc`` and
  ``acc_norm``. :func:`build_next_verse_docs` makes the data file; a test checks the shipped file is
  exactly what it builds from the reference text.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
from pathlib import Path

from torch import nn

from ..errors import RVQError

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
NEXT_VERSE = "rvq_kjv_next_verse"


def shipped_tasks() -> list[str]:
    """Names of the local tasks shipped with rvqllm."""
    return sorted(p.name for p in TASKS_DIR.iterdir() if (p / f"{p.name}.yaml").exists())


def build_next_verse_docs(text: str, n_docs: int = 64, n_choices: int = 4, seed: int = 0) -> list[dict]:
    """``[{"context": str, "choices": [str] * n_choices, "label": int}]`` from a one-verse-per-line text.

    Question ``k`` takes a verse ``i`` of at least 12 words (``i`` spread evenly through the text); the
    context is the previous verse plus the first half of verse ``i``'s words, the answer is the second
    half, placed at a seeded position among ``n_choices - 1`` distractors: second halves of other
    long verses at least 50 lines away. Deterministic for a given text and seed.
    """
    verses = [v.strip() for v in text.splitlines() if v.strip()]
    long = [i for i in range(1, len(verses)) if len(verses[i].split()) >= 12]
    if len(long) < n_docs * 8:
        raise RVQError(f"the text has {len(long)} verses of 12+ words, too few for {n_docs} questions")

    def halves(i: int) -> tuple[str, str]:
        words = verses[i].split()
        return " ".join(words[: len(words) // 2]), " " + " ".join(words[len(words) // 2 :])

    rng = random.Random(seed)
    step = len(long) // n_docs
    docs = []
    for k in range(n_docs):
        i = long[k * step + step // 2]
        head, tail = halves(i)
        others = [j for j in rng.sample(long, 4 * n_choices) if abs(j - i) > 50]
        distractors = [t for t in (halves(j)[1] for j in others) if t != tail][: n_choices - 1]
        label = rng.randrange(n_choices)
        choices = distractors[:label] + [tail] + distractors[label:]
        docs.append({"context": f"{verses[i - 1]}\n{head}", "choices": choices, "label": label})
    return docs


def write_next_verse_data(text: str, path: Path) -> Path:
    """Write :func:`build_next_verse_docs` as JSON lines (the shipped data file is made this way)."""
    path.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in build_next_verse_docs(text)))
    return path


def _resolved_task_dir() -> Path:
    """A temporary copy of the shipped tasks whose ``data_files`` are absolute paths (lm-eval resolves
    relative ones against the working directory, not the YAML's folder)."""
    import yaml

    out = Path(tempfile.mkdtemp(prefix="rvqllm-tasks-"))
    for name in shipped_tasks():
        src = TASKS_DIR / name
        cfg = yaml.safe_load((src / f"{name}.yaml").read_text())
        files = cfg.get("dataset_kwargs", {}).get("data_files", {})
        for split, rel in files.items():
            files[split] = str(src / rel)
        (out / name).mkdir()
        (out / name / f"{name}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return out


def run_tasks(
    model: nn.Module,
    tokenizer,
    tasks: list[str],
    *,
    limit: int | None = None,
    batch_size: int = 8,
    include_path: str | Path | None = None,
) -> dict[str, dict[str, float]]:
    """Run lm-eval ``tasks`` on ``model``: ``{task: {metric: value}}`` (stderr entries dropped).

    ``limit`` caps the documents per task; ``include_path`` adds a folder of the user's YAML tasks.
    Raises :class:`RVQError` naming a task lm-eval does not know.
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    local = _resolved_task_dir()
    try:
        paths = [str(local)] + ([str(include_path)] if include_path else [])
        manager = TaskManager(include_path=paths)
        unknown = [t for t in tasks if t not in manager.all_tasks]
        if unknown:
            raise RVQError(f"lm-eval does not know task(s) {unknown}: shipped local tasks are {shipped_tasks()}; "
                           "hub tasks need their data online; add your own YAML folder with --include-path")
        lm = HFLM(pretrained=model.eval(), tokenizer=tokenizer, batch_size=batch_size)
        out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                      bootstrap_iters=0, log_samples=False, verbosity="ERROR")
    finally:
        shutil.rmtree(local, ignore_errors=True)
    results = {}
    for task, metrics in out["results"].items():
        results[task] = {k.split(",")[0]: float(v) for k, v in metrics.items()
                         if isinstance(v, (int, float)) and "stderr" not in k}
    return results
