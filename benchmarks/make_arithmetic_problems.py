"""Grade-school arithmetic word problems with verified numeric answers, for ``eval_accuracy.py``.

    python benchmarks/make_arithmetic_problems.py                     # writes benchmarks/data/arithmetic_100.jsonl
    python benchmarks/make_arithmetic_problems.py --count 30 --seed 7 --out /tmp/p.jsonl
    python benchmarks/make_arithmetic_problems.py --check benchmarks/data/arithmetic_100.jsonl

Each problem comes from one of ten kinds (shopping, sharing, travel, timetables, savings, ages, fencing, discounts,
filling a tank, buses). A kind draws its parameters from a seeded ``random.Random``, writes the text and computes the
answer; an independent check then tests the answer against the parameters the other way round (change plus cost
equals the bill paid, shares times friends plus the kept ones equals the total, ...). A problem is kept only when the
check passes, the answer is a positive integer, every parameter appears in the text and the text is new. Kinds take
turns, so any prefix of the file mixes them.

One JSON object a line: ``{"id", "problem", "answer", "kind", "params"}``; ``answer`` is the number as a string, and
``kind`` with ``params`` let ``--check`` recompute and re-verify every answer of a file. The same seed and count
always give the same file.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "data" / "arithmetic_100.jsonl"
NAMES = ("Maya", "Leo", "Priya", "Tomas", "Aiko", "Sam", "Nadia", "Omar", "Lena", "Kofi", "Rosa", "Ivan")
Params = dict[str, int]


@dataclass(frozen=True)
class Kind:
    """One family of problems: draw parameters, write the text, solve, and check an answer independently."""

    name: str
    draw: Callable[[random.Random], Params]
    text: Callable[[Params, str], str]
    solve: Callable[[Params], int]
    check: Callable[[Params, int], bool]


def _shopping(r: random.Random) -> Params:
    p = {"count": r.randint(2, 9), "price": r.randint(2, 15), "extra": r.randint(5, 40)}
    cost = p["count"] * p["price"] + p["extra"]
    p["bill"] = next(b for b in (20, 50, 100, 200) if b > cost)
    return p


def _sharing(r: random.Random) -> Params:
    friends, each, kept = r.randint(3, 9), r.randint(2, 12), r.randint(1, 10)
    per_tray = r.choice([6, 8, 10, 12])
    # Smallest tray count that covers everything, then widen "each" so the totals match exactly.
    trays = math.ceil((friends * each + kept) / per_tray)
    each = (trays * per_tray - kept) // friends
    kept = trays * per_tray - friends * each
    return {"trays": trays, "per_tray": per_tray, "kept": kept, "friends": friends}


def _travel(r: random.Random) -> Params:
    return {"speed": r.randint(8, 25), "hours": r.randint(2, 6), "more": r.randint(3, 30)}


def _timetable(r: random.Random) -> Params:
    return {"lessons": r.randint(3, 7), "minutes": r.choice([30, 35, 40, 45, 50]), "gap": r.choice([5, 10, 15])}


def _savings(r: random.Random) -> Params:
    saved, weekly = r.randint(10, 60), r.randint(4, 15)
    return {"saved": saved, "weekly": weekly, "price": saved + r.randint(20, 150)}


def _ages(r: random.Random) -> Params:
    return {"age": r.randint(4, 12), "times": r.randint(3, 5), "later": r.randint(13, 20)}


def _fencing(r: random.Random) -> Params:
    return {"length": r.randint(5, 30), "width": r.randint(3, 20), "cost": r.randint(2, 9)}


def _discount(r: random.Random) -> Params:
    percent = r.choice([10, 20, 25, 50])
    return {"price": r.randint(2, 20) * (100 // math.gcd(100, percent)), "percent": percent}


def _tank(r: random.Random) -> Params:
    rate, minutes = r.randint(3, 12), r.randint(5, 30)
    start = r.randint(5, 60)
    return {"rate": rate, "start": start, "capacity": start + rate * minutes}


def _buses(r: random.Random) -> Params:
    return {"students": r.randint(40, 180), "teachers": r.randint(3, 12), "seats": r.choice([20, 25, 30, 40, 45])}


KINDS = (
    Kind("shopping", _shopping,
         lambda p, n: (f"{n} buys {p['count']} notebooks that cost {p['price']} dollars each and a backpack that "
                       f"costs {p['extra']} dollars. {n} pays with a {p['bill']}-dollar bill. How many dollars of "
                       "change does " f"{n} get back?"),
         lambda p: p["bill"] - p["count"] * p["price"] - p["extra"],
         lambda p, a: a + p["count"] * p["price"] + p["extra"] == p["bill"]),
    Kind("sharing", _sharing,
         lambda p, n: (f"{n} bakes {p['trays']} trays of cookies with {p['per_tray']} cookies on each tray, keeps "
                       f"{p['kept']} cookies, and shares the rest equally among {p['friends']} friends. How many "
                       "cookies does each friend get?"),
         lambda p: (p["trays"] * p["per_tray"] - p["kept"]) // p["friends"],
         lambda p, a: a * p["friends"] + p["kept"] == p["trays"] * p["per_tray"]),
    Kind("travel", _travel,
         lambda p, n: (f"{n} cycles at {p['speed']} kilometres per hour for {p['hours']} hours, stops for lunch, "
                       f"and then rides another {p['more']} kilometres. How many kilometres does {n} ride in all?"),
         lambda p: p["speed"] * p["hours"] + p["more"],
         lambda p, a: (a - p["more"]) % p["hours"] == 0 and (a - p["more"]) // p["hours"] == p["speed"]),
    Kind("timetable", _timetable,
         lambda p, n: (f"{n}'s school day has {p['lessons']} lessons of {p['minutes']} minutes each, with a "
                       f"{p['gap']}-minute break between two lessons in a row. How many minutes pass from the start "
                       "of the first lesson to the end of the last one?"),
         lambda p: p["lessons"] * p["minutes"] + (p["lessons"] - 1) * p["gap"],
         lambda p, a: a + p["gap"] == p["lessons"] * (p["minutes"] + p["gap"])),
    Kind("savings", _savings,
         lambda p, n: (f"{n} has saved {p['saved']} dollars and puts away {p['weekly']} dollars more every week. "
                       f"A bike costs {p['price']} dollars. After how many weeks does {n} have enough money for "
                       "the bike for the first time?"),
         lambda p: math.ceil((p["price"] - p["saved"]) / p["weekly"]),
         lambda p, a: p["saved"] + (a - 1) * p["weekly"] < p["price"] <= p["saved"] + a * p["weekly"]),
    Kind("ages", _ages,
         lambda p, n: (f"{n} is {p['age']} years old, and {n}'s aunt is {p['times']} times as old. How old will "
                       f"the aunt be when {n} is {p['later']}?"),
         lambda p: p["age"] * p["times"] + p["later"] - p["age"],
         lambda p, a: a - p["later"] == p["age"] * (p["times"] - 1)),
    Kind("fencing", _fencing,
         lambda p, n: (f"{n} wants a fence around a rectangular garden that is {p['length']} metres long and "
                       f"{p['width']} metres wide. The fence costs {p['cost']} dollars per metre. How many dollars "
                       "does the whole fence cost?"),
         lambda p: 2 * (p["length"] + p["width"]) * p["cost"],
         lambda p, a: a % (2 * p["cost"]) == 0 and a // (2 * p["cost"]) - p["width"] == p["length"]),
    Kind("discount", _discount,
         lambda p, n: (f"A jacket costs {p['price']} dollars. In a sale the shop takes {p['percent']} percent off "
                       f"the price. How many dollars does {n} pay for the jacket in the sale?"),
         lambda p: p["price"] * (100 - p["percent"]) // 100,
         lambda p, a: a * 100 == p["price"] * (100 - p["percent"])),
    Kind("tank", _tank,
         lambda p, n: (f"A water tank holds {p['capacity']} litres and already has {p['start']} litres in it. "
                       f"{n} fills it with a hose that adds {p['rate']} litres per minute. How many minutes does it "
                       "take to fill the tank?"),
         lambda p: (p["capacity"] - p["start"]) // p["rate"],
         lambda p, a: p["start"] + a * p["rate"] == p["capacity"]),
    Kind("buses", _buses,
         lambda p, n: (f"{p['students']} students and {p['teachers']} teachers from {n}'s school go on a trip. "
                       f"Each bus has {p['seats']} seats. How many buses do they need so that everyone gets a "
                       "seat?"),
         lambda p: math.ceil((p["students"] + p["teachers"]) / p["seats"]),
         lambda p, a: (a - 1) * p["seats"] < p["students"] + p["teachers"] <= a * p["seats"]),
)
KINDS_BY_NAME = {k.name: k for k in KINDS}


def verify(kind: Kind, params: Params, text: str, answer: int) -> str | None:
    """Why this problem is unusable, or None: the answer must be the kind's solution, pass its independent check,
    be a positive integer, and every parameter must appear in the text."""
    if answer != kind.solve(params):
        return f"answer {answer} is not the solution {kind.solve(params)}"
    if not kind.check(params, answer):
        return f"answer {answer} fails the independent check"
    if answer <= 0:
        return f"answer {answer} is not positive"
    missing = [k for k, v in params.items() if str(v) not in text]
    return f"parameters {missing} missing from the text" if missing else None


def generate(count: int, seed: int) -> list[dict[str, object]]:
    """``count`` verified problems, kinds taking turns, names from ``NAMES``; deterministic in ``seed``."""
    r = random.Random(seed)
    seen: set[str] = set()
    out: list[dict[str, object]] = []
    while len(out) < count:
        kind = KINDS[len(out) % len(KINDS)]
        for _ in range(1000):
            params = kind.draw(r)
            text = kind.text(params, r.choice(NAMES))
            answer = kind.solve(params)
            if text not in seen and verify(kind, params, text, answer) is None:
                break
        else:
            raise RuntimeError(f"kind {kind.name!r} drew no usable problem in 1000 tries")
        seen.add(text)
        out.append({"id": f"arith-{len(out):03d}", "problem": text, "answer": str(answer), "kind": kind.name,
                    "params": params})
    return out


def check_file(path: Path) -> int:
    """Recompute and re-verify every problem of ``path``; returns how many failed (each printed)."""
    failed = 0
    for n, line in enumerate(path.read_text().splitlines(), 1):
        row = json.loads(line)
        kind = KINDS_BY_NAME[row["kind"]]
        why = verify(kind, row["params"], row["problem"], int(row["answer"]))
        if why is not None:
            failed += 1
            print(f"{path}:{n} ({row['id']}): {why}", file=sys.stderr)
    return failed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=100)
    ap.add_argument("--seed", type=int, default=20250410)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--check", type=Path, default=None, metavar="FILE", help="re-verify FILE instead of writing")
    args = ap.parse_args(argv)
    if args.check is not None:
        failed = check_file(args.check)
        print(f"{args.check}: {'all answers verified' if not failed else f'{failed} problems failed'}")
        return 1 if failed else 0
    rows = generate(args.count, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    print(f"wrote {len(rows)} problems to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
