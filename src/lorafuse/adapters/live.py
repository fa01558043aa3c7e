"""`lorafuse check --engine peft|transformers`, live: the adapter is loaded by PEFT itself (`PeftModel
.from_pretrained`) or by transformers' PEFT integration (`PreTrainedModel.load_adapter`) onto a model, and each
module's ΔW as that engine computes it is compared with lorafuse's own reading of the files (s·B·A with the
config's scale). The model is the given local base model, else a tiny one built from the adapter's shapes (a
Linear, Conv1D or Embedding at every stored module and head path), so no download and no real weights are needed.

What this catches that the replayed rules cannot: modules the engine leaves out (a `target_modules` that lists fewer
modules than the file stores: their factors are silently dropped), modules it wraps but finds no factors for (left
at their initial zero update), heads stored but not loaded, scales it applies differently."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lorafuse.adapters.engines import PREFIX, AdapterLayout, Finding, peft_scaling

LIVE_ENGINES = ("peft", "transformers")
ATOL = 1e-5  # relative to the largest |ΔW| entry: float32 products of the same factors


def live_findings(path: str | Path, layout: AdapterLayout, engine: str, base_model: str | None = None) -> list[Finding]:
    """The findings of loading `path` with `engine` and comparing its ΔW and heads with the files'."""
    try:
        import peft  # noqa: F401
    except ImportError:
        return [Finding("live load", True, "PEFT is not installed: only the replayed rules were checked")]
    try:
        model = _loaded(Path(path), layout, engine, base_model)
    except Exception as exc:  # the engine's own failure is the finding
        return [Finding("live load", False, f"{_engine_call(engine)} fails: {type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:300] if str(exc) else ''}", "fix what the error names")]
    where = f"base model {base_model}" if base_model else "a tiny model built from the adapter's shapes"
    return [Finding("live load", True, f"{_engine_call(engine)} loads it onto {where}"),
            _delta_finding(Path(path), layout, model, engine), _heads_finding(Path(path), layout, model)]


def _engine_call(engine: str) -> str:
    return "PeftModel.from_pretrained" if engine == "peft" else "transformers' model.load_adapter"


# -- the model ---------------------------------------------------------------------------------------------------
def _set_module(root: torch.nn.Module, dotted: str, module: torch.nn.Module) -> None:
    """Place `module` at `dotted`, creating empty containers on the way (digits are fine as module names)."""
    *parents, leaf = dotted.split(".")
    node = root
    for part in parents:
        if not hasattr(node, part):
            node.add_module(part, torch.nn.Module())
        node = getattr(node, part)
    node.add_module(leaf, module)


def _target_layer(shape_out: int, shape_in: int, embedding: bool, fan_in_fan_out: bool) -> torch.nn.Module:
    if embedding:  # lora_embedding_A is r×num_embeddings, lora_embedding_B dim×r
        return torch.nn.Embedding(shape_in, shape_out)
    if fan_in_fan_out:  # GPT-2's Conv1D stores its weight as in×out
        from transformers.pytorch_utils import Conv1D

        return Conv1D(shape_out, shape_in)
    return torch.nn.Linear(shape_in, shape_out)


def _heads(layout: AdapterLayout) -> dict[str, dict[str, tuple[int, ...]]]:
    """modules_to_save tensors by module path: {'classifier': {'weight': (3, 32), 'bias': (3,)}}."""
    found: dict[str, dict[str, tuple[int, ...]]] = {}
    for key in layout.other_keys:
        module, _, leaf = key.removeprefix(PREFIX).rpartition(".")
        found.setdefault(module, {})[leaf] = layout.shapes[key]
    return found


def tiny_model(layout: AdapterLayout) -> torch.nn.Module:
    """A module tree with a layer of each stored module's shape at its path, and each head's."""
    root = torch.nn.Module()
    fan = bool(layout.config.get("fan_in_fan_out"))
    for module, f in layout.modules.items():
        _set_module(root, module, _target_layer(f.b_shape[0], f.a_shape[1], f.embedding, fan))
    for module, tensors in _heads(layout).items():
        weight = tensors.get("weight", (1, 1))
        layer = torch.nn.Linear(weight[-1], weight[0], bias="bias" in tensors)
        _set_module(root, module, layer)
    return root


def _transformers_model(layout: AdapterLayout) -> Any:
    """The tiny module tree inside a transformers PreTrainedModel (load_adapter is a PreTrainedModel method)."""
    from transformers import PretrainedConfig, PreTrainedModel

    class TinyFromShapes(PreTrainedModel):
        config_class = PretrainedConfig
        base_model_prefix = ""

        def __init__(self, config: PretrainedConfig) -> None:
            super().__init__(config)
            for name, child in tiny_model(layout).named_children():
                self.add_module(name, child)

    return TinyFromShapes(PretrainedConfig())


