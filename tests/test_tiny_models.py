"""The project's tiny test models: deterministic, cached, loadable by transformers and vLLM alike."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from hogwild_vllm.testing.corpus import make_documents
from hogwild_vllm.testing.tiny_models import MODEL_KINDS, SPECS, build_tiny_model

REPO = Path(__file__).resolve().parents[1]
USER_Q = "Tom has 12 apples and buys 7 more. How many apples does Tom have now?"


@pytest.fixture(scope="module")
def paths() -> dict[str, Path]:
    return {kind: build_tiny_model(kind) for kind in MODEL_KINDS}


def _load(path: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path).eval()


def _chat_prompt_ids(tok: Any) -> list[int]:
    text = tok.apply_chat_template([{"role": "user", "content": USER_Q}], tokenize=False, add_generation_prompt=True)
    return tok(text + "<think>\n")["input_ids"]


@torch.no_grad()
def _greedy(model: Any, ids: list[int], n: int) -> tuple[list[int], list[float]]:
    """Plain argmax decoding without a stop token (what vLLM's ignore_eos greedy does): ids and their logprobs."""
    x, logprobs = torch.tensor([ids]), []
    for _ in range(n):
        lp = model(x).logits[0, -1].log_softmax(-1)
        nxt = lp.argmax()
        logprobs.append(lp[nxt].item())
        x = torch.cat([x, nxt.view(1, 1)], dim=1)
    return x[0, len(ids):].tolist(), logprobs


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_second_call_is_cached(paths: dict[str, Path]) -> None:
    t0 = time.time()
    again = build_tiny_model("qwen2")
    assert again == paths["qwen2"]
    assert time.time() - t0 < 1.0
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json"} <= set(os.listdir(again))


def test_build_is_deterministic(paths: dict[str, Path], tmp_path: Path) -> None:
    """A fresh build in another folder (another process built the cached one, possibly) gives identical bytes."""
    kind = "gptj"  # the cheapest to train
    fresh = build_tiny_model(kind, cache_dir=tmp_path)
    assert fresh.name == paths[kind].name
    a, b = _files(fresh), _files(paths[kind])
    assert a.keys() == b.keys()
    for name in a:
        assert a[name] == b[name], f"{name} differs between two builds"


_RACE = """
import dataclasses, sys
from hogwild_vllm.testing.tiny_models import SPECS, build_tiny_model
spec = dataclasses.replace(SPECS["qwen2"], train_steps=3, corpus_docs=300)
print(build_tiny_model("qwen2", cache_dir=sys.argv[1], spec=spec))
"""


def test_concurrent_builds_share_one_result(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", _RACE, str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env, cwd=REPO) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    assert outs[0][0] == outs[1][0]
    built = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert [p.name for p in built] == [Path(outs[0][0].strip()).name]  # no temp folder left behind
    assert sum("building" in o[1] for o in outs) == 1  # the second one waited and found it


def test_debris_of_a_killed_build_is_replaced(tmp_path: Path) -> None:
    spec = dataclasses.replace(SPECS["gptj"], train_steps=2, corpus_docs=200)
    final = tmp_path / f"gptj-{spec.cache_key()}"
    (final / "half").mkdir(parents=True)  # a folder without config.json
    (tmp_path / f".{final.name}.dead").mkdir()  # a temp folder left by a killed build
    assert build_tiny_model("gptj", cache_dir=tmp_path, spec=spec) == final
    assert (final / "config.json").is_file() and not (final / "half").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [final.name]


def test_cli_prints_path(paths: dict[str, Path]) -> None:
    out = subprocess.run([sys.executable, "-m", "hogwild_vllm.testing.tiny_models", "--kind", "llama3"],
                         capture_output=True, text=True, cwd=REPO, timeout=300, check=True)
    assert out.stdout.strip() == str(paths["llama3"])


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_hf_loads_and_generates(paths: dict[str, Path], kind: str) -> None:
    from transformers import GenerationConfig

    tok, model = _load(paths[kind])
    assert type(model).__name__ == SPECS[kind].architecture
    assert next(model.parameters()).dtype == torch.float32
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    gen = GenerationConfig.from_pretrained(paths[kind])
    assert tok.eos_token_id == tok.pad_token_id == model.config.eos_token_id == gen.eos_token_id == eos
    assert model.config.pad_token_id == gen.pad_token_id == eos
    for t in ("<|im_start|>", "<|im_end|>", "<think>", "</think>"):
        assert len(tok(t)["input_ids"]) == 1, t
    assert 1500 <= len(tok) <= SPECS[kind].vocab_size + 8 and model.config.vocab_size == len(tok)
    ids = _chat_prompt_ids(tok)
    out = model.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False)
    text = tok.decode(out[0, len(ids):])
    assert re.search(r"[A-Za-z]{3,}", text), text


def test_chat_template(paths: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(paths["qwen2"])
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"},
            {"role": "assistant", "content": "\\boxed{4}"}]
    text = tok.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n"
                    "<|im_start|>assistant\n")
    full = tok.apply_chat_template(msgs, tokenize=False)
    assert full.endswith("<|im_start|>assistant\n\\boxed{4}<|im_end|>\n")
    ids = tok(full)["input_ids"]
    assert tok.decode(ids) == full
    assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 3


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_logit_gap_is_large(paths: dict[str, Path], kind: str) -> None:
    """Greedy decoding is not a sea of near-ties: top-1 minus top-2 logit on held-out text."""
    tok, model = _load(paths[kind])
    docs = make_documents(12, seed=12345)  # not the training seed
    gaps = []
    with torch.no_grad():
        for d in docs:
            ids = torch.tensor([tok(d)["input_ids"][:256]])
            top2 = model(ids).logits[0].topk(2, dim=-1).values
            gaps.append(top2[:, 0] - top2[:, 1])
    median = torch.cat(gaps).median().item()
    assert median > 0.5, median


