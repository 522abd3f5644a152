//! Python bindings of peft-rs (`peft_rs._core`): type and error conversion only; the logic
//! lives in the `peft-rs` crate.

mod adapter;
mod config;
mod dlpack;
mod errors;
mod json;
mod layers;

use pyo3::prelude::*;

#[pymodule(gil_used = false)]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("CUDA_ENABLED", cfg!(feature = "cuda"))?;
    m.add_class::<config::PyLoraConfig>()?;
    m.add_class::<config::PyIa3Config>()?;
    m.add_class::<config::PyAdaLoraConfig>()?;
    m.add_class::<config::PyVeraConfig>()?;
    m.add_class::<layers::LoraLinear>()?;
    m.add_class::<layers::LoraEmbedding>()?;
    m.add_class::<layers::LoraConv2d>()?;
    m.add_class::<layers::IA3Linear>()?;
    m.add_class::<layers::IA3Conv2d>()?;
    m.add_class::<layers::AdaLoraLinear>()?;
    m.add_class::<layers::VeraLinear>()?;
    m.add_class::<adapter::PyPeftAdapter>()?;
    m.add_class::<dlpack::DLPackExport>()?;
    Ok(())
}
