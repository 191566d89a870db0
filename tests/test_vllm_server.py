"""``vllm serve`` with the plugin switched on, exercised on 127.0.0.1 with the real ``openai`` client.

Groups go through ``vllm_xargs`` (the options as a JSON string: the field admits no nested objects) and come back in
the response's ``kv_transfer_params["hogwild"]``; bad options are an HTTP 400 naming the option; plain requests run
next to groups.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from vllm_scripts.launch import ENGINE_ENV

from hogwild_vllm.config import GroupConfig
from hogwild_vllm.prompt import build_prompt_ids
from hogwild_vllm.testing.tiny_models import build_tiny_model

pytestmark = [pytest.mark.engine, pytest.mark.server, pytest.mark.slow]
OPTIONS = {"workers": 2, "layout": "combined", "max_tokens": 48,
           "templates": {"step_separator": "\n", "answer_marker": "ANSWER{"}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    model = str(build_tiny_model("qwen2"))
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    vllm = Path(sys.executable).parent / "vllm"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(vllm), "serve", model, "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
             "--max-model-len", "1024", "--block-size", "32", "--enforce-eager", "--seed", "0",
             "--additional-config", json.dumps({"hogwild": {}})],
            stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ, **ENGINE_ENV))
    try:
        import urllib.request

        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"vllm serve exited {proc.returncode}: {log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"vllm serve did not come up: {log.read_text()[-4000:]}")
            time.sleep(1)
        yield f"http://127.0.0.1:{port}/v1", model
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


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
