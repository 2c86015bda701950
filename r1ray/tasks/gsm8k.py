"""GSM8K-format problems from a user's jsonl: ``{"question": ..., "answer": "<rationale>\\n#### <number>"}``.

Nothing is downloaded: ``get_task("gsm8k", path="train.jsonl")``. The rationale becomes the worked solution
(calculator annotations ``<<48/2=24>>`` removed) and the number after ``####`` the gold answer (thousands
separators removed). Splits are by the problem's hash like every task; with ``eval_path`` the eval split is
that whole file instead, and train keeps the lines of ``path`` whose uid is not in it (still disjoint). The
seed does not reorder anything (the file's order is the order); there is one difficulty level.
"""

from __future__ import annotations

import re
from functools import cached_property
from pathlib import Path

from r1ray.artifacts import jsonl_rows
from r1ray.tasks import base, mathcheck

__all__ = ["Gsm8kTask", "parse_record"]

_CALC = re.compile(r"<<[^<>]*>>")


def parse_record(record: dict, where: str) -> tuple[str, str, str]:
    """``(question, answer, solution)`` from one GSM8K record; ValueError naming ``where`` when malformed."""
    if not isinstance(record, dict) or not isinstance(record.get("question"), str) \
            or not isinstance(record.get("answer"), str):
        raise ValueError(f"{where}: expected an object with string fields 'question' and 'answer'")
    rationale, sep, final = record["answer"].rpartition("####")
    final = final.strip().replace(",", "")
    if not sep or mathcheck.parse_number(final) is None:
        raise ValueError(f"{where}: 'answer' must end with '#### <number>', got ...{record['answer'][-40:]!r}")
    lines = [_CALC.sub("", ln).strip() for ln in rationale.strip().splitlines()]
    steps = [ln for ln in lines if ln] + [f"So the answer is {final}."]
    return record["question"].strip(), final, "\n".join(steps)


def _load(path: str | Path) -> list[tuple[str, str, str]]:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"gsm8k: path={str(path)!r} is not a file")
    out = [parse_record(record, where) for where, record in jsonl_rows(p)]
    if not out:
        raise ValueError(f"gsm8k: {p} holds no records")
    return out


class Gsm8kTask:
    name = "gsm8k"
    difficulties = (1,)

    def __init__(self, path: str | Path | None = None, eval_path: str | Path | None = None):
        self.path, self.eval_path = path, eval_path

    @cached_property
    def _splits(self) -> dict[str, list[tuple[str, str, str]]]:
        if self.path is None:
            raise ValueError('gsm8k needs a file: get_task("gsm8k", path="train.jsonl") (GSM8K-format jsonl)')
        records = _load(self.path)
        if self.eval_path is None:
            by = {s: [r for r in records if base.split_of(base.problem_uid(self.name, r[0])) == s]
                  for s in base.SPLITS}
        else:
            held = _load(self.eval_path)
            held_uids = {base.problem_uid(self.name, r[0]) for r in held}
            by = {"train": [r for r in records if base.problem_uid(self.name, r[0]) not in held_uids],
                  "eval": held}
        return by

    def size(self, split: str = "train") -> int:
        """How many problems ``split`` holds (indices wrap around past it)."""
        return len(self._splits[split])

    def problem(self, index: int, *, seed: int = 0, split: str = "train", difficulty: int = 1) -> base.Problem:
        base.check_args(self.name, self.difficulties, index, split, difficulty)
        records = self._splits[split]
        if not records:
            raise ValueError(f"gsm8k: the {split} split of {self.path} is empty (too few lines for a hash split)")
        question, answer, solution = records[index % len(records)]
        return base.Problem(self.name, index, split, difficulty, question, answer, solution, {})

    def verify(self, completion: str, problem: base.Problem) -> float:
        return 1.0 if mathcheck.answers_match(base.extract_answer(completion), problem.answer) else 0.0
