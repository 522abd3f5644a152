//! Training: VarMap registration, gradients, freezing and dropout of one layer; the trainer on a
//! small model (accumulation, resume).

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::{Optimizer, SGD, VarMap};
use peft_rs::base::{BaseLayer, ModuleKind};
use peft_rs::methods::lora::{LORA_B, LoraInit};
use peft_rs::{AdaptedModule, LoraConfig, ParamSource};

const ADAPTER: &str = "default";

fn layer(config: LoraConfig) -> AdaptedModule {
    let w = Tensor::randn(0f32, 1., (6, 5), &Device::Cpu).unwrap();
    let base = BaseLayer::new(ModuleKind::Linear, w, None).unwrap();
    let mut layer = AdaptedModule::new("lin", base);
    layer
        .add(
            ADAPTER,
            &config,
            ParamSource::Init { seed: 0 },
            &BTreeMap::new(),
        )
        .unwrap();
    layer.set_active(&[ADAPTER]).unwrap();
    layer
}

fn register(layer: &mut AdaptedModule, varmap: &VarMap, prefix: &str) -> peft_rs::Result<()> {
    layer
        .get_mut(ADAPTER)
        .unwrap()
        .params_mut()
        .register(varmap, prefix)
}

fn set_frozen(layer: &mut AdaptedModule, frozen: bool) {
    layer
        .get_mut(ADAPTER)
        .unwrap()
        .params_mut()
        .set_frozen(frozen);
}

#[test]
fn registered_parameters_receive_gradients_and_train() {
    let mut layer = layer(LoraConfig {
        r: 2,
        ..Default::default()
    });
    let varmap = VarMap::new();
    register(&mut layer, &varmap, "model.lin").unwrap();
    let names: Vec<_> = varmap
        .data()
        .lock()
        .unwrap()
        .keys()
        .cloned()
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(
        names,
        ["model.lin.lora_A.weight", "model.lin.lora_B.weight"]
    );

    let x = Tensor::randn(0f32, 1., (8, 5), &Device::Cpu).unwrap();
    let target = Tensor::randn(0f32, 1., (8, 6), &Device::Cpu).unwrap();
    let loss = |l: &AdaptedModule| {
        (l.forward(&x).unwrap() - &target)
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap()
    };
    let before = loss(&layer).to_scalar::<f32>().unwrap();
    let mut sgd = SGD::new(varmap.all_vars(), 0.05).unwrap();
    for _ in 0..20 {
        sgd.backward_step(&loss(&layer)).unwrap();
    }
    let after = loss(&layer).to_scalar::<f32>().unwrap();
    assert!(after < before, "loss did not decrease: {before} -> {after}");
    // B started at zero and was trained through the registered variable.
    let b = layer
        .adapter(ADAPTER)
        .unwrap()
        .params()
        .get(LORA_B)
        .unwrap();
    assert!(
        b.abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            > 0.0
    );
}

#[test]
fn frozen_parameters_get_no_gradient() {
    let mut layer = layer(LoraConfig {
        r: 2,
        ..Default::default()
    });
    let varmap = VarMap::new();
    register(&mut layer, &varmap, "lin").unwrap();
    set_frozen(&mut layer, true);
    assert!(layer.adapter(ADAPTER).unwrap().params().is_frozen());
    let x = Tensor::ones((3, 5), DType::F32, &Device::Cpu).unwrap();
    let grads = layer
        .forward(&x)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    for var in varmap.all_vars() {
        assert!(grads.get(&var).is_none());
    }
    set_frozen(&mut layer, false);
    let grads = layer
        .forward(&x)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert!(varmap.all_vars().iter().any(|v| grads.get(v).is_some()));
}

#[test]
fn registering_twice_under_one_prefix_is_refused() {
    let varmap = VarMap::new();
    register(&mut layer(LoraConfig::default()), &varmap, "lin").unwrap();
    assert!(register(&mut layer(LoraConfig::default()), &varmap, "lin").is_err());
}

#[test]
fn dropout_only_in_training() {
    let config = LoraConfig {
        r: 4,
        lora_dropout: 0.5,
        init_lora_weights: LoraInit::Flag(false),
        ..Default::default()
    };
    let mut layer = layer(config);
    let x = Tensor::ones((64, 5), DType::F32, &Device::Cpu).unwrap();
    let eval_a = layer.forward(&x).unwrap();
    let eval_b = layer.forward(&x).unwrap();
    assert_eq!(
        (&eval_a - &eval_b)
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
        0.0
    );
    layer.set_training(true);
    let train = layer.forward(&x).unwrap();
    assert!(
        (&train - &eval_a)
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            > 0.0
    );
}

/// A small classifier written against `ModelBuilder` (`input_ids` carries float features), so
/// the trainer runs without Python. Parity with PyTorch is in tests/test_training.py.
mod trainer {
    use std::collections::HashMap;
    use std::sync::Arc;

    use candle_core::{DType, Device, Tensor};
    use candle_nn::VarBuilder;
    use peft_rs::PeftConfig;
    use peft_rs::model::{Layer, Model, ModelBuilder, ModelInput, Modules, PeftModel};
    use peft_rs::train::{Batch, CheckpointPlan, Trainer, TrainerOptions};
    use serde_json::json;

    struct MlpForSequenceClassification {
        lin0: Layer,
        classifier: Layer,
        modules: Modules,
    }

