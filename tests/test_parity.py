"""Every method and space against a small independent reference written here from the paper or the authors' code
(PEFT merge_utils.py, mergekit generalized_task_arithmetic.py / sparsify.py, the Breadcrumbs, DARE (MergeLM),
TSV-M and Iso authors' code, KnOTS and Core Space task_merger.py), in float64 on dense ΔW_t, calling none of
lorafuse's primitives. The adapters have mixed ranks (rank_pattern), rsLoRA, different α/r, a module absent from
one adapter, and negative, non-unit weights. Each reference states where it follows lorafuse's documented
deviations from the code it ports (e.g. the |w| denominator of TIES).

Then: permuting the adapters changes no method's result beyond 1e-5 (DARE's drops follow the adapter names)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from adapter_factory import MIXED_MODULES, mixed_adapters
from safetensors.torch import load_file

from lorafuse.errors import ConfigError
from lorafuse.merging.engine import merge

MODULES = list(MIXED_MODULES)
WEIGHTS = [1.3, -0.6, 0.8]
FULL = 64  # ≥ every module's min(m, n): a dense result's truncation is lossless
TOL = 2e-5


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return mixed_adapters(tmp_path_factory.mktemp("parity"))


def factors(path, module):
    """(s·B, A) of one module in float64, read and scaled here (rank_pattern, alpha_pattern, rsLoRA), or None."""
    cfg = json.loads((path / "adapter_config.json").read_text())
    state = load_file(str(path / "adapter_model.safetensors"))
    key = f"base_model.model.{module}"
    if f"{key}.lora_A.weight" not in state:
        return None
    r = cfg.get("rank_pattern", {}).get(module, cfg["r"])
    alpha = cfg.get("alpha_pattern", {}).get(module, cfg["lora_alpha"])
    scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    return scale * state[f"{key}.lora_B.weight"].double(), state[f"{key}.lora_A.weight"].double()


def updates(paths, module):
    """[T, m, n] unweighted ΔW_t (zeros where an adapter lacks the module)."""
    m, n = MIXED_MODULES[module]
    out = []
    for p in paths:
        f = factors(p, module)
        out.append(torch.zeros(m, n, dtype=torch.float64) if f is None else f[0] @ f[1])
    return torch.stack(out)


def rel(a, b):
    return float((a.double() - b).norm() / b.norm())


def signed(U):
    """Each singular vector (column) with its entry of largest magnitude positive: lorafuse's documented sign
    convention, which a tie of TIES's 'frequency' election (elected +) sees in an aligned space."""
    idx = U.abs().argmax(dim=0)
    return torch.where(U[idx, torch.arange(U.shape[1])] < 0, -1.0, 1.0).double()


# -- spaces: blocks and rebuild, as the KnOTS and Core Space code compute them ------------------------------------
def full_space(paths, module):
    return updates(paths, module), lambda merged: merged


def knots_space(paths, module):
    """KnOTS task_merger.py: SVD of [ΔW_1 … ΔW_T] (concatenated along the input axis), σ cut at 1e-5 (relative
    here, as documented), task blocks S·V_tᵀ, ΔW = U·merged."""
    x = updates(paths, module)
    T, _, n = x.shape
    U, S, Vh = torch.linalg.svd(torch.cat(list(x), dim=1), full_matrices=False)
    k = int((S > 1e-5 * S[0]).sum())
    flip = signed(U[:, :k])
    U, Vh = U[:, :k] * flip, Vh[:k] * flip[:, None]
    blocks = torch.stack([S[:k, None] * Vh[:, t * n:(t + 1) * n] for t in range(T)])
    return blocks, lambda merged: U @ merged


def core_space(paths, module):
    """Core Space task_merger.py: U_B, V_A from SVDs of the stacked B's and A's (the scaled B's, as documented),
    cores M_t = U_Bᵀ ΔW_t V_Aᵀ, ΔW = U_B·M·V_A."""
    present = [f for p in paths if (f := factors(p, module)) is not None]
    UB = torch.linalg.svd(torch.cat([B for B, _ in present], 1), full_matrices=False)[0]
    VA = torch.linalg.svd(torch.cat([A for _, A in present], 0), full_matrices=False)[2]
    UB, VA = UB * signed(UB), VA * signed(VA.T)[:, None]
    blocks = torch.stack([UB.T @ x @ VA.T for x in updates(paths, module)])
    return blocks, lambda merged: UB @ merged @ VA


SPACES = {"full": full_space, "knots": knots_space, "core": core_space}


# -- element-wise references --------------------------------------------------------------------------------------
def top_k_mask(flat, k):
    """PEFT magnitude_based_pruning / mergekit magnitude: exactly the k largest |x| (a sort, not a threshold); ties
    by position (a stable sort), lorafuse's documented rule."""
    mask = torch.zeros_like(flat)
    if k > 0:
        mask[torch.argsort(flat.abs(), descending=True, stable=True)[:k]] = 1
    return mask


def per_scope(blocks, scope, mask_fn):
    """Apply a flat per-task mask rule per module, or over all modules concatenated (the TIES paper, KnOTS)."""
    T = next(iter(blocks.values())).shape[0]
    if scope == "module":
        return {m: torch.stack([mask_fn(b[t].reshape(-1)).reshape(b[t].shape) for t in range(T)]) * b
                for m, b in blocks.items()}
    sizes = [b[0].numel() for b in blocks.values()]
    masks = [torch.split(mask_fn(torch.cat([b[t].reshape(-1) for b in blocks.values()])), sizes) for t in range(T)]
    return {m: b * torch.stack([masks[t][i].reshape(b[t].shape) for t in range(T)])
            for i, (m, b) in enumerate(blocks.items())}