def test_paragraph_breaks(paths: dict[str, Path]) -> None:
    """Greedy text (end of text banned) has paragraph breaks after a sentence every ~20-80 tokens, and \\boxed{}."""
    tok, model = _load(paths["qwen2"])
    prompts = [_chat_prompt_ids(tok), tok("Problem: Solve for $x$: $3x + 4 = 19$.\n\n")["input_ids"]]
    n, breaks, boxed = 300, 0, 0
    for ids in prompts:
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
        text = tok.decode(out[0, len(ids):])
        breaks += len(re.findall(r"[.?!]\n\n", text))
        boxed += text.count("\\boxed{")
    assert 10 <= len(prompts) * n / max(breaks, 1) <= 80, (breaks, text)
    assert boxed >= 1


def test_rope_settings(paths: dict[str, Path]) -> None:
    from transformers import AutoConfig

    qwen = AutoConfig.from_pretrained(paths["qwen2"])
    assert qwen.rope_parameters["rope_type"] == "default" and qwen.rope_parameters["rope_theta"] == 10000.0
    assert (qwen.num_attention_heads, qwen.num_key_value_heads, qwen.hidden_size) == (4, 2, 256)
    llama = AutoConfig.from_pretrained(paths["llama3"])
    assert llama.rope_parameters == SPECS["llama3"].rope_parameters
    assert llama.rope_parameters["rope_type"] == "llama3" and llama.rope_parameters["factor"] == 8.0
    assert llama.num_key_value_heads < llama.num_attention_heads
    gptj = AutoConfig.from_pretrained(paths["gptj"])
    head_dim = gptj.hidden_size // gptj.num_attention_heads
    assert gptj.rotary_dim == 32 < head_dim == 64
    glm = AutoConfig.from_pretrained(paths["glm4"])
    assert glm.model_type == "glm4" and glm.rope_parameters["partial_rotary_factor"] == 0.5
    from hogwild_vllm.rope import rope_spec_from_hf_config

    spec = rope_spec_from_hf_config(glm, "glm4")
    assert (spec.rotary_dim, spec.head_size, spec.is_neox_style) == (32, 64, False)


_VLLM_SCRIPT = """
import json, sys

def main():
    from vllm import LLM, SamplingParams

    llm = LLM(model=sys.argv[1], dtype="float32", enforce_eager=True, max_model_len=512, seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=1)
    out = llm.generate([{"prompt_token_ids": json.loads(sys.argv[2])}], params)[0].outputs[0]
    lps = [d[t].logprob for t, d in zip(out.token_ids, out.logprobs)]
    print("RESULT=" + json.dumps({"ids": list(out.token_ids), "logprobs": lps}))

if __name__ == "__main__":
    main()
"""


@pytest.mark.slow
@pytest.mark.engine
@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_vllm_greedy_equals_hf(paths: dict[str, Path], kind: str, tmp_path: Path) -> None:
    """fp32 greedy ids (and their logprobs) agree. The ~400-token prompt reaches positions where RoPE details
    matter: e.g. dropping llama3 scaling flips HF's argmax at dozens of positions of such a text."""
    tok, model = _load(paths[kind])
    context = tok("\n\n".join(make_documents(8, seed=777)))["input_ids"][:380]
    ids = context + _chat_prompt_ids(tok)
    assert len(ids) + 16 <= 512
    expected, expected_lps = _greedy(model, ids, 16)
    script = tmp_path / "run_vllm.py"
    script.write_text(_VLLM_SCRIPT)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_TARGET_DEVICE": "cpu",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    res = subprocess.run([sys.executable, str(script), str(paths[kind]), json.dumps(ids)], capture_output=True,
                         text=True, env=env, cwd=tmp_path, timeout=600)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT=")]
    assert res.returncode == 0 and lines, res.stderr[-4000:]
    got = json.loads(lines[-1].split("=", 1)[1])
    assert got["ids"] == expected, (tok.decode(got["ids"]), tok.decode(expected))
    diff = max(abs(a - b) for a, b in zip(got["logprobs"], expected_lps, strict=True))
    print(f"{kind}: max |logprob diff| vLLM vs HF = {diff:.2e}")
    assert got["logprobs"] == pytest.approx(expected_lps, abs=1e-4)  # measured ~1e-5


def test_spec_change_changes_cache_key() -> None:
    spec = SPECS["qwen2"]
    assert spec.cache_key() == dataclasses.replace(spec).cache_key()
    assert spec.cache_key() != dataclasses.replace(spec, seed=1).cache_key()
    assert len({s.cache_key() for s in SPECS.values()}) == len(SPECS)
