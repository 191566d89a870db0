"""benchmarks/eval_accuracy.py: answer normalisation, majority vote, the problems file and its generator, scoring
of planted outputs through the script's own run functions (a fake engine), and the script itself as a subprocess
on the tiny model (CSV columns; a planted correct answer scores, a wrong one does not)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from argparse import Namespace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import _scoring  # noqa: E402
import _systems  # noqa: E402
import make_arithmetic_problems as gen  # noqa: E402

from hogwild_vllm.config import Templates  # noqa: E402
from hogwild_vllm.outputs import GroupOutput, Usage, WorkerOutput  # noqa: E402

CSV_COLUMNS = ["system", "kind", "layout", "workers", "budget", "problems", "correct", "accuracy", "answered",
               "errors", "wall_s", "forward_passes_mean", "tokens_mean", "finisher_runs"]


@pytest.mark.parametrize(("raw", "want"), [
    ("4320", "4320"), ("4,320", "4320"), ("4320.0", "4320"), ("$4320", "4320"), ("\\$4,320.00", "4320"),
    (" 4320 dollars", "4320"), ("\\text{4320 m}", "4320"), ("4320.", "4320"), ("-7", "-7"), ("\u22127", "-7"),
    ("0.50", "0.5"), ("x = 12", "12"), ("25\\%", "25"), ("\\frac{6}{4}", "3/2"), ("\\dfrac{8}{4}", "2"),
    ("3/2", "3/2"), ("2+3", "2+3"), ("Five", "five"), ("", None), ("  ", None), (None, None),
    ("1,000,000", "1000000"), ("12,5", "12,5"),
])
def test_normalize_answer(raw, want):
    assert _scoring.normalize_answer(raw) == want
    if want is not None:
        assert _scoring.normalize_answer(want) == want  # idempotent: a voted answer normalises to itself


def test_is_correct_needs_an_extracted_answer_equal_to_the_expected_one():
    assert _scoring.is_correct("4,320", "4320") and _scoring.is_correct("4320.0", "$4320")
    assert not _scoring.is_correct("4321", "4320")
    assert not _scoring.is_correct(None, "4320") and not _scoring.is_correct("", "4320")


def test_majority_vote_counts_normalised_answers_and_breaks_ties_by_first_sample():
    assert _scoring.majority_vote(["7", "9", "9.0", None]) == "9"
    assert _scoring.majority_vote(["9", "7", "7", "9"]) == "9"  # tie: first sampled wins
    assert _scoring.majority_vote([None, "7", "9"]) == "7"
    assert _scoring.majority_vote([None, None]) is None and _scoring.majority_vote([]) is None


def test_load_problems_names_the_line_and_the_field(tmp_path):
    good = tmp_path / "p.jsonl"
    good.write_text('{"id": "a", "problem": "2+2?", "answer": 4}\n\n{"problem": "3+3?", "answer": "6"}\n')
    assert _scoring.load_problems(good) == [_scoring.Problem("a", "2+2?", "4"), _scoring.Problem("line-3", "3+3?", "6")]
    assert len(_scoring.load_problems(good, limit=1)) == 1
    cases = {'{"problem": "x"}\n': r"p\.jsonl:1: missing field 'answer'",
             '{"id": 1, "problem": "x", "answer": 1}\n{"answer": 2}\n': r":2: missing field 'problem'",
             '{"problem": "x", "answer": 1}\n{oops\n': r":2: not valid JSON",
             '[1, 2]\n': r":1: expected a JSON object",
             '{"problem": "", "answer": 1}\n': r":1: 'problem' must be a non-empty string",
             '{"problem": "x", "answer": null}\n': r":1: 'answer' must be",
             '{"id": "a", "problem": "x", "answer": 1}\n{"id": "a", "problem": "y", "answer": 2}\n':
                 r":2: duplicate id 'a'",
             '\n': r"no problems"}
    for text, match in cases.items():
        bad = tmp_path / "p.jsonl"
        bad.write_text(text)
        with pytest.raises(_scoring.ProblemsFileError, match=match):
            _scoring.load_problems(bad)
    with pytest.raises(_scoring.ProblemsFileError, match="cannot read"):
        _scoring.load_problems(tmp_path / "missing.jsonl")


def test_the_committed_problems_are_the_generators_and_verified(tmp_path):
    committed = gen.DEFAULT_OUT.read_text().splitlines()
    assert [json.loads(line) for line in committed] == gen.generate(100, 20250410)
    assert gen.check_file(gen.DEFAULT_OUT) == 0
    rows = [json.loads(line) for line in committed]
    assert len({r["problem"] for r in rows}) == 100 and {r["kind"] for r in rows[:10]} == set(gen.KINDS_BY_NAME)
    # --check catches a wrong answer, naming the line.
    rows[3]["answer"] = str(int(rows[3]["answer"]) + 1)
    broken = tmp_path / "broken.jsonl"
    broken.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert gen.check_file(broken) == 1


def test_parse_system():
    assert _systems.parse_system("single") == _systems.System("single")
    assert _systems.parse_system("sc:4") == _systems.System("sc", 4)
    assert _systems.parse_system("hogwild:2:interleaved").label == "hogwild N=2 interleaved"
    for bad in ("sc", "sc:0", "hogwild:2", "hogwild:2:diagonal", "hogwild:17:combined", "greedy"):
        with pytest.raises(ValueError, match="expected single, sc:N or hogwild:N:LAYOUT"):
            _systems.parse_system(bad)


# ---- scoring of planted outputs through the script's run functions, on a fake engine -------------------------
class CharTokenizer:
    """One token a character; no chat template (prompts are plain text)."""

    chat_template = None
    eos_token_id = 0

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i) for i in ids)


class FakeLLM:
    """Answers every request with planted text: ``plain[problem]`` is one text per sample; a group's result is
    ``GroupOutput`` whose ``answer`` is what the engine would extract from ``group[problem]``; a finisher
    continuation (the prompt ends with the finisher suffix) writes ``finisher``."""

    def __init__(self, plain: dict[str, list[str]], group: dict[str, str], finisher: str) -> None:
        self.plain, self.group, self.finisher, self.tok = plain, group, finisher, CharTokenizer()

    def _problem(self, prompt: Any) -> str:
        text = self.tok.decode(prompt["prompt_token_ids"])
        return next(p for p in {**self.plain, **self.group} if p in text)

    def generate(self, prompts: list[Any], params: Any, use_tqdm: Any = True) -> list[Any]:
        outs = []
        for k, prompt in enumerate(prompts):
            p = params[k] if isinstance(params, list) else params
            text = self.tok.decode(prompt["prompt_token_ids"])
            if text.endswith(Templates().finisher_suffix):
                outs.append(SimpleNamespace(outputs=[self._completion(self.finisher)]))
            elif p.extra_args and "hogwild" in p.extra_args:
                body = self.group[self._problem(prompt)]
                out = GroupOutput([], [], [WorkerOutput("Alice", [1] * len(body), [False] * len(body), body)],
                                  body, _systems.find_answer(body, "\\boxed{"), "Alice", "length",
                                  Usage(3, [len(body)], [0], 1 + len(body)))
                outs.append(SimpleNamespace(request_id=str(k), kv_transfer_params={"hogwild": out.to_dict()}))
            else:
                texts = self.plain[self._problem(prompt)]
                assert len(texts) == p.n
                outs.append(SimpleNamespace(outputs=[self._completion(t) for t in texts]))
        return outs

    def _completion(self, text: str) -> Any:
        return SimpleNamespace(text=text, token_ids=self.tok.encode(text), finish_reason="length")


def fake_engine(llm: FakeLLM, finisher: bool = False) -> _systems.Engine:
    engine = _systems.Engine.__new__(_systems.Engine)
    engine.args = Namespace(temperature=0.6, top_p=0.95, seed=0, finisher=finisher, finisher_tokens=8,
                            instruction="Answer in \\boxed{}.")
    engine.templates, engine.llm, engine.tokenizer, engine.eos = Templates(), llm, llm.tok, {0}
    return engine


PROBLEMS = [_scoring.Problem("right", "Q one?", "42"), _scoring.Problem("wrong", "Q two?", "42"),
            _scoring.Problem("none", "Q three?", "42")]


def test_planted_answers_score_through_extraction():
    llm = FakeLLM(plain={"Q one?": ["so \\boxed{42}."], "Q two?": ["so \\boxed{41}."], "Q three?": ["no answer"]},
                  group={"Q one?": "**Alice [1]:** 6*7 = \\boxed{42}", "Q two?": "\\boxed{4,200}",
                         "Q three?": "still thinking"}, finisher="")
    engine = fake_engine(llm)
    single = _systems.run_system(engine, _systems.System("single"), PROBLEMS, 16)
    assert [r["correct"] for r in single] == [True, False, False]
    assert [r["answer"] for r in single] == ["42", "41", None]
    group = _systems.run_system(engine, _systems.System("hogwild", 1, "combined"), PROBLEMS, 16)
    assert [r["correct"] for r in group] == [True, False, False] and group[1]["answer"] == "4,200"
    assert group[0]["forward_passes"] == 1 + len("**Alice [1]:** 6*7 = \\boxed{42}")


def test_self_consistency_scores_the_majority():
    llm = FakeLLM(plain={"Q one?": ["\\boxed{41}", "\\boxed{42}", "\\boxed{42.0}"],
                         "Q two?": ["\\boxed{42}", "\\boxed{41}", "\\boxed{41}"],
                         "Q three?": ["\\boxed{42}", "none", "none"]}, group={}, finisher="")
    recs = _systems.run_system(fake_engine(llm), _systems.System("sc", 3), PROBLEMS, 16)
    assert [r["correct"] for r in recs] == [True, False, True]  # a lone answer wins over samples without one
    assert recs[0]["answers"] == ["41", "42", "42.0"]
    assert recs[0]["tokens"] == sum(map(len, llm.plain["Q one?"])) and recs[0]["forward_passes"] == len("\\boxed{42.0}")


def test_plain_finisher_fills_in_a_missing_answer_only():
    llm = FakeLLM(plain={"Q one?": ["\\boxed{41}"], "Q two?": ["thinking"], "Q three?": ["thinking"]}, group={},
                  finisher="42}.")
    recs = _systems.run_system(fake_engine(llm, finisher=True), _systems.System("single"), PROBLEMS, 16)
    assert [r["correct"] for r in recs] == [False, True, True]
    assert [r["finisher_ran"] for r in recs] == [False, True, True]
    assert recs[1]["forward_passes"] == len("thinking") + len("42}.")


# ---- the script itself, on the tiny model -------------------------------------------------------------------
def run_eval(tmp_path: Path, problems: list[dict[str, Any]], name: str) -> tuple[list[dict[str, str]], list[dict]]:
    from hogwild_vllm.testing.tiny_models import tiny_model_path

    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in problems))
    cmd = [sys.executable, str(BENCH / "eval_accuracy.py"), "--model", str(tiny_model_path("qwen2")),
           "--problems", str(path), "--budgets", "16", "--systems", "single", "sc:2", "hogwild:2:combined",
           "--finisher", "--finisher-tokens", "6", "--out", str(tmp_path), "--name", name]
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_TARGET_DEVICE="cpu")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=BENCH.parent)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = (tmp_path / f"{name}.csv").read_text().splitlines()
    assert lines[0].startswith("# command: python benchmarks/eval_accuracy.py ")
    rows = list(csv.DictReader(line for line in lines if not line.startswith("#")))
    records = [json.loads(line) for line in (tmp_path / f"{name}_answers.jsonl").read_text().splitlines()]
    assert (tmp_path / f"{name}.md").is_file() and (tmp_path / f"{name}.png").is_file()
    return rows, records


@pytest.mark.engine
@pytest.mark.slow
def test_eval_script_csv_and_planted_answers(tmp_path):
    problems: list[dict[str, Any]] = [
        {"id": "p1", "problem": "What is 2 + 3?", "answer": "5"},
        {"id": "p2", "problem": "What is 4 * 6?", "answer": 24},
        {"id": "p3", "problem": "What is 10 - 7?", "answer": "3"}]
    expected = {p["id"]: str(p["answer"]) for p in problems}
    rows, records = run_eval(tmp_path, problems, "first")
    assert list(rows[0]) == CSV_COLUMNS
    assert [r["system"] for r in rows] == ["single", "sc N=2", "hogwild N=2 combined"]
    for row in rows:
        mine = [r for r in records if r["system"] == row["system"]]
        assert row["budget"] == "16" and row["problems"] == "3" and len(mine) == 3
        assert int(row["correct"]) == sum(r["correct"] for r in mine)
        assert float(row["accuracy"]) == pytest.approx(int(row["correct"]) / 3)
        assert float(row["forward_passes_mean"]) > 0 and float(row["tokens_mean"]) > 0
        for r in mine:  # scored from the extracted answer it records
            assert r["expected"] == expected[r["id"]]
            assert r["correct"] == _scoring.is_correct(r["answer"], r["expected"])
    # The tiny model writes noise, so plant: p1's expected answer becomes what a system really answered (it must
    # now score), p2's a different number (it must not). Same texts, order and seeds: the same outputs again.
    answered = next(r for r in records if r["id"] == "p1" and r["answer"] is not None)
    system = answered["system"]
    p2 = next(r for r in records if r["id"] == "p2" and r["system"] == system)
    problems[0]["answer"] = answered["answer"]
    problems[1]["answer"] = "1" + (_scoring.normalize_answer(p2["answer"]) or "0")
    rows2, records2 = run_eval(tmp_path, problems, "planted")
    again = {r["id"]: r for r in records2 if r["system"] == system}
    assert again["p1"]["answer"] == answered["answer"], "seeded sampling did not reproduce the first run"
    assert again["p1"]["correct"] is True and again["p2"]["correct"] is False
    row = next(r for r in rows2 if r["system"] == system)
    assert int(row["correct"]) == sum(r["correct"] for r in again.values()) >= 1
