//! `AdaptedModule` semantics with adapters of different methods on one module (LoRA + IA³),
//! and the `BaseWeight` seam with a quantised base weight.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{DType, Device, Tensor};
use peft_rs::base::{BaseLayer, BaseWeight, ModuleKind};
use peft_rs::config::ModuleSelector;
use peft_rs::init::Initializer;
use peft_rs::methods::ia3::{IA3_L, Ia3Config};
use peft_rs::methods::lora::{LORA_A, LORA_B, LoraInit};
use peft_rs::{AdaptedModule, LoraConfig, MergeOutcome, ParamSource, PeftError};

const MODULE: &str = "lin";
const OUT: usize = 6;
const IN: usize = 5;

fn no_shared() -> BTreeMap<String, Tensor> {
    BTreeMap::new()
}

fn dense_weight() -> Tensor {
    Initializer::new(1)
        .uniform(&[OUT, IN], 1.0, DType::F32)
        .unwrap()
}

fn dense_base() -> BaseLayer {
    let bias = Initializer::new(2)
        .uniform(&[OUT], 0.5, DType::F32)
        .unwrap();
    BaseLayer::new(ModuleKind::Linear, dense_weight(), Some(bias)).unwrap()
}

fn input() -> Tensor {
    Initializer::new(3)
        .uniform(&[4, IN], 2.0, DType::F32)
        .unwrap()
}

fn targets() -> Option<ModuleSelector> {
    Some(ModuleSelector::Names(vec![MODULE.into()]))
}

/// A LoRA adapter with random (non-identity) A and B.
fn lora_config() -> LoraConfig {
    LoraConfig {
        r: 2,
        lora_alpha: 4.0,
        target_modules: targets(),
        init_lora_weights: LoraInit::Flag(false),
        ..Default::default()
    }
}

fn ia3_config(feedforward: bool) -> Ia3Config {
    Ia3Config {
        target_modules: targets(),
        feedforward_modules: feedforward.then(|| ModuleSelector::Names(vec![MODULE.into()])),
        ..Default::default()
    }
}

/// `ia3_l` away from zero, so that PEFT's unmerge (divide by `l + 1e-8`) is accurate.
fn ia3_l(feedforward: bool) -> ParamSource {
    let l = if feedforward {
        Tensor::new(&[[1.5f32, -0.5, 2.0, 0.8, -1.2]], &Device::Cpu)
    } else {
        Tensor::new(
            &[[1.5f32], [-0.5], [2.0], [0.8], [-1.2], [0.3]],
            &Device::Cpu,
        )
    };
    ParamSource::Given(vec![(IA3_L.to_string(), l.unwrap())])
}

