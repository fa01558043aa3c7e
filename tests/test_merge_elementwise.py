"""Element-wise methods against plain dense references of each paper's definition, written here."""

from __future__ import annotations

import functools

import pytest
import torch
from adapter_factory import dense_update, llama_modules, write_adapter

from lorafuse.merging.engine import merge
from lorafuse.merging.methods.thresholds import StreamingQuantile

MODULES = llama_modules(layers=2, names=("self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj"))
FULL_RANK = 64  # ≥ every module's min dimension: truncation is lossless, so the merged dense update is compared


@pytest.fixture()
def adapters(tmp_path):
    return [write_adapter(tmp_path / f"a{i}", MODULES, r=4, alpha=8, seed=10 + i) for i in range(3)]


def tv(paths, module):
    return torch.stack([dense_update(p, module) for p in paths])


def topk_mask(x: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the int(density·N) largest |x| of each task (by sorting, independent of the library's kthvalue)."""
    flat = x.reshape(x.shape[0], -1)
    k = int(density * flat.shape[1])
    mask = torch.zeros_like(flat, dtype=torch.bool)
    idx = flat.abs().argsort(dim=1, descending=True)[:, :k]
    mask.scatter_(1, idx, True)
    return mask.reshape(x.shape)


def ties_reference(x: torch.Tensor, density: float, lam: float, mask=None) -> torch.Tensor:
    """TIES (Yadav et al. 2023): trim, elect sign by total mass, disjoint mean, λ."""
    trimmed = x * (topk_mask(x, density) if mask is None else mask)
    sign = torch.sign(trimmed.sum(0))
    agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
    return lam * (trimmed * agree).sum(0) / agree.sum(0).clamp(min=1)


def merged_dense(result, module):
    return result.delta(module).double()


def close(a, b, tol=1e-5):
    return float((a - b).norm() / b.norm().clamp(min=1e-30)) < tol


def test_ties_per_module(adapters):
    result = merge(adapters, "ties", density=0.3, **{"lambda": 0.8}, rank=FULL_RANK, exact_svd=True, progress=False)
    for module in MODULES:
        assert close(merged_dense(result, module), ties_reference(tv(adapters, module), 0.3, 0.8)), module


def test_ties_global_trim(adapters):
    result = merge(adapters, "ties", density=0.25, trim_scope="global", rank=FULL_RANK, exact_svd=True,
                   progress=False)
    flat = torch.stack([torch.cat([tv(adapters, m)[t].reshape(-1) for m in MODULES]) for t in range(3)])
    mask_flat = topk_mask(flat, 0.25)
    offset = 0
    for module in MODULES:
        x = tv(adapters, module)
        n = x[0].numel()
        mask = mask_flat[:, offset:offset + n].reshape(x.shape)
        offset += n
        assert close(merged_dense(result, module), ties_reference(x, 0.25, 1.0, mask)), module


def test_magnitude_prune_and_breadcrumbs(adapters):
    mp = merge(adapters, "magnitude_prune", density=0.4, rank=FULL_RANK, exact_svd=True, progress=False)
    bc = merge(adapters, "breadcrumbs", density=0.5, gamma=0.1, rank=FULL_RANK, exact_svd=True, progress=False)
    for module in MODULES:
        x = tv(adapters, module)
        assert close(merged_dense(mp, module), (x * topk_mask(x, 0.4)).sum(0))
        band = topk_mask(x, 0.6) & ~topk_mask(x, 0.1)  # drop the top 10%, keep the next 50%
        assert close(merged_dense(bc, module), (x * band).sum(0))


def test_dare_matches_reference_with_same_masks(adapters):
    """DARE (Yu et al. 2024): drop with probability p, rescale 1/(1-p); masks from the documented counter-based
    generator (tests/dare_reference.py ports it independently)."""
    from dare_reference import keep_mask, key_of

    p = 0.6
    lin = merge(adapters, "dare_linear", drop_rate=p, seed=3, rank=FULL_RANK, exact_svd=True, progress=False)
    tie = merge(adapters, "dare_ties", drop_rate=p, seed=3, rank=FULL_RANK, exact_svd=True, progress=False)
    names = [a.name for a in adapters]
    for module in MODULES:
        x = tv(adapters, module)
        keep = torch.stack([keep_mask(key_of(3, n, module), tuple(x[0].shape), p) for n in names])
        dropped = x * keep / (1 - p)
        assert close(merged_dense(lin, module), dropped.sum(0))
        assert close(merged_dense(tie, module), ties_reference(dropped, 1.0, 1.0))


def test_dare_is_seeded_and_order_independent(adapters):
    a = merge(adapters, "dare_ties", drop_rate=0.5, seed=1, progress=False)
    b = merge(adapters[::-1], "dare_ties", drop_rate=0.5, seed=1, progress=False)
    c = merge(adapters, "dare_ties", drop_rate=0.5, seed=2, progress=False)
    m = next(iter(MODULES))
    assert close(a.delta(m).double(), b.delta(m).double(), tol=1e-4)
    assert not close(a.delta(m).double(), c.delta(m).double(), tol=1e-2)


def test_density_one_ties_of_one_adapter_is_identity(adapters):
    result = merge(adapters[:1], "ties", density=1.0, rank=FULL_RANK, exact_svd=True, progress=False)
    for module in MODULES:
        assert close(merged_dense(result, module), dense_update(adapters[0], module))


def test_dense_results_come_back_at_the_inputs_joint_rank(adapters):
    result = merge(adapters, "ties", density=0.2, progress=False)
    assert {u.rank for u in result.modules.values()} == {12}  # Σr of three rank-4 adapters, below min(m, n)
    assert 0 < result.provenance["retained_energy"]["min"] <= 1


def test_streaming_quantile_is_exact():
    gen = torch.Generator().manual_seed(0)
    chunks = [torch.randn(n, generator=gen) * s for n, s in ((1000, 1.0), (5000, 0.01), (300, 30.0))]
    allv = torch.cat(chunks).abs().sort(descending=True).values
    q = StreamingQuantile([0.1, 0.5, 1.0, 0.0])
    for c in chunks:
        q.observe(c)
    q.plan()
    for c in chunks:
        q.gather(c)
    t10, t50, t100, t0 = q.thresholds()
    assert t10 == float(allv[int(0.1 * allv.numel()) - 1]) and t50 == float(allv[int(0.5 * allv.numel()) - 1])
    assert t100 == 0.0 and t0 == float("inf")


def test_rows_sample_brackets_skewed_low_rank_updates_in_one_pass(monkeypatch):
    """A low-rank update whose rows and columns have very different scales (as real B's and A's do) makes a grid
    sample's entries correlated; the sample of independent positions still brackets the exact threshold, so each
    task's values are read once, and the threshold equals a full sort's."""
    import lorafuse.merging.methods.thresholds as thresholds
    from lorafuse.merging.algebra.lowrank import LowRank
    from lorafuse.merging.spaces import DenseRows

    gen = torch.Generator().manual_seed(0)
    m, n, r = 3000, 700, 4
    B = torch.randn(m, r, generator=gen) * torch.exp(2 * torch.randn(m, 1, generator=gen))
    A = torch.randn(r, n, generator=gen) * torch.exp(torch.randn(1, n, generator=gen))
    rows = DenseRows([LowRank(B, A)])
    passes = []
    original = thresholds._count_and_band
    monkeypatch.setattr(thresholds, "_count_and_band", lambda v, b: passes.append(1) or original(v, b))
    for density in (0.02, 0.2, 0.7):
        passes.clear()
        (got,) = thresholds.top_thresholds(lambda: rows.task_values(0), m * n, [density], rows.task_sample(0))
        exact = (B @ A).abs().reshape(-1).sort(descending=True).values[int(density * m * n) - 1]
        assert got == float(exact) and len(passes) == 1


@pytest.mark.parametrize("method, params", [("ties", {"density": 0.2}), ("dare_ties", {"drop_rate": 0.5})])
def test_keep_exact_holds_the_uncut_result_that_evaluation_reads(adapters, method, params):
    """The saved adapter is cut to rank Σr; `keep_exact` keeps the method's dense result, which is what
    `exact_modules()` (and so the Evaluator) reads: equal to a lossless full-rank merge, unlike the cut one."""
    cut = merge(adapters, method, progress=False, keep_exact=True, **params)
    full = merge(adapters, method, rank=FULL_RANK, exact_svd=True, progress=False, **params)
    assert set(cut.exact) == set(MODULES) and cut.provenance["retained_energy"]["min"] < 0.99
    for module in MODULES:
        exact = cut.exact_modules()[module].dense().double()
        assert close(exact, merged_dense(full, module))
        assert not close(merged_dense(cut, module), merged_dense(full, module), tol=1e-3)
    assert not merge(adapters, method, progress=False, **params).exact  # held only when asked for


def test_keep_exact_of_an_exact_method_holds_nothing_extra(adapters):
    result = merge(adapters, "task_arithmetic", progress=False, keep_exact=True)
    assert result.exact == {} and result.exact_modules() == result.modules


def test_dare_generator_is_splitmix64_counter_based():
    """Known answer (SplitMix64 from state 1234567: 6457827717110365317, 3203168211198807973, ...), any band drawn
    on its own equals the same slice of one whole draw, and the keep rate is 1 − p."""
    from dare_reference import words
    from lorafuse.merging.methods.primitives import Draws, bernoulli_keep_mask, uniform_words

    first = [int(w) for w in uniform_words(1234567, 0, 4)]
    assert first[0] + (first[1] << 32) == 6457827717110365317
    assert first[2] + (first[3] << 32) == 3203168211198807973
    assert first == words(1234567, 4)
    whole = uniform_words(99, 0, 100_001)
    for start, count in ((0, 7), (3, 40_000), (65_537, 34_464), (99_999, 2)):
        assert (uniform_words(99, start, count) == whole[start:start + count]).all()
    x = torch.ones(2, 300, 500)
    mask = bernoulli_keep_mask(x, 0.1, Draws((5, 6)))
    assert abs(float(mask.mean()) - 0.1) < 0.005 and not torch.equal(mask[0], mask[1])
    band = bernoulli_keep_mask(x[:, 100:160], 0.1, Draws((5, 6), 100 * 500))
    assert torch.equal(band, mask[:, 100:160])


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DEVICE_CASES = [
    ("ties", {"density": 0.3}, "full"), ("ties", {"density": 0.3, "trim_scope": "global"}, "full"),
    ("dare_ties", {"drop_rate": 0.5, "trim_density": 0.5}, "full"), ("dare_linear", {"drop_rate": 0.3}, "full"),
    ("magnitude_prune", {"density": 0.4}, "full"), ("breadcrumbs", {}, "full"), ("ties", {"density": 0.3}, "knots"),
    ("dare_ties", {"drop_rate": 0.5}, "core"), ("task_arithmetic", {}, "full"), ("linear", {}, "full"),
    ("cat", {}, "full"), ("tsv", {}, "full"), ("iso_c", {}, "full"), ("ties", {"density": 0.3}, "core"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("method", "params", "space"), DEVICE_CASES)
def test_device_path_matches_the_cpu(adapters, monkeypatch, device, method, params, space):
    """`device` runs each module's work there (streamed, results back on the CPU) with the CPU's result within 1e-5.
    On the CPU the device path is run with device="cpu" and the accelerator's torch counting of thresholds forced."""
    from lorafuse.merging.methods import thresholds

    reference = merge(adapters, method, rank=8, space=space, progress=False, device="cpu", **params)
    monkeypatch.setattr(thresholds, "count_on_device", lambda chunk: True)
    result = merge(adapters, method, rank=8, space=space, progress=False, device=device, **params)
    assert result.provenance["options"]["device"] == device
    for module in MODULES:
        assert result.modules[module].B.device.type == "cpu"
        assert close(merged_dense(result, module), merged_dense(reference, module)), module


def test_device_option_from_yaml_and_default(monkeypatch):
    from lorafuse.merging.config import MergeConfig
    from lorafuse.model.models import default_device

    config = MergeConfig(merge_method="ties", models=[{"model": "x"}], device="cpu")
    assert config.merge_kwargs()["device"] == "cpu"
    assert MergeConfig(merge_method="ties", models=[{"model": "x"}], parameters={"device": "cpu"}
                       ).merge_kwargs()["device"] == "cpu"
    monkeypatch.delenv("LORAFUSE_DEVICE", raising=False)
    assert default_device(None) == ("cuda" if torch.cuda.is_available() else "cpu")


def test_strict_limits_keep_the_exact_top_k_without_a_tie_budget():
    """The counting pass's limits (sample bracket, one exact pass) equal a full sort's; `strict` turns a threshold
    with no tie into (τ⁻, 0), which keeps the same k with a plain `>`, and leaves real ties (quantised values)
    as (τ, ties), which keep exactly k by position."""
    from lorafuse.merging.methods.primitives import top_mask
    from lorafuse.merging.methods.thresholds import top_limits

    gen = torch.Generator().manual_seed(1)
    smooth = torch.randn(40_000, generator=gen) * torch.rand(40_000, generator=gen)
    quantised = torch.randint(-3, 4, (40_000,), generator=gen).float() * 0.25
    for values in (smooth, quantised):
        for density in (0.05, 0.2, 0.5):
            k = int(density * values.numel())
            chunks = lambda v=values: iter(v.split(7_000))  # noqa: E731
            (plain,) = top_limits(chunks, values.numel(), [density], values[::7])
            (strict,) = top_limits(chunks, values.numel(), [density], values[::7], strict=True)
            ranked = values.abs().sort(descending=True, stable=True)
            tau = float(ranked.values[k - 1])
            assert plain == (tau, k - int((values.abs() > tau).sum()))
            expected = torch.zeros(values.numel())
            expected[ranked.indices[:k]] = 1
            for limit in (plain, strict):
                table = torch.tensor([limit], dtype=torch.float64)  # its tie budget consumed chunk by chunk
                mask = torch.cat([top_mask(c.unsqueeze(0), table)[0] for c in values.split(7_000)])
                assert torch.equal(mask, expected)
            tied = int((values.abs() == tau).sum()) > plain[1]
            assert strict == (plain if tied else (float(torch.tensor(tau).nextafter(torch.tensor(0.0))), 0))


def test_weighted_sum_has_the_bits_of_the_gemv():
    """The task sums are added in task order from 0 (fused multiply-adds): on the CPU the same bits as the GEMV
    tensordot(w, x) that lorafuse used before, signed zeros included."""
    from lorafuse.merging.methods.primitives import weighted_sum

    gen = torch.Generator().manual_seed(2)
    for tasks in (1, 2, 4, 5):
        x = torch.randn(tasks, 3, 1001, generator=gen) * (torch.rand(tasks, 3, 1001, generator=gen) > 0.3)
        x[:, 0, :7] = -0.0
        for w in (torch.ones(tasks), torch.randn(tasks, generator=gen)):
            got, gemv = weighted_sum(x, w), torch.tensordot(w, x, dims=1)
            assert torch.equal(got.view(torch.int32), gemv.view(torch.int32))


@pytest.mark.parametrize(("method", "params"), [
    ("ties", {"density": 0.2}), ("ties", {"density": 0.2, "trim_scope": "global"}), ("dare_ties", {"drop_rate": 0.9}),
    ("dare_ties", {"drop_rate": 0.5, "trim_density": 0.3}), ("breadcrumbs", {}), ("magnitude_prune", {"density": 0.3})])
@pytest.mark.parametrize("compiled", [False, True])
def test_bands_in_parallel_give_the_sequential_bits(tmp_path, monkeypatch, method, params, compiled):
    """Bands merged on two threads, in sub-bands of a few rows, equal one thread's merge in whole bands, bit for
    bit (the dense result and the saved factors); quantised adapters (ties at the threshold) too, merged in row
    order there by the torch path, in parallel by the compiled kernels (each row knows its tie budget)."""
    import lorafuse.merging.engine as engine
    import lorafuse.merging.methods.kernels as kernels
    import lorafuse.merging.spaces as spaces

    modules = llama_modules(layers=1, names=("self_attn.q_proj", "mlp.down_proj"))
    smooth = [write_adapter(tmp_path / f"s{i}", modules, r=4, alpha=8, seed=30 + i) for i in range(3)]
    quantised = _quantised(tmp_path)
    threads = torch.get_num_threads()
    original, launch = engine._Bands.run_parallel, kernels.run
    uses_kernels = compiled and method != "breadcrumbs"
    for paths in (smooth, quantised):
        monkeypatch.setenv("LORAFUSE_COMPILED", "1" if compiled else "0")
        torch.set_num_threads(1)
        try:
            reference = merge(paths, method, rank=2, keep_exact=True, progress=False, **params)
            torch.set_num_threads(2)
            monkeypatch.setattr(engine, "MERGE_BAND_ENTRIES", 64)  # sub-bands of 1–2 rows
            monkeypatch.setattr(spaces, "BAND_ENTRIES", 256)  # several bands per module
            monkeypatch.setattr(engine, "COMPILED_BAND_ENTRIES", 256)
            calls: list[int] = []
            monkeypatch.setattr(engine._Bands, "run_parallel", functools.partialmethod(_spy, calls, original))
            monkeypatch.setattr(kernels, "run", functools.partial(_spy_launch, calls, launch))
            parallel = merge(paths, method, rank=2, keep_exact=True, progress=False, **params)
            if uses_kernels:
                assert calls and set(calls) == {2}
            elif paths is smooth:
                assert calls
            elif "drop_rate" not in params:  # ties at τ: some module merged in row order
                assert len(calls) < len(modules)
        finally:
            torch.set_num_threads(threads)
            monkeypatch.undo()
        for module in reference.modules:
            a, b = reference.exact[module].matrix, parallel.exact[module].matrix
            assert torch.equal(a.view(torch.int32), b.view(torch.int32)), module
            assert torch.equal(reference.delta(module), parallel.delta(module)), module


def _spy_launch(calls, launch, kernel, threads, *args):
    calls.append(threads)
    return launch(kernel, threads, *args)


def _spy(self, calls, original, workers):
    calls.append(workers)
    return original(self, workers)


def _quantised(root):
    """Two adapters with entries in {-1, 0, 1}: their updates tie hundreds of entries at any threshold."""
    import json

    import numpy as np
    from safetensors.torch import save_file

    out = []
    for i in range(2):
        rng = np.random.default_rng(i)
        state = {}
        for module, (m, n) in llama_modules(layers=1, names=("self_attn.q_proj", "mlp.down_proj")).items():
            state[f"base_model.model.{module}.lora_A.weight"] = torch.from_numpy(
                rng.integers(-1, 2, (3, n)).astype(np.float32))
            state[f"base_model.model.{module}.lora_B.weight"] = torch.from_numpy(
                rng.integers(-1, 2, (m, 3)).astype(np.float32))
        d = root / f"q{i}"
        d.mkdir()
        save_file(state, str(d / "adapter_model.safetensors"))
        (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 3, "lora_alpha": 3,
                                                           "target_modules": ["q_proj", "down_proj"]}))
        out.append(d)
    return out


@pytest.mark.parametrize(("method", "params"), [
    ("ties", {"density": 0.2}), ("ties", {"density": 0.3, "majority": "frequency", "denominator": "count"}),
    ("ties", {"density": 0.2, "lambda": 1.5}), ("magnitude_prune", {"density": 0.3}),
    ("dare_ties", {"drop_rate": 0.9}), ("dare_ties", {"drop_rate": 0.5, "trim_density": 0.3}),
    ("dare_ties", {"drop_rate": 0.7, "majority": "frequency"}), ("dare_linear", {"drop_rate": 0.6})])
@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (0.7, -1.3, 0.0, 2.0)])
def test_band_kernel_has_the_bits_of_the_generic_merge(method, params, weights):
    """The engine's planned band kernel (strict limits) writes the bits of merge_blocks_, signed zeros included,
    on blocks with exact zeros, negative zeros and entries at ±τ; the kernel keeps its buffers across calls of
    different sizes."""
    from lorafuse.merging.methods import primitives as P
    from lorafuse.merging.methods.elementwise import BandKernel
    from lorafuse.merging.methods.registry import get_method

    spec = get_method(method)
    parsed, recipe = spec.parse_params(params), spec.fn.recipe
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4, 9, 301, generator=gen) * (torch.rand(4, 9, 301, generator=gen) > 0.2)
    x[:, 0, :5] = -0.0
    density = getattr(parsed, "density", getattr(parsed, "trim_density", 1.0))
    k = int(density * x[0].numel())
    taus = [float(x[t].abs().reshape(-1).kthvalue(max(1, x[t].numel() - k)).values)
            for t in range(4)]  # the float below the k-th largest: a strict limit
    x[:, 1, :4] = torch.tensor(taus).reshape(4, 1) * torch.tensor([1.0, -1.0, 1.0, -1.0])  # at ±τ⁻: trimmed
    table = torch.tensor([[[tau, 0.0]] for tau in taus], dtype=torch.float64)
    if not (recipe.sparsify.value == "magnitude" or recipe.trim_after_drop and density < 1.0):
        table = table[:, :0]  # DARE without a trim: no thresholds
    w = torch.tensor(weights)
    kernel = spec.fn.band_kernel(w, table, parsed)
    assert isinstance(kernel, BandKernel)
    draws = P.Draws((11, 12, 13, 14)).in_thread()
    for rows in (slice(0, 9), slice(2, 5), slice(0, 9)):
        block = x[:, rows]
        expected = spec.fn.merge_into(block.clone(), w, table.clone(), parsed, draws.at(rows.start * 301),
                                      torch.empty(block.shape[1:]), torch.empty_like(block))
        got = kernel(block.clone(), draws.at(rows.start * 301), torch.empty(block.shape[1:]), torch.empty_like(block))
        assert torch.equal(got.view(torch.int32), expected.view(torch.int32))


