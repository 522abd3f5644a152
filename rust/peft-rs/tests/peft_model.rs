//! PeftModel on a small model written against `ModelBuilder`: injection by targeting rules,
//! mixed batches equal to single-adapter runs for every kind of method, save/load round trips,
//! hot swap, merge_and_unload, deletion rules. (Parity with PEFT on real models is in the Python
//! tests.)

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use peft_rs::model::{Layer, Model, ModelBuilder, ModelInput, Modules, PeftModel};
use peft_rs::{PeftConfig, PeftError, Result};
use serde_json::json;

/// `classifier(relu(lin1(relu(lin0(x)))))`; `input_ids` carries float features here.
struct Mlp {
    lin0: Layer,
    lin1: Layer,
    classifier: Layer,
    modules: Modules,
}

impl Mlp {
    fn new(seed: u64) -> Mlp {
        let dev = Device::Cpu;
        let mut tensors = HashMap::new();
        let mut value = seed as f32;
        let mut next = |shape: &[usize]| {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = (0..n)
                .map(|_| {
                    value = (value * 1.7 + 0.31).fract();
                    value - 0.5
                })
                .collect();
            Tensor::from_vec(data, shape, &dev).unwrap()
        };
        for (name, (out, inp)) in [("lin0", (12, 6)), ("lin1", (8, 12)), ("classifier", (3, 8))] {
            tensors.insert(format!("{name}.weight"), next(&[out, inp]));
            tensors.insert(format!("{name}.bias"), next(&[out]));
        }
        let b = ModelBuilder::new(VarBuilder::from_tensors(tensors, DType::F32, &dev));
        Mlp {
            lin0: b.pp("lin0").linear(6, 12, true).unwrap(),
            lin1: b.pp("lin1").linear(12, 8, true).unwrap(),
            classifier: b.pp("classifier").linear(8, 3, true).unwrap(),
            modules: b.modules(),
        }
    }
}

impl Model for Mlp {
    fn forward(&self, input: &ModelInput) -> Result<Tensor> {
        let h = self.lin0.forward(&input.input_ids)?.relu()?;
        let h = self.lin1.forward(&h)?.relu()?;
        self.classifier.forward(&h)
    }

    fn modules(&self) -> &Modules {
        &self.modules
    }

    fn architecture(&self) -> &'static str {
        "Mlp"
    }
}

fn config(value: serde_json::Value) -> PeftConfig {
    PeftConfig::from_json(value).unwrap()
}

fn lora() -> PeftConfig {
    config(
        json!({"peft_type": "LORA", "r": 2, "target_modules": ["lin0", "lin1"], "init_lora_weights": false}),
    )
}

