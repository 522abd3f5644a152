//! Python bindings of peft-rs (`peft_rs._core`): type and error conversion only; the logic
//! lives in the `peft-rs` crate.

mod adapter;
mod arithmetic;
mod config;
mod dlpack;
mod errors;
mod json;
mod layer;
mod model;
mod peft_model;
mod stream_merge;
mod tokenizer;
mod train;

use pyo3::prelude::*;

#[pymodule(gil_used = false)]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("CUDA_ENABLED", cfg!(feature = "cuda"))?;
    config::add_config_classes(m)?;
    let classes: Vec<&str> = peft_rs::registry::METHODS
        .iter()
        .map(|m| m.config_class)
        .collect();
    m.add(
        "CONFIG_CLASSES",
        pyo3::types::PyTuple::new(m.py(), classes)?,
    )?;
    m.add_class::<layer::PyAdaptedLayer>()?;
    m.add_class::<adapter::PyPeftAdapter>()?;
    m.add_class::<model::PyModel>()?;
    m.add_class::<peft_model::PyPeftModel>()?;
    m.add_class::<peft_model::DisabledAdapters>()?;
    m.add_class::<tokenizer::PyTokenizer>()?;
    m.add_class::<train::PyTrainer>()?;
    let architectures: Vec<&str> = peft_rs::model::ARCHITECTURES
        .iter()
        .map(|a| a.name)
        .collect();
    m.add(
        "ARCHITECTURES",
        pyo3::types::PyTuple::new(m.py(), architectures)?,
    )?;
    m.add_class::<dlpack::DLPackExport>()?;
    m.add_function(wrap_pyfunction!(stream_merge::merge_checkpoint, m)?)?;
    m.add_function(wrap_pyfunction!(arithmetic::combine_adapters, m)?)?;
    Ok(())
}