@pytest.mark.parametrize(("method", "params"), [
    ("ties", {"density": 0.3}), ("magnitude_prune", {"density": 0.2}), ("dare_ties", {"drop_rate": 0.5, "trim_density": 0.3})])
def test_band_kernel_consumes_tie_budgets_as_the_generic_merge(method, params):
    """Quantised blocks tie many entries at τ: band after band (row order) the kernel keeps the same first tied
    entries as merge_blocks_ and leaves the same budgets in the shared table; Breadcrumbs' band stays generic."""
    from lorafuse.merging.methods import primitives as P
    from lorafuse.merging.methods.elementwise import BandKernel, threshold_input
    from lorafuse.merging.methods.registry import get_method

    spec = get_method(method)
    parsed, recipe = spec.parse_params(params), spec.fn.recipe
    gen = torch.Generator().manual_seed(8)
    x = torch.randint(-4, 5, (3, 12, 50), generator=gen).float() * 0.125
    draws = P.Draws((21, 22, 23)).in_thread()
    values = threshold_input(x, recipe, parsed, draws)
    density = getattr(parsed, "density", getattr(parsed, "trim_density", 1.0))
    table = torch.tensor([[P.top_limit(v, int(density * v.numel()))] for v in values], dtype=torch.float64)
    assert bool(table[:, 0, 1].gt(0).all())
    w = torch.tensor([0.5, 1.0, 2.0])
    generic_table, kernel_table = table.clone(), table.clone()
    kernel = spec.fn.band_kernel(w, kernel_table, parsed)
    assert isinstance(kernel, BandKernel)
    for start in range(0, 12, 5):
        block = x[:, start:start + 5]
        expected = spec.fn.merge_into(block.clone(), w, generic_table, parsed, draws.at(start * 50),
                                      torch.empty(block.shape[1:]), torch.empty_like(block))
        got = kernel(block.clone(), draws.at(start * 50), torch.empty(block.shape[1:]), torch.empty_like(block))
        assert torch.equal(got.view(torch.int32), expected.view(torch.int32))
        assert torch.equal(kernel_table, generic_table)
    assert bool(kernel_table[:, 0, 1].eq(0).all())  # every budget spent: exactly k kept per task
    breadcrumbs = get_method("breadcrumbs")
    assert not isinstance(breadcrumbs.fn.band_kernel(w, table, breadcrumbs.parse_params({})), BandKernel)


