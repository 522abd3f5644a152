//! Forward and merge+unmerge of one adapted `Linear(1024, 1024)` for a set of methods, next to the
//! base layer alone, in f32 and bf16 at 1 and 512 tokens: a regression check of the core paths
//! (fused linear kernel, bf16 GEMM, in-place merges) without Python.

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

fn layer(config: &PeftConfig, dtype: DType) -> AdaptedModule {
    let w = Tensor::randn(0f32, 0.02, (WIDTH, WIDTH), &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    let b = Tensor::zeros(WIDTH, dtype, &Device::Cpu).unwrap();
    let base = BaseLayer::new(ModuleKind::Linear, w, Some(b)).unwrap();
    let mut module = AdaptedModule::new("lin", base);
    let shared = Default::default();
    module
        .add("default", &**config, ParamSource::Init { seed: 0 }, &shared)
        .unwrap();
    module
}

fn methods(c: &mut Criterion) {
    for dtype in [DType::F32, DType::BF16] {
        let mut group = c.benchmark_group(format!("linear_w{WIDTH}_{dtype:?}").to_lowercase());
        let inputs: Vec<(usize, Tensor)> = [1, 512]
            .into_iter()
            .map(|tokens| {
                let x = Tensor::randn(0f32, 1., (tokens, WIDTH), &Device::Cpu).unwrap();
                (tokens, x.to_dtype(dtype).unwrap())
            })
            .collect();
        for (label, json) in configs() {
            let config = PeftConfig::from_json(json).unwrap();
            let mut module = layer(&config, dtype);
            for (tokens, x) in &inputs {
                let id = BenchmarkId::new(format!("forward_{tokens}"), label);
                group.bench_with_input(id, x, |bench, x| bench.iter(|| module.forward(x).unwrap()));
            }
            group.bench_function(BenchmarkId::new("merge_unmerge", label), |bench| {
                bench.iter(|| {
                    module.merge(None, false).unwrap();
                    module.unmerge().unwrap();
                })
            });
        }
        let base = layer(
            &PeftConfig::from_json(configs()[0].1.clone()).unwrap(),
            dtype,
        );
        for (tokens, x) in &inputs {
            let id = BenchmarkId::new(format!("forward_{tokens}"), "base");
            group.bench_with_input(id, x, |bench, x| {
                bench.iter(|| base.base().forward(x).unwrap())
            });
        }
        group.finish();
    }
}

criterion_group!(benches, methods);
criterion_main!(benches);
