//! numpy / torch arrays in and out through DLPack.
//!
//! Import copies once into candle's owned CPU storage (candle cannot borrow foreign memory);
//! strided sources are gathered in the same pass. Export is zero-copy: the capsule points into
//! the candle tensor's buffer and keeps the tensor alive until the consumer releases it.

use std::ffi::{CStr, c_void};
use std::ptr::NonNull;

use candle_core::{CpuStorage, DType, Device, Storage, Tensor};
use half::{bf16, f16};
use pyo3::exceptions::{PyBufferError, PyTypeError};
use pyo3::ffi;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyCapsule, PyDict, PyTuple};

const KDL_CPU: i32 = 1;
const NAME: &CStr = c"dltensor";
const NAME_VERSIONED: &CStr = c"dltensor_versioned";

#[repr(C)]
#[derive(Clone, Copy)]
struct DLDevice {
    device_type: i32,
    device_id: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct DLDataType {
    code: u8,
    bits: u8,
    lanes: u16,
}

#[repr(C)]
struct DLTensor {
    data: *mut c_void,
    device: DLDevice,
    ndim: i32,
    dtype: DLDataType,
    shape: *mut i64,
    strides: *mut i64,
    byte_offset: u64,
}

#[repr(C)]
struct DLManagedTensor {
    dl_tensor: DLTensor,
    manager_ctx: *mut c_void,
    deleter: Option<unsafe extern "C" fn(*mut DLManagedTensor)>,
}

#[repr(C)]
struct DLPackVersion {
    major: u32,
    minor: u32,
}

#[repr(C)]
struct DLManagedTensorVersioned {
    version: DLPackVersion,
    manager_ctx: *mut c_void,
    deleter: Option<unsafe extern "C" fn(*mut DLManagedTensorVersioned)>,
    flags: u64,
    dl_tensor: DLTensor,
}

/// Which array library a value came from, so results go back as the same type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArrayKind {
    Numpy,
    Torch,
}

impl ArrayKind {
    /// `"numpy"` or `"torch"`.
    pub fn from_framework(framework: &str) -> PyResult<Self> {
        match framework {
            "numpy" => Ok(Self::Numpy),
            "torch" => Ok(Self::Torch),
            other => Err(crate::errors::value_error(format!(
                "framework must be \"numpy\" or \"torch\", found {other:?}"
            ))),
        }
    }

    pub fn of(obj: &Bound<'_, PyAny>) -> PyResult<Self> {
        let module = obj.get_type().module()?;
        let module = module.to_str()?;
        if module.starts_with("torch") {
            Ok(Self::Torch)
        } else if module.starts_with("numpy") {
            Ok(Self::Numpy)
        } else {
            Err(crate::errors::type_error(format!(
                "expected a numpy.ndarray or torch.Tensor, found {}",
                obj.get_type().name()?
            )))
        }
    }

    /// Wraps a candle tensor as this library's array, without copying.
    pub fn wrap<'py>(self, py: Python<'py>, tensor: Tensor) -> PyResult<Bound<'py, PyAny>> {
        let tensor = tensor.contiguous().map_err(crate::errors::candle_err)?;
        if self == Self::Numpy && tensor.dtype() == DType::BF16 {
            return Err(crate::errors::type_error(
                "numpy has no bfloat16 dtype: pass torch tensors for bf16",
            ));
        }
        if self == Self::Torch
            && let Some(from_dlpack) = torch_c(py, TorchC::FromDlpack)
        {
            return from_dlpack.call1((capsule(py, &tensor, false)?,));
        }
        let export = Bound::new(py, DLPackExport { tensor })?;
        let library = match self {
            Self::Torch => "torch",
            Self::Numpy => "numpy",
        };
        py.import(library)?.getattr("from_dlpack")?.call1((export,))
    }
}

