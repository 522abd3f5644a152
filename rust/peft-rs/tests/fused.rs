//! The CPU's fused forward (base product, low-rank terms, scales and full-rank deltas in one
//! output buffer) against each method's plain path, which PEFT parity is tested on. The plain
//! path is the one taken when gradients are recorded, so a `Var` input selects it.

use candle_core::{DType, Device, Tensor, Var};
use peft_rs::base::{BaseLayer, ModuleKind};
use peft_rs::init::Initializer;
use peft_rs::{AdaptedModule, ParamSource, PeftConfig};
use serde_json::json;

fn configs() -> Vec<(&'static str, serde_json::Value)> {
    vec![
        (
            "lora",
            json!({"peft_type": "LORA", "r": 3, "lora_alpha": 7, "init_lora_weights": false}),
        ),
        (
            "lora with bias",
            json!({"peft_type": "LORA", "r": 2, "lora_bias": true, "init_lora_weights": false}),
        ),
        (
            // Above the bf16 kernel's epilogue rank: the term is formed by one GEMM first.
            "lora of rank 70",
            json!({"peft_type": "LORA", "r": 70, "init_lora_weights": false}),
        ),
        (
            "rslora",
            json!({"peft_type": "LORA", "r": 4, "use_rslora": true, "init_lora_weights": false}),
        ),
        (
            "dora",
            json!({"peft_type": "LORA", "r": 3, "use_dora": true, "init_lora_weights": false}),
        ),
        (
            "adalora",
            json!({"peft_type": "ADALORA", "init_r": 3, "total_step": 10, "init_lora_weights": false}),
        ),
        (
            "vera",
            json!({"peft_type": "VERA", "r": 4, "init_weights": false}),
        ),
        // A rank above the row-dot projections' (a GEMM projects it).
        (
            "vera rank 80",
            json!({"peft_type": "VERA", "r": 80, "init_weights": false}),
        ),
        (
            "loha",
            json!({"peft_type": "LOHA", "r": 3, "alpha": 5, "init_weights": false}),
        ),
        (
            "lokr",
            json!({"peft_type": "LOKR", "r": 2, "init_weights": false}),
        ),
        (
            "ia3 output",
            json!({"peft_type": "IA3", "feedforward_modules": [], "init_ia3_weights": false}),
        ),
        (
            "ia3 feed-forward",
            json!({"peft_type": "IA3", "target_modules": ["lin"], "feedforward_modules": ["lin"], "init_ia3_weights": false}),
        ),
    ]
}

fn module(
    config: &PeftConfig,
    kind: ModuleKind,
    (out, inp): (usize, usize),
    dtype: DType,
    bias: bool,
) -> Option<AdaptedModule> {
    let mut init = Initializer::new(11);
    let dims: &[usize] = match kind {
        ModuleKind::Conv1D => &[inp, out],
        _ => &[out, inp],
    };
    let weight = init.uniform(dims, 1.0, dtype).unwrap();
    let bias = bias.then(|| init.uniform(&[out], 1.0, dtype).unwrap());
    let mut module = AdaptedModule::new("lin", BaseLayer::new(kind, weight, bias).unwrap());
    let shared = config.generate_shared(out, inp).unwrap();
    if let Err(e) = module.add("default", &**config, ParamSource::Init { seed: 5 }, &shared) {
        // Methods PEFT does not apply to this kind of layer (LoHa, LoKr on Conv1D).
        assert!(e.to_string().contains("does not support"), "{e}");
        return None;
    }
    // VeRA's λ_b starts at 1 (PEFT's init): other values, so that the test sees it applied.
    if config.peft_type() == "VERA" {
        let adapter = module.adapter("default").unwrap();
        let mut entries = adapter.params().entries().to_vec();
        for (name, tensor) in &mut entries {
            if name.contains("lambda_b") {
                *tensor = init.uniform(tensor.dims(), 2.0, tensor.dtype()).unwrap();
            }
        }
        module.delete("default").unwrap();
        let given = ParamSource::Given(entries);
        module.add("default", &**config, given, &shared).unwrap();
    }
    // Another base weight: DoRA's magnitude (the initial norm) then no longer equals the norm.
    // f32 only: bf16 DoRA takes the plain path, whose base product rounds at other points with
    // a recorded input (candle adds the bias after rounding), and m/‖W‖ would amplify that.
    if dtype == DType::F32 {
        module
            .replace_base_weight(init.uniform(dims, 1.0, dtype).unwrap())
            .unwrap();
    }
    Some(module)
}

fn max_rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    let (a, b) = (
        a.to_dtype(DType::F32).unwrap(),
        b.to_dtype(DType::F32).unwrap(),
    );
    assert_eq!(a.dims(), b.dims());
    let scale = b
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let diff = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    diff / scale.max(1e-6)
}

/// Inputs of several leading shapes, one of them a non-contiguous view; 150 and 70 rows span
/// several of the kernel's row blocks (64 rows), the last one part-filled.
fn inputs(inp: usize, dtype: DType) -> Vec<Tensor> {
    let mut init = Initializer::new(3);
    let mut xs: Vec<Tensor> = [vec![1, inp], vec![2, 3, inp], vec![17, inp], vec![150, inp]]
        .iter()
        .map(|d| init.uniform(d, 2.0, dtype).unwrap())
        .collect();
    let wide = init.uniform(&[70, inp + 3], 2.0, dtype).unwrap();
    xs.push(wide.narrow(1, 2, inp).unwrap());
    xs
}

#[test]
fn the_fused_forward_equals_the_plain_path_for_every_method_kind_and_dtype() {
    for (label, json) in configs() {
        let config = PeftConfig::from_json(json).unwrap();
        for kind in [ModuleKind::Linear, ModuleKind::Conv1D] {
            for dtype in [DType::F32, DType::BF16] {
                for shape in [(1, 1), (7, 5), (33, 65)] {
                    for bias in [true, false] {
                        let Some(module) = module(&config, kind, shape, dtype, bias) else {
                            continue;
                        };
                        for x in inputs(shape.1, dtype) {
                            let fused = module.forward(&x).unwrap();
                            let var = Var::from_tensor(&x).unwrap();
                            let plain = module.forward(var.as_tensor()).unwrap();
                            assert_eq!(fused.dtype(), dtype);
                            // Both round the base output to bf16 and then the sum, but the
                            // plain path adds the bias to the rounded product (candle) where
                            // the fused one adds it before rounding (as torch's F.linear): two
                            // bf16 steps apart at most (8 significant bits: 2⁻⁷ of the largest
                            // output each).
                            let tol = if dtype == DType::BF16 {
                                2f32.powi(-6)
                            } else {
                                1e-5
                            };
                            let diff = max_rel_diff(&fused, &plain);
                            assert!(
                                diff <= tol,
                                "{label} {kind:?} {dtype:?} {shape:?} bias={bias} x{:?}: {diff}",
                                x.dims()
                            );
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn a_recorded_input_takes_the_plain_path_and_gets_its_gradient() {
    let config = PeftConfig::from_json(configs()[0].1.clone()).unwrap();
    let module = module(&config, ModuleKind::Linear, (4, 6), DType::F32, true).unwrap();
    let x = Var::from_tensor(&Tensor::ones((2, 6), DType::F32, &Device::Cpu).unwrap()).unwrap();
    let grads = module
        .forward(x.as_tensor())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert!(grads.get(x.as_tensor()).is_some());
}