@pytest.mark.parametrize(("method", "params"), [
    ("ties", {"density": 0.2}), ("ties", {"density": 0.3, "trim_scope": "global"}),
    ("ties", {"density": 0.3, "majority": "frequency", "denominator": "count", "lambda": 1.5}),
    ("dare_ties", {"drop_rate": 0.9}), ("dare_ties", {"drop_rate": 0.5, "trim_density": 0.3}),
    ("dare_ties", {"drop_rate": 0.5, "trim_density": 0.3, "trim_scope": "global"}),
    ("magnitude_prune", {"density": 0.3}), ("dare_linear", {"drop_rate": 0.6, "lambda": 0.8})])
@pytest.mark.parametrize("brackets", ["sampled", "missed"])
def test_compiled_kernels_give_the_torch_paths_bits(tmp_path, monkeypatch, method, params, brackets):
    """The compiled counting and merge passes (methods/kernels.py) against the torch path, on 2 threads in several
    bands a module: the same limits, the same kept entries (ties at τ by position: quantised adapters), the same
    dense bits and saved factors, with negative and zero weights too; also where the sample's bracket misses τ
    (forced here: the counting pass counts again with the widened bracket)."""
    import lorafuse.merging.engine as engine
    import lorafuse.merging.methods.thresholds as thresholds
    import lorafuse.merging.spaces as spaces

    if brackets == "missed":  # a bracket above every value, for both paths
        monkeypatch.setattr(thresholds, "_bracket", lambda sample, k, total: (1e30, 2e30))

    modules = llama_modules(layers=1, names=("self_attn.q_proj", "mlp.down_proj"))
    smooth = [write_adapter(tmp_path / f"s{i}", modules, r=4, alpha=8, seed=40 + i) for i in range(3)]
    threads = torch.get_num_threads()
    monkeypatch.setattr(spaces, "BAND_ENTRIES", 512)
    monkeypatch.setattr(engine, "COMPILED_BAND_ENTRIES", 300)  # bands of a few rows, their sizes not aligned
    try:
        torch.set_num_threads(2)
        for paths, weights in ((smooth, [1.0, -0.5, 2.0]), (smooth, [0.7, 0.0, 1.3]), (_quantised(tmp_path), None)):
            results = []
            for compiled in ("0", "1"):
                monkeypatch.setenv("LORAFUSE_COMPILED", compiled)
                results.append(merge(paths, method, rank=2, keep_exact=True, progress=False, weights=weights,
                                     **params))
            for module in results[0].modules:
                a, b = (r.exact[module].matrix for r in results)
                assert torch.equal(a.view(torch.int32), b.view(torch.int32)), module
                assert torch.equal(results[0].delta(module), results[1].delta(module)), module
    finally:
        torch.set_num_threads(threads)


