//! LoRA forward in Rust: base linear alone, LoRA unmerged, LoRA merged.

use std::sync::Arc;

use candle_core::{Device, Tensor};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use peft_rs::adapters::lora::LoraInit;
use peft_rs::base::{BaseLayer, ModuleKind};
use peft_rs::{Adapter, LoraConfig, LoraLayer, Mergeable};

fn forward(c: &mut Criterion) {
    let width = 1024;
    let mut group = c.benchmark_group("lora_forward_w1024_f32");
    for &(tokens, r) in &[(1usize, 16u32), (512, 16), (512, 64)] {
        let w = Tensor::randn(0f32, 0.02, (width, width), &Device::Cpu).unwrap();
        let b = Tensor::zeros(width, candle_core::DType::F32, &Device::Cpu).unwrap();
        let base = BaseLayer::new(ModuleKind::Linear, w, Some(b)).unwrap();
        let config = LoraConfig {
            r,
            lora_alpha: 2.0 * r as f64,
            init_lora_weights: LoraInit::Flag(false),
            ..Default::default()
        };
        let mut layer = LoraLayer::new("lin", base.clone(), Arc::new(config), 0).unwrap();
        let x = Tensor::randn(0f32, 1., (tokens, width), &Device::Cpu).unwrap();
        let id = format!("tokens{tokens}_r{r}");
        group.bench_with_input(BenchmarkId::new("base", &id), &x, |bench, x| {
            bench.iter(|| base.forward(x).unwrap())
        });
        group.bench_with_input(BenchmarkId::new("unmerged", &id), &x, |bench, x| {
            bench.iter(|| layer.forward(x).unwrap())
        });
        layer.merge(false).unwrap();
        group.bench_with_input(BenchmarkId::new("merged", &id), &x, |bench, x| {
            bench.iter(|| layer.forward(x).unwrap())
        });
    }
    group.finish();
}

criterion_group!(benches, forward);
criterion_main!(benches);