fn dtype_from_dl(t: DLDataType) -> PyResult<DType> {
    if t.lanes != 1 {
        return Err(crate::errors::type_error(
            "vector dtypes (lanes > 1) are not supported",
        ));
    }
    Ok(match (t.code, t.bits) {
        (2, 16) => DType::F16,
        (2, 32) => DType::F32,
        (2, 64) => DType::F64,
        (4, 16) => DType::BF16,
        (0, 16) => DType::I16,
        (0, 32) => DType::I32,
        (0, 64) => DType::I64,
        (1, 8) => DType::U8,
        (1, 32) => DType::U32,
        (code, bits) => {
            return Err(crate::errors::type_error(format!(
                "unsupported array dtype (DLPack code {code}, {bits} bits); use float16/32/64, bfloat16 or an integer type"
            )));
        }
    })
}

fn dtype_to_dl(d: DType) -> PyResult<DLDataType> {
    let (code, bits) = match d {
        DType::F16 => (2, 16),
        DType::F32 => (2, 32),
        DType::F64 => (2, 64),
        DType::BF16 => (4, 16),
        DType::I16 => (0, 16),
        DType::I32 => (0, 32),
        DType::I64 => (0, 64),
        DType::U8 => (1, 8),
        DType::U32 => (1, 32),
        other => {
            return Err(crate::errors::type_error(format!(
                "cannot export dtype {other:?}"
            )));
        }
    };
    Ok(DLDataType {
        code,
        bits,
        lanes: 1,
    })
}

/// Copies a (possibly strided) DLPack tensor into an owned `Vec`.
///
/// # Safety
/// `t` must describe a live CPU tensor whose elements are `T`.
unsafe fn gather<T: Copy + Send + Sync>(t: &DLTensor, shape: &[usize]) -> Vec<T> {
    let n: usize = shape.iter().product();
    if n == 0 {
        return Vec::new();
    }
    let base = unsafe { (t.data as *const u8).add(t.byte_offset as usize) as *const T };
    let contiguous_strides = {
        let mut s = vec![1i64; shape.len()];
        for i in (0..shape.len().saturating_sub(1)).rev() {
            s[i] = s[i + 1] * shape[i + 1] as i64;
        }
        s
    };
    let strides: Vec<i64> = if t.strides.is_null() {
        contiguous_strides.clone()
    } else {
        unsafe { std::slice::from_raw_parts(t.strides, shape.len()) }.to_vec()
    };
    // Strides of size-1 dimensions do not matter.
    let is_contiguous = shape
        .iter()
        .zip(strides.iter().zip(&contiguous_strides))
        .all(|(&d, (s, c))| d == 1 || s == c);
    if is_contiguous {
        return copied(unsafe { std::slice::from_raw_parts(base, n) });
    }
    let mut out = Vec::with_capacity(n);
    let mut index = vec![0usize; shape.len()];
    for _ in 0..n {
        let offset: i64 = index
            .iter()
            .zip(&strides)
            .map(|(&i, &s)| i as i64 * s)
            .sum();
        out.push(unsafe { *base.offset(offset as isize) });
        for d in (0..shape.len()).rev() {
            index[d] += 1;
            if index[d] < shape[d] {
                break;
            }
            index[d] = 0;
        }
    }
    out
}

/// `src` copied, by all threads from `PARALLEL_COPY_BYTES`: one core copies ~12 GB/s on these
/// VMs, two ~22 (16 MiB: 1.2 → 0.7 ms, 5% of a 4096-token forward at width 1024).
fn copied<T: Copy + Send + Sync>(src: &[T]) -> Vec<T> {
    use rayon::prelude::*;
    const PARALLEL_COPY_BYTES: usize = 1 << 20;
    const CHUNK_BYTES: usize = 1 << 18;
    if std::mem::size_of_val(src) < PARALLEL_COPY_BYTES {
        return src.to_vec();
    }
    let chunk = CHUNK_BYTES / size_of::<T>().max(1);
    let mut out = Vec::with_capacity(src.len());
    out.spare_capacity_mut()[..src.len()]
        .par_chunks_mut(chunk)
        .zip(src.par_chunks(chunk))
        .for_each(|(dst, src)| {
            // SAFETY: `dst` and `src` have the same length and do not overlap (`dst` is in
            // the fresh vector); `T: Copy`.
            unsafe {
                std::ptr::copy_nonoverlapping(src.as_ptr(), dst.as_mut_ptr().cast(), src.len())
            }
        });
    // SAFETY: every element up to `src.len()` was written above.
    unsafe { out.set_len(src.len()) };
    out
}

