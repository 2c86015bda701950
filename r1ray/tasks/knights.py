"""Knights and knaves: knights always tell the truth, knaves always lie; say who is which.

Each instance is random statements kept only when brute force over all ``2**n`` assignments finds exactly one
consistent assignment, so the gold answer is unique. The worked solution is that brute force, written out:
one line per assignment, naming the first statement that contradicts it.

The verifier reads the answer as a sequence of names and role words (``knight``/``knave``, plurals too): each
role applies to the names mentioned since the previous role, so ``"Ann is a knight, Bob is a knave"``,
``"Ann: knight; Bob: knave"`` and ``"Ann and Bob are knights"`` all parse. Every person must get exactly one
role, equal to the gold one, and a role word with no name before it (a hedge: ``"Ann is a knight or a
knave"``) makes the answer wrong.
"""

from __future__ import annotations

import itertools
import random
import re

from r1ray.tasks import base

__all__ = ["LEVELS", "KnightsKnavesTask", "parse_roles"]

LEVELS: dict[int, int] = {1: 2, 2: 3, 3: 4}
"""Difficulty -> number of people."""

_NAMES = ["Ann", "Bob", "Cleo", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivan", "Jo", "Kai", "Lea", "Max", "Nia"]
_ROLE = {True: "knight", False: "knave"}


def _truth(stmt: tuple, world: tuple[bool, ...]) -> bool:
    kind = stmt[0]
    if kind == "is":
        return world[stmt[1]] == stmt[2]
    if kind == "both":
        return world[stmt[1]] == stmt[3] and world[stmt[2]] == stmt[3]
    if kind == "either":
        return world[stmt[1]] == stmt[3] or world[stmt[2]] == stmt[3]
    if kind == "same":
        return world[stmt[1]] == world[stmt[2]]
    if kind == "different":
        return world[stmt[1]] != world[stmt[2]]
    raise ValueError(f"unknown statement kind {kind!r}")


def _say(stmt: tuple, speaker: int, names: list[str]) -> str:
    kind = stmt[0]
    if kind == "is":
        return f"{names[stmt[1]]} is a {_ROLE[stmt[2]]}"  # never about the speaker (see _statement)
    a, b = sorted(stmt[1:3], key=lambda i: i == speaker)  # the speaker, if named, goes last: "Bob and I"
    first, second = names[a], ("I" if b == speaker else names[b])
    if kind == "both":
        return f"{first} and {second} are both {_ROLE[stmt[3]]}s"
    if kind == "either":
        return f"at least one of {first} and {'me' if b == speaker else second} is a {_ROLE[stmt[3]]}"
    if kind == "same":
        return f"{first} and {second} are the same kind"
    return f"{first} and {second} are different kinds"


def _statement(r: random.Random, speaker: int, n: int) -> tuple:
    others = [i for i in range(n) if i != speaker]
    kind = r.choice(["is", "is", "both", "either", "same", "different"])
    if kind == "is":
        return ("is", r.choice(others), r.random() < 0.5)
    if kind in ("same", "different"):
        return (kind, speaker, r.choice(others))
    a, b = r.sample(range(n), 2) if n > 2 else (0, 1)
    return (kind, a, b, r.random() < 0.5)


def solve(statements: list[tuple], n: int) -> list[tuple[bool, ...]]:
    """Every consistent assignment (``True`` = knight): each speaker's statement is true iff they are a knight."""
    return [w for w in itertools.product((True, False), repeat=n)
            if all(_truth(s, w) == w[i] for i, s in enumerate(statements))]


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]


def _describe(world: tuple[bool, ...], names: list[str]) -> str:
    return ", ".join(f"{names[i]} is a {_ROLE[k]}" for i, k in enumerate(world))


class KnightsKnavesTask:
    name = "knights_knaves"
    difficulties = tuple(LEVELS)

    def problem(self, index: int, *, seed: int, split: str = "train", difficulty: int = 1) -> base.Problem:
        base.check_args(self.name, self.difficulties, index, split, difficulty)
        n = LEVELS[difficulty]

        def make(r: random.Random):
            names = r.sample(_NAMES, n)
            for _ in range(10_000):
                statements = [_statement(r, i, n) for i in range(n)]
                found = solve(statements, n)
                if len(found) == 1:
                    break
            else:
                raise RuntimeError(f"knights_knaves: no uniquely solvable puzzle for {n} people")
            said = [f'{names[i]} says: "{_capital(_say(s, i, names))}."' for i, s in enumerate(statements)]
            question = (
                "On an island, knights always tell the truth and knaves always lie. "
                f"You meet {n} inhabitants: {', '.join(names)}. " + " ".join(said)
                + " Who is a knight and who is a knave?"
            )
            steps = []
            for world in itertools.product((True, False), repeat=n):
                bad = next((i for i, s in enumerate(statements) if _truth(s, world) != world[i]), None)
                if bad is None:
                    steps.append(f"Suppose {_describe(world, names)}: every statement is consistent.")
                else:
                    steps.append(
                        f"Suppose {_describe(world, names)}: {names[bad]}'s statement would be "
                        f"{'true' if _truth(statements[bad], world) else 'false'}, but {names[bad]} is a "
                        f"{_ROLE[world[bad]]}. Contradiction."
                    )
            answer = _describe(found[0], names)
            steps.append(f"So {answer}.")
            meta = {"names": names, "roles": {names[i]: _ROLE[k] for i, k in enumerate(found[0])},
                    "statements": [list(s) for s in statements]}
            return question, answer, "\n".join(steps), meta

        return base.first_in_split(self.name, make, index=index, seed=seed, split=split, difficulty=difficulty)

    def verify(self, completion: str, problem: base.Problem) -> float:
        got = base.extract_answer(completion)
        if got is None or len(got) > 2000:
            return 0.0
        return 1.0 if parse_roles(got, problem.meta["names"]) == problem.meta["roles"] else 0.0


_WORD = re.compile(r"[A-Za-z]+")
_ROLE_WORDS = {"knight": "knight", "knights": "knight", "knave": "knave", "knaves": "knave"}


def parse_roles(answer: str, names: list[str]) -> dict[str, str] | None:
    """``{name: "knight"|"knave"}`` read from a free-form answer; None when a name gets two roles or none."""
    canon = {n.lower(): n for n in names}
    roles: dict[str, str] = {}
    pending: list[str] = []
    for m in _WORD.finditer(answer):  # one fixed pattern: a per-puzzle pattern would thrash re's cache
        word = m.group().lower()
        if word in canon:
            pending.append(canon[word])
            continue
        role = _ROLE_WORDS.get(word)
        if role is None:
            continue
        if not pending:  # a role naming nobody: a hedge like "Ann is a knight or a knave"
            return None
        for name in pending:
            if roles.setdefault(name, role) != role:
                return None
        pending = []
    if pending or set(roles) != set(names):
        return None
    return roles
