"""``vllm serve`` with the plugin switched on, exercised on 127.0.0.1 with the real ``openai`` client.

Groups go through ``vllm_xargs`` (the options as a JSON string: the field admits no nested objects) and come back in
the response's ``kv_transfer_params["hogwild"]``; bad options are an HTTP 400 naming the option; plain requests run
next to groups.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from vllm_scripts.launch import ENGINE_ENV

from hogwild_vllm.config import GroupConfig
from hogwild_vllm.prompt import build_prompt_ids
from hogwild_vllm.testing.server import vllm_server
from hogwild_vllm.testing.tiny_models import build_tiny_model

pytestmark = [pytest.mark.engine, pytest.mark.server, pytest.mark.slow]
OPTIONS = {"workers": 2, "layout": "combined", "max_tokens": 48,
           "templates": {"step_separator": "\n", "answer_marker": "ANSWER{"}}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    model = str(build_tiny_model("qwen2"))
    log = tmp_path_factory.mktemp("server") / "server.log"
    with vllm_server(model, log, "--dtype", "float32", "--max-model-len", "1024", "--block-size", "32",
                     "--enforce-eager", "--seed", "0", env=ENGINE_ENV) as base:
        yield base, model


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server[0], api_key="none", timeout=600)


def test_group_over_completions_equals_reference(server, client):
    from transformers import AutoTokenizer

    from hogwild_vllm.reference_engine import ReferenceEngine

    model = server[1]
    cfg = GroupConfig.from_dict(OPTIONS)
    prompt = build_prompt_ids(AutoTokenizer.from_pretrained(model), "What is 5 + 6?", cfg)
    resp = client.completions.create(model=model, prompt=prompt, max_tokens=1, temperature=0.0,
                                     extra_body={"vllm_xargs": {"hogwild": json.dumps(OPTIONS)}})
    result = resp.model_dump()["kv_transfer_params"]["hogwild"]
    ref = ReferenceEngine(model).generate(prompt_ids=prompt, cfg=cfg)
    assert [w["token_ids"] for w in result["workers"]] == [w.token_ids for w in ref.workers]
    assert result["transcript"] == ref.transcript
    assert resp.choices[0].finish_reason == "length"
    assert resp.choices[0].text  # the transcript, detokenized by the server


def test_group_over_chat_completions(server, client):
    resp = client.chat.completions.create(
        model=server[1], messages=[{"role": "user", "content": "Name two colours."}], max_tokens=1,
        temperature=0.0, extra_body={"vllm_xargs": {"hogwild": json.dumps(OPTIONS)}})
    result = resp.model_dump()["kv_transfer_params"]["hogwild"]
    assert [w["name"] for w in result["workers"]] == ["Alice", "Bob"]
    assert result["usage"]["generated_tokens"][0] > 0


def test_bad_options_are_a_400_naming_the_option(server, client):
    import openai

    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=server[1], prompt="Hi", max_tokens=1,
                                  extra_body={"vllm_xargs": {"hogwild": json.dumps({"workers": 0})}})
    assert "'workers' must be an integer in 1..16" in str(info.value)
    with pytest.raises(openai.BadRequestError, match="not valid JSON"):
        client.completions.create(model=server[1], prompt="Hi", max_tokens=1,
                                  extra_body={"vllm_xargs": {"hogwild": "{workers"}})


def test_plain_requests_unaffected(server, client):
    resp = client.completions.create(model=server[1], prompt="The sum of 3 and 4 is", max_tokens=8,
                                     temperature=0.0)
    assert resp.choices[0].finish_reason == "length"
    assert resp.model_dump().get("kv_transfer_params") is None


def test_streamed_choices_are_the_workers_live(server, client):
    """n = workers: each worker is a choice, streamed as it is generated; the deltas reassemble to the
    non-streamed response, which equals the reference engine (greedy); every choice ends with the result."""
    from transformers import AutoTokenizer

    from hogwild_vllm.reference_engine import ReferenceEngine

    model = server[1]
    tokenizer = AutoTokenizer.from_pretrained(model)
    cfg = GroupConfig.from_dict(OPTIONS)
    prompt = build_prompt_ids(tokenizer, "What is 7 + 8?", cfg)
    options = json.dumps({k: v for k, v in OPTIONS.items() if k != "workers"})  # workers default to n
    request = dict(model=model, prompt=prompt, max_tokens=1, temperature=0.0, n=cfg.workers,
                   extra_body={"vllm_xargs": {"hogwild": options}})
    texts, chunks, finish, stop = [""] * cfg.workers, [0] * cfg.workers, [None] * cfg.workers, [None] * cfg.workers
    for chunk in client.completions.create(stream=True, **request):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            chunks[choice.index] += 1
            if choice.finish_reason is not None:
                finish[choice.index] = choice.finish_reason
                stop[choice.index] = (choice.model_extra or {}).get("stop_reason")
    whole = client.completions.create(**request)
    assert [c.text for c in sorted(whole.choices, key=lambda c: c.index)] == texts
    ref = ReferenceEngine(model).generate(prompt_ids=prompt, cfg=cfg)
    assert texts == [tokenizer.decode(w.token_ids) for w in ref.workers]
    assert all(n > 10 for n in chunks), chunks  # token by token, not one piece at the end
    assert finish == ["length"] * cfg.workers
    for s in stop:
        summary = json.loads(s)["hogwild"]
        assert summary["transcript"] == ref.transcript and summary["usage"]["forward_passes"] > 1
    result = whole.model_dump()["kv_transfer_params"]["hogwild"]
    assert [w["token_ids"] for w in result["workers"]] == [w.token_ids for w in ref.workers]


def test_streamed_chat_choices(server, client):
    stream = client.chat.completions.create(
        model=server[1], messages=[{"role": "user", "content": "Name two colours."}], n=2, temperature=1.0,
        seed=3, stream=True, extra_body={"vllm_xargs": {"hogwild": json.dumps(OPTIONS)}})
    content = ["", ""]
    for chunk in stream:
        for choice in chunk.choices:
            content[choice.index] += choice.delta.content or ""
    assert content[0].startswith("**Alice [1]:**") and content[1].startswith("**Bob [1]:**")


def test_choices_that_disagree_with_workers_are_a_400(server, client):
    import openai

    with pytest.raises(openai.BadRequestError, match="n=3 asks for one choice per worker"):
        client.completions.create(model=server[1], prompt="Hi", max_tokens=1, n=3,
                                  extra_body={"vllm_xargs": {"hogwild": json.dumps(OPTIONS)}})


def test_stream_client_example(server):
    """examples/stream_client.py against the real server: every worker's text appears, tagged, then the result."""
    script = Path(__file__).resolve().parents[1] / "examples" / "stream_client.py"
    options = json.dumps({k: v for k, v in OPTIONS.items() if k not in ("workers", "max_tokens")})
    run = subprocess.run([sys.executable, str(script), "What is 2 + 2?", "--base-url", server[0], "--model",
                          server[1], "--workers", "2", "--max-tokens", "32", "--options", options, "--transcript"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "[Alice] **Alice [1]:** Hi, I'm Alice." in run.stdout and "[Bob] **Bob [1]:**" in run.stdout
    assert "== finish: length" in run.stdout and "== transcript" in run.stdout


def kv_usage(base: str) -> float:
    """The server's KV cache usage (0..1) from its Prometheus metrics."""
    import urllib.request

    with urllib.request.urlopen(base.removesuffix("/v1") + "/metrics", timeout=10) as r:
        text = r.read().decode()
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith("vllm:kv_cache_usage_perc")]
    assert values, "no vllm:kv_cache_usage_perc in /metrics"
    return sum(values)


def _streamed_group(client, model: str, prompt: list[int], options: str) -> list[str]:
    texts = ["", ""]
    for chunk in client.completions.create(model=model, prompt=prompt, max_tokens=1, temperature=0.0, n=2,
                                           stream=True, extra_body={"vllm_xargs": {"hogwild": options}}):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    return texts


def _streamed_plain(client, model: str, prompt: str) -> str:
    stream = client.completions.create(model=model, prompt=prompt, max_tokens=24, temperature=0.0, stream=True)
    return "".join(choice.text for chunk in stream for choice in chunk.choices)


def test_load_of_streaming_groups_and_plain_requests(server, client):
    """16 streaming groups and 16 streaming plain requests at once: no error, each result equal to the same
    request alone, and every KV block back at the end."""
    from concurrent.futures import ThreadPoolExecutor

    from transformers import AutoTokenizer

    base, model = server
    tokenizer = AutoTokenizer.from_pretrained(model)
    options = json.dumps({**{k: v for k, v in OPTIONS.items() if k != "workers"}, "max_tokens": 32})
    cfg = GroupConfig.from_dict({**OPTIONS, "max_tokens": 32})
    groups = [build_prompt_ids(tokenizer, f"Problem {k}: what is {k} + {k + 3}?", cfg) for k in range(16)]
    plains = [f"Story {k}: once upon a time the number {k}" for k in range(16)]
    start = kv_usage(base)
    with ThreadPoolExecutor(max_workers=32) as pool:
        group_futures = [pool.submit(_streamed_group, client, model, p, options) for p in groups]
        plain_futures = [pool.submit(_streamed_plain, client, model, p) for p in plains]
        together = [f.result(timeout=600) for f in group_futures], [f.result(timeout=600) for f in plain_futures]
    assert all(len(texts) == 2 and all(texts) for texts in together[0])
    for k in (0, 7, 15):  # alone, one at a time: the same tokens (greedy; batching changes nothing)
        assert _streamed_group(client, model, groups[k], options) == together[0][k]
        assert _streamed_plain(client, model, plains[k]) == together[1][k]
    deadline = time.monotonic() + 10
    while kv_usage(base) != start and time.monotonic() < deadline:
        time.sleep(0.1)
    assert kv_usage(base) == start


def test_client_disconnect_frees_the_group_within_a_second(server, client):
    import httpx

    base, model = server
    from transformers import AutoTokenizer

    cfg = GroupConfig.from_dict({**OPTIONS, "max_tokens": 200})  # a view of ~800 positions: fits 1024
    prompt = build_prompt_ids(AutoTokenizer.from_pretrained(model), "A long problem: count to 200.", cfg)
    options = json.dumps({**{k: v for k, v in OPTIONS.items() if k != "workers"}, "max_tokens": 200})
    start = kv_usage(base)
    body = {"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0.0, "n": 2, "stream": True,
            "vllm_xargs": {"hogwild": options}}
    with httpx.Client(timeout=60) as http, http.stream("POST", f"{base}/completions", json=body) as resp:
        assert resp.status_code == 200
        lines = 0
        for line in resp.iter_lines():
            assert '"error"' not in line, line
            lines += line.startswith("data: {")
            if lines >= 6:
                break
        during = kv_usage(base)
    gone = time.monotonic()  # the connection is closed here
    while kv_usage(base) != start and time.monotonic() - gone < 1.0:
        time.sleep(0.02)
    freed_after = time.monotonic() - gone
    assert during > start and kv_usage(base) == start, (start, during, freed_after)
    assert freed_after < 1.0
    assert _streamed_plain(client, model, "After the disconnect, the server")  # still serving


def test_group_too_long_for_the_engine_is_a_400(server, client):
    import openai

    options = json.dumps({**OPTIONS, "max_tokens": 900})  # two workers' views of 1800+ positions; the engine has 1024
    with pytest.raises(openai.BadRequestError, match="exceeds max_model_len 1024") as info:
        client.completions.create(model=server[1], prompt="Hi", max_tokens=1,
                                  extra_body={"vllm_xargs": {"hogwild": options}})
    assert "extra_args.hogwild" in str(info.value)
    assert _streamed_plain(client, server[1], "After the refusal, the server")  # nothing else affected


def scrape(base: str) -> dict[str, float]:
    """The hogwild series of the server's /metrics: name (with labels) -> value."""
    import urllib.request

    with urllib.request.urlopen(base.removesuffix("/v1") + "/metrics", timeout=10) as r:
        text = r.read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith("hogwild:")}