/// A borrowed DLPack tensor handed to the GIL-free copy.
struct SendRef<'a>(&'a DLTensor);
// SAFETY: the DLTensor and the memory it points to stay alive and unmoved for the borrow (the
// caller holds the producer object and its capsule); the copy only reads them.
unsafe impl Send for SendRef<'_> {}

impl<'a> SendRef<'a> {
    // A method, so closures capture the whole (Send) wrapper rather than its field.
    fn into_inner(self) -> &'a DLTensor {
        self.0
    }
}

/// A numpy array or torch tensor (CPU) as a candle tensor (one copy).
pub fn tensor_from_py(obj: &Bound<'_, PyAny>) -> PyResult<Tensor> {
    let py = obj.py();
    let kind = ArrayKind::of(obj)?;
    let mut obj = obj.clone();
    let to_dlpack = match kind {
        ArrayKind::Torch => {
            if obj.getattr(intern!(py, "requires_grad"))?.is_truthy()? {
                obj = obj.call_method0(intern!(py, "detach"))?;
            }
            torch_c(py, TorchC::ToDlpack)
        }
        ArrayKind::Numpy => None,
    };
    let capsule = match to_dlpack {
        Some(to_dlpack) => to_dlpack.call1((&obj,))?,
        None => {
            let kwargs = PyDict::new(py);
            kwargs.set_item("max_version", (1, 0))?;
            match obj.call_method("__dlpack__", (), Some(&kwargs)) {
                Ok(c) => c,
                Err(e) if e.is_instance_of::<PyTypeError>(py) => obj.call_method0("__dlpack__")?,
                Err(e) => return Err(e),
            }
        }
    };
    let capsule = capsule
        .cast_into::<PyCapsule>()
        .map_err(|_| crate::errors::type_error("__dlpack__ did not return a capsule"))?;
    // The capsule is not consumed (not renamed): its own destructor releases the producer's
    // memory once we drop it, after the copy below.
    unsafe {
        let cap = capsule.as_ptr();
        let dl: &DLTensor = if ffi::PyCapsule_IsValid(cap, NAME_VERSIONED.as_ptr()) == 1 {
            let m = ffi::PyCapsule_GetPointer(cap, NAME_VERSIONED.as_ptr())
                as *const DLManagedTensorVersioned;
            if (*m).version.major != 1 {
                return Err(PyBufferError::new_err(format!(
                    "unsupported DLPack major version {}",
                    (*m).version.major
                )));
            }
            &(*m).dl_tensor
        } else if ffi::PyCapsule_IsValid(cap, NAME.as_ptr()) == 1 {
            let m = ffi::PyCapsule_GetPointer(cap, NAME.as_ptr()) as *const DLManagedTensor;
            &(*m).dl_tensor
        } else {
            return Err(PyBufferError::new_err(
                "__dlpack__ returned an invalid or consumed capsule",
            ));
        };
        if dl.device.device_type != KDL_CPU {
            return Err(crate::errors::type_error(
                "only CPU arrays are accepted by this build of peft_rs (CUDA needs the `cuda` feature)",
            ));
        }
        let shape: Vec<usize> = if dl.ndim == 0 {
            Vec::new()
        } else {
            std::slice::from_raw_parts(dl.shape, dl.ndim as usize)
                .iter()
                .map(|&d| d as usize)
                .collect()
        };
        let dtype = dtype_from_dl(dl.dtype)?;
        // The copy runs without the GIL; `obj` and `capsule` keep the memory alive meanwhile.
        let source = SendRef(dl);
        let t = obj.py().detach(move || {
            let dl = source.into_inner();
            let dev = &Device::Cpu;
            match dtype {
                DType::F16 => Tensor::from_vec(gather::<f16>(dl, &shape), shape, dev),
                DType::BF16 => Tensor::from_vec(gather::<bf16>(dl, &shape), shape, dev),
                DType::F32 => Tensor::from_vec(gather::<f32>(dl, &shape), shape, dev),
                DType::F64 => Tensor::from_vec(gather::<f64>(dl, &shape), shape, dev),
                DType::I16 => Tensor::from_vec(gather::<i16>(dl, &shape), shape, dev),
                DType::I32 => Tensor::from_vec(gather::<i32>(dl, &shape), shape, dev),
                DType::I64 => Tensor::from_vec(gather::<i64>(dl, &shape), shape, dev),
                DType::U8 => Tensor::from_vec(gather::<u8>(dl, &shape), shape, dev),
                DType::U32 => Tensor::from_vec(gather::<u32>(dl, &shape), shape, dev),
                _ => unreachable!("dtype_from_dl returns only the dtypes above"),
            }
        });
        t.map_err(crate::errors::candle_err)
    }
}

