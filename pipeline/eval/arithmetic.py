"""Arithmetic word problems from five templates of our own (MIT, this project), with worked solutions: the
`help-wrong-number` preference pairs (pipeline/eval/prefs.py) read them. Pure and seeded, no data files."""
from __future__ import annotations

import random

NAMES = ("Ana", "Ben", "Chloe", "Dev", "Emma", "Farid", "Grace", "Hugo", "Iris", "Jon", "Kemi", "Liam", "Mia",
         "Noor", "Omar", "Pia")
ITEMS = ("apples", "books", "stamps", "marbles", "cookies", "pencils", "shells", "cards", "plants", "coins")


def _word_problem(kind: int, n: str, it: str, rng) -> tuple[str, str, int]:
    """(question, worked solution, answer) of template `kind` (0-4) for name `n` and item `it`."""
    if kind == 0:
        a, b, d = rng.randint(5, 60), rng.randint(2, 15), rng.randint(2, 9)
        return (f"{n} has {a} {it}. {n} gets {b} more {it} every day for {d} days. How many {it} does {n} have now?",
                f"{n} gets {b} x {d} = {b * d} {it}.\n{n} has {a} + {b * d} = {a + b * d} {it} now.", a + b * d)
    if kind == 1:
        boxes, per = rng.randint(3, 12), rng.randint(4, 20)
        given = min(rng.randint(1, 20), boxes * per - 1)     # something is left
        return (f"{n} buys {boxes} boxes of {it} with {per} {it} in each box and gives away {given} {it}. "
                f"How many {it} are left?",
                f"{n} buys {boxes} x {per} = {boxes * per} {it}.\nAfter giving away {given}, {boxes * per} - "
                f"{given} = {boxes * per - given} {it} are left.", boxes * per - given)
    if kind == 2:
        k, each = rng.randint(2, 8), rng.randint(3, 25)
        return (f"{n} shares {k * each} {it} equally among {k} friends. How many {it} does each friend get?",
                f"Each friend gets {k * each} / {k} = {each} {it}.", each)
    if kind == 3:
        price, qty = rng.randint(2, 15), rng.randint(2, 9)
        cost = price * qty
        paid = cost + rng.randint(1, 50)
        return (f"{n} buys {qty} {it} at ${price} each and pays with ${paid}. How much change does {n} get?",
                f"The {it} cost {qty} x {price} = {cost} dollars.\nThe change is {paid} - {cost} = {paid - cost} "
                "dollars.", paid - cost)
    a, b, c = rng.randint(10, 90), rng.randint(10, 90), rng.randint(10, 90)
    return (f"{n} collected {a} {it} on Monday, {b} on Tuesday and {c} on Wednesday. How many {it} did {n} collect "
            "in all?", f"In all, {n} collected {a} + {b} + {c} = {a + b + c} {it}.", a + b + c)


def word_problems(n: int, seed: int = 0) -> list[tuple[str, str, int, int]]:
    """`n` (question, worked solution, answer, wrong answer), the same for a seed: the five templates in turn, the
    wrong answer 1-9 away, alternately above and below the answer (above where below would be negative)."""
    rng, out = random.Random(seed), []
    for k in range(n):
        q, sol, ans = _word_problem(k % 5, rng.choice(NAMES), rng.choice(ITEMS), rng)
        d = 1 + k % 9
        out.append((q, sol, ans, ans + d if (k // 5) % 2 == 0 or ans - d < 0 else ans - d))
    return out
