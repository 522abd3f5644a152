//! Numbers produced by the real PEFT package (tests/generate_golden.py) reproduced in Rust.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use peft_rs::PeftAdapter;
use peft_rs::base::{Conv2dParams, ModuleKind};
use peft_rs::io::read_safetensors;
use peft_rs::peft_adapter::ModuleKinds;

fn golden(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(case)
}

fn load(path: &Path) -> HashMap<String, Tensor> {
    read_safetensors(path).unwrap().into_iter().collect()
}

fn abs_max(t: &Tensor) -> f64 {
    let t = t.to_dtype(DType::F64).unwrap();
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    let a = a.to_dtype(DType::F64).unwrap();
    abs_max(&(a - b.to_dtype(DType::F64).unwrap()).unwrap())
}

fn assert_close(actual: &Tensor, expected: &Tensor, what: &str) {
    let tol = 1e-5 * abs_max(expected).max(1.0);
    let diff = max_abs_diff(actual, expected);
    assert!(diff <= tol, "{what}: max |diff| {diff} > {tol}");
}

/// The module types of each case's model (tests/conftest.py): what `peft_rs.module_types`
/// reads from the torch model. Every module with a weight in `base`.
fn model_kinds(case: &str, base: &HashMap<String, Tensor>) -> ModuleKinds {
    let dir = golden(case);
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("meta.json")).unwrap()).unwrap();
    base.keys()
        .filter_map(|k| k.strip_suffix(".weight"))
        .map(|module| {
            let kind = match (case, module) {
                ("conv1d", _) => ModuleKind::Conv1D,
                ("embedding", "emb") => ModuleKind::Embedding,
                ("conv2d", _) => {
                    let m = &meta[module];
                    ModuleKind::Conv2d(Conv2dParams {
                        stride: m["stride"].as_u64().unwrap() as usize,
                        padding: m["padding"].as_u64().unwrap() as usize,
                        ..Default::default()
                    })
                }
                _ => ModuleKind::Linear,
            };
            (module.to_string(), kind)
        })
        .collect()
}

fn check_case(case: &str) {
    let dir = golden(case);
    let adapter = PeftAdapter::from_pretrained(&dir.join("adapter"), None).unwrap();
    let base = load(&dir.join("base.safetensors"));
    let expected = load(&dir.join("expected.safetensors"));
    let kinds = model_kinds(case, &base);

    let merged = adapter.merge_into(&base, &kinds, true).unwrap();
    let mut checked = 0;
    for (key, want) in expected
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix("merged.")?, v)))
    {
        let got = merged.get(key).or_else(|| base.get(key)).unwrap();
        assert_close(got, want, &format!("{case}: merged {key}"));
        checked += 1;
    }
    assert_eq!(checked, base.len());

    for module in adapter.module_names() {
        let layer = adapter
            .layer(
                module,
                adapter.base_layer_from(module, &kinds, &base).unwrap(),
            )
            .unwrap();
        let x = &expected[&format!("input.{module}")];
        let want = &expected[&format!("output.{module}")];
        assert_close(
            &layer.forward(x).unwrap(),
            want,
            &format!("{case}: forward {module}"),
        );
    }
}

#[test]
fn linear_with_lora_bias() {
    check_case("linear");
}

#[test]
fn modules_to_save() {
    check_case("modules_to_save");
}

#[test]
fn rank_alpha_patterns_with_rslora() {
    check_case("patterns_rslora");
}

#[test]
fn transformers_conv1d() {
    check_case("conv1d");
}

#[test]
fn embedding() {
    check_case("embedding");
}

#[test]
fn conv2d() {
    check_case("conv2d");
}

#[test]
fn merge_unmerge_round_trip_on_golden_layers() {
    for case in ["linear", "conv1d", "embedding", "conv2d"] {
        let dir = golden(case);
        let adapter = PeftAdapter::from_pretrained(&dir.join("adapter"), None).unwrap();
        let base = load(&dir.join("base.safetensors"));
        let kinds = model_kinds(case, &base);
        for module in adapter.module_names() {
            let mut layer = adapter
                .layer(
                    module,
                    adapter.base_layer_from(module, &kinds, &base).unwrap(),
                )
                .unwrap();
            let before = layer.base().weight().unwrap();
            layer.merge(None, false).unwrap();
            assert!(
                max_abs_diff(&layer.base().weight().unwrap(), &before) > 1e-4,
                "{case}/{module}: merge changed nothing"
            );
            layer.unmerge().unwrap();
            assert_close(
                &layer.base().weight().unwrap(),
                &before,
                &format!("{case}/{module} unmerge"),
            );
        }
    }
}

#[test]
fn save_round_trip_is_lossless() {
    let dir = golden("patterns_rslora");
    let adapter = PeftAdapter::from_pretrained(&dir.join("adapter"), None).unwrap();
    let out = tempfile::tempdir().unwrap();
    adapter.save_pretrained(out.path()).unwrap();
    let again = PeftAdapter::from_pretrained(out.path(), None).unwrap();
    assert_eq!(adapter.config(), again.config());
    let (a, b) = (adapter.to_state_dict(), again.to_state_dict());
    assert_eq!(a.len(), b.len());
    for ((ka, ta), (kb, tb)) in a.iter().zip(&b) {
        assert_eq!(ka, kb);
        assert_eq!(max_abs_diff(ta, tb), 0.0);
    }
    // PEFT's file layout: sorted keys, 2-space indent, inference_mode written as true.
    let text = std::fs::read_to_string(out.path().join("adapter_config.json")).unwrap();
    let value: serde_json::Value = serde_json::from_str(&text).unwrap();
    let keys: Vec<_> = value.as_object().unwrap().keys().cloned().collect();
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(keys, sorted);
    assert_eq!(value["inference_mode"], true);
    assert_eq!(value["rank_pattern"]["layers.1.q"], 2);
}
