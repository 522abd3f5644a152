//! The frozen layers that adapters wrap, in PyTorch's weight layouts.

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{DType, Device, Tensor};

use crate::error::{PeftError, Result};
use crate::kernels::linear::Extras;

/// Hyper-parameters of a 2-D convolution. candle's convolution takes one value per parameter for
/// both spatial dimensions, so asymmetric PyTorch settings are rejected when a layer is built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv2dParams {
    pub stride: usize,
    pub padding: usize,
    pub dilation: usize,
    pub groups: usize,
}

impl Default for Conv2dParams {
    fn default() -> Self {
        Self {
            stride: 1,
            padding: 0,
            dilation: 1,
            groups: 1,
        }
    }
}

/// The kind of module an adapter is attached to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModuleKind {
    /// `nn.Linear`, weight `(out, in)`.
    Linear,
    /// transformers' `Conv1D` (GPT-2), weight `(in, out)`; PEFT's `fan_in_fan_out=True`.
    Conv1D,
    /// `nn.Embedding`, weight `(num_embeddings, embedding_dim)`.
    Embedding,
    /// `nn.Conv2d`, weight `(out, in / groups, kh, kw)`.
    Conv2d(Conv2dParams),
}

/// The seam between peft-rs and a base weight's storage.
///
/// peft-rs reads a base weight only as a dense tensor in PyTorch's layout for its module kind,
/// and writes one back only when merging or unmerging. A dense tensor implements it as is; a
/// quantized weight (another crate's 4-bit format, say) dequantizes in [`BaseWeight::dense`] and
/// re-quantizes in [`BaseWeight::replace`], and every method, merge rule and file works on it.
pub trait BaseWeight: std::fmt::Debug + Send + Sync {
    /// The weight as a dense tensor in PyTorch's layout (`(out, in)` for Linear...).
    fn dense(&self) -> Result<Tensor>;
    /// Stores a new weight of the same shape, given dense (merge and unmerge).
    fn replace(&mut self, weight: Tensor) -> Result<()>;
    /// Shape of the dense weight.
    fn dims(&self) -> &[usize];
    /// The dtype [`BaseWeight::dense`] returns and layer inputs must have.
    fn dtype(&self) -> DType;
    fn device(&self) -> &Device;
}

impl BaseWeight for Tensor {
    fn dense(&self) -> Result<Tensor> {
        Ok(self.clone())
    }

    fn replace(&mut self, weight: Tensor) -> Result<()> {
        if weight.dims() != Tensor::dims(self) {
            return Err(PeftError::shape(
                "replacement base weight",
                Tensor::dims(self),
                weight.dims(),
            ));
        }
        *self = weight.to_dtype(Tensor::dtype(self))?;
        Ok(())
    }

    fn dims(&self) -> &[usize] {
        Tensor::dims(self)
    }

    fn dtype(&self) -> DType {
        Tensor::dtype(self)
    }

    fn device(&self) -> &Device {
        Tensor::device(self)
    }
}

/// A frozen base layer: its kind, its weight (behind [`BaseWeight`]) and bias.
#[derive(Debug)]
pub struct BaseLayer {
    kind: ModuleKind,
    weight: Box<dyn BaseWeight>,
    bias: Option<Tensor>,
    /// Whether the weight tensor may be held outside this layer (it was given to it, or handed
    /// out by [`BaseLayer::weight`]). Merging writes a weight only this layer holds in place (as
    /// PEFT does) and a lent one into a new tensor, so a handle never changes under its holder.
    lent: AtomicBool,
}

impl BaseLayer {
    /// A layer over a dense weight.
    pub fn new(kind: ModuleKind, weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        Self::with_weight(kind, Box::new(weight), bias)
    }