/// A candle tensor offered through `__dlpack__` (what `torch.from_dlpack` / `numpy.from_dlpack`
/// consume).
#[pyclass(module = "peft_rs._core", frozen)]
pub struct DLPackExport {
    tensor: Tensor,
}

/// What the capsule owns: the tensor (keeping its buffer alive) and the shape/strides arrays the
/// DLTensor points into.
struct ExportCtx {
    _tensor: Tensor,
    shape: Vec<i64>,
    strides: Vec<i64>,
}

unsafe extern "C" fn delete_legacy(m: *mut DLManagedTensor) {
    unsafe {
        drop(Box::from_raw((*m).manager_ctx as *mut ExportCtx));
        drop(Box::from_raw(m));
    }
}

unsafe extern "C" fn delete_versioned(m: *mut DLManagedTensorVersioned) {
    unsafe {
        drop(Box::from_raw((*m).manager_ctx as *mut ExportCtx));
        drop(Box::from_raw(m));
    }
}

/// Frees the tensor if no consumer took it (the capsule still has its original name).
unsafe extern "C" fn capsule_destructor(cap: *mut ffi::PyObject) {
    unsafe {
        if ffi::PyCapsule_IsValid(cap, NAME_VERSIONED.as_ptr()) == 1 {
            let m = ffi::PyCapsule_GetPointer(cap, NAME_VERSIONED.as_ptr())
                as *mut DLManagedTensorVersioned;
            if let Some(d) = (*m).deleter {
                d(m);
            }
        } else if ffi::PyCapsule_IsValid(cap, NAME.as_ptr()) == 1 {
            let m = ffi::PyCapsule_GetPointer(cap, NAME.as_ptr()) as *mut DLManagedTensor;
            if let Some(d) = (*m).deleter {
                d(m);
            }
        } else {
            // Consumed: the consumer calls the deleter.
            ffi::PyErr_Clear();
        }
    }
}

fn data_pointer(tensor: &Tensor) -> PyResult<*mut c_void> {
    let (storage, layout) = tensor.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        return Err(crate::errors::type_error(
            "only CPU tensors can be exported by this build",
        ));
    };
    let offset = layout.start_offset();
    let ptr = match cpu {
        CpuStorage::F16(v) => v[offset..].as_ptr() as *const c_void,
        CpuStorage::BF16(v) => v[offset..].as_ptr() as *const c_void,
        CpuStorage::F32(v) => v[offset..].as_ptr() as *const c_void,
        CpuStorage::F64(v) => v[offset..].as_ptr() as *const c_void,
        CpuStorage::I16(v) => v[offset..].as_ptr() as *const c_void,
        CpuStorage::I32(v) => v[offset..].as_ptr() as *const c_void,
        CpuStorage::I64(v) => v[offset..].as_ptr() as *const c_void,
        CpuStorage::U8(v) => v[offset..].as_ptr() as *const c_void,
        CpuStorage::U32(v) => v[offset..].as_ptr() as *const c_void,
        _ => {
            return Err(crate::errors::type_error(format!(
                "cannot export dtype {:?}",
                tensor.dtype()
            )));
        }
    };
    Ok(ptr as *mut c_void)
}