def test_count_pass_gives_each_row_its_share_of_the_tie_budget():
    """The compiled counting pass: the exact (τ, ties) of a full sort for every task at once, and per row the tied
    entries it keeps, so that |x| > τ plus each row's first budget[r] entries equal to τ are exactly the k largest
    of a stable descending sort (ties by position), whatever the bands."""
    import numpy as np

    from lorafuse.merging.methods.primitives import top_limit
    from lorafuse.merging.methods.thresholds import Band, count_pass

    gen = torch.Generator().manual_seed(3)
    x = torch.randint(-4, 5, (3, 40, 33), generator=gen).float() * 0.25  # quantised: many ties at any τ
    ks = [int(d * x[0].numel()) for d in (0.2, 0.35, 0.5)]

    def bands():
        for start in range(0, 40, 7):  # bands of 7 rows
            yield Band(x[:, start:start + 7].contiguous().numpy(), start * 33, np.zeros(3, np.uint64))

    limits, budgets = count_pass(bands, x[0].numel(), ks, lambda t: x[t].reshape(-1)[::5])
    for t, k in enumerate(ks):
        assert limits[t] == top_limit(x[t], k) and limits[t][1] > 0
        assert int(budgets[t].sum()) == limits[t][1]
        mags = x[t].abs()
        tied = mags == limits[t][0]
        keep_tied = tied & (tied.int().cumsum(1) <= torch.from_numpy(budgets[t]).unsqueeze(1))
        expected = torch.zeros(x[t].numel(), dtype=torch.bool)
        expected[mags.reshape(-1).sort(descending=True, stable=True).indices[:k]] = True
        assert torch.equal((mags > limits[t][0]) | keep_tied, expected.reshape(x[t].shape))
