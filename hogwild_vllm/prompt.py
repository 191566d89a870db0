"""The common prompt, the token codec over a Hugging Face tokenizer, and the tokens banned while workers generate."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hogwild_vllm.config import GroupConfig

# Special tokens that end a turn or a thought in common chat templates; banned when the tokenizer has them.
STOP_TOKEN_TEXTS = ("</think>", "<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "<|end|>", "</s>")


class HFCodec:
    """:class:`hogwild_vllm.layout.TokenCodec` over a transformers tokenizer (no special tokens added)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=False))


def build_prompt_ids(tokenizer: Any, problem: str, cfg: GroupConfig) -> list[int]:
    """Token ids of the common prompt: system rules, the problem, the assistant turn, the history header."""
    if not isinstance(problem, str) or not problem.strip():
        raise ValueError("the problem text must be a non-empty string")
    tpl = cfg.templates
    system = tpl.system_text(cfg.worker_names)
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": system}, {"role": "user", "content": problem}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = f"{system}\n\n{problem}\n\n"
    return list(tokenizer.encode(text + tpl.history_header, add_special_tokens=False))


def banned_token_ids(tokenizer: Any, cfg: GroupConfig, eos_token_ids: Sequence[int] = ()) -> list[int]:
    """End-of-sequence / end-of-turn / end-of-thinking tokens, the first token of every step header, and the
    request's own extra ids: no worker may stop the group or fake a header."""
    banned = set(cfg.banned_token_ids) | set(eos_token_ids)
    if tokenizer.eos_token_id is not None:
        banned.add(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    banned.update(vocab[t] for t in STOP_TOKEN_TEXTS if t in vocab)
    codec = HFCodec(tokenizer)
    for name in cfg.worker_names:
        header = codec.encode(cfg.templates.header_text(name, 2, check=False))
        if header:
            banned.add(header[0])
    return sorted(banned)


def eos_token_ids(*values: Any) -> list[int]:
    """End-of-sequence ids from config values that may each be None, one id, or a list of ids (the model config's
    and the generation config's ``eos_token_id``), sorted and without repeats."""
    ids: set[int] = set()
    for eos in values:
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, (list, tuple)):
            ids.update(int(e) for e in eos)
    return sorted(ids)