/// A DLPack capsule (versioned or legacy) pointing into `t`'s buffer (`t` contiguous), which it
/// keeps alive until the consumer's deleter or the capsule's destructor runs.
fn capsule<'py>(py: Python<'py>, t: &Tensor, versioned: bool) -> PyResult<Bound<'py, PyCapsule>> {
    let ctx = Box::new(ExportCtx {
        _tensor: t.clone(),
        shape: t.dims().iter().map(|&d| d as i64).collect(),
        strides: t.stride().iter().map(|&s| s as i64).collect(),
    });
    let dl_tensor = DLTensor {
        data: data_pointer(t)?,
        device: DLDevice {
            device_type: KDL_CPU,
            device_id: 0,
        },
        ndim: t.rank() as i32,
        dtype: dtype_to_dl(t.dtype())?,
        shape: ctx.shape.as_ptr() as *mut i64,
        strides: ctx.strides.as_ptr() as *mut i64,
        byte_offset: 0,
    };
    let ctx = Box::into_raw(ctx) as *mut c_void;
    let (pointer, name) = if versioned {
        let m = Box::new(DLManagedTensorVersioned {
            version: DLPackVersion { major: 1, minor: 0 },
            manager_ctx: ctx,
            deleter: Some(delete_versioned),
            flags: 0,
            dl_tensor,
        });
        (Box::into_raw(m) as *mut c_void, NAME_VERSIONED)
    } else {
        let m = Box::new(DLManagedTensor {
            dl_tensor,
            manager_ctx: ctx,
            deleter: Some(delete_legacy),
        });
        (Box::into_raw(m) as *mut c_void, NAME)
    };
    // SAFETY: `pointer` is a leaked Box released by the destructor or the consumer's deleter.
    unsafe {
        PyCapsule::new_with_pointer_and_destructor(
            py,
            NonNull::new(pointer).expect("Box pointers are non-null"),
            name,
            Some(capsule_destructor),
        )
    }
}

/// torch's C-level DLPack converters, what `torch.utils.dlpack` wraps: `Tensor.__dlpack__` and
/// `torch.from_dlpack` are Python functions costing several microseconds per call, as much as
/// a small layer's forward.
#[derive(Clone, Copy)]
enum TorchC {
    ToDlpack,
    FromDlpack,
}

/// The converter from `torch._C` (imported by then: a torch tensor came in), looked up once;
/// `None` where this torch has no such function (the public API is used then).
fn torch_c(py: Python<'_>, which: TorchC) -> Option<Bound<'_, PyAny>> {
    static TO: PyOnceLock<Option<Py<PyAny>>> = PyOnceLock::new();
    static FROM: PyOnceLock<Option<Py<PyAny>>> = PyOnceLock::new();
    let (cell, name) = match which {
        TorchC::ToDlpack => (&TO, "_to_dlpack"),
        TorchC::FromDlpack => (&FROM, "_from_dlpack"),
    };
    let function = cell.get_or_init(py, || {
        // torch is in use: the package may now open torch's MKL (`peft_rs._torch_in_use`,
        // which decides by `PEFT_RS_BLAS` and raises nothing in the default mode).
        if let Err(error) = py
            .import("peft_rs")
            .and_then(|m| m.call_method0("_torch_in_use"))
        {
            error.write_unraisable(py, None);
        }
        let module = py.import("torch._C").ok()?;
        Some(module.getattr(name).ok()?.unbind())
    });
    function.as_ref().map(|f| f.bind(py).clone())
}

#[pymethods]
impl DLPackExport {
    #[pyo3(signature = (*, stream=None, max_version=None, dl_device=None, copy=None))]
    fn __dlpack__<'py>(
        &self,
        py: Python<'py>,
        stream: Option<Bound<'py, PyAny>>,
        max_version: Option<(u32, u32)>,
        dl_device: Option<(i32, i32)>,
        copy: Option<bool>,
    ) -> PyResult<Bound<'py, PyCapsule>> {
        if stream.as_ref().is_some_and(|s| !s.is_none()) {
            return Err(PyBufferError::new_err(
                "a stream is only meaningful for CUDA tensors",
            ));
        }
        if dl_device.is_some_and(|d| d.0 != KDL_CPU) {
            return Err(PyBufferError::new_err("peft_rs tensors live on the CPU"));
        }
        if copy == Some(true) {
            return Err(PyBufferError::new_err(
                "copy=True is not supported; the export is zero-copy",
            ));
        }
        capsule(py, &self.tensor, max_version.is_some_and(|v| v.0 >= 1))
    }

    fn __dlpack_device__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        PyTuple::new(py, [KDL_CPU, 0])
    }
}