def magnitude(blocks, density, scope):
    return per_scope(blocks, scope, lambda flat: top_k_mask(flat, int(density * flat.numel())))


def breadcrumbs_mergekit(blocks, gamma, density, scope):
    """mergekit sparsify.magnitude_outliers: int(γN) largest dropped, int(dN) kept; where they exceed N, fewer of
    the largest are dropped. Deviation (lorafuse's, documented): mergekit's `indices[n_bot:-n_top]` keeps nothing
    when n_top = 0; here the int(dN) largest are kept then."""

    def mask(flat):
        N = flat.numel()
        target, top = int(density * N), int(gamma * N)
        bottom = N - target - top
        if bottom < 0:
            top, bottom = top + bottom, 0
        order = torch.argsort(flat.abs())  # ascending
        out = torch.zeros_like(flat)
        out[order[bottom:N - top]] = 1
        return out

    return per_scope(blocks, scope, mask)


def breadcrumbs_authors(blocks, gamma, density):
    """rezazzr/breadcrumbs TaskVectorMiddleKeep (remove_first): per row of the last axis, topk removes the
    int(γ·n) largest, then topk keeps the int(d·n) largest of what is left."""
    out = {}
    for m, b in blocks.items():
        n = b.shape[-1]
        removed = b.clone()
        top = int(gamma * n)
        if top:
            idx = torch.topk(b.abs(), top, dim=-1).indices
            removed.scatter_(-1, idx, 0.0)
        keep = torch.zeros_like(b)
        idx = torch.topk(removed.abs(), int(density * n), dim=-1).indices
        keep.scatter_(-1, idx, 1.0)
        out[m] = removed * keep
    return out


def dare_drop(blocks, p, seed, names, rescale=True):
    """DARE (MergeLM mask_input_with_mask_rate): drop with probability p, divide by 1 − p. The masks come from
    lorafuse's documented counter-based generator (a SplitMix64 word per entry, keyed by adapter name and module;
    ported independently in tests/dare_reference.py)."""
    from dare_reference import keep_mask, key_of

    out = {}
    for m, b in blocks.items():
        keep = torch.stack([keep_mask(key_of(seed, name, m), tuple(b[t].shape), p).double()
                            for t, name in enumerate(names)])
        out[m] = b * keep / ((1 - p) if rescale else 1.0)
    return out


def ties_combine(x, w, lam=1.0, majority="total", denominator="weights"):
    """mergekit GTATask with consensus (get_mask): signs elected on the weighted values (sum, or count of signs;
    a tie elects +), the agreeing weighted values summed and divided by the agreeing weights. Deviation (lorafuse's,
    documented): the divisor is Σ|w| (mergekit: Σw, which a negative weight can zero or flip), or the count
    (`denominator: count`, PEFT's disjoint_merge)."""
    w = torch.tensor(w, dtype=torch.float64).reshape(-1, *([1] * (x.ndim - 1)))
    y = x * w
    votes = y.sum(0) if majority == "total" else torch.sign(y).sum(0)
    elected = (votes >= 0).double() * 2 - 1
    agree = (torch.sign(y) == elected).double()
    divisor = (w.abs() * agree).sum(0) if denominator == "weights" else agree.sum(0)
    divisor[divisor == 0] = 1
    return lam * (y * agree).sum(0) / divisor


def weighted_sum(x, w, lam=1.0):
    return lam * (x * torch.tensor(w, dtype=torch.float64).reshape(-1, 1, 1)).sum(0)


ELEMENTWISE = {  # method, parameters → (sparsify blocks dict, combine) of the reference
    "ties": ({"density": 0.3, "lambda": 0.9},
             lambda b, s, n: magnitude(b, 0.3, s), lambda x, w: ties_combine(x, w, 0.9)),
    "ties-frequency-count": ({"density": 0.4, "majority": "frequency", "denominator": "count"},
                             lambda b, s, n: magnitude(b, 0.4, s),
                             lambda x, w: ties_combine(x, w, 1.0, "frequency", "count")),
    "magnitude_prune": ({"density": 0.35, "lambda": 0.7},
                        lambda b, s, n: magnitude(b, 0.35, s), lambda x, w: weighted_sum(x, w, 0.7)),
    "breadcrumbs": ({"density": 0.5, "gamma": 0.05},
                    lambda b, s, n: breadcrumbs_mergekit(b, 0.05, 0.5, s), weighted_sum),
    "breadcrumbs-overflow": ({"density": 0.9, "gamma": 0.2},  # γ + d > 1: fewer of the largest dropped
                             lambda b, s, n: breadcrumbs_mergekit(b, 0.2, 0.9, s), weighted_sum),
    "breadcrumbs-authors": ({"density": 0.5, "gamma": 0.1, "rule": "authors"},
                            lambda b, s, n: breadcrumbs_authors(b, 0.1, 0.5), weighted_sum),
    "dare_linear": ({"drop_rate": 0.6, "seed": 3, "lambda": 0.8},
                    lambda b, s, n: dare_drop(b, 0.6, 3, n), lambda x, w: weighted_sum(x, w, 0.8)),
    "dare_ties": ({"drop_rate": 0.5, "seed": 1},
                  lambda b, s, n: dare_drop(b, 0.5, 1, n), ties_combine),
    "dare_ties-trim": ({"drop_rate": 0.5, "seed": 1, "trim_density": 0.3},  # MergeLM: DARE, then ties_merging
                       lambda b, s, n: magnitude(dare_drop(b, 0.5, 1, n), 0.3, s), ties_combine),
}