    /// A layer over any [`BaseWeight`] (a quantized weight from another crate, say).
    pub fn with_weight(
        kind: ModuleKind,
        weight: Box<dyn BaseWeight>,
        bias: Option<Tensor>,
    ) -> Result<Self> {
        let rank = match kind {
            ModuleKind::Conv2d(p) => {
                if p.groups == 0 || p.stride == 0 || p.dilation == 0 {
                    return Err(PeftError::InvalidOperation(format!(
                        "Conv2d stride, dilation and groups must be positive, found {p:?}"
                    )));
                }
                4
            }
            _ => 2,
        };
        if weight.dims().len() != rank {
            return Err(PeftError::InvalidOperation(format!(
                "a {kind:?} weight must have {rank} dimensions, found shape {:?}",
                weight.dims()
            )));
        }
        if !weight.dtype().is_float() {
            return Err(PeftError::DType {
                what: "base weight".into(),
                expected: "a floating-point dtype".into(),
                found: format!("{:?}", weight.dtype()),
            });
        }
        let layer = Self {
            kind,
            weight,
            bias,
            lent: AtomicBool::new(true),
        };
        if let Some(b) = &layer.bias {
            if kind == ModuleKind::Embedding {
                return Err(PeftError::InvalidOperation(
                    "an Embedding has no bias".into(),
                ));
            }
            if b.dims() != [layer.out_features()] {
                return Err(PeftError::shape(
                    "base bias",
                    &[layer.out_features()],
                    b.dims(),
                ));
            }
        }
        Ok(layer)
    }

    pub fn kind(&self) -> ModuleKind {
        self.kind
    }

    /// The weight, dense, in PyTorch's layout. The layer never changes it in place afterwards.
    pub fn weight(&self) -> Result<Tensor> {
        self.lent.store(true, Ordering::Relaxed);
        self.weight.dense()
    }

    /// The weight for a computation that drops it before the layer changes (not lent).
    pub(crate) fn dense_weight(&self) -> Result<Tensor> {
        self.weight.dense()
    }

    /// Whether only this layer holds its weight tensor, which merging may then write in place.
    pub(crate) fn owns_weight(&self) -> bool {
        !self.lent.load(Ordering::Relaxed)
    }

