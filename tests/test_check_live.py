"""`lorafuse check --engine peft|transformers` loads the adapter for real (PEFT's PeftModel.from_pretrained, or
transformers' load_adapter) on a tiny model built from the adapter's shapes, or a given local base model, and
compares each module's ΔW and the head with lorafuse's reading: an adapter the replayed rules pass but PEFT does
not reproduce (target_modules listing fewer modules than the file stores) fails; `lorafuse check DIR` with no
--engine checks every engine."""

from __future__ import annotations

import json

import pytest
import torch
from adapter_factory import write_adapter
from tiny_models import tiny_bert

from lorafuse.adapters.check import check_adapter
from lorafuse.adapters.engines import check_layout, layout_from_dir
from lorafuse.cli import main

pytest.importorskip("peft")
pytest.importorskip("transformers")

LLAMA = {f"model.layers.{i}.self_attn.{p}": (32, 32) for i in range(2) for p in ("q_proj", "v_proj")}
BERT = {f"bert.encoder.layer.{i}.attention.self.{p}": (32, 32) for i in range(2) for p in ("query", "value")}


def _short_targets(path):
    """The adapter with `target_modules` naming only q_proj: PEFT drops the stored v_proj factors."""
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg["target_modules"] = ["q_proj"]
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize("engine", ["peft", "transformers"])
def test_a_good_adapter_loads_with_the_files_delta(tmp_path, engine):
    path = write_adapter(tmp_path / "a", LLAMA, r=4, alpha=8, rslora=True,
                         rank_pattern={"model.layers.1.self_attn.v_proj": 2})
    verdict = check_adapter(path, engine)
    assert verdict.ok, verdict.format()
    assert [f.rule for f in verdict.findings][-3:] == ["live load", "ΔW", "heads"]


@pytest.mark.parametrize("engine", ["peft", "transformers"])
def test_target_modules_listing_fewer_modules_fails_live_only(tmp_path, engine, capsys):
    path = _short_targets(write_adapter(tmp_path / "a", LLAMA, r=4, alpha=8))
    assert check_layout(layout_from_dir(path), "peft").ok  # the replayed rules alone miss it
    assert main(["check", str(path), "--engine", engine]) == 1
    out = capsys.readouterr().out
    assert "FAIL ΔW" in out and "2 of 4 stored modules are not loaded" in out and "target_modules" in out


def test_a_classification_head_is_the_loaded_one(tmp_path):
    head = {"base_model.model.classifier.weight": torch.randn(3, 32), "base_model.model.classifier.bias": torch.randn(3)}
    good = write_adapter(tmp_path / "good", BERT, task_type="SEQ_CLS", modules_to_save=["classifier"], extra=head,
                         target_modules=["query", "value"])
    assert check_adapter(good, "peft").ok and check_adapter(good, "transformers").ok
    base = tiny_bert(tmp_path / "bert")
    verdict = check_adapter(good, "peft", base_model=str(base))  # the real local base, as a SEQ_CLS model
    assert verdict.ok, verdict.format()
    assert "base model" in verdict.findings[-3].detail


def test_check_without_engine_checks_every_engine(tmp_path, capsys):
    path = write_adapter(tmp_path / "a", LLAMA, r=4, alpha=8)
    assert main(["check", str(path), "--json"]) == 0
    verdicts = json.loads(capsys.readouterr().out)
    assert [v["engine"] for v in verdicts] == ["vllm", "sglang", "lorax", "llamacpp", "peft", "transformers"]
    bad = _short_targets(write_adapter(tmp_path / "b", LLAMA, r=4, alpha=8))
    assert main(["check", str(bad)]) == 1
