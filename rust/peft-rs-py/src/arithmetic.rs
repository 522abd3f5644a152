//! `peft_rs.combine_adapters` and the options of `PeftModel.add_weighted_adapter`: adapter
//! arithmetic of `peft_rs::arithmetic` (PEFT's `add_weighted_adapter`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use peft_rs::PeftAdapter;
use peft_rs::arithmetic::{Combination, CombineOptions, MajoritySign};
use pyo3::prelude::*;

use crate::errors::{run, to_pyerr};

/// The combination type (`None`: the method's default) and options from PEFT's keyword
/// arguments.
pub fn combine_options(
    combination_type: Option<&str>,
    svd_rank: Option<usize>,
    svd_clamp: Option<f64>,
    svd_full_matrices: bool,
    density: Option<f64>,
    majority_sign_method: &str,
    seed: u64,
) -> PyResult<(Option<Combination>, CombineOptions)> {
    let combination = combination_type
        .map(Combination::from_name)
        .transpose()
        .map_err(to_pyerr)?;
    let options = CombineOptions {
        svd_rank,
        svd_clamp,
        svd_full_matrices,
        density,
        majority_sign_method: MajoritySign::from_name(majority_sign_method).map_err(to_pyerr)?,
        seed,
    };
    Ok((combination, options))
}

/// Combines the LoRA or IA³ adapters in `adapter_dirs` with `weights` as PEFT's
/// `add_weighted_adapter` does (LoRA's `combination_type` defaults to "svd"; IA³ takes none),
/// without a model, and saves the result in `out_dir` (in `out_dir/<adapter_name>` for a
/// name other than "default", as PEFT saves). Returns the directory written; for
/// `combination_type="exact_svd"`, `(directory, {module: relative truncation error})` with
/// `‖ΔW − B A‖_F / ‖ΔW‖_F` per module.
#[pyfunction]
#[pyo3(signature = (
    adapter_dirs, weights, out_dir, combination_type=None, svd_rank=None, svd_clamp=None,
    svd_full_matrices=true, density=None, majority_sign_method="total", seed=0,
    adapter_name="default"
))]
#[allow(clippy::too_many_arguments)]
pub fn combine_adapters(
    py: Python<'_>,
    adapter_dirs: Vec<PathBuf>,
    weights: Vec<f64>,
    out_dir: PathBuf,
    combination_type: Option<&str>,
    svd_rank: Option<usize>,
    svd_clamp: Option<f64>,
    svd_full_matrices: bool,
    density: Option<f64>,
    majority_sign_method: &str,
    seed: u64,
    adapter_name: &str,
) -> PyResult<Py<PyAny>> {
    let (combination, options) = combine_options(
        combination_type,
        svd_rank,
        svd_clamp,
        svd_full_matrices,
        density,
        majority_sign_method,
        seed,
    )?;
    let (path, report) = run(py, || {
        let adapters = adapter_dirs
            .iter()
            .map(|dir| PeftAdapter::from_pretrained(Path::new(dir), None))
            .collect::<peft_rs::Result<Vec<_>>>()?;
        let refs: Vec<&PeftAdapter> = adapters.iter().collect();
        let (combined, report) = peft_rs::arithmetic::combine_adapters_with_report(
            adapter_name,
            &refs,
            &weights,
            combination,
            &options,
        )?;
        Ok((combined.save_pretrained(&out_dir)?, report))
    })?;
    if combination == Some(Combination::ExactSvd) {
        let errors: BTreeMap<String, f64> = report.truncation_errors;
        Ok((path, errors).into_pyobject(py)?.into_any().unbind())
    } else {
        Ok(path.into_pyobject(py)?.into_any().unbind())
    }
}
