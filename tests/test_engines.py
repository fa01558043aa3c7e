"""`lorafuse check` against independent replays of each engine's loading (tests/engine_loaders.py): on adapters
that must load and adapters that must fail, the check's verdict equals what the replay does — it loads, applies
every tensor, and computes the update the adapter means. The EXPECTED table is the README's "which outputs load
where"."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from adapter_factory import llama_modules, write_adapter

from engine_loaders import (
    LoadError,
    intended_deltas,
    llamacpp_convert,
    lorax_load,
    peft_load,
    sglang_load,
    vllm_load,
)
from lorafuse.adapters.check import check_adapter
from lorafuse.adapters.serving import fit_for_engine
from lorafuse.cli import main
from lorafuse.merging.engine import merge

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

ENGINES = ("vllm", "sglang", "lorax", "llamacpp", "peft")
ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
# case -> engines that load it and compute the update it means (vLLM at its default max_lora_rank 16)
EXPECTED = {
    "fused": dict.fromkeys(ENGINES, True),
    "fused_rank_patterns": {"vllm": True, "sglang": False, "lorax": False, "llamacpp": False, "peft": True},
    "wide": {"vllm": False, "sglang": True, "lorax": True, "llamacpp": True, "peft": True},
    "wide_target_vllm": dict.fromkeys(ENGINES, True),
    "gaps": {"vllm": True, "sglang": False, "lorax": False, "llamacpp": True, "peft": True},
    "gaps_target_lorax": dict.fromkeys(ENGINES, True),
    "head_average": {"vllm": False, "sglang": False, "lorax": False, "llamacpp": False, "peft": True},
    "rslora_input": {"vllm": True, "sglang": False, "lorax": True, "llamacpp": False, "peft": True},
    "seq_cls_without_head": {"vllm": True, "sglang": True, "lorax": True, "llamacpp": True, "peft": False},
}


def _llama(classify: bool = False):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   num_labels=3, pad_token_id=0)
    cls = transformers.LlamaForSequenceClassification if classify else transformers.LlamaForCausalLM
    return cls(cfg).eval()


def _without(modules: dict, drop: str) -> dict:
    return {m: s for m, s in modules.items() if m != drop}


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("engines")
    every = llama_modules(2)
    attn = llama_modules(2, ATTN)
    # mixed ranks and targets: r=4 everywhere, r=2 rsLoRA on attention, r=3 on layer 0's q/v only
    mixed = [write_adapter(root / "a", every, r=4, alpha=8, seed=1),
             write_adapter(root / "b", attn, r=2, alpha=4, seed=2, rslora=True),
             write_adapter(root / "c", {m: every[m] for m in ("model.layers.0.self_attn.q_proj",
                                                              "model.layers.0.self_attn.v_proj")}, r=3, alpha=3, seed=3)]
    out = {"fused": merge(mixed, "cat", progress=False).save(root / "fused"),
           "fused_rank_patterns": merge(mixed, "cat", progress=False, rank_patterns=True).save(root / "patterns")}
    wide_inputs = [write_adapter(root / f"w{i}", every, r=8, alpha=16, seed=10 + i) for i in range(3)]
    out["wide"] = merge(wide_inputs, "cat", progress=False).save(root / "wide")  # rank 24 > 16
    result = merge(wide_inputs, "cat", progress=False)
    fit_for_engine(result, "vllm")
    out["wide_target_vllm"] = result.save(root / "wide_vllm")
    gappy = [write_adapter(root / "g", _without(every, "model.layers.1.self_attn.q_proj"), r=4, alpha=4, seed=5)]
    out["gaps"] = merge(gappy, "linear", progress=False).save(root / "gaps")
    result = merge(gappy, "linear", progress=False)
    fit_for_engine(result, "lorax")
    out["gaps_target_lorax"] = result.save(root / "gaps_lorax")
    heads = [write_adapter(root / f"h{i}", attn, r=4, alpha=8, seed=20 + i, task_type="SEQ_CLS",
                           modules_to_save=["score"], extra={"base_model.model.score.weight": torch.randn(3, 32)})
             for i in range(2)]
    out["head_average"] = merge(heads, "task_arithmetic", progress=False, modules_to_save="average").save(
        root / "head_average")
    out["rslora_input"] = write_adapter(root / "rs", every, r=4, alpha=8, seed=30, rslora=True)
    out["seq_cls_without_head"] = write_adapter(root / "nohead", attn, r=4, alpha=8, seed=31, task_type="SEQ_CLS")
    return out


def replay(engine: str, path: Path) -> bool:
    """Whether the engine's replay loads the adapter, applies every tensor and computes the intended update."""
    cfg = json.loads((path / "adapter_config.json").read_text())
    classify = cfg.get("task_type") == "SEQ_CLS"
    try:
        loaded = {"vllm": lambda: vllm_load(path), "sglang": lambda: sglang_load(path),
                  "lorax": lambda: lorax_load(path, num_layers=2), "llamacpp": lambda: llamacpp_convert(path),
                  "peft": lambda: peft_load(path, _llama(classify))}[engine]()
    except LoadError:
        return False
    want = intended_deltas(path)
    same = set(loaded.deltas) == set(want) and all(
        torch.allclose(loaded.deltas[m], want[m], atol=1e-6, rtol=1e-5) for m in want)
    return same and not loaded.ignored


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("case", list(EXPECTED))
def test_check_agrees_with_the_engine_replay(cases, case, engine):
    verdict = check_adapter(cases[case], engine)
    replayed = replay(engine, cases[case])
    assert replayed == EXPECTED[case][engine], f"replay of {engine} on {case}"
    assert verdict.ok == replayed, verdict.format()