    impl Model for MlpForSequenceClassification {
        fn forward(&self, input: &ModelInput) -> peft_rs::Result<Tensor> {
            let h = self.lin0.forward(&input.input_ids)?.tanh()?;
            self.classifier.forward(&h)
        }

        fn modules(&self) -> &Modules {
            &self.modules
        }

        fn architecture(&self) -> &'static str {
            "MlpForSequenceClassification"
        }
    }

    fn model(dropout: f64) -> PeftModel {
        let dev = Device::Cpu;
        let mut tensors = HashMap::new();
        for (name, (out, inp)) in [("lin0", (16, 6)), ("classifier", (3, 16))] {
            // Deterministic weights: both runs of a test start from the same model.
            let n = out * inp;
            let values: Vec<f32> = (0..n)
                .map(|i| ((i * 37 % 101) as f32 / 101.0) - 0.5)
                .collect();
            let w = Tensor::from_vec(values, (out, inp), &dev).unwrap();
            tensors.insert(format!("{name}.weight"), w);
            tensors.insert(
                format!("{name}.bias"),
                Tensor::zeros(out, DType::F32, &dev).unwrap(),
            );
        }
        let b = ModelBuilder::new(VarBuilder::from_tensors(tensors, DType::F32, &dev));
        let mlp = MlpForSequenceClassification {
            lin0: b.pp("lin0").linear(6, 16, true).unwrap(),
            classifier: b.pp("classifier").linear(16, 3, true).unwrap(),
            modules: b.modules(),
        };
        let mut peft = PeftModel::new(Arc::new(mlp));
        let config = PeftConfig::from_json(json!({
            "peft_type": "LORA", "r": 4, "target_modules": ["lin0"], "lora_dropout": dropout,
            "modules_to_save": ["classifier"], "init_lora_weights": false
        }))
        .unwrap();
        peft.add_adapter("default", config, 3).unwrap();
        peft
    }

    fn data(rows: usize) -> Batch {
        let values: Vec<f32> = (0..rows * 6)
            .map(|i| ((i * 53 % 97) as f32 / 48.5) - 1.0)
            .collect();
        let x = Tensor::from_vec(values, (rows, 6), &Device::Cpu).unwrap();
        let labels: Vec<i64> = (0..rows as i64).map(|i| i % 3).collect();
        Batch {
            input: ModelInput::new(x),
            labels: Tensor::new(labels.as_slice(), &Device::Cpu).unwrap(),
        }
    }

    fn state(model: &PeftModel) -> Vec<(String, Vec<f32>)> {
        model
            .adapter("default")
            .unwrap()
            .to_state_dict()
            .into_iter()
            .map(|(k, t)| (k, t.flatten_all().unwrap().to_vec1().unwrap()))
            .collect()
    }

    fn options(accumulation_steps: usize) -> TrainerOptions {
        TrainerOptions {
            lr: 1e-2,
            total_steps: Some(6),
            warmup_steps: 1,
            accumulation_steps,
            seed: 5,
            ..Default::default()
        }
    }

    #[test]
    fn accumulation_equals_one_batch_and_the_loss_falls() {
        let batch = data(12);
        let mut results = Vec::new();
        for parts in [1, 3] {
            let mut m = model(0.0);
            let start = m.adapter("default").unwrap().to_state_dict();
            let mut trainer = Trainer::new(&mut m, None, options(parts)).unwrap();
            let losses: Vec<f64> = (0..6)
                .map(|_| trainer.step(&mut m, &batch).unwrap().loss)
                .collect();
            assert!(losses[5] < losses[0], "{losses:?}");
            assert_ne!(start.len(), 0);
            results.push((losses, state(&m)));
        }
        let ((one, a), (acc, b)) = (&results[0], &results[1]);
        for (x, y) in one.iter().zip(acc) {
            assert!((x - y).abs() < 1e-5 * x.abs(), "{one:?} vs {acc:?}");
        }
        for ((k, x), (_, y)) in a.iter().zip(b) {
            let err = x
                .iter()
                .zip(y)
                .map(|(p, q)| (p - q).abs())
                .fold(0f32, f32::max);
            assert!(err < 1e-5, "{k}: {err}");
        }
    }

    #[test]
    fn a_resumed_run_repeats_the_uninterrupted_one() {
        let data = data(10);
        let dir = tempfile::tempdir().unwrap();
        let plan = CheckpointPlan {
            dir: dir.path().to_path_buf(),
            every: Some(2),
        };
        let mut full = model(0.3);
        let start = state(&full);
        let mut trainer = Trainer::new(&mut full, None, options(1)).unwrap();
        let history = trainer
            .fit(&mut full, &data, 2, 4, Some(&plan), &mut |_| Ok(()))
            .unwrap();
        assert_eq!(history.len(), 6);

        let mut resumed = model(0.3);
        // The same starting point: the model's own init is seeded.
        assert_eq!(state(&resumed), start);
        let mut again = Trainer::new(&mut resumed, None, options(1)).unwrap();
        again
            .load_checkpoint(&mut resumed, &dir.path().join("checkpoint-2"))
            .unwrap();
        let rest = again
            .fit(&mut resumed, &data, 2, 4, None, &mut |_| Ok(()))
            .unwrap();
        let tail: Vec<f64> = history[2..].iter().map(|s| s.loss).collect();
        assert_eq!(rest.iter().map(|s| s.loss).collect::<Vec<_>>(), tail);
        assert_eq!(state(&resumed), state(&full));
    }
}