def method_of(case):
    return case.split("-")[0]


@pytest.mark.parametrize("space", list(SPACES))
@pytest.mark.parametrize("scope", ["module", "global"])
@pytest.mark.parametrize("case", list(ELEMENTWISE))
def test_elementwise_method_matches_its_reference(paths, case, scope, space):
    params, sparsify, combine = ELEMENTWISE[case]
    if params.get("rule") == "authors" and scope == "global":
        pytest.skip("the authors' Breadcrumbs thresholds each row")
    result = merge(paths, method_of(case), weights=WEIGHTS, space=space, trim_scope=scope, rank=FULL,
                   exact_svd=True, progress=False, **params)
    projected = {m: SPACES[space](paths, m) for m in MODULES}
    sparse = sparsify({m: blocks for m, (blocks, _) in projected.items()}, scope, ["a", "b", "c"])
    for module, (_, rebuild) in projected.items():
        assert rel(result.delta(module), rebuild(combine(sparse[module], WEIGHTS))) < TOL, module


def test_trim_scope_defaults_to_each_spaces_reference(paths):
    """KnOTS's code trims globally, PEFT/mergekit and Core Space's per module."""
    for space, scope in (("full", "module"), ("knots", "global"), ("core", "module")):
        default = merge(paths, "ties", density=0.3, space=space, rank=FULL, exact_svd=True, progress=False)
        explicit = merge(paths, "ties", density=0.3, space=space, trim_scope=scope, rank=FULL, exact_svd=True,
                         progress=False)
        assert default.provenance["options"]["trim_scope"] == scope
        for module in MODULES:
            assert torch.equal(default.delta(module), explicit.delta(module))


def test_ties_negative_weight_keeps_the_elected_sign(tmp_path):
    """The issue's entry: x = (2, 0.5, −3), w = (−1, 1, −1). Weighted values (−2, 0.5, 3) elect +; the agreeing
    0.5 and 3 over Σ|w| = 2 give 1.75 (mergekit's Σw divisor is 0 there; PEFT elects on the unweighted x)."""
    import numpy as np
    from safetensors.numpy import save_file

    xs = (2.0, 0.5, -3.0)
    adapters = []
    for i, x in enumerate(xs):
        d = tmp_path / f"t{i}"
        d.mkdir()
        save_file({"base_model.model.layer.q.lora_A.weight": np.array([[1.0]], np.float32),
                   "base_model.model.layer.q.lora_B.weight": np.array([[x]], np.float32)},
                  str(d / "adapter_model.safetensors"))
        (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 1, "lora_alpha": 1,
                                                           "target_modules": ["q"]}))
        adapters.append(d)
    out = merge(adapters, "ties", density=1.0, weights=[-1, 1, -1], progress=False).delta("layer.q")
    assert float(out) == pytest.approx(1.75)
    assert float(out) == pytest.approx(float(ties_combine(torch.tensor(xs).reshape(3, 1, 1).double(),
                                                          [-1, 1, -1])))
    count = merge(adapters, "ties", density=1.0, weights=[-1, 1, -1], denominator="count", progress=False)
    assert float(count.delta("layer.q")) == pytest.approx(1.75)  # two agreeing tasks: (0.5 + 3) / 2
    tie = merge(adapters[:2], "ties", density=1.0, weights=[1, -4], majority="frequency", progress=False)
    assert float(tie.delta("layer.q")) == pytest.approx(2.0)  # signs (+, −) tie: + is elected (PEFT, mergekit)


# -- DARE's parameters -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_refuses_density_naming_drop_rate(paths, method):
    with pytest.raises(ConfigError, match="drop_rate"):
        merge(paths, method, density=0.3, progress=False)
    with pytest.raises(ConfigError, match="drop_rate"):
        merge(paths, method, densities=[0.3, 0.3, 0.3], progress=False)


def test_dare_ties_trim_changes_the_merge_and_full_trim_is_none(paths):
    plain = merge(paths, "dare_ties", drop_rate=0.5, seed=1, rank=FULL, exact_svd=True, progress=False)
    same = merge(paths, "dare_ties", drop_rate=0.5, seed=1, trim_density=1.0, rank=FULL, exact_svd=True,
                 progress=False)
    trimmed = merge(paths, "dare_ties", drop_rate=0.5, seed=1, trim_density=0.2, rank=FULL, exact_svd=True,
                    progress=False)
    module = MODULES[0]
    assert torch.equal(plain.delta(module), same.delta(module))
    assert rel(trimmed.delta(module), plain.delta(module).double()) > 0.05