def test_fused_outputs_have_one_true_rank(cases):
    """No patterns, r = lora_alpha = every tensor's rank; the modules' own ranks stay within min(m, n)."""
    from safetensors import safe_open

    for case in ("fused", "wide", "wide_target_vllm", "gaps_target_lorax"):
        cfg = json.loads((cases[case] / "adapter_config.json").read_text())
        assert cfg["rank_pattern"] == {} and cfg["alpha_pattern"] == {} and cfg["r"] == cfg["lora_alpha"]
        with safe_open(str(cases[case] / "adapter_model.safetensors"), "pt") as f:
            for key in f.keys():
                shape = f.get_slice(key).get_shape()
                assert shape[0 if "lora_A" in key else 1] == cfg["r"], key
        provenance = json.loads((cases[case] / "lorafuse_merge.json").read_text())
        assert max(provenance["output"]["ranks"]) <= cfg["r"]
    wide = json.loads((cases["wide"] / "lorafuse_merge.json").read_text())
    assert wide["output"]["ranks"] == [16, 24]  # k/v_proj (16×32) at min(m, n) = 16, the rest at Σr = 24
    assert json.loads((cases["wide_target_vllm"] / "adapter_config.json").read_text())["r"] == 16


def test_failures_name_the_rule_and_the_fix(cases):
    verdict = check_adapter(cases["wide"], "vllm")
    assert [f.rule for f in verdict.failures] == ["max_lora_rank"]
    assert "24 > max_lora_rank 16" in verdict.failures[0].detail and "--max-lora-rank" in verdict.failures[0].fix
    patterns = check_adapter(cases["fused_rank_patterns"], "llamacpp")
    assert [f.rule for f in patterns.failures] == ["scaling"] and "×" in patterns.failures[0].detail
    assert check_adapter(cases["wide"], "vllm", max_lora_rank=32).ok