def _base(layout: AdapterLayout, base_model: str) -> Any:
    """The real base model in the class the adapter's task_type implies (a head of the stored head's size)."""
    import transformers

    task = layout.config.get("task_type")
    if task == "SEQ_CLS":
        rows = next((t["weight"][0] for t in _heads(layout).values() if "weight" in t), 2)
        return transformers.AutoModelForSequenceClassification.from_pretrained(base_model, num_labels=rows)
    if task == "CAUSAL_LM":
        return transformers.AutoModelForCausalLM.from_pretrained(base_model)
    return transformers.AutoModel.from_pretrained(base_model)


def _loaded(path: Path, layout: AdapterLayout, engine: str, base_model: str | None) -> Any:
    """The model with the adapter loaded by `engine`; its LoRA layers hold the adapter as `default`."""
    import peft

    model = _base(layout, base_model) if base_model else None
    if engine == "transformers":
        model = model if model is not None else _transformers_model(layout)
        model.load_adapter(str(path), adapter_name="default")
        return model
    model = model if model is not None else tiny_model(layout)
    config = peft.PeftConfig.from_pretrained(str(path))
    if base_model is None:
        config.task_type = None  # a bare module tree has no transformers task wrapper; heads still load
    return peft.PeftModel.from_pretrained(model, str(path), config=config)


# -- the comparison ------------------------------------------------------------------------------------------------
def _file_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


def _lorafuse_delta(layout: AdapterLayout, tensors: dict[str, torch.Tensor], module: str) -> torch.Tensor:
    """ΔW = s·B·A (out×in) as lorafuse reads the files."""
    f = layout.modules[module]
    a, b = ("lora_embedding_A", "lora_embedding_B") if f.embedding else ("lora_A.weight", "lora_B.weight")
    A, B = tensors[f"{PREFIX}{module}.{a}"].double(), tensors[f"{PREFIX}{module}.{b}"].double()
    return peft_scaling(layout.config, module) * (B @ A)


def _engine_deltas(model: Any) -> dict[str, torch.Tensor]:
    """Every LoRA layer's ΔW as the engine computes it (out×in), by module path relative to the bare model."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.scaling:
            delta = module.get_delta_weight("default").double()
            transposed = isinstance(module, torch.nn.Embedding) or getattr(module, "fan_in_fan_out", False)
            out[_bare(name)] = delta.T if transposed else delta
    return out


def _bare(name: str) -> str:
    """A module's path as the adapter names it (PEFT's wrapper prefixes `base_model.model.`)."""
    return name.removeprefix("base_model.model.")


def _delta_finding(path: Path, layout: AdapterLayout, model: Any, engine: str) -> Finding:
    tensors = _file_tensors(path)
    got = _engine_deltas(model)
    stored = set(layout.modules)
    dropped = sorted(stored - set(got))
    extra = sorted(set(got) - stored)
    wrong = []
    for module in sorted(stored & set(got)):
        want = _lorafuse_delta(layout, tensors, module)
        if got[module].shape != want.shape or not torch.allclose(
                got[module], want, atol=ATOL * max(float(want.abs().max()), 1e-12), rtol=0):
            wrong.append(module)
    if dropped:
        return Finding("ΔW", False, f"{len(dropped)} of {len(stored)} stored modules are not loaded by "
                       f"{_engine_call(engine)} ({dropped[0]}): target_modules does not name them, so their factors "
                       "are silently dropped", "list every stored module in target_modules")
    if wrong or extra:
        what = (f"{len(wrong)} modules get a ΔW other than the file's s·B·A ({wrong[0]})" if wrong else
                f"{len(extra)} modules are wrapped with no factors in the file ({extra[0]}): left at their init")
        return Finding("ΔW", False, what, "fix r/lora_alpha/rank_pattern or target_modules in adapter_config.json")
    return Finding("ΔW", True, f"every one of {len(stored)} modules: the engine's ΔW equals lorafuse's s·B·A "
                   f"(max |diff| ≤ {ATOL:g} of the largest entry)")


def _heads_finding(path: Path, layout: AdapterLayout, model: Any) -> Finding:
    stored = _heads(layout)
    if not stored:
        return Finding("heads", True, "no head tensors stored")
    tensors = _file_tensors(path)
    modules = dict(model.named_modules())
    wrong = []
    for head in stored:
        loaded = _loaded_head(modules, head)
        for leaf in stored[head]:
            want = tensors[f"{PREFIX}{head}.{leaf}"]
            value = getattr(loaded, leaf, None) if loaded is not None else None
            if value is None or value.shape != want.shape or not torch.equal(value.detach().to(want.dtype), want):
                wrong.append(f"{head}.{leaf}")
    if wrong:
        return Finding("heads", False, f"{len(wrong)} head tensors stored but not in the loaded model ({wrong[0]}): "
                       "modules_to_save does not name them", "list the head in modules_to_save")
    return Finding("heads", True, f"the stored head ({', '.join(stored)}) is the loaded one")


def _loaded_head(modules: dict[str, torch.nn.Module], head: str) -> torch.nn.Module | None:
    """The head module as the engine runs it: PEFT's modules_to_save copy where it wrapped one."""
    for name, module in modules.items():
        if _bare(name) == head:
            copies = getattr(module, "modules_to_save", None)
            return copies["default"] if copies is not None and "default" in copies else module
    return None