def test_average_refuses_weights_and_linear_does_not_normalize_by_default(paths):
    with pytest.raises(ConfigError, match="linear"):
        merge(paths, "average", weights=WEIGHTS, progress=False)
    plain = merge(paths, "linear", weights=WEIGHTS, progress=False)
    normalized = merge(paths, "linear", weights=WEIGHTS, normalize=True, progress=False)
    for module in MODULES:
        x = updates(paths, module)
        assert rel(plain.delta(module), weighted_sum(x, WEIGHTS)) < TOL
        assert rel(normalized.delta(module), weighted_sum(x, WEIGHTS) / sum(WEIGHTS)) < TOL


# -- exact and spectral methods -------------------------------------------------------------------------------------
def nonzero_svd(x, limit=None):
    """Dense SVD keeping the numerically non-zero triplets (lorafuse's documented reading of the dense codes)."""
    U, S, Vh = torch.linalg.svd(x, full_matrices=False)
    k = int((S > 1e-6 * S[0]).sum()) if S[0] > 0 else 0
    k = k if limit is None else min(k, limit)
    return U[:, :k], S[:k], Vh[:k].T


def procrustes(M):
    """The authors' orthogonalisation: u·vᵀ from torch.linalg.svd(M)."""
    P, _, Qh = torch.linalg.svd(M, full_matrices=False)
    return P @ Qh


def tsv_reference(x, alpha=1.0):
    """TSV_utils.compute_and_sum_svd_mem_reduction: per task its top ⌊min(m, n)/T⌋ triplets (at most its rank),
    U's and V's concatenated and orthogonalised, rebuilt with the concatenated singular values."""
    budget = math.floor(min(x.shape[1:]) / x.shape[0])
    parts = [nonzero_svd(t, budget) for t in x if t.abs().max() > 0]
    Us, Ss, Vs = zip(*parts)
    return alpha * procrustes(torch.cat(Us, 1)) @ torch.diag(torch.cat(Ss)) @ procrustes(torch.cat(Vs, 1)).T


def iso_c_reference(x, alpha=1.0, rank=None):
    """iso.py iso_c: SVD of the sum (its code: the mean times T), every singular value set to their mean (of the
    top `rank` when a rank is asked for)."""
    U, S, V = nonzero_svd(x.sum(0), rank)
    return alpha * S.mean() * U @ V.T


def iso_cts_reference(x, common=0.8, alpha=1.0, rank=None):
    """iso.py iso_cts with the budget K = the sum's rank (or the asked rank): ⌊common·K⌋ common directions, the
    rest split evenly over the tasks (rounded, the common part grown), per task its top directions off the common
    left subspace, both sides orthogonalised, a flat spectrum at the mean."""
    T = x.shape[0]
    U, S, V = nonzero_svd(x.sum(0))
    K = S.numel() if rank is None else min(rank, S.numel())
    kc = math.floor(common * K)
    per_task = round((K - kc) / T)
    kc = K - per_task * T
    Uc = U[:, :kc]
    parts = [(Uc, S[:kc], V[:, :kc])]
    for t in x:
        if per_task and t.abs().max() > 0:
            parts.append(nonzero_svd(t - Uc @ (Uc.T @ t), per_task))
    Us, Ss, Vs = zip(*parts)
    return alpha * torch.cat(Ss).mean() * procrustes(torch.cat(Us, 1)) @ procrustes(torch.cat(Vs, 1)).T


MODULE_METHODS = {  # method, parameters → reference on the weighted [T, m, n] updates
    "task_arithmetic": ({"lambda": 0.7}, lambda x: 0.7 * x.sum(0)),
    "linear": ({}, lambda x: x.sum(0)),
    "cat": ({}, lambda x: x.sum(0)),
    "tsv": ({"alpha": 0.9}, lambda x: tsv_reference(x, 0.9)),
    "iso_c": ({"alpha": 1.2}, lambda x: iso_c_reference(x, 1.2)),
    "iso_cts": ({"common": 0.6}, lambda x: iso_cts_reference(x, 0.6)),
}


@pytest.mark.parametrize("space", ["full", "core"])
@pytest.mark.parametrize("method", list(MODULE_METHODS))
def test_module_method_matches_its_reference(paths, method, space):
    params, reference = MODULE_METHODS[method]
    result = merge(paths, method, weights=WEIGHTS, space=space, progress=False, **params)
    w = torch.tensor(WEIGHTS, dtype=torch.float64).reshape(-1, 1, 1)
    for module in MODULES:
        blocks, rebuild = SPACES[space](paths, module)
        assert rel(result.delta(module), rebuild(reference(blocks * w))) < TOL, module


def test_average_matches_the_mean(paths):
    result = merge(paths, "average", space="core", progress=False)
    for module in MODULES:
        assert rel(result.delta(module), updates(paths, module).mean(0)) < TOL


@pytest.mark.parametrize("method", ["iso_c", "iso_cts"])
def test_iso_with_a_rank_takes_the_top_directions_then_flattens(paths, method):
    rank = 4
    result = merge(paths, method, weights=WEIGHTS, rank=rank, progress=False)
    w = torch.tensor(WEIGHTS, dtype=torch.float64).reshape(-1, 1, 1)
    reference = iso_c_reference if method == "iso_c" else iso_cts_reference
    for module in MODULES:
        assert result.modules[module].rank == rank
        assert rel(result.delta(module), reference(updates(paths, module) * w, rank=rank)) < TOL, module


