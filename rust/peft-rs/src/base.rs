//! The frozen layers that adapters wrap, in PyTorch's weight layouts.

use candle_core::{DType, Tensor};

use crate::error::{PeftError, Result};

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

/// A frozen base layer: its weights and how it computes.
#[derive(Debug, Clone)]
pub struct BaseLayer {
    kind: ModuleKind,
    weight: Tensor,
    bias: Option<Tensor>,
}

impl BaseLayer {
    pub fn new(kind: ModuleKind, weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
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
        if weight.rank() != rank {
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
        let layer = Self { kind, weight, bias };
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

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    pub fn dtype(&self) -> DType {
        self.weight.dtype()
    }

    /// Replaces the weights (same shapes and dtype), as merging does.
    pub(crate) fn set_weights(&mut self, weight: Tensor, bias: Option<Tensor>) {
        self.weight = weight;
        self.bias = bias;
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

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self.kind {
            ModuleKind::Embedding => embedding(&self.weight, x),
            ModuleKind::Linear | ModuleKind::Conv1D => {
                self.check_input_dtype(x)?;
                let w = if self.kind == ModuleKind::Linear {
                    self.weight.t()?
                } else {
                    self.weight.clone()
                };
                linear_rows(x, &w, self.bias.as_ref(), self.in_features())
            }
            ModuleKind::Conv2d(p) => {
                self.check_input_dtype(x)?;
                let y = conv2d(x, &self.weight, p, self.in_features())?;
                match &self.bias {
                    Some(b) => Ok(y.broadcast_add(&b.reshape((1, (), 1, 1))?)?),
                    None => Ok(y),
                }
            }
        }
    }

    /// The layer without its bias, computed in `x`'s dtype (DoRA's recomputed base term).
    pub fn forward_without_bias(&self, x: &Tensor) -> Result<Tensor> {
        let unbiased = Self {
            kind: self.kind,
            weight: self.weight.to_dtype(x.dtype())?,
            bias: None,
        };
        unbiased.forward(x)
    }

    fn check_input_dtype(&self, x: &Tensor) -> Result<()> {
        if x.dtype() != self.weight.dtype() {
            return Err(PeftError::DType {
                what: "layer input".into(),
                expected: format!("{:?} (the base weight's dtype)", self.weight.dtype()),
                found: format!("{:?}", x.dtype()),
            });
        }
        Ok(())
    }
}

/// `x @ w (+ bias)` over the last dimension of `x`, for any leading dimensions; `w` is
/// `(in, out)` (a transposed view is fine: no copy is made).
pub(crate) fn linear_rows(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    in_features: usize,
) -> Result<Tensor> {
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
    let y = crate::kernels::matmul(&x.reshape((rows, last))?, w)?;
    let y = match bias {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    let mut out = lead.to_vec();
    out.push(y.dim(1)?);
    Ok(y.reshape(out)?)
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