def test_check_cli(cases, capsys):
    assert main(["check", str(cases["fused"]), "--engine", "vllm", "sglang", "lorax", "llamacpp", "peft"]) == 0
    assert main(["check", str(cases["wide"]), "--engine", "vllm", "--max-lora-rank", "16"]) == 1
    assert "FAIL max_lora_rank" in capsys.readouterr().out
    assert main(["check", str(cases["head_average"]), "--engine", "sglang", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report[0]["ok"] is False and any(f["rule"] == "modules_to_save" and not f["passed"]
                                            for f in report[0]["findings"])
    assert main(["check", str(cases["fused"]), "--engine", "vllm", "--max-lora-rank", "12"]) == 1  # not a vLLM value


def test_merge_target_vllm_picks_the_rank_and_refuses_heads(tmp_path, capsys):
    every = llama_modules(2)
    paths = [str(write_adapter(tmp_path / f"a{i}", every, r=8, alpha=16, seed=i)) for i in range(3)]
    out = tmp_path / "fused"
    assert main(["merge", "--method", "cat", "--adapters", *paths, "-o", str(out), "--target", "vllm",
                 "--max-lora-rank", "16", "--quiet"]) == 0
    assert "vllm: passes" in capsys.readouterr().out
    assert check_adapter(out, "vllm").ok and replay("vllm", out)
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 16
    energy = json.loads((out / "lorafuse_merge.json").read_text())["retained_energy"]
    assert 0.0 < energy["min"] < 1.0  # rank 24 → 16 truncated, recorded
    assert main(["merge", "--method", "cat", "--adapters", *paths, "-o", str(tmp_path / "x"), "--target", "vllm",
                 "--rank", "32"]) == 1
    assert "above max_lora_rank 16" in capsys.readouterr().err
    assert main(["merge", "--adapters", *paths, "-o", str(tmp_path / "y"), "--target", "vllm",
                 "--modules-to-save", "average"]) == 1
    assert "does not load" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


@pytest.mark.parametrize("engine", ["sglang", "lorax", "llamacpp"])
def test_the_suggested_rewrite_passes(cases, tmp_path, engine):
    """The fix a failed rank-pattern check prints (a one-adapter linear merge with --target) is exact and loads."""
    source = cases["fused_rank_patterns"]
    fix = check_adapter(source, engine).failures[0].fix
    command = fix[fix.index("`lorafuse ") + len("`lorafuse "):fix.rindex("`")].replace("OUT", str(tmp_path / "out"))
    assert main([*command.split(), "--quiet"]) == 0
    out = tmp_path / "out"
    assert check_adapter(out, engine).ok and replay(engine, out)
    want, got = intended_deltas(source), intended_deltas(out)
    assert all(torch.allclose(got[m], want[m], atol=1e-6) for m in want)


@pytest.mark.parametrize("method", ["iso_c", "tsv"])
def test_a_zero_merge_is_stored_at_rank_one_and_loads_everywhere(tmp_path, method):
    """Weights all 0 give ΔW = 0: stored at rank 1 with zero factors (PEFT refuses r = 0), which every engine's
    replay loads, computing ΔW = 0, and `lorafuse check` passes."""
    every = llama_modules(2)
    inputs = [write_adapter(tmp_path / f"in{i}", every, r=4, alpha=8, seed=40 + i) for i in range(2)]
    out = merge(inputs, method, weights=[0.0, 0.0], progress=False).save(tmp_path / "zero")
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 1
    for engine in ENGINES:
        assert check_adapter(out, engine).ok, check_adapter(out, engine).format()
        assert replay(engine, out), engine
    assert all(float(d.abs().max()) == 0.0 for d in intended_deltas(out).values())


def test_check_reports_rank_zero_instead_of_crashing(tmp_path, capsys):
    """An adapter written with r = 0 (by an older lorafuse, or by hand) fails one rule, 'positive rank', for
    every engine; the CLI exits 1 with the finding, not a ZeroDivisionError."""
    path = write_adapter(tmp_path / "r0", llama_modules(1, ("self_attn.q_proj",)), r=0, alpha=0,
                         rank_pattern={"model.layers.0.self_attn.q_proj": 0})
    for engine in ENGINES:
        verdict = check_adapter(path, engine)
        assert [f.rule for f in verdict.failures] == ["positive rank"], verdict.format()
    assert main(["check", str(path), "--engine", *ENGINES]) == 1
    assert "FAIL positive rank" in capsys.readouterr().out
