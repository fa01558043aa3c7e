"""`lorafuse merge` and `lorafuse inspect` as a user runs them: YAML config, flags, provenance, errors."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
import yaml
from adapter_factory import dense_update, llama_modules, write_adapter

from lorafuse.cli import main

MODULES = llama_modules(1, ("self_attn.q_proj", "self_attn.v_proj"))


def test_yaml_config_merge_with_provenance(tmp_path):
    for i in range(2):
        write_adapter(tmp_path / f"ad{i}", MODULES, seed=i)
    config = tmp_path / "merge.yml"
    config.write_text(yaml.safe_dump({
        "merge_method": "linear",
        "models": [{"model": "./ad0", "name": "mnli", "parameters": {"weight": 0.25}},
                   {"model": "./ad1", "parameters": {"weight": 0.75}}],
        "parameters": {"rank": 8},
        "dtype": "float32",
    }))
    assert main(["merge", str(config), "-o", str(tmp_path / "out"), "--quiet"]) == 0
    prov = json.loads((tmp_path / "out" / "lorafuse_merge.json").read_text())
    assert prov["method"]["name"] == "linear" and [i["name"] for i in prov["inputs"]] == ["mnli", "ad1"]
    assert len(prov["inputs"][0]["sha256"]) == 64 and prov["versions"]["lorafuse"]
    assert yaml.safe_load(prov["config_yaml"])["merge_method"] == "linear"
    from lorafuse.adapters.reader import LoraAdapter

    fused = LoraAdapter(tmp_path / "out")
    module = "model.layers.0.self_attn.q_proj"
    ref = 0.25 * dense_update(tmp_path / "ad0", module) + 0.75 * dense_update(tmp_path / "ad1", module)
    assert float((fused.update(module).dense().double() - ref).norm() / ref.norm()) < 1e-5


def test_flags_errors_and_overwrite(tmp_path, capsys):
    paths = [str(write_adapter(tmp_path / f"ad{i}", MODULES, seed=i)) for i in range(2)]
    out = str(tmp_path / "out")
    assert main(["merge", "--method", "ties", "--adapters", *paths, "--density", "0.5", "-o", out, "--quiet"]) == 0
    assert main(["merge", "--method", "ties", "--adapters", *paths, "-o", out, "--quiet"]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert main(["merge", "--method", "ties", "--adapters", *paths, "-o", out, "--overwrite", "--quiet",
                 "--param", "majority=frequency"]) == 0
    assert main(["merge", "--method", "tiess", "--adapters", *paths, "-o", str(tmp_path / "x")]) == 1
    assert "did you mean 'ties'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_bad_yaml_field_is_named(tmp_path, capsys):
    config = tmp_path / "bad.yml"
    config.write_text("merge_method: ties\nmodels:\n  - model: x\n    parameters: {wieght: 1}\n")
    assert main(["merge", str(config), "-o", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "bad.yml" in err and "wieght" in err and "did you mean 'weight'" in err


def test_inspect_reports_modules_and_norms(tmp_path, capsys):
    path = write_adapter(tmp_path / "ad", MODULES, r=4, alpha=8)
    assert main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["n_modules"] == 2 and info["modules"][0]["scaling"] == 2.0
    module = info["modules"][0]["module"]
    assert abs(info["modules"][0]["norm"] - float(dense_update(path, module).norm())) < 1e-6
    assert main(["inspect", str(path)]) == 0
    assert "‖ΔW‖_F" in capsys.readouterr().out


def test_help_does_not_import_torch():
    code = "import sys; from lorafuse.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    assert torch  # the test process itself has torch; the CLI process above must not


def test_help_does_not_import_numba():
    """The compiled kernels (merging/methods/kernels.py) are imported by the full-space merge only."""
    code = ("import sys\nfrom lorafuse.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('numba' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "False"


def test_hub_ids_are_downloaded(tmp_path, monkeypatch):
    """A name that is not a local directory is fetched with huggingface_hub (offline here: the call is faked)."""
    import huggingface_hub

    local = write_adapter(tmp_path / "snapshot", MODULES, seed=3)
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns=None, **kw):
        calls.append((repo_id, allow_patterns))
        return str(local)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    from lorafuse.adapters.reader import LoraAdapter

    adapter = LoraAdapter("someone/mnli-lora")
    assert adapter.path == local and calls[0][0] == "someone/mnli-lora"
    assert "adapter_model.bin" not in calls[0][1]


def test_example_configs_validate():
    from pathlib import Path

    from lorafuse.merging.config import load_merge_config
    from lorafuse.merging.methods.registry import get_method

    examples = sorted((Path(__file__).parents[1] / "examples").glob("*.yml"))
    assert examples
    for path in examples:
        kwargs = load_merge_config(path).merge_kwargs(path.parent)
        spec = get_method(kwargs["method"])
        engine = {"adapters", "method", "names", "weights", "densities", "base_model", "dtype", "rank", "space",
                  "exact_svd", "modules_to_save"}
        spec.parse_params({k: v for k, v in kwargs.items() if k not in engine})


def test_dare_density_is_refused_naming_drop_rate(tmp_path, capsys):
    """PEFT's and mergekit's DARE `density` is a keep probability; here it would be another merge: refused."""
    paths = [str(write_adapter(tmp_path / f"ad{i}", MODULES, seed=i)) for i in range(2)]
    out = tmp_path / "out"
    assert main(["merge", "--method", "dare_linear", "--density", "0.3", "--adapters", *paths, "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert "dare_linear" in err and "drop_rate" in err and not out.exists()
    config = tmp_path / "dare.yml"
    config.write_text(yaml.safe_dump({"merge_method": "dare_ties",
                                      "models": [{"model": p, "parameters": {"density": 0.3}} for p in paths]}))
    assert main(["merge", str(config), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert "dare.yml" in err and "models[0].parameters.density" in err and "drop_rate" in err and not out.exists()
    assert main(["merge", "--list-methods"]) == 0
    assert "trim_density" in capsys.readouterr().out
