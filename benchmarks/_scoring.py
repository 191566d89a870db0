"""Scoring for ``eval_accuracy.py``, pure Python: the problems file, answer normalisation, correctness, majority
vote. Answers are extracted by the engine's own rule (``hogwild_vllm.layout.find_answer``: the first balanced
``\\boxed{...}``); this module only compares them."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from pathlib import Path

# Text around a number that does not change it: LaTeX spacing and text wrappers, currency, thousands separators.
_NOISE = (r"\!", r"\,", r"\;", r"\:", r"\ ", "~", r"\$", "$", r"\%", "%", r"\left", r"\right")
_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mathbf|mbox)\{([^{}]*)\}")
_FRAC = re.compile(r"^\\[dt]?frac\{(-?\d+)\}\{(-?\d+)\}$")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_NUMBER = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)")
_ONE_NUMBER = re.compile(r"^[^\d.\-]*(-?(?:\d+(?:\.\d*)?|\.\d+))[^\d]*$")


class ProblemsFileError(ValueError):
    """The problems file is unusable; the message names the file, the line and what is wrong."""


@dataclass(frozen=True)
class Problem:
    id: str
    problem: str
    answer: str


def load_problems(path: str | Path, limit: int | None = None) -> list[Problem]:
    """The first ``limit`` (all when None) problems of a JSONL file: one object a line with ``problem`` (text),
    ``answer`` (string or number) and optionally ``id`` (default ``line-<n>``); blank lines are skipped."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ProblemsFileError(f"cannot read the problems file {path}: {e.strerror or e}") from None
    out: list[Problem] = []
    ids: set[str] = set()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ProblemsFileError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise ProblemsFileError(f"{where}: expected a JSON object, got {type(row).__name__}")
        for key in ("problem", "answer"):
            if key not in row:
                raise ProblemsFileError(f"{where}: missing field {key!r} (each line needs 'problem' and 'answer')")
        if not isinstance(row["problem"], str) or not row["problem"].strip():
            raise ProblemsFileError(f"{where}: 'problem' must be a non-empty string")
        answer = row["answer"]
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)) or not str(answer).strip():
            raise ProblemsFileError(f"{where}: 'answer' must be a non-empty string or a number, got {answer!r}")
        pid = str(row.get("id", f"line-{n}"))
        if pid in ids:
            raise ProblemsFileError(f"{where}: duplicate id {pid!r}")
        ids.add(pid)
        out.append(Problem(pid, row["problem"], str(answer)))
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise ProblemsFileError(f"{path}: no problems")
    return out


def _canonical_number(text: str) -> str | None:
    """``"4320"``, ``"4320.0"``, ``"-0.50"`` -> ``"4320"``, ``"4320"``, ``"-0.5"``; None if not a number."""
    try:
        value = Decimal(text)
    except InvalidOperation:
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def normalize_answer(answer: str | None) -> str | None:
    """One canonical string per answer, so that equal numbers compare equal: ``"4,320"``, ``"4320.0"``,
    ``"$4320"``, ``"4320 dollars"``, ``"\\text{4320 m}"`` -> ``"4320"``; ``"\\frac{6}{4}"`` and ``"3/2"`` ->
    ``"3/2"`` (an integral fraction becomes the integer). A text holding no number or several numbers (``"2+3"``)
    is kept as text, lower-cased, spaces removed. None (no answer) and an empty answer give None."""
    if answer is None:
        return None
    text = _TEXT_WRAPPER.sub(r"\1", answer.strip().replace("\u2212", "-"))
    for noise in _NOISE:
        text = text.replace(noise, " ")
    text = _THOUSANDS.sub("", text).strip().rstrip(".").strip()
    if not text:
        return None
    frac = _FRAC.match(text.replace(" ", "")) or re.fullmatch(r"(-?\d+)/(-?\d+)", text.replace(" ", ""))
    if frac and int(frac.group(2)) != 0:
        value = Fraction(int(frac.group(1)), int(frac.group(2)))
        return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"
    one = _ONE_NUMBER.match(text)
    if one and len(_NUMBER.findall(text)) == 1:
        number = _canonical_number(one.group(1).rstrip("."))
        if number is not None:
            return number
    return re.sub(r"\s+", "", text).lower()


def is_correct(extracted: str | None, expected: str) -> bool:
    """True when an answer was extracted and it normalises to the expected answer."""
    got = normalize_answer(extracted)
    return got is not None and got == normalize_answer(expected)


def majority_vote(answers: Sequence[str | None]) -> str | None:
    """The most frequent normalised answer among ``answers`` (None entries, samples without an answer, do not
    vote); a tie goes to the tied answer that appears first in ``answers``; None when nobody answered."""
    counts: dict[str, int] = {}
    for a in answers:
        key = normalize_answer(a)
        if key is not None:
            counts[key] = counts.get(key, 0) + 1
    if not counts:
        return None
    best = max(counts.values())
    return next(k for k, c in counts.items() if c == best)  # dicts keep first-seen order
