//! Training hooks: VarMap registration, gradients, freezing and dropout.

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
