//! Forward and merge+unmerge of one adapted `Linear(1024, 1024)` for a set of methods, next to the
//! base layer alone: a regression check of the core paths without Python.

use candle_core::{DType, Device, Tensor};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use peft_rs::base::{BaseLayer, ModuleKind};
use peft_rs::{AdaptedModule, ParamSource, PeftConfig};
use serde_json::json;

const WIDTH: usize = 1024;

/// (label, config): every config is away from identity so each path does its full work.
fn configs() -> Vec<(&'static str, serde_json::Value)> {
    vec![
        (
            "lora_r16",
            json!({"peft_type": "LORA", "r": 16, "lora_alpha": 32, "init_lora_weights": false}),
        ),
        (
            "dora_r16",
            json!({"peft_type": "LORA", "r": 16, "use_dora": true, "init_lora_weights": false}),
        ),
        (
            "ia3",
            json!({"peft_type": "IA3", "init_ia3_weights": false}),
        ),
        (
            "loha_r8",
            json!({"peft_type": "LOHA", "r": 8, "init_weights": false}),
        ),
        (
            "lokr_r8",
            json!({"peft_type": "LOKR", "r": 8, "init_weights": false}),
        ),
        (
            "oft_b32",
            json!({"peft_type": "OFT", "oft_block_size": 32, "init_weights": false}),
        ),
        (
            "boft_b8",
            json!({"peft_type": "BOFT", "boft_block_size": 8, "init_weights": false}),
        ),
    ]
}

fn layer(config: &PeftConfig) -> AdaptedModule {
    let w = Tensor::randn(0f32, 0.02, (WIDTH, WIDTH), &Device::Cpu).unwrap();
    let b = Tensor::zeros(WIDTH, DType::F32, &Device::Cpu).unwrap();
    let base = BaseLayer::new(ModuleKind::Linear, w, Some(b)).unwrap();
    let mut module = AdaptedModule::new("lin", base);
    let shared = Default::default();
    module
        .add("default", &**config, ParamSource::Init { seed: 0 }, &shared)
        .unwrap();
    module
}

fn methods(c: &mut Criterion) {
    let mut group = c.benchmark_group("linear_w1024_f32");
    let x = Tensor::randn(0f32, 1., (512, WIDTH), &Device::Cpu).unwrap();
    for (label, json) in configs() {
        let config = PeftConfig::from_json(json).unwrap();
        let mut module = layer(&config);
        group.bench_with_input(BenchmarkId::new("forward_512", label), &x, |bench, x| {
            bench.iter(|| module.forward(x).unwrap())
        });
        group.bench_function(BenchmarkId::new("merge_unmerge", label), |bench| {
            bench.iter(|| {
                module.merge(None, false).unwrap();
                module.unmerge().unwrap();
            })
        });
    }
    let base = layer(&PeftConfig::from_json(configs()[0].1.clone()).unwrap());
    group.bench_with_input(BenchmarkId::new("forward_512", "base"), &x, |bench, x| {
        bench.iter(|| base.base().forward(x).unwrap())
    });
    group.finish();
}

criterion_group!(benches, methods);
criterion_main!(benches);
