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
