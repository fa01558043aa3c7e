"""Every bad input gets a clear error naming the file, module or field, and a failed run leaves nothing."""

from __future__ import annotations

import json

import pytest
import torch
from adapter_factory import llama_modules, write_adapter
from safetensors.torch import load_file, save_file

from lorafuse.errors import AdapterError, ConfigError, IncompatibleAdaptersError, OutputExistsError
from lorafuse.merging.engine import merge

MODULES = llama_modules(1, ("self_attn.q_proj", "mlp.down_proj"))


@pytest.fixture()
def pair(tmp_path):
    return [write_adapter(tmp_path / f"a{i}", MODULES, seed=i) for i in range(2)]


def test_missing_directory_and_files(tmp_path, pair):
    with pytest.raises(AdapterError, match="no such adapter directory"):
        merge([tmp_path / "nope", pair[0]], progress=False)
    (pair[0] / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match="missing adapter_model.safetensors"):
        merge(pair, progress=False)
    (pair[1] / "adapter_config.json").unlink()
    with pytest.raises(AdapterError, match="missing adapter_config.json"):
        merge(pair[1:], progress=False)


def test_corrupt_files(pair):
    (pair[0] / "adapter_model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(AdapterError, match="a0/adapter_model.safetensors: corrupt"):
        merge(pair, progress=False)
    (pair[1] / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="a1/adapter_config.json: not valid JSON"):
        merge(pair[1:], progress=False)


def test_nan_in_factors_names_module(pair):
    path = pair[1] / "adapter_model.safetensors"
    state = load_file(str(path))
    key = "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"
    state[key][0, 0] = float("nan")
    save_file(state, str(path))
    with pytest.raises(AdapterError, match="model.layers.0.mlp.down_proj.*NaN"):
        merge(pair, progress=False)


def test_shape_mismatch(tmp_path, pair):
    other = write_adapter(tmp_path / "big", {"model.layers.0.self_attn.q_proj": (64, 64)}, seed=5)
    with pytest.raises(IncompatibleAdaptersError, match="model.layers.0.self_attn.q_proj.*shape"):
        merge([pair[0], other], progress=False)


def test_different_base_model(tmp_path, pair):
    other = write_adapter(tmp_path / "other", MODULES, base_model="gpt2")
    with pytest.raises(IncompatibleAdaptersError, match="base model 'gpt2'"):
        merge([pair[0], other], progress=False)
    with pytest.raises(IncompatibleAdaptersError, match="base_model 'meta-llama/Llama-3-8B'"):
        merge(pair, base_model="meta-llama/Llama-3-8B", progress=False)


def test_weights_of_wrong_length(pair):
    with pytest.raises(ConfigError, match="weights: 3 values for 2 adapters"):
        merge(pair, "linear", weights=[1, 2, 3], progress=False)


def test_unknown_method_and_parameter(pair):
    with pytest.raises(ConfigError, match="unknown merge method 'tie'.*did you mean 'ties'"):
        merge(pair, "tie", progress=False)
    with pytest.raises(ConfigError, match="unknown parameter 'densty'.*did you mean 'density'"):
        merge(pair, "ties", densty=0.3, progress=False)


@pytest.mark.parametrize("density", [0.0, 1.5, -0.1])
def test_density_outside_range(pair, density):
    with pytest.raises(ConfigError, match="density"):
        merge(pair, "ties", density=density, progress=False)
    with pytest.raises(ConfigError, match="outside"):
        merge(pair, "ties", densities=[0.5, density], progress=False)


def test_existing_output_refused_and_failed_write_leaves_nothing(tmp_path, pair):
    result = merge(pair, progress=False)
    out = result.save(tmp_path / "out")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        result.save(out)
    result.save(out, overwrite=True)
    bad = merge(pair, progress=False)
    bad.heads = {"task": {"w": "not a tensor"}}  # fails after the adapter files are written
    with pytest.raises(AttributeError):
        bad.save(tmp_path / "failed")
    assert not any(p.name.startswith((".failed", "failed")) for p in tmp_path.iterdir())


@pytest.mark.parametrize("field,value,feature", [
    ("use_dora", True, "DoRA"), ("lora_bias", True, "LoRA bias"), ("peft_type", "IA3", "peft_type IA3"),
    ("bias", "all", "bias='all'")])
def test_unsupported_features_named(tmp_path, field, value, feature):
    path = write_adapter(tmp_path / "x", MODULES, **{field: value})
    with pytest.raises(AdapterError, match=f"unsupported adapter feature: {feature}"):
        merge([path], progress=False)


def test_bin_weights_need_opt_in(tmp_path, pair):
    state = load_file(str(pair[0] / "adapter_model.safetensors"))
    (pair[0] / "adapter_model.safetensors").unlink()
    torch.save(state, pair[0] / "adapter_model.bin")
    with pytest.raises(AdapterError, match="opt-in"):
        merge(pair, progress=False)
    assert merge(pair, progress=False, allow_bin=True).modules


def test_modules_to_save_needs_a_policy(tmp_path):
    head = {"base_model.model.classifier.weight": torch.randn(3, 32), "base_model.model.classifier.bias": torch.zeros(3)}
    paths = [write_adapter(tmp_path / f"h{i}", MODULES, seed=i, extra=head, modules_to_save=["classifier"],
                           task_type="SEQ_CLS") for i in range(2)]
    with pytest.raises(ConfigError, match="modules_to_save.*per_task.*average.*drop"):
        merge(paths, progress=False)
    kept = merge(paths, progress=False, modules_to_save="per_task")
    out = kept.save(tmp_path / "out")
    assert sorted(p.name for p in (out / "task_heads").iterdir()) == ["h0.safetensors", "h1.safetensors"]
    averaged = merge(paths, progress=False, modules_to_save="average")
    assert torch.allclose(averaged.extra_state["base_model.model.classifier.weight"], head["base_model.model.classifier.weight"])
    assert json.loads(json.dumps(averaged.config))["modules_to_save"] == ["classifier"]
    assert not merge(paths, progress=False, modules_to_save="drop").heads


def test_stray_tensors_without_modules_to_save(tmp_path):
    path = write_adapter(tmp_path / "x", MODULES, extra={"base_model.model.lm_head.weight": torch.zeros(2, 2)})
    with pytest.raises(AdapterError, match="not LoRA factors"):
        merge([path], progress=False)