# -- order invariance ---------------------------------------------------------------------------------------------
ALL_CASES = [(m, p, s) for m, (p, _) in MODULE_METHODS.items() for s in ("full", "core")]
ALL_CASES += [(method_of(c), p, s) for c, (p, _, _) in ELEMENTWISE.items() for s in SPACES]
ALL_CASES += [("average", {}, "full"), ("iso_c", {"rank": 4}, "full"), ("iso_cts", {"rank": 5}, "core"),
              ("tsv", {"rank": 4}, "full"), ("ties", {"density": 0.3, "rank": 4}, "knots")]


@pytest.mark.parametrize(("method", "params", "space"), ALL_CASES,
                         ids=[f"{m}-{s}-{i}" for i, (m, _, s) in enumerate(ALL_CASES)])
def test_permuting_the_adapters_changes_nothing(paths, method, params, space):
    """At the default rank (nothing cut; dense results at Σr) and with a rank: the adapters in reverse order,
    each keeping its weight and name, give the same update to 1e-5."""
    weights = None if method == "average" else WEIGHTS
    forward = merge(paths, method, weights=weights, space=space, progress=False, **params)
    backward = merge(paths[::-1], method, weights=weights and weights[::-1], space=space, progress=False, **params)
    for module in MODULES:
        assert rel(backward.delta(module), forward.delta(module).double()) < 1e-5, module


# -- spectral precision ---------------------------------------------------------------------------------------------
def _negated(src, dst):
    """A copy of the adapter at `src` with every lora_B negated: its update is exactly −ΔW."""
    import shutil

    from safetensors.torch import save_file

    shutil.copytree(src, dst)
    state = load_file(str(dst / "adapter_model.safetensors"))
    save_file({k: -v if "lora_B" in k else v for k, v in state.items()}, str(dst / "adapter_model.safetensors"))
    return dst


@pytest.mark.parametrize("space", ["full", "core"])
@pytest.mark.parametrize("method", ["iso_c", "iso_cts"])
def test_iso_of_a_cancelling_sum_is_exactly_zero(paths, tmp_path, method, space):
    """ΔW + (−ΔW) = 0: the rank is measured against the inputs' rounding, not the result's own, so nothing of the
    rounding noise is flattened into an update (it was: norm 0.6–1.3 for Iso-CTS, 7e-7 for Iso-C)."""
    pair = [paths[0], _negated(paths[0], tmp_path / "neg")]
    result = merge(pair, method, names=["a", "neg"], space=space, progress=False)
    for module in MODULES:
        assert float(result.delta(module).abs().max()) == 0.0, module


def test_iso_cts_of_eight_adapters_matches_its_reference_in_any_order(tmp_path):
    """T = 8 (Σr = min(m, n)): the subspaces are cut at near-equal singular values, so float32 orthogonalisation
    gave 7.2e-5 from the float64 reference and 7.6e-5 between orders; float64 subspaces give 4.7e-7 and 4.1e-7."""
    from adapter_factory import write_adapter

    shape = {"layer.0.q": (256, 128)}
    inputs = [write_adapter(tmp_path / f"t{i}", shape, r=8, alpha=8, seed=100 + i) for i in range(8)]
    weights = [1.0, -0.7, 0.9, 1.2, 0.5, -1.1, 0.8, 0.6]
    x = torch.stack([factors(p, "layer.0.q")[0] @ factors(p, "layer.0.q")[1] for p in inputs])
    reference = iso_cts_reference(x * torch.tensor(weights, dtype=torch.float64).reshape(-1, 1, 1))
    forward = merge(inputs, "iso_cts", weights=weights, progress=False).delta("layer.0.q")
    backward = merge(inputs[::-1], "iso_cts", weights=weights[::-1], progress=False).delta("layer.0.q")
    assert rel(forward, reference) < 1e-5
    assert rel(backward, forward.double()) < 1e-5


# -- ties -------------------------------------------------------------------------------------------------------------
def _quantised_adapters(root, count=2, rank=2):
    """Adapters whose factors take values in {−1, 0, 1}: ΔW has five distinct values, each tied across hundreds
    of entries, and so do KnOTS blocks C·A_t (each entry a sum of two exact products)."""
    import numpy as np
    from safetensors.numpy import save_file

    out = []
    for i in range(count):
        rng = np.random.default_rng(i)
        state = {}
        for module, (m, n) in MIXED_MODULES.items():
            state[f"base_model.model.{module}.lora_A.weight"] = rng.integers(-1, 2, (rank, n)).astype(np.float32)
            state[f"base_model.model.{module}.lora_B.weight"] = rng.integers(-1, 2, (m, rank)).astype(np.float32)
        d = root / f"q{i}"
        d.mkdir()
        save_file(state, str(d / "adapter_model.safetensors"))
        (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": rank,
                                                           "target_modules": ["q_proj", "k_proj", "down_proj"]}))
        out.append(d)
    return out


@pytest.mark.parametrize("space", list(SPACES))
@pytest.mark.parametrize("scope", ["module", "global"])
@pytest.mark.parametrize(("method", "params"), [("magnitude_prune", {"density": 0.2}), ("ties", {"density": 0.3}),
                                                ("breadcrumbs", {"density": 0.3, "gamma": 0.1})])
