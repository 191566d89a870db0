"""Long plain runs on AMX CPUs (bf16): where vLLM packs the cache for its AMX kernel, the plugin keeps the ``vec``
packing groups read and attends runs of >= ``AMX_MIN_QUERIES`` queries with vLLM's AMX kernel over a scratch copy
of their keys and values. The copy is exact (the kernel's output equals its output over a cache vLLM wrote itself),
and prompts through the engine, chunked, several in a batch, get bitwise the prompt logprobs of the plugin-off
engine. Contiguous runs are sliced, not gathered."""

from __future__ import annotations

import pytest
import torch

from hogwild_vllm.testing.tiny_models import build_tiny_model

AMX = torch.cpu._is_amx_tile_supported()
needs_amx = pytest.mark.skipif(not AMX, reason="vLLM uses its AMX kernel only on CPUs with AMX tiles")

NUM_KV_HEADS, NUM_HEADS, HEAD_DIM = 2, 4, 64
# (block size, queries, keys): one row ending at its last key, block sizes vLLM packs for AMX (multiples of 32); its
# earlier tokens: none, within the first block, whole blocks and a partial one, all but one
PACK_CASES = [(32, 64, 64), (32, 97, 113), (32, 97, 161), (128, 300, 1000), (128, 1, 129)]


def _vllm_amx_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                        block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """vLLM's AMX kernel, one causal row: query [Q, Hq, D] at positions seq_len - Q .. seq_len - 1 -> [Q, Hq, D]."""
    from vllm import _custom_ops as vllm_ops

    qsl = torch.tensor([0, query.shape[0]], dtype=torch.int32)  # [2]
    seq_lens = torch.tensor([seq_len], dtype=torch.int32)  # [1]
    meta = vllm_ops.cpu_attn_get_scheduler_metadata(1, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, seq_lens, query.dtype, qsl,
                                                    True, -1, "amx", False)
    out = torch.empty_like(query)
    vllm_ops.cpu_attention_with_kv_cache(query, key_cache, value_cache, out, qsl, seq_lens, HEAD_DIM ** -0.5, True,
                                         None, -1, block_table, 0.0, meta, None)
    return out


def _split(cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[num_blocks, Hkv, block_size, 2 * D] -> the key and value halves vLLM's CPU ops take."""
    num_blocks, heads, block_size, two_d = cache.shape
    key, value = cache.view(num_blocks, heads, 2 * block_size, two_d // 2).chunk(2, dim=2)
    return key, value


@needs_amx
@pytest.mark.parametrize(("block_size", "num_queries", "seq_len"), PACK_CASES)
def test_scratch_fill_equals_vllms_own_amx_cache(block_size: int, num_queries: int, seq_len: int) -> None:
    """A run's earlier tokens from the ``vec`` cache pages, its own from the batch: vLLM's AMX kernel over the filled
    scratch equals its output over a cache it wrote itself, bitwise, and the cache is only read."""
    from vllm import _custom_ops as vllm_ops

    from hogwild_vllm.attention.backend import ScratchFill, fill_scratch

    torch.cpu._init_amx()
    gen = torch.Generator().manual_seed(block_size * 1000 + seq_len)
    num_blocks, used, before = 3 * (seq_len // block_size + 1), -(-seq_len // block_size), seq_len - num_queries
    blocks = torch.randperm(num_blocks, generator=gen)[:used]  # [B] the row's blocks, shuffled
    slots = (blocks[:, None] * block_size + torch.arange(block_size)).flatten()[:seq_len]  # [seq_len]
    keys, values = (torch.randn(seq_len, NUM_KV_HEADS, HEAD_DIM, generator=gen).to(torch.bfloat16) for _ in "kv")
    query = torch.randn(num_queries, NUM_HEADS, HEAD_DIM, generator=gen).to(torch.bfloat16)  # [Q, Hq, D]
    shape = (num_blocks, NUM_KV_HEADS, block_size, 2 * HEAD_DIM)

    own = torch.zeros(shape, dtype=torch.bfloat16)  # vLLM's cache on an AMX CPU
    vllm_ops.cpu_attn_reshape_and_cache(keys, values, *_split(own), slots, "amx")
    want = _vllm_amx_attention(query, *_split(own), blocks.view(1, -1).int(), seq_len)

    cache = torch.randn(shape, generator=gen).to(torch.bfloat16)  # the plugin's: "vec" packing over garbage
    vllm_ops.cpu_attn_reshape_and_cache(keys, values, *_split(cache), slots, "vec")
    before_fill = cache.clone()
    pages = blocks[: -(-before // block_size)]  # [P] the blocks holding the tokens before the run's own
    fill = ScratchFill(pages, torch.arange(pages.numel() * block_size), torch.arange(before, seq_len))
    scratch = torch.zeros((used, *shape[1:]), dtype=torch.bfloat16)  # as the builder allocates it
    fill_scratch(scratch, cache, keys[before:], values[before:], fill)
    got = _vllm_amx_attention(query, *_split(scratch), torch.arange(used, dtype=torch.int32).view(1, -1), seq_len)

    assert torch.equal(got, want)
    assert torch.equal(cache, before_fill)


def test_touching_runs_are_one_slice() -> None:
    from hogwild_vllm.attention.backend import _tokens

    assert _tokens([(0, 3077)], torch.device("cpu")) == slice(0, 3077)
    assert _tokens([(4, 2), (6, 3)], torch.device("cpu")) == slice(4, 9)
    index = _tokens([(0, 2), (5, 1)], torch.device("cpu"))
    assert isinstance(index, torch.Tensor) and index.tolist() == [0, 1, 5]


@pytest.fixture(scope="module")
def engine_runs() -> dict[str, dict]:
    from vllm_scripts.launch import Script

    model = str(build_tiny_model("qwen2"))
    scripts = {mode: Script("amx_prefill.py", model, mode) for mode in ("on", "off")}
    return {mode: script.result() for mode, script in scripts.items()}


@needs_amx
@pytest.mark.engine
def test_long_plain_runs_bitwise_vllms_amx_prefill(engine_runs: dict[str, dict]) -> None:
    on, off = engine_runs["on"], engine_runs["off"]
    assert on["amx"] == [True]
    assert [len(lp) for lp in on["logprobs"]] == [512, 160, 96]
    assert on["logprobs"] == off["logprobs"]
    assert on["tokens"] == off["tokens"]


@needs_amx
@pytest.mark.engine
def test_group_prefill_on_the_amx_path_finishes(engine_runs: dict[str, dict]) -> None:
    group = engine_runs["on"]["group"]  # its pass 0: the common prompt (160 tokens) as one AMX run, then the glue
    assert "error" not in group and group["finish_reason"] == "length", group
    assert group["usage"]["prompt_tokens"] == 160 and min(group["usage"]["generated_tokens"]) > 0
