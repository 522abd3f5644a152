//! Python bindings of peft-rs (`peft_rs._core`): type and error conversion only; the logic
//! lives in the `peft-rs` crate.

mod adapter;
mod arithmetic;
mod blas;
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

/// Rust-side allocations only (tensors); Python's own allocator is untouched.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (its index in mimalloc 3's `mi_option_e`).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Freed memory goes back to the OS after 10 s unused rather than mimalloc's 1 s: a training
/// step frees and reallocates its activations every few hundred milliseconds, and memory handed
/// back is faulted in and zeroed by the kernel again (measured: up to 2.5x slower steps).
fn keep_freed_memory() {
    // SAFETY: sets a plain integer option; called once, when the module is imported.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 10_000) };
}

#[pymodule(gil_used = false)]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    keep_freed_memory();
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
    m.add_function(wrap_pyfunction!(blas::use_blas, m)?)?;
    m.add_function(wrap_pyfunction!(blas::blas_info, m)?)?;
    m.add_function(wrap_pyfunction!(blas::use_amx, m)?)?;
    Ok(())
}