def test_magnitude_ties_keep_exactly_int_d_n(tmp_path, monkeypatch, method, params, scope, space):
    """Quantised updates tie hundreds of entries at the threshold: exactly int(d·N) are kept per task and scope
    (ties broken by position, as a stable sort), where every tied entry used to be kept."""
    import lorafuse.merging.methods.elementwise as elementwise

    calls: list[tuple[torch.Tensor, int]] = []  # per merge call (one per module here): kept per task, N per task
    original = elementwise.combine

    def spy(x, *args):
        calls.append(((x != 0).reshape(x.shape[0], -1).sum(1), x[0].numel()))
        return original(x, *args)

    trim = elementwise.BandKernel._trim

    def spy_trim(self, x):  # bands whose limits carry no tie budget any more run the planned kernel
        trim(self, x)
        calls.append(((x != 0).reshape(x.shape[0], -1).sum(1), x[0].numel()))

    import lorafuse.merging.methods.kernels as kernels

    launch = kernels.run

    def spy_kernel(kernel, threads, *args):  # the compiled merge pass leaves each task's trimmed values in x
        launch(kernel, threads, *args)
        if kernel is kernels.merge_band:
            x = torch.from_numpy(args[0])
            calls.append(((x != 0).reshape(x.shape[0], -1).sum(1), x[0].numel()))

    monkeypatch.setattr(elementwise, "combine", spy)
    monkeypatch.setattr(elementwise.BandKernel, "_trim", spy_trim)
    monkeypatch.setattr(kernels, "run", spy_kernel)
    merge(_quantised_adapters(tmp_path), method, space=space, trim_scope=scope, progress=False, **params)
    density = params["density"]
    if scope == "module":
        for kept, total in calls:
            assert kept.tolist() == [int(density * total)] * 2
    else:
        total = sum(n for _, n in calls)
        assert torch.stack([k for k, _ in calls]).sum(0).tolist() == [int(density * total)] * 2


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_breadcrumbs_authors_thresholds_rows_of_the_stored_weight(tmp_path, fan_in_fan_out):
    """The authors' rule is per row of the stored weight matrix: ΔW's rows, or ΔWᵀ's (ΔW's columns) when
    fan_in_fan_out stores the weight as in×out (GPT-2's Conv1D)."""
    from adapter_factory import write_adapter

    shape = {"layer.0.c_attn": (24, 40)}
    inputs = [write_adapter(tmp_path / f"t{i}", shape, r=3, alpha=6, seed=i, fan_in_fan_out=fan_in_fan_out)
              for i in range(2)]
    result = merge(inputs, "breadcrumbs", rule="authors", density=0.5, gamma=0.1, weights=WEIGHTS[:2], rank=24,
                   exact_svd=True, progress=False)
    x = torch.stack([factors(p, "layer.0.c_attn")[0] @ factors(p, "layer.0.c_attn")[1] for p in inputs])
    stored = x.transpose(1, 2) if fan_in_fan_out else x
    sparse = breadcrumbs_authors({"m": stored}, 0.1, 0.5)["m"]
    reference = weighted_sum(sparse.transpose(1, 2) if fan_in_fan_out else sparse, WEIGHTS[:2])
    assert rel(result.delta("layer.0.c_attn"), reference) < TOL


# -- newer low-rank-aware methods: CART, STAR, RobustMerge, WUDI, CtM ------------------------------------------------
def cart_reference(x, lam=2.0, ratio=0.12, ceil=False):
    """JH-GEECS/CART merging.py (CART): θ_avg = mean of the task vectors; each centred τ_t − θ_avg cut by a dense SVD
    to its top k = max(1, int(ratio·min(m, n))) triplets (the Core Space code's get_cart_delta_w: ceil); the cut
    parts summed, scaled by the prior λ and added to the mean."""
    avg = x.mean(0)
    dim = min(x.shape[1:])
    k = math.ceil(ratio * dim) if ceil else max(1, int(ratio * dim))
    total = torch.zeros_like(avg)
    for t in x:
        U, S, Vh = torch.linalg.svd(t - avg, full_matrices=False)
        total += U[:, :k] @ torch.diag(S[:k]) @ Vh[:k]
    return avg + lam * total


def star_reference(x, eta=40.0, lam=1.0):
    """IBM/STAR merger/STAR.py star (dense SVD; searchsorted of the nuclear-norm share, + 1; kept values rescaled
    to the full nuclear norm), then simple_avg.weighted_merge with 1/T. A task without the module is all zeros:
    the dense code's SVD of zeros gives zeros (we skip it; it still counts in 1/T)."""
    out = torch.zeros_like(x[0])
    for t in x:
        if t.abs().max() == 0:
            continue
        U, S, Vh = torch.linalg.svd(t, full_matrices=False)
        k = int(torch.searchsorted(torch.cumsum(S, 0), S.sum() * eta / 100)) + 1
        kept = S[:k] * S.sum() / S[:k].sum()
        out += U[:, :k] @ torch.diag(kept) @ Vh[:k] / x.shape[0]
    return lam * out


