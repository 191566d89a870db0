"""The project's own tiny test models, built locally (no model hub needed).

``build_tiny_model(kind)`` returns a directory that both ``transformers`` and vLLM load
offline: a byte-level BPE tokenizer trained on a synthetic corpus (see ``corpus.py``),
a ChatML chat template, and a small randomly initialised transformer that is then
briefly trained on the same corpus so that it writes paragraph-like text.

Kinds: ``qwen2`` (default neox RoPE, GQA), ``llama3`` (``rope_type: llama3`` scaling,
GQA) and ``gptj`` (gptj-style interleaved RoPE on a partial ``rotary_dim``). Benchmark
kinds (``BENCH_KINDS``, not in ``MODEL_KINDS``, so the model tests skip them): ``smollm2``,
SmolLM2-135M's shapes (llama, 30 layers, hidden 576, 9 / 3 heads) with untrained random
weights and the same tokenizer.

Builds are deterministic and cached under ``$HOGWILD_MODEL_CACHE`` (default
``~/.cache/hogwild_vllm/models``) in a folder named by a hash of the spec; a build
happens in a temporary folder under a file lock and is renamed into place.

CLI: ``python -m hogwild_vllm.testing.tiny_models [--kind K] [--all] [--cache-dir D]`` prints
the folders on stdout (progress goes to stderr).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import pathlib
import sys
import time
from typing import Any

from .model_cache import cached_folder, default_cache_dir

BUILDER_VERSION = 1
MODEL_KINDS = ("qwen2", "llama3", "gptj", "glm4")
BENCH_KINDS = ("smollm2",)
EOT, IM_START, IM_END, THINK_OPEN, THINK_CLOSE = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
BUILD_THREADS = 1  # fixed so float reductions (hence weights) never vary; 2+ threads
# also slow down badly when the 2-core machine is busy with other jobs

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@dataclasses.dataclass(frozen=True)
class TinyModelSpec:
    """Everything that determines a tiny model's bytes (together with BUILDER_VERSION)."""

    kind: str
    architecture: str                 # HF class name written to config.json
    rope_parameters: dict[str, Any]   # as transformers 5 spells it in config.json
    rotary_dim: int | None = None     # gptj only: rotary dims per head (< head_dim)
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 64
    intermediate_size: int = 512
    max_position_embeddings: int = 8192  # room for groups: a view holds the prompt and every worker's tokens
    vocab_size: int = 2048            # upper bound: the corpus' words run out at ~1.8k
    corpus_docs: int = 4000
    seed: int = 0
    init_std: float = 0.02            # hidden weights
    head_std: float = 0.2             # lm_head: logit std ~ head_std * sqrt(hidden)
    train_steps: int = 150
    batch_size: int = 8
    seq_len: int = 128
    lr: float = 3e-3

    def cache_key(self) -> str:
        import torch
        import transformers

        blob = json.dumps({"spec": dataclasses.asdict(self), "builder": BUILDER_VERSION,
                           "torch": torch.__version__, "transformers": transformers.__version__},
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


SPECS: dict[str, TinyModelSpec] = {
    "qwen2": TinyModelSpec(
        kind="qwen2", architecture="Qwen2ForCausalLM",
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "llama3": TinyModelSpec(
        kind="llama3", architecture="LlamaForCausalLM",
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 512}),
    "gptj": TinyModelSpec(
        kind="gptj", architecture="GPTJForCausalLM", num_kv_heads=4, rotary_dim=32,
        # GPT-J's HF config has no RoPE fields: theta is fixed at 10000 in both libraries.
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    # Partial rotary (half of each head) with gptj (interleaved) pairing, through transformers' attention interface,
    # so the reference engine runs it too (GPT-J's transformers code does not use that interface).
    "glm4": TinyModelSpec(
        kind="glm4", architecture="Glm4ForCausalLM",
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}),
    # Benchmarks: real per-layer shapes (SmolLM2-135M), random weights (no training), the tiny models' tokenizer.
    "smollm2": TinyModelSpec(
        kind="smollm2", architecture="LlamaForCausalLM",
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0}, hidden_size=576, num_layers=30,
        num_heads=9, num_kv_heads=3, intermediate_size=1536, max_position_embeddings=8192, train_steps=0),
}


def _log(msg: str) -> None:
    print(f"[tiny_models] {msg}", file=sys.stderr, flush=True)


def _train_tokenizer(spec: TinyModelSpec, docs: list[str]) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size, special_tokens=[EOT, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    # Train on the plain text: the ChatML markers are special tokens, not words.
    texts = [d.replace(IM_START, "\n").replace(IM_END, "\n") for d in docs]
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_tokens([THINK_OPEN, THINK_CLOSE])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOT, pad_token=EOT, unk_token=None, bos_token=None,
        additional_special_tokens=[IM_START, IM_END], chat_template=CHAT_TEMPLATE,
        model_max_length=spec.max_position_embeddings, clean_up_tokenization_spaces=False)