fn input(rows: usize) -> ModelInput {
    let x = Tensor::arange(0f32, (rows * 6) as f32, &Device::Cpu)
        .unwrap()
        .reshape((rows, 6))
        .unwrap()
        .affine(0.05, -0.4)
        .unwrap();
    ModelInput::new(x)
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    a.sub(b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// Three adapters of different kinds (additive, scaling, rotation) on overlapping modules.
fn three_adapters() -> PeftModel {
    let mut model = PeftModel::new(Arc::new(Mlp::new(1)));
    model.add_adapter("a", lora(), 0).unwrap();
    let ia3 = config(
        json!({"peft_type": "IA3", "target_modules": ["lin1", "classifier"], "init_ia3_weights": false}),
    );
    model.add_adapter("b", ia3, 1).unwrap();
    let oft = config(
        json!({"peft_type": "OFT", "r": 0, "oft_block_size": 3, "target_modules": ["lin0"], "init_weights": false}),
    );
    model.add_adapter("c", oft, 2).unwrap();
    model
}

#[test]
fn first_adapter_is_active_and_later_ones_are_not() {
    let model = three_adapters();
    assert_eq!(model.active_adapters(), ["a"]);
    assert_eq!(model.adapter_names(), ["a", "b", "c"]);
    let base = PeftModel::new(Arc::new(Mlp::new(1)));
    let x = input(2);
    assert!(max_diff(&model.forward(&x).unwrap(), &base.forward(&x).unwrap()) > 1e-3);
}

#[test]
fn mixed_batch_rows_equal_single_adapter_runs() {
    let mut model = three_adapters();
    let x = input(5);
    let rows: Vec<String> = ["a", "b", "__base__", "c", "a"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let mixed = model.forward_mixed(&x, &rows).unwrap();
    for (i, name) in rows.iter().enumerate() {
        let single = if name == "__base__" {
            model.enable_adapters(false).unwrap();
            let y = model.forward(&x).unwrap();
            model.enable_adapters(true).unwrap();
            y
        } else {
            model.set_adapter(&[name]).unwrap();
            model.forward(&x).unwrap()
        };
        let (got, want) = (mixed.get(i).unwrap(), single.get(i).unwrap());
        assert!(max_diff(&got, &want) < 1e-6, "row {i} ({name})");
    }
    let err = model.forward_mixed(&x, &rows[..2]).unwrap_err();
    assert!(
        err.to_string().contains("Length of `adapter_names`"),
        "{err}"
    );
    let unknown = vec!["zzz".to_string(); 5];
    let err = model.forward_mixed(&x, &unknown).unwrap_err();
    assert!(
        err.to_string().contains("non-existing adapter(s): zzz"),
        "{err}"
    );
}

#[test]
fn several_active_adapters_and_merging_agree() {
    let mut model = three_adapters();
    model.set_adapter(&["a", "b", "c"]).unwrap();
    let x = input(3);
    let unmerged = model.forward(&x).unwrap();
    model.merge_adapter(Some(&["a"]), true).unwrap();
    assert!(max_diff(&model.forward(&x).unwrap(), &unmerged) < 1e-5);
    model.merge_adapter(None, true).unwrap();
    assert!(max_diff(&model.forward(&x).unwrap(), &unmerged) < 1e-5);
    model.unmerge_adapter().unwrap();
    assert!(max_diff(&model.forward(&x).unwrap(), &unmerged) < 1e-5);
    let err = model.set_adapter(&["nope"]).unwrap_err();
    assert!(matches!(err, PeftError::MissingKey { .. }), "{err}");
}

#[test]
fn save_and_load_round_trip_and_hot_swap() {
    let dir = tempfile::tempdir().unwrap();
    let model = three_adapters();
    let written = model.save_pretrained(dir.path(), None).unwrap();
    assert_eq!(written.len(), 3); // "a", "b", "c": non-default names go to sub-folders
    let x = input(2);

    let mut other =
        PeftModel::from_pretrained(Arc::new(Mlp::new(1)), &dir.path().join("a"), "a").unwrap();
    other.load_adapter(&dir.path().join("c"), "c").unwrap();
    other.set_adapter(&["a", "c"]).unwrap();
    let mut original = three_adapters();
    original.set_adapter(&["a", "c"]).unwrap();
    assert!(max_diff(&other.forward(&x).unwrap(), &original.forward(&x).unwrap()) < 1e-6);

    // Hot swap: "a" takes the weights of another LoRA adapter with the same shapes.
    let swap_dir = tempfile::tempdir().unwrap();
    let mut donor = PeftModel::new(Arc::new(Mlp::new(1)));
    donor.add_adapter("default", lora(), 42).unwrap();
    donor.save_pretrained(swap_dir.path(), None).unwrap();
    other.set_adapter(&["a"]).unwrap();
    other.hotswap_adapter(swap_dir.path(), "a").unwrap();
    assert!(max_diff(&other.forward(&x).unwrap(), &donor.forward(&x).unwrap()) < 1e-6);

    // A rank mismatch is refused and leaves the adapter as it was.
    let bad_dir = tempfile::tempdir().unwrap();
    let mut bad = PeftModel::new(Arc::new(Mlp::new(1)));
    let r4 = config(
        json!({"peft_type": "LORA", "r": 4, "target_modules": ["lin0", "lin1"], "init_lora_weights": false}),
    );
    bad.add_adapter("default", r4, 0).unwrap();
    bad.save_pretrained(bad_dir.path(), None).unwrap();
    let before = other.forward(&x).unwrap();
    let err = other.hotswap_adapter(bad_dir.path(), "a").unwrap_err();
    assert!(matches!(err, PeftError::ShapeMismatch { .. }), "{err}");
    assert!(max_diff(&other.forward(&x).unwrap(), &before) == 0.0);
}

#[test]
fn load_is_strict_and_leaves_nothing_on_failure() {
    let dir = tempfile::tempdir().unwrap();
    let mut saved = PeftModel::new(Arc::new(Mlp::new(1)));
    saved.add_adapter("default", lora(), 0).unwrap();
    saved.save_pretrained(dir.path(), None).unwrap();
    // A model whose modules the adapter does not match: nothing is added.
    let mut model = PeftModel::new(Arc::new(Mlp::new(1)));
    model.add_adapter("x", lora(), 0).unwrap();
    let err = model.load_adapter(dir.path(), "x").unwrap_err();
    assert!(err.to_string().contains("already exists"), "{err}");
    assert_eq!(model.adapter_names(), ["x"]);
    let none = config(json!({"peft_type": "LORA", "target_modules": ["nothing"]}));
    let err = model.add_adapter("y", none, 0).unwrap_err();
    assert!(
        err.to_string().contains("not found in the base model"),
        "{err}"
    );
    assert_eq!(model.adapter_names(), ["x"]);
}

#[test]
fn delete_and_merge_and_unload() {
    let mut model = three_adapters();
    model.set_adapter(&["c"]).unwrap();
    let err = model.delete_adapter("zzz").unwrap_err();
    assert!(err.to_string().contains("[\"a\", \"b\", \"c\"]"), "{err}");
    model.delete_adapter("c").unwrap();
    assert_eq!(model.active_adapters(), ["a"]); // alphabetically first remaining, as PEFT
    model.merge_adapter(None, false).unwrap();
    assert!(model.delete_adapter("a").is_err()); // merged
    model.unmerge_adapter().unwrap();

    let x = input(2);
    let expected = model.forward(&x).unwrap();
    let plain = model.merge_and_unload(true).unwrap();
    assert!(max_diff(&plain.forward(&x).unwrap(), &expected) < 1e-5);
    for layer in plain.modules().layers() {
        assert!(layer.module().adapter_names().is_empty());
    }
}

#[test]
fn modules_to_save_copies_are_saved_under_peft_keys() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        json!({"peft_type": "LORA", "r": 2, "target_modules": ["lin0"], "modules_to_save": ["classifier"]}),
    );
    let mut model = PeftModel::new(Arc::new(Mlp::new(1)));
    model.add_adapter("default", cfg, 0).unwrap();
    let keys: Vec<String> = model
        .adapter("default")
        .unwrap()
        .to_state_dict()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert!(
        keys.contains(&"base_model.model.classifier.weight".to_string()),
        "{keys:?}"
    );
    assert!(
        keys.contains(&"base_model.model.classifier.bias".to_string()),
        "{keys:?}"
    );
    model.save_pretrained(dir.path(), None).unwrap();
    let loaded = PeftModel::from_pretrained(Arc::new(Mlp::new(1)), dir.path(), "default").unwrap();
    let x = input(2);
    assert!(max_diff(&loaded.forward(&x).unwrap(), &model.forward(&x).unwrap()) < 1e-6);
}