def robustmerge_reference(paths, module, weights, mask_ratio=0.2, att_ratio=0.2, fuse_weight=2.0):
    """AuroraZengfh/RobustMerge llava/model/builder.py (load_and_merge_pretrained_model + clamp), on the factors:
    per task and factor the entries ≥ the kthvalue(int(N·(1 − mask_ratio))) of |x|; per row of A the scale
    Σ|A| / Σ|Ã| clamped below at its sorted[int(r·(1 − att_ratio))]; Â = f·ΣÃ, B̂ = f·Σ s·B̃ / Σ s (per column).
    lorafuse's documented extensions: B carries its LoRA scale and the weight; mixed ranks matched by index, each
    direction normalised over the tasks that have it; ΔW = B̂·Â."""
    m, n = MIXED_MODULES[module]
    present = [(f, w) for p, w in zip(paths, weights) if (f := factors(p, module)) is not None]
    r = max(A.shape[0] for (_, A), _ in present)
    A_sum, B_sum = torch.zeros(r, n, dtype=torch.float64), torch.zeros(m, r, dtype=torch.float64)
    norm = torch.zeros(r, dtype=torch.float64)
    for (B, A), w in present:
        masks = []
        for x in (A, B):
            kth = x.abs().reshape(-1).kthvalue(int(x.numel() * (1 - mask_ratio))).values
            masks.append(x.abs() >= kth)
        s = A.abs().sum(-1) / (masks[0] * A).abs().sum(-1)
        s = torch.clamp(s, torch.sort(s).values[int(s.numel() * (1 - att_ratio))], torch.sort(s).values[-1])
        k = A.shape[0]
        A_sum[:k] += masks[0] * A
        B_sum[:, :k] += w * s * (masks[1] * B)
        norm[:k] += s
    return (fuse_weight * B_sum / norm) @ (fuse_weight * A_sum)


def wudi_reference(x, steps=300, lr=1e-5):
    """FusionBench fusion_bench/method/wudi/wudi.py wudi_merging (= the paper, and the authors' RoBERTa code with its
    own lr): Adam (weight decay 0) from the sum, on Σ_t ‖(τ − τ_t)τ_tᵀ‖²/‖τ_t‖², autograd, dense, float64. A task
    without the module is left out (its term is 0/0 there; lorafuse's documented choice)."""
    tvs = torch.stack([t for t in x if t.abs().max() > 0])
    tau = torch.nn.Parameter(tvs.sum(0).clone())
    optimizer = torch.optim.Adam([tau], lr=lr, weight_decay=0)
    norms = tvs.reshape(tvs.shape[0], -1).norm(dim=-1) ** 2
    for _ in range(steps):
        loss = (torch.matmul(tau.unsqueeze(0) - tvs, tvs.transpose(1, 2)).square() / norms[:, None, None]).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return tau.detach()


def ctm_reference(paths, module, weights, rank, iters, combine):
    """CtM (no code: the paper as lorafuse's docstring reads it), dense and float64: the Tucker-2 of the unweighted
    ΔW_t by HOSVD (top-`rank` left singular vectors of [ΔW_1 … ΔW_T] and of [ΔW_1ᵀ … ΔW_Tᵀ]) and `iters` HOOI
    sweeps, each basis vector with lorafuse's sign convention; cores C_t = Uᵀ ΔW_t V merged by `combine` (the
    element-wise references above, on the cores), ΔW = U·merged·Vᵀ."""
    x = updates(paths, module)

    def top(M):
        return torch.linalg.svd(M, full_matrices=False)[0][:, :rank]

    U, V = top(torch.cat(list(x), 1)), top(torch.cat([t.T for t in x], 1))
    for _ in range(iters):
        U = top(torch.cat([t @ V for t in x], 1))
        V = top(torch.cat([t.T @ U for t in x], 1))
    U, V = U * signed(U), V * signed(V)
    cores = torch.stack([U.T @ t @ V for t in x])
    return U @ combine(module, cores, weights) @ V.T


CTM_CASES = {  # case → (parameters, rank, HOOI sweeps, combine(module, cores, weights))
    "ta": ({"lambda": 0.8, "hooi_iters": 0}, None, 0, lambda m, c, w: weighted_sum(c, w, 0.8)),
    "ta-hooi": ({}, 5, 10, lambda m, c, w: weighted_sum(c, w)),
    "ties": ({"base": "ties", "density": 0.4, "lambda": 1.2}, 4, 10,
             lambda m, c, w: ties_combine(magnitude({m: c}, 0.4, "module")[m], w, 1.2)),
    "dare_ties": ({"base": "dare_ties", "drop_rate": 0.5, "seed": 2, "trim_density": 0.5, "majority": "frequency"},
                  None, 10,
                  lambda m, c, w: ties_combine(magnitude(dare_drop({m: c}, 0.5, 2, ["a", "b", "c"]), 0.5,
                                                         "module")[m], w, 1.0, "frequency")),
}


@pytest.mark.parametrize("case", list(CTM_CASES))
def test_ctm_matches_its_reference(paths, case):
    params, rank, iters, combine = CTM_CASES[case]
    result = merge(paths, "ctm", weights=WEIGHTS, rank=rank, progress=False, **params)
    worst = 0.0
    for module in MODULES:
        r = rank or max(f[1].shape[0] for p in paths if (f := factors(p, module)) is not None)
        assert result.modules[module].rank <= r
        worst = max(worst, rel(result.delta(module), ctm_reference(paths, module, WEIGHTS, r, iters, combine)))
    print(f"\nctm-{case}: worst relative disagreement {worst:.2e}")
    assert worst < TOL, case


