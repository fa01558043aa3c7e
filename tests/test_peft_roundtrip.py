"""The saved adapter is PEFT's own format: `PeftModel.from_pretrained` loads it and gives the logits of the base
model plus the dense fused update (Llama, BERT and GPT-2 shapes; GPT-2 uses fan_in_fan_out Conv1D)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from adapter_factory import llama_modules, write_adapter

from lorafuse.merging.engine import merge

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def tiny_llama():
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg), llama_modules(2)


def tiny_gpt2():
    cfg = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    shapes = {"attn.c_attn": (96, 32), "attn.c_proj": (32, 32), "mlp.c_fc": (128, 32), "mlp.c_proj": (32, 128)}
    return transformers.GPT2LMHeadModel(cfg), {f"transformer.h.{i}.{n}": s for i in range(2) for n, s in shapes.items()}


def tiny_bert():
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, num_labels=3)
    shapes = {"attention.self.query": (32, 32), "attention.self.value": (32, 32), "intermediate.dense": (64, 32),
              "output.dense": (32, 64)}
    return transformers.BertForSequenceClassification(cfg), {
        f"bert.encoder.layer.{i}.{n}": s for i in range(2) for n, s in shapes.items()}


def add_updates(model, result, transpose: bool):
    """Independent reference: the base model with each fused dense update added to its weight."""
    ref = copy.deepcopy(model)
    params = dict(ref.named_parameters())
    with torch.no_grad():
        for module in result.modules:
            delta = result.delta(module)
            params[f"{module}.weight"] += delta.T if transpose else delta
    return ref


@pytest.mark.parametrize("builder,fan_in_fan_out,task_type", [
    (tiny_llama, False, "CAUSAL_LM"), (tiny_gpt2, True, "CAUSAL_LM"), (tiny_bert, False, "SEQ_CLS")])
@pytest.mark.parametrize("method,params", [("task_arithmetic", {}), ("ties", {"density": 0.5})])
def test_saved_adapter_loads_in_peft(tmp_path, builder, fan_in_fan_out, task_type, method, params):
    torch.manual_seed(0)
    model, modules = builder()
    model.eval()
    model.save_pretrained(tmp_path / "base")
    paths = [write_adapter(tmp_path / f"a{i}", modules, r=4, alpha=8, seed=i, base_model=str(tmp_path / "base"),
                           fan_in_fan_out=fan_in_fan_out, task_type=task_type, rslora=(i == 1)) for i in range(2)]
    result = merge(paths, method, progress=False, **params)
    out = result.save(tmp_path / "fused")
    ids = torch.randint(0, 100, (2, 9))
    reference = add_updates(model, result, fan_in_fan_out)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(out))
    with torch.no_grad():
        got, want = loaded(input_ids=ids).logits, reference(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(want, model(input_ids=ids).logits, atol=1e-4)  # the update is not negligible


@pytest.mark.parametrize("rank_patterns", [False, True])
def test_mixed_rank_output_reloads(tmp_path, rank_patterns):
    """Modules of different output ranks (a cat of r=4 on every module and r=2 on attention only): by default one
    rank, the smaller modules zero-padded, no patterns; with rank_patterns, rank_pattern/alpha_pattern. Both
    reload in PEFT with logits equal to the base plus the fused updates."""
    from safetensors import safe_open

    model, modules = tiny_llama()
    model.save_pretrained(tmp_path / "base")
    attn = {m: s for m, s in modules.items() if "self_attn" in m}
    a = write_adapter(tmp_path / "a", modules, r=4, alpha=4, seed=0, base_model=str(tmp_path / "base"))
    b = write_adapter(tmp_path / "b", attn, r=2, alpha=4, seed=1, base_model=str(tmp_path / "base"))
    result = merge([a, b], "cat", progress=False, rank_patterns=rank_patterns)
    out = result.save(tmp_path / "fused")
    cfg = json.loads((out / "adapter_config.json").read_text())
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        ranks = {k: f.get_slice(k).get_shape()[0 if "lora_A" in k else 1] for k in f.keys()}
    if rank_patterns:
        assert cfg["rank_pattern"] and cfg["rank_pattern"] == cfg["alpha_pattern"]
        assert len(set(ranks.values())) == 2
    else:
        assert cfg["rank_pattern"] == {} and cfg["alpha_pattern"] == {}
        assert cfg["r"] == cfg["lora_alpha"] == 6 and set(ranks.values()) == {6}
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(out))
    ids = torch.randint(0, 100, (1, 7))
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, add_updates(model, result, False)(input_ids=ids).logits,
                              atol=1e-5)


def test_output_model_equals_base_plus_update(tmp_path):
    from lorafuse.adapters.export import write_merged_model

    model, modules = tiny_llama()
    model.save_pretrained(tmp_path / "base")
    paths = [write_adapter(tmp_path / f"a{i}", modules, seed=i, base_model=str(tmp_path / "base")) for i in range(2)]
    result = merge(paths, "average", progress=False)
    write_merged_model(result, tmp_path / "base", tmp_path / "merged")
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    ids = torch.randint(0, 100, (1, 7))
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, add_updates(model, result, False)(input_ids=ids).logits,
                              atol=1e-5)