/// A module holding `lora` (LoRA) and `ia3` (IA³, scaling outputs or, `feedforward`, inputs).
fn two_methods(feedforward: bool) -> AdaptedModule {
    let mut layer = AdaptedModule::new(MODULE, dense_base());
    let lora = ParamSource::Init { seed: 7 };
    layer
        .add("lora", &lora_config(), lora, &no_shared())
        .unwrap();
    layer
        .add(
            "ia3",
            &ia3_config(feedforward),
            ia3_l(feedforward),
            &no_shared(),
        )
        .unwrap();
    layer
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn assert_close(a: &Tensor, b: &Tensor, what: &str) {
    let diff = max_abs_diff(a, b);
    assert!(diff <= 1e-5, "{what}: max |diff| {diff}");
}

/// The `ia3_l` of `layer`'s adapter `ia3`, flat.
fn l_of(layer: &AdaptedModule) -> Tensor {
    let l = layer.adapter("ia3").unwrap().params().get(IA3_L).unwrap();
    l.flatten_all().unwrap()
}

#[test]
fn first_adapter_is_active_and_set_active_selects_one_or_several() {
    let mut layer = two_methods(false);
    assert_eq!(layer.adapter_names(), ["lora", "ia3"]);
    assert_eq!(layer.active_adapters(), ["lora"]);
    layer.set_active(&["ia3"]).unwrap();
    assert_eq!(layer.active_adapters(), ["ia3"]);
    layer.set_active(&["ia3", "lora"]).unwrap();
    assert_eq!(layer.active_adapters(), ["ia3", "lora"]);
    let err = layer.set_active(&["lora", "nope"]).unwrap_err();
    assert!(matches!(err, PeftError::MissingKey { .. }), "{err}");
    assert_eq!(layer.active_adapters(), ["ia3", "lora"]);
}

/// Several active adapters compose in order, the last wrapping the ones before it: each
/// adapter's layer function applied to the layer below it.
#[test]
fn forward_is_the_composition_of_the_active_adapters() {
    let x = input();
    for feedforward in [false, true] {
        let mut layer = two_methods(feedforward);
        let l = l_of(&layer);
        let base_y = dense_base().forward(&x).unwrap();
        layer.set_active(&["lora"]).unwrap();
        let lora_y = layer.forward(&x).unwrap();
        assert!(max_abs_diff(&lora_y, &base_y) > 1e-3, "LoRA has an effect");
        // The input a feed-forward IA³ hands to the layer below it.
        let x_scaled = if feedforward {
            x.broadcast_mul(&l).unwrap()
        } else {
            x.clone()
        };
        let lora_of_scaled = layer.forward(&x_scaled).unwrap();

        layer.set_active(&["ia3"]).unwrap();
        let ia3_y = layer.forward(&x).unwrap();
        let want = if feedforward {
            dense_base().forward(&x_scaled).unwrap()
        } else {
            base_y.broadcast_mul(&l).unwrap()
        };
        assert_close(&ia3_y, &want, "IA³ alone");

        // IA³ outermost: it scales the LoRA layer's output, or its input.
        layer.set_active(&["lora", "ia3"]).unwrap();
        let want = if feedforward {
            lora_of_scaled.clone()
        } else {
            lora_y.broadcast_mul(&l).unwrap()
        };
        assert_close(&layer.forward(&x).unwrap(), &want, "LoRA then IA³");

        // LoRA outermost: its path is added to the IA³ layer's output.
        layer.set_active(&["ia3", "lora"]).unwrap();
        let lora_path = (&lora_y - &base_y).unwrap();
        let want = (&ia3_y + &lora_path).unwrap();
        assert_close(&layer.forward(&x).unwrap(), &want, "IA³ then LoRA");
    }
}

#[test]
fn merging_one_then_the_other_keeps_the_forward_and_unmerge_restores_the_weight() {
    let x = input();
    for feedforward in [false, true] {
        for order in [["lora", "ia3"], ["ia3", "lora"]] {
            let what = format!("feedforward={feedforward} order={order:?}");
            let mut layer = two_methods(feedforward);
            layer.set_active(&order).unwrap();
            let unmerged = layer.forward(&x).unwrap();
            let (weight, bias) = (
                layer.base().weight().unwrap(),
                layer.base().bias().unwrap().clone(),
            );

            let first = layer.merge(Some(&order[..1]), false).unwrap();
            assert_eq!(first.merged, [order[0]]);
            assert_eq!(layer.merged_adapters(), [order[0]]);
            assert!(max_abs_diff(&layer.base().weight().unwrap(), &weight) > 1e-3);
            let half = layer.forward(&x).unwrap();
            assert_close(&half, &unmerged, &format!("{what}: one merged"));

            let second = layer.merge(None, false).unwrap();
            assert_eq!(second.merged, [order[1]]);
            assert_eq!(second.already_merged, [order[0]]);
            assert_eq!(layer.merged_adapters(), order);
            let merged = layer.forward(&x).unwrap();
            assert_close(&merged, &unmerged, &format!("{what}: both merged"));

            // Last merged, first unmerged.
            let unmerged_names = layer.unmerge().unwrap();
            assert_eq!(unmerged_names, [order[1], order[0]]);
            assert!(!layer.is_merged());
            assert_close(&layer.base().weight().unwrap(), &weight, &what);
            assert_close(layer.base().bias().unwrap(), &bias, &what);
            assert_close(&layer.forward(&x).unwrap(), &unmerged, &what);
        }
    }
}

#[test]
fn merging_an_already_merged_adapter_is_reported_and_changes_nothing() {
    let mut layer = two_methods(false);
    layer.set_active(&["lora", "ia3"]).unwrap();
    layer.merge(Some(&["lora"]), false).unwrap();
    let weight = layer.base().weight().unwrap();
    let bias = layer.base().bias().unwrap().clone();
    let outcome = layer.merge(Some(&["lora"]), false).unwrap();
    assert_eq!(
        outcome,
        MergeOutcome {
            merged: vec![],
            already_merged: vec!["lora".into()],
        }
    );
    assert_eq!(max_abs_diff(&layer.base().weight().unwrap(), &weight), 0.0);
    assert_eq!(max_abs_diff(layer.base().bias().unwrap(), &bias), 0.0);
    assert_eq!(layer.merged_adapters(), ["lora"]);
}

#[test]
fn delete_unknown_lists_known_names_and_delete_while_merged_errors() {
    let mut layer = two_methods(false);
    let err = layer.delete("nope").unwrap_err();
    assert!(matches!(err, PeftError::MissingKey { .. }), "{err}");
    let message = err.to_string();
    assert!(
        message.contains("\"lora\"") && message.contains("\"ia3\""),
        "{message}"
    );

    layer.merge(Some(&["ia3"]), false).unwrap();
    let err = layer.delete("ia3").unwrap_err();
    assert!(matches!(err, PeftError::InvalidOperation(_)), "{err}");
    assert_eq!(layer.adapter_names(), ["lora", "ia3"]);

    layer.unmerge().unwrap();
    layer.set_active(&["ia3"]).unwrap();
    layer.delete("ia3").unwrap();
    assert_eq!(layer.adapter_names(), ["lora"]);
    // The last active adapter gone, the first remaining one becomes active (PEFT's rule).
    assert_eq!(layer.active_adapters(), ["lora"]);
}

#[test]
fn safe_merge_of_a_nan_adapter_leaves_the_weight_untouched() {
    let mut layer = two_methods(false);
    let mut a = vec![0.5f32; 2 * IN];
    a[3] = f32::NAN;
    let nan = ParamSource::Given(vec![
        (
            LORA_A.to_string(),
            Tensor::from_vec(a, (2, IN), &Device::Cpu).unwrap(),
        ),
        (
            LORA_B.to_string(),
            Tensor::ones((OUT, 2), DType::F32, &Device::Cpu).unwrap(),
        ),
    ]);
    layer.add("bad", &lora_config(), nan, &no_shared()).unwrap();
    layer.set_active(&["ia3", "bad"]).unwrap();
    layer.merge(Some(&["ia3"]), true).unwrap();
    let weight = layer.base().weight().unwrap();
    let bias = layer.base().bias().unwrap().clone();

    let err = layer.merge(Some(&["bad"]), true).unwrap_err();
    assert!(matches!(err, PeftError::NonFiniteMerge { .. }), "{err}");
    assert_eq!(max_abs_diff(&layer.base().weight().unwrap(), &weight), 0.0);
    assert_eq!(max_abs_diff(layer.base().bias().unwrap(), &bias), 0.0);
    assert_eq!(layer.merged_adapters(), ["ia3"]);
}

#[test]
fn disabled_forward_is_the_base_layer() {
    let x = input();
    let base_y = dense_base().forward(&x).unwrap();
    let mut layer = two_methods(false);
    layer.set_active(&["lora", "ia3"]).unwrap();
    assert!(max_abs_diff(&layer.forward(&x).unwrap(), &base_y) > 1e-3);
    layer.enable_adapters(false).unwrap();
    assert_eq!(max_abs_diff(&layer.forward(&x).unwrap(), &base_y), 0.0);

    // Disabling unmerges what was merged.
    layer.enable_adapters(true).unwrap();
    layer.merge(None, false).unwrap();
    let unmerged = layer.enable_adapters(false).unwrap();
    assert_eq!(unmerged, ["ia3", "lora"]);
    assert_close(&layer.forward(&x).unwrap(), &base_y, "disabled after merge");
}

/// A weight stored int8-quantised per output row (absmax scale), as a quantisation crate might
/// hold it; it counts the writes that come through [`BaseWeight::replace`].
#[derive(Debug)]
struct Int8Rows {
    values: Vec<i8>,
    scales: Vec<f32>,
    dims: Vec<usize>,
    device: Device,
    replaced: Arc<AtomicUsize>,
}

impl Int8Rows {
    fn quantize(weight: &Tensor, replaced: Arc<AtomicUsize>) -> Self {
        let rows: Vec<Vec<f32>> = weight.to_vec2().unwrap();
        let mut values = Vec::new();
        let mut scales = Vec::new();
        for row in &rows {
            let absmax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
            let scale = if absmax > 0.0 { absmax / 127.0 } else { 1.0 };
            values.extend(row.iter().map(|v| (v / scale).round() as i8));
            scales.push(scale);
        }
        Self {
            values,
            scales,
            dims: weight.dims().to_vec(),
            device: weight.device().clone(),
            replaced,
        }
    }
}

impl BaseWeight for Int8Rows {
    fn dense(&self) -> peft_rs::Result<Tensor> {
        let cols = self.dims[1];
        let v: Vec<f32> = self
            .values
            .iter()
            .enumerate()
            .map(|(i, q)| f32::from(*q) * self.scales[i / cols])
            .collect();
        Ok(Tensor::from_vec(v, self.dims.as_slice(), &self.device)?)
    }

    fn replace(&mut self, weight: Tensor) -> peft_rs::Result<()> {
        assert_eq!(weight.dims(), self.dims.as_slice());
        let count = self.replaced.clone();
        *self = Self::quantize(&weight.to_dtype(DType::F32)?, count);
        self.replaced.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn dims(&self) -> &[usize] {
        &self.dims
    }

    fn dtype(&self) -> DType {
        DType::F32
    }

    fn device(&self) -> &Device {
        &self.device
    }
}

fn with_lora(base: BaseLayer) -> AdaptedModule {
    let mut layer = AdaptedModule::new(MODULE, base);
    let lora = ParamSource::Init { seed: 7 };
    layer
        .add("lora", &lora_config(), lora, &no_shared())
        .unwrap();
    layer
}

#[test]
fn quantised_base_weight_behaves_as_its_dequantised_dense_weight() {
    let x = input();
    let replaced = Arc::new(AtomicUsize::new(0));
    let quantised = Int8Rows::quantize(&dense_weight(), replaced.clone());
    let dequantised = quantised.dense().unwrap();
    let bias = dense_base().bias().cloned();
    let mut on_int8 = with_lora(
        BaseLayer::with_weight(ModuleKind::Linear, Box::new(quantised), bias.clone()).unwrap(),
    );
    let on_dense =
        with_lora(BaseLayer::new(ModuleKind::Linear, dequantised.clone(), bias).unwrap());
    let y = on_int8.forward(&x).unwrap();
    assert_eq!(max_abs_diff(&y, &on_dense.forward(&x).unwrap()), 0.0);
    assert_eq!(
        replaced.load(Ordering::SeqCst),
        0,
        "a forward writes nothing"
    );

    // Merging writes W + ΔW through `replace`, which re-quantises it.
    let (want, _) = on_dense.merged_weights(&["lora"]).unwrap();
    on_int8.merge(None, false).unwrap();
    assert_eq!(replaced.load(Ordering::SeqCst), 1);
    let merged = on_int8.base().weight().unwrap();
    let requantised = Int8Rows::quantize(&want, Arc::default()).dense().unwrap();
    assert_eq!(max_abs_diff(&merged, &requantised), 0.0);
    assert!(
        max_abs_diff(&merged, &want) > 0.0,
        "the write was quantised"
    );
    // Rounding is within half a quantisation step (row absmax / 127) of each row.
    let step = |w: &Tensor| abs_max(w) / 127.0;
    assert!(max_abs_diff(&merged, &want) <= step(&want) / 2.0 + 1e-6);
    on_int8.unmerge().unwrap();
    assert_eq!(replaced.load(Ordering::SeqCst), 2);
    let restored = on_int8.base().weight().unwrap();
    let bound = (step(&want) + step(&dequantised)) / 2.0 + 1e-6;
    assert!(max_abs_diff(&restored, &dequantised) <= bound);
}

fn abs_max(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Merges write the weight in place only while nothing outside the layer holds it: a weight
/// handed out (or given at construction) keeps its values through any merge/unmerge cycle,
/// and the in-place cycles in between restore the weight exactly as the copying ones do.
#[test]
fn a_weight_handed_out_never_changes_under_its_holder() {
    for feedforward in [false, true] {
        let mut layer = two_methods(feedforward);
        layer.set_active(&["lora", "ia3"]).unwrap();
        let given = dense_weight();
        let x = input();
        let unmerged = layer.forward(&x).unwrap();
        for _ in 0..3 {
            // The first cycle copies (the weight was given); later ones write in place.
            layer.merge(None, false).unwrap();
            assert_close(&layer.forward(&x).unwrap(), &unmerged, "merged forward");
            layer.unmerge().unwrap();
        }
        let held = layer.base().weight().unwrap();
        let snapshot = held.copy().unwrap();
        layer.merge(None, false).unwrap();
        let merged = layer.base().weight().unwrap();
        let merged_snapshot = merged.copy().unwrap();
        layer.unmerge().unwrap();
        layer.merge(None, false).unwrap();
        layer.unmerge().unwrap();
        assert_eq!(max_abs_diff(&held, &snapshot), 0.0, "held before a merge");
        assert_eq!(
            max_abs_diff(&merged, &merged_snapshot),
            0.0,
            "held while merged"
        );
        assert_close(&layer.base().weight().unwrap(), &given, "restored");
        assert_close(
            &layer.forward(&x).unwrap(),
            &unmerged,
            "forward after cycles",
        );
    }
}