def _make_config(spec: TinyModelSpec, vocab: int, eos: int) -> Any:
    from transformers import Glm4Config, GPTJConfig, LlamaConfig, Qwen2Config

    ids = dict(vocab_size=vocab, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
               tie_word_embeddings=False)
    if spec.kind == "gptj":
        return GPTJConfig(n_positions=spec.max_position_embeddings, n_embd=spec.hidden_size,
                          n_layer=spec.num_layers, n_head=spec.num_heads,
                          rotary_dim=spec.rotary_dim, n_inner=spec.intermediate_size,
                          architectures=[spec.architecture], **ids)
    classes = {"Qwen2ForCausalLM": Qwen2Config, "LlamaForCausalLM": LlamaConfig, "Glm4ForCausalLM": Glm4Config}
    cls = classes[spec.architecture]
    extra = {"head_dim": spec.head_dim} if cls is not Qwen2Config else {}
    assert spec.hidden_size == spec.num_heads * spec.head_dim
    return cls(hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
               num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
               num_key_value_heads=spec.num_kv_heads, rms_norm_eps=1e-6,
               max_position_embeddings=spec.max_position_embeddings,
               rope_parameters=dict(spec.rope_parameters), architectures=[spec.architecture],
               **extra, **ids)


def _init_weights(model: Any, spec: TinyModelSpec) -> None:
    """Seeded init, independent of HF's own init order: one generator per parameter."""
    import torch

    residual_out = ("o_proj", "down_proj", "out_proj", "fc_out")
    with torch.no_grad():
        for i, (name, p) in enumerate(sorted(model.named_parameters())):
            gen = torch.Generator().manual_seed(spec.seed * 100003 + i)
            if p.ndim == 1:  # norms' weights get 1, every bias 0
                p.fill_(1.0 if name.endswith("weight") else 0.0)
                continue
            std = spec.head_std if name.startswith("lm_head") else spec.init_std
            if any(k in name for k in residual_out):
                std /= math.sqrt(2 * spec.num_layers)
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * std)


def _train(model: Any, spec: TinyModelSpec, ids: Any) -> None:
    import torch

    gen = torch.Generator().manual_seed(spec.seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.95),
                            weight_decay=0.01)
    warmup = max(1, spec.train_steps // 10)
    model.train()
    t0, c0 = time.time(), time.process_time()
    for step in range(spec.train_steps):
        frac = min(1.0, (step + 1) / warmup)
        decay = 0.5 * (1 + math.cos(math.pi * step / spec.train_steps))
        for g in opt.param_groups:
            g["lr"] = spec.lr * frac * (0.1 + 0.9 * decay)
        starts = torch.randint(0, len(ids) - spec.seq_len, (spec.batch_size,), generator=gen)
        x = torch.stack([ids[s:s + spec.seq_len] for s in starts.tolist()])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == spec.train_steps - 1:
            _log(f"{spec.kind}: step {step} loss {loss.item():.3f} "
                 f"({time.time() - t0:.1f}s wall, {time.process_time() - c0:.1f}s cpu)")
    model.eval()


def _build_into(spec: TinyModelSpec, out: pathlib.Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from .corpus import make_documents

    docs = make_documents(spec.corpus_docs, spec.seed)
    tokenizer = _train_tokenizer(spec, docs)
    eos = tokenizer.convert_tokens_to_ids(EOT)
    config = _make_config(spec, len(tokenizer), eos)
    threads = torch.get_num_threads()
    det = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(BUILD_THREADS)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        torch.manual_seed(spec.seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        _init_weights(model, spec)
        stream = tokenizer.backend_tokenizer.encode(EOT.join(docs) + EOT).ids
        _train(model, spec, torch.tensor(stream, dtype=torch.long))
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(det[0], warn_only=det[1])
    model.generation_config = GenerationConfig(bos_token_id=eos, eos_token_id=eos,
                                               pad_token_id=eos)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "tiny_model_spec.json").write_text(
        json.dumps({"spec": dataclasses.asdict(spec), "builder": BUILDER_VERSION}, indent=2))


def build_tiny_model(kind: str = "qwen2", cache_dir: str | os.PathLike | None = None,
                     spec: TinyModelSpec | None = None) -> pathlib.Path:
    """Build (or find in the cache) the tiny model of ``kind``; return its folder.

    ``spec`` overrides the built-in spec of ``kind`` (tests use cheaper ones).
    """
    if spec is None:
        if kind not in SPECS:
            raise ValueError(f"unknown tiny model kind {kind!r}; choose from {MODEL_KINDS + BENCH_KINDS}")
        spec = SPECS[kind]
    root = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = root / f"{spec.kind}-{spec.cache_key()}"
    return cached_folder(final, lambda tmp: _build_into(spec, tmp), spec.kind, _log)


def tiny_model_path(kind: str = "qwen2") -> pathlib.Path:
    """The default-cache folder of ``kind``, built on first use."""
    return build_tiny_model(kind)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Build the project's tiny test models.")
    ap.add_argument("--kind", default="qwen2", choices=MODEL_KINDS + BENCH_KINDS)
    ap.add_argument("--all", action="store_true", help="build every test kind (MODEL_KINDS)")
    ap.add_argument("--cache-dir", default=None)
    args = ap.parse_args(argv)
    for kind in MODEL_KINDS if args.all else (args.kind,):
        print(build_tiny_model(kind, args.cache_dir), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