def test_metrics_scrape(server, client):
    from transformers import AutoTokenizer

    base, model = server
    cfg = GroupConfig.from_dict({**OPTIONS, "max_tokens": 120})
    prompt = build_prompt_ids(AutoTokenizer.from_pretrained(model), "Metrics: what is 9 + 9?", cfg)
    options = json.dumps({**{k: v for k, v in OPTIONS.items() if k != "workers"}, "max_tokens": 120})
    before = scrape(base)
    running = []
    stream = client.completions.create(model=model, prompt=prompt, max_tokens=1, temperature=0.0, n=2, stream=True,
                                       extra_body={"vllm_xargs": {"hogwild": options}})
    for chunk in stream:
        if len(running) < 50 and chunk.choices and chunk.choices[0].index == 0:
            running.append(scrape(base))
    _streamed_group(client, model, prompt, options)  # the same prompt again: read from the prefix cache
    time.sleep(0.5)
    after = scrape(base)

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert any(m.get("hogwild:groups_running") == 1 and m.get("hogwild:workers_running") == 2 for m in running)
    assert after["hogwild:groups_running"] == 0 and after["hogwild:workers_running"] == 0
    assert delta('hogwild:groups_finished_total{reason="length"}') == 2
    assert delta("hogwild:group_latency_seconds_count") == 2 and delta("hogwild:group_latency_seconds_sum") > 0
    assert delta("hogwild:prompt_tokens_total") == 2 * len(prompt)
    assert delta("hogwild:cached_prompt_tokens_total") >= len(prompt) - 2 * 32  # the second group's, whole blocks
    assert delta("hogwild:committed_steps_total") >= 2 and delta("hogwild:forced_tokens_total") > 0
    # Every worker's own tokens, sampled or forced: the groups ran to their budget of 120 a worker.
    assert delta("hogwild:generated_tokens_total") + delta("hogwild:forced_tokens_total") >= 2 * 2 * 110