    /// Shape of the weight in PyTorch's layout.
    pub fn weight_dims(&self) -> &[usize] {
        self.weight.dims()
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    pub fn dtype(&self) -> DType {
        self.weight.dtype()
    }

    pub fn device(&self) -> &Device {
        self.weight.device()
    }

    /// Replaces the weight (through the [`BaseWeight`] seam) and the bias, as merging does;
    /// `owned`: nothing outside this layer holds `weight` (a merge's fresh result).
    pub(crate) fn set_weights(
        &mut self,
        weight: Tensor,
        bias: Option<Tensor>,
        owned: bool,
    ) -> Result<()> {
        self.weight.replace(weight)?;
        self.bias = bias;
        *self.lent.get_mut() = !owned;
        Ok(())
    }

    /// PEFT's `in_features`: input width, `num_embeddings` or input channels.
    pub fn in_features(&self) -> usize {
        let d = self.weight.dims();
        match self.kind {
            ModuleKind::Linear => d[1],
            ModuleKind::Conv1D | ModuleKind::Embedding => d[0],
            ModuleKind::Conv2d(p) => d[1] * p.groups,
        }
    }

    /// PEFT's `out_features`: output width, `embedding_dim` or output channels.
    pub fn out_features(&self) -> usize {
        let d = self.weight.dims();
        match self.kind {
            ModuleKind::Linear | ModuleKind::Conv2d(_) => d[0],
            ModuleKind::Conv1D | ModuleKind::Embedding => d[1],
        }
    }

    /// `(kh, kw)` for Conv2d, `(1, 1)` otherwise.
    pub fn kernel_size(&self) -> (usize, usize) {
        let d = self.weight.dims();
        match self.kind {
            ModuleKind::Conv2d(_) => (d[2], d[3]),
            _ => (1, 1),
        }
    }

    /// The weight as the linear map it is, `(out, in_flat)`: Linear as is, Conv1D transposed,
    /// Conv2d flattened to `(out, in/groups·kh·kw)`, Embedding transposed to `(dim, num)`.
    pub fn to_out_in(&self, weight: &Tensor) -> Result<Tensor> {
        Ok(match self.kind {
            ModuleKind::Linear => weight.clone(),
            ModuleKind::Conv1D | ModuleKind::Embedding => weight.t()?,
            ModuleKind::Conv2d(_) => weight.flatten_from(1)?,
        })
    }

    /// The inverse of [`BaseLayer::to_out_in`]: back to PyTorch's layout (contiguous).
    pub fn from_out_in(&self, out_in: &Tensor) -> Result<Tensor> {
        Ok(match self.kind {
            ModuleKind::Linear => out_in.contiguous()?,
            ModuleKind::Conv1D | ModuleKind::Embedding => out_in.t()?.contiguous()?,
            ModuleKind::Conv2d(_) => out_in.contiguous()?.reshape(self.weight.dims())?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with(x, &self.dense_weight()?, self.bias.as_ref())
    }

    /// The layer's computation with another weight and bias of the same shapes (methods whose
    /// forward uses a transformed weight, such as BOFT on Conv2d).
    pub fn forward_with(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: Option<&Tensor>,
    ) -> Result<Tensor> {
        match self.kind {
            ModuleKind::Embedding => embedding(weight, x),
            ModuleKind::Linear | ModuleKind::Conv1D => {
                check_input_dtype(x, weight)?;
                let w = if self.kind == ModuleKind::Linear {
                    weight.t()?
                } else {
                    weight.clone()
                };
                linear_rows(x, &w, bias, self.in_features())
            }
            ModuleKind::Conv2d(p) => {
                check_input_dtype(x, weight)?;
                let y = conv2d(x, weight, p, self.in_features())?;
                match bias {
                    Some(b) => {
                        let shape: &[usize] = if y.rank() == 4 {
                            &[1, b.dim(0)?, 1, 1]
                        } else {
                            &[b.dim(0)?, 1, 1]
                        };
                        Ok(y.broadcast_add(&b.reshape(shape)?)?)
                    }
                    None => Ok(y),
                }
            }
        }
    }

    /// The layer without its bias, computed in `x`'s dtype (DoRA's recomputed base term).
    pub fn forward_without_bias(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with(x, &self.dense_weight()?.to_dtype(x.dtype())?, None)
    }

    /// The layer's output with an adapter's `extras` computed in the same pass (one output
    /// buffer, see [`crate::kernels::linear`]); `None` where that kernel does not apply (not a
    /// Linear or Conv1D layer, not on the CPU, gradients recorded, f64): the caller then
    /// takes its plain path, which computes the same values.
    pub(crate) fn forward_fused(&self, x: &Tensor, extras: &Extras) -> Result<Option<Tensor>> {
        if !matches!(self.kind, ModuleKind::Linear | ModuleKind::Conv1D) {
            return Ok(None);
        }
        let weight = self.dense_weight()?;
        check_input_dtype(x, &weight)?;
        let (rows, lead) = as_rows(x, self.in_features())?;
        let (weight, rows, bias) = match &extras.weight_delta {
            Some(delta) => {
                let sum =
                    crate::kernels::elementwise::add_scaled_as(&weight, delta, 1.0, DType::F32)?;
                let Some(sum) = sum else { return Ok(None) };
                let bias = self
                    .bias
                    .as_ref()
                    .map(|b| b.to_dtype(DType::F32))
                    .transpose()?;
                (sum, rows.to_dtype(DType::F32)?, bias)
            }
            None => (weight, rows, self.bias.clone()),
        };
        let w_t = match self.kind {
            ModuleKind::Linear => weight.t()?,
            _ => weight,
        };
        match crate::kernels::linear::linear(&rows, &w_t, bias.as_ref(), extras)? {
            Some(y) => Ok(Some(unflatten_rows(y.to_dtype(x.dtype())?, lead)?)),
            None => Ok(None),
        }
    }

    /// A per-output-feature vector shaped to broadcast against this layer's output of rank
    /// `rank` (channels-first for Conv2d).
    pub fn per_output(&self, v: &Tensor, rank: usize) -> Result<Tensor> {
        let n = v.elem_count();
        Ok(match self.kind {
            ModuleKind::Conv2d(_) if rank == 4 => v.reshape((1, n, 1, 1))?,
            ModuleKind::Conv2d(_) => v.reshape((n, 1, 1))?,
            _ => v.reshape(n)?,
        })
    }
}

/// Inputs of Linear, Conv1D and Conv2d layers must have the weight's dtype.
fn check_input_dtype(x: &Tensor, weight: &Tensor) -> Result<()> {
    if x.dtype() != weight.dtype() {
        return Err(PeftError::DType {
            what: "layer input".into(),
            expected: format!("{:?} (the base weight's dtype)", weight.dtype()),
            found: format!("{:?}", x.dtype()),
        });
    }
    Ok(())
}

/// `x @ w (+ bias)` over the last dimension of `x`, for any leading dimensions; `w` is
/// `(in, out)` (a transposed view is fine: no copy is made).
pub(crate) fn linear_rows(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    in_features: usize,
) -> Result<Tensor> {
    let (rows, lead) = as_rows(x, in_features)?;
    let y = match crate::kernels::linear::linear(&rows, w, bias, &Extras::default())? {
        Some(y) => y,
        None => {
            let y = crate::kernels::matmul(&rows, w)?;
            match bias {
                Some(b) => y.broadcast_add(b)?,
                None => y,
            }
        }
    };
    unflatten_rows(y, lead)
}

/// `x` as `(rows, in_features)` and its leading dimensions.
fn as_rows(x: &Tensor, in_features: usize) -> Result<(Tensor, Vec<usize>)> {
    let dims = x.dims();
    let Some((&last, lead)) = dims.split_last() else {
        return Err(PeftError::shape("layer input", &[in_features], dims));
    };
    if last != in_features {
        let mut expected = lead.to_vec();
        expected.push(in_features);
        return Err(PeftError::shape(
            "layer input (last dimension)",
            &expected,
            dims,
        ));
    }
    let rows: usize = lead.iter().product();
    Ok((x.reshape((rows, last))?, lead.to_vec()))
}

fn unflatten_rows(y: Tensor, mut lead: Vec<usize>) -> Result<Tensor> {
    lead.push(y.dim(1)?);
    Ok(y.reshape(lead)?)
}

/// Embedding lookup for integer ids of any shape; output `(*ids.shape, dim)`.
pub(crate) fn embedding(table: &Tensor, ids: &Tensor) -> Result<Tensor> {
    if ids.dtype().is_float() {
        return Err(PeftError::DType {
            what: "embedding input".into(),
            expected: "integer token ids (u8, u32 or i64)".into(),
            found: format!("{:?}", ids.dtype()),
        });
    }
    let rows = table.index_select(&ids.flatten_all()?, 0)?;
    let mut out = ids.dims().to_vec();
    out.push(table.dim(1)?);
    Ok(rows.reshape(out)?)
}

/// 2-D convolution on `(N, C, H, W)` or unbatched `(C, H, W)` input.
pub(crate) fn conv2d(
    x: &Tensor,
    kernel: &Tensor,
    p: Conv2dParams,
    in_channels: usize,
) -> Result<Tensor> {
    let unbatched = x.rank() == 3;
    let x4 = match x.rank() {
        3 => x.unsqueeze(0)?,
        4 => x.clone(),
        _ => {
            return Err(PeftError::InvalidOperation(format!(
                "Conv2d input must be (N, C, H, W) or (C, H, W), found shape {:?}",
                x.dims()
            )));
        }
    };
    if x4.dim(1)? != in_channels {
        return Err(PeftError::shape(
            "Conv2d input channels",
            &[in_channels],
            &[x4.dim(1)?],
        ));
    }
    let y = x4.conv2d(kernel, p.padding, p.stride, p.dilation, p.groups)?;
    Ok(if unbatched { y.squeeze(0)? } else { y })
}
