//! Seeded random initialisers (PyTorch's distributions, not its bit streams: weights made here
//! are not meant to equal torch's for the same seed).

use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::Result;

pub struct Initializer {
    rng: StdRng,
}

impl Initializer {
    pub fn new(seed: u64) -> Self {
        Self {
            rng: StdRng::seed_from_u64(seed),
        }
    }

    /// U(-bound, bound).
    pub fn uniform(&mut self, shape: &[usize], bound: f64, dtype: DType) -> Result<Tensor> {
        let n = shape.iter().product();
        let v: Vec<f64> = (0..n)
            .map(|_| self.rng.random_range(-bound..=bound))
            .collect();
        Ok(Tensor::from_vec(v, shape, &Device::Cpu)?.to_dtype(dtype)?)
    }

    /// N(0, std²), by Box-Muller.
    pub fn normal(&mut self, shape: &[usize], std: f64, dtype: DType) -> Result<Tensor> {
        let n = shape.iter().product();
        let v: Vec<f64> = (0..n)
            .map(|_| {
                let u1: f64 = 1.0 - self.rng.random::<f64>();
                let u2: f64 = self.rng.random::<f64>();
                std * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
            })
            .collect();
        Ok(Tensor::from_vec(v, shape, &Device::Cpu)?.to_dtype(dtype)?)
    }

    /// `kaiming_uniform_(a=sqrt(5))`, PyTorch's default for Linear/Conv weights:
    /// U(±1/sqrt(fan_in)) with fan_in the product of every dimension but the first.
    pub fn kaiming_uniform(&mut self, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let fan_in: usize = shape[1..].iter().product();
        self.uniform(shape, 1.0 / (fan_in.max(1) as f64).sqrt(), dtype)
    }
}