def test_ctm_refuses_parameters_its_base_rule_does_not_take(paths):
    with pytest.raises(ConfigError, match="drop_rate"):
        merge(paths, "ctm", base="ties", drop_rate=0.5, progress=False)
    with pytest.raises(ConfigError, match="density"):
        merge(paths, "ctm", density=0.5, progress=False)
    with pytest.raises(ConfigError, match="one density"):
        merge(paths, "ctm", base="ties", densities=[0.2, 0.3, 0.2], progress=False)


NEW_METHODS = {  # case → (method, parameters, space, reference on the weighted [T, m, n] blocks of that space)
    "cart": ("cart", {}, "full", cart_reference),
    "cart-params": ("cart", {"lambda": 0.7, "rank_ratio": 0.2}, "full", lambda x: cart_reference(x, 0.7, 0.2)),
    "cart-core-ceil": ("cart", {"lambda": 1.5, "rank_ratio": 0.3, "rounding": "ceil"}, "core",
                       lambda x: cart_reference(x, 1.5, 0.3, ceil=True)),
    "star": ("star", {}, "full", star_reference),
    "wudi": ("wudi", {}, "full", wudi_reference),
    "wudi-fast": ("wudi", {"steps": 60, "lr": 2e-3}, "full", lambda x: wudi_reference(x, 60, 2e-3)),
    "wudi-scaled": ("wudi", {"steps": 60, "lr": 2e-3, "lambda": 0.3}, "full", lambda x: 0.3 * wudi_reference(x, 60, 2e-3)),
    "star-params": ("star", {"eta": 75.0, "lambda": 1.4}, "full", lambda x: star_reference(x, 75.0, 1.4)),
}
FACTOR_METHODS = {  # case → (method, parameters, reference on the adapters' factors of one module)
    "robustmerge": ("robustmerge", {}, robustmerge_reference),
    "robustmerge-params": ("robustmerge", {"density": 0.5, "att_ratio": 0.5, "fuse_weight": 1.0},
                           lambda p, m, w: robustmerge_reference(p, m, w, 0.5, 0.5, 1.0)),
}


@pytest.mark.parametrize("case", list(FACTOR_METHODS))
def test_factor_method_matches_its_reference(paths, case):
    method, params, reference = FACTOR_METHODS[case]
    result = merge(paths, method, weights=WEIGHTS, progress=False, **params)
    worst = max(rel(result.delta(module), reference(paths, module, WEIGHTS)) for module in MODULES)
    print(f"\n{case}: worst relative disagreement {worst:.2e}")
    assert worst < TOL, case


@pytest.mark.parametrize("case", list(NEW_METHODS))
def test_new_method_matches_its_reference(paths, case):
    method, params, space, reference = NEW_METHODS[case]
    result = merge(paths, method, weights=WEIGHTS, space=space, rank=FULL, exact_svd=True, progress=False, **params)
    w = torch.tensor(WEIGHTS, dtype=torch.float64).reshape(-1, 1, 1)
    worst = 0.0
    for module in MODULES:
        blocks, rebuild = SPACES[space](paths, module)
        worst = max(worst, rel(result.delta(module), rebuild(reference(blocks * w))))
    print(f"\n{case}: worst relative disagreement {worst:.2e}")
    assert worst < TOL, case


@pytest.mark.parametrize(("method", "space"), [("star", "core"), ("star", "knots"), ("cart", "knots"),
                                               ("robustmerge", "core"), ("wudi", "core"), ("ctm", "core")])
def test_new_methods_refuse_spaces_they_are_not_defined_in(paths, method, space):
    with pytest.raises(ConfigError, match=f"method '{method}'"):
        merge(paths, method, space=space, progress=False)


NEW_ORDER_CASES = [(m, p, s) for m, p, s, _ in NEW_METHODS.values()]
NEW_ORDER_CASES += [(m, p, "full") for m, p, _ in FACTOR_METHODS.values()]
NEW_ORDER_CASES += [("ctm", {**p, "rank": r}, "full") for p, r, _, _ in CTM_CASES.values()]
NEW_ORDER_CASES += [("cart", {"rank": 4}, "full"), ("star", {"rank": 3}, "full"),
                    ("robustmerge", {"rank": 3}, "full"), ("wudi", {"rank": 4, "lr": 1e-3, "steps": 50}, "full")]


@pytest.mark.parametrize(("method", "params", "space"), NEW_ORDER_CASES,
                         ids=[f"{m}-{s}-{i}" for i, (m, _, s) in enumerate(NEW_ORDER_CASES)])
def test_permuting_the_adapters_changes_no_new_method(paths, method, params, space):
    forward = merge(paths, method, weights=WEIGHTS, space=space, progress=False, **params)
    backward = merge(paths[::-1], method, weights=WEIGHTS[::-1], space=space, progress=False, **params)
    for module in MODULES:
        assert rel(backward.delta(module), forward.delta(module).double()) < 1e-5, module


def test_ctm_draws_random_numbers_only_with_dare_ties():
    """Experiments run a method over several seeds when it draws random numbers: CtM only with base dare_ties."""
    from lorafuse.experiment.config import parse_config

    config = parse_config({"name": "x", "model": "minilm", "tasks": ["rte"], "methods": [
        {"method": "ctm"}, {"method": "ctm", "label": "ctm-ties", "params": {"base": "ties"}},
        {"method": "ctm", "label": "ctm-dare", "params": {"base": "dare_ties"}}, {"method": "wudi"}]}, "cfg")
    assert [m.stochastic for m in config.methods] == [False, False, True, False]
