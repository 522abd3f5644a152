//! LoKr (PEFT `tuners/lokr`): a Kronecker product update `ΔW = (w1 ⊗ w2) · alpha / r`, on
//! `nn.Linear` and `nn.Conv2d`. The output and input sizes are split as `out = a·b`,
//! `in = c·d` by PEFT's [`factorization`]; `w1` is `(a, c)` and `w2` is `(b, d)` (Conv2d:
//! `(b, d, kh, kw)`), each either a full matrix or a rank-`r` product, and `w2` of an effective
//! Conv2d is a CP kernel. The layer mechanics (forward, dropouts) are LyCORIS's, in
//! [`crate::methods::lycoris`].

use std::collections::BTreeMap;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::base::{BaseLayer, ModuleKind};
use crate::config::{CommonFields, check_extra_fields};
use crate::error::{PeftError, Result};
use crate::init::Initializer;
use crate::kernels::linear::matmul_scaled;
use crate::matching::Selection;
use crate::merge::adapter_dtype;
use crate::method::{
    InferredBase, LayerAdapter, MethodConfig, MethodEntry, ParamSource, dims_of, dims_with_rank,
};
use crate::methods::lycoris::{
    LycorisAdapter, LycorisFields, LycorisMethod, TrainingDropout, check_kind, config_object,
    cp_weight, low_rank_pays, take_field, take_fields,
};
use crate::params::take_params;

pub const PEFT_TYPE: &str = "LOKR";

pub const ENTRY: MethodEntry = MethodEntry {
    peft_type: PEFT_TYPE,
    config_class: "LoKrConfig",
    from_json: |v| Ok(Arc::new(LoKrConfig::from_json(v)?)),
};

pub const LOKR_W1: &str = "lokr_w1";
pub const LOKR_W1_A: &str = "lokr_w1_a";
pub const LOKR_W1_B: &str = "lokr_w1_b";
pub const LOKR_W2: &str = "lokr_w2";
pub const LOKR_W2_A: &str = "lokr_w2_a";
pub const LOKR_W2_B: &str = "lokr_w2_b";
pub const LOKR_T2: &str = "lokr_t2";

/// Every tensor name a LoKr layer can have, relative to its module (PEFT's `ParameterDict`s: no
/// `.weight` suffix).
pub const PARAM_NAMES: &[&str] = &[
    LOKR_W1, LOKR_W1_A, LOKR_W1_B, LOKR_W2, LOKR_W2_A, LOKR_W2_B, LOKR_T2,
];

/// `init_weights`: `true`, `false` or `"lycoris"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LoKrInit {
    Flag(bool),
    Named(String),
}

impl Default for LoKrInit {
    fn default() -> Self {
        Self::Flag(true)
    }
}

/// PEFT's `LoKrConfig`, with PEFT's field names and defaults.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LoKrConfig {
    #[serde(flatten)]
    pub common: CommonFields,
    #[serde(flatten)]
    pub lycoris: LycorisFields,
    /// Also factor `w1` into a rank-`r` product when `r < max(a, c) / 2`.
    pub decompose_both: bool,
    /// The [`factorization`] target: `-1` for factors near the square root.
    pub decompose_factor: i64,
    /// Divide the rank-dropout mask by its mean.
    pub rank_dropout_scale: bool,
    /// `true`: `w1` (or `w1_a`) starts at zero; `"lycoris"`: `w2` (or `w2_b`) does; `false`:
    /// every factor is random.
    pub init_weights: LoKrInit,
    /// Fields a newer PEFT may write; they must be "off" (see [`check_extra_fields`]).
    #[serde(skip_serializing)]
    pub unsupported: Map<String, Value>,
}

impl Default for LoKrConfig {
    fn default() -> Self {
        Self {
            common: CommonFields::default(),
            lycoris: LycorisFields::default(),
            decompose_both: false,
            decompose_factor: -1,
            rank_dropout_scale: false,
            init_weights: LoKrInit::default(),
            unsupported: Map::new(),
        }
    }
}

impl LoKrConfig {
    /// Reads a config from PEFT's JSON form (`adapter_config.json` or `LoKrConfig.to_dict()`).
    pub fn from_json(value: Value) -> Result<Self> {
        let mut map = config_object(value, PEFT_TYPE)?;
        let config = Self {
            common: take_fields(&mut map)?,
            lycoris: take_fields(&mut map)?,
            decompose_both: take_field(&mut map, "decompose_both", false)?,
            decompose_factor: take_field(&mut map, "decompose_factor", -1)?,
            rank_dropout_scale: take_field(&mut map, "rank_dropout_scale", false)?,
            init_weights: take_field(&mut map, "init_weights", LoKrInit::default())?,
            unsupported: map,
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks every field; every constructor calls it, so a config in hand is valid.
    pub fn validate(&self) -> Result<()> {
        self.common.validate()?;
        check_extra_fields(&self.unsupported, &[])?;
        self.lycoris.validate()?;
        match &self.init_weights {
            LoKrInit::Flag(_) => Ok(()),
            LoKrInit::Named(name) if name == "lycoris" => Ok(()),
            // PEFT treats any other non-empty string as `true`; an unknown name is a mistake.
            LoKrInit::Named(name) => Err(PeftError::config(
                "init_weights",
                format!("{name:?} is not an initialisation; use true, false or \"lycoris\""),
            )),
        }
    }
}

impl MethodConfig for LoKrConfig {
    fn peft_type(&self) -> &'static str {
        PEFT_TYPE
    }

    fn validate(&self) -> Result<()> {
        LoKrConfig::validate(self)
    }

    fn fields(&self) -> Value {
        serde_json::to_value(self).expect("LoKrConfig serialises")
    }

    fn selection(&self) -> Selection<'_> {
        self.lycoris.selection()
    }

    fn param_names(&self) -> &'static [&'static str] {
        PARAM_NAMES
    }

    fn rank_for(&self, module: &str) -> Result<Option<usize>> {
        Ok(Some(self.lycoris.rank_and_alpha(module)?.0))
    }

    fn build(
        &self,
        module: &str,
        base: &BaseLayer,
        source: ParamSource,
        _shared: &BTreeMap<String, Tensor>,
    ) -> Result<Box<dyn LayerAdapter>> {
        Ok(Box::new(LoKrAdapter::new(
            module,
            base,
            self.clone(),
            source,
        )?))
    }

    /// `out = a·b`, `in = c·d`: `(a, c)` from `lokr_w1` (or `lokr_w1_a`'s rows and
    /// `lokr_w1_b`'s columns), `(b, d)` and the kernel from `lokr_w2` (or its factors, with
    /// `lokr_t2` in the CP form). A factored flat Conv2d `lokr_w2_b` holds `d · kh · kw`
    /// columns: read as a Linear unless only a square kernel makes `(c, d)` PEFT's
    /// factorization of the input width.
    fn infer_base(
        &self,
        module: &str,
        tensors: &[(String, Tensor)],
        _shared: &BTreeMap<String, Tensor>,
    ) -> Result<Option<InferredBase>> {
        let (a, c) = match dims_of(tensors, LOKR_W1) {
            Some(_) => {
                let w1 = dims_with_rank(module, tensors, LOKR_W1, &[2])?;
                (w1[0], w1[1])
            }
            None => (
                dims_with_rank(module, tensors, LOKR_W1_A, &[2])?[0],
                dims_with_rank(module, tensors, LOKR_W1_B, &[2])?[1],
            ),
        };
        let (b, d, kernel) = if dims_of(tensors, LOKR_W2).is_some() {
            match dims_with_rank(module, tensors, LOKR_W2, &[2, 4])? {
                [b, d, kh, kw] => (*b, *d, Some((*kh, *kw))),
                w2 => (w2[0], w2[1], None),
            }
        } else if dims_of(tensors, LOKR_T2).is_some() {
            let t2 = dims_with_rank(module, tensors, LOKR_T2, &[4])?;
            let b = dims_with_rank(module, tensors, LOKR_W2_A, &[2])?[1];
            let d = dims_with_rank(module, tensors, LOKR_W2_B, &[2])?[1];
            (b, d, Some((t2[2], t2[3])))
        } else {
            let b = dims_with_rank(module, tensors, LOKR_W2_A, &[2])?[0];
            let cols = dims_with_rank(module, tensors, LOKR_W2_B, &[2])?[1];
            let fits = |d: usize| factorization(c * d, self.decompose_factor) == (c, d);
            match (2..=7).find(|k| cols % (k * k) == 0 && !fits(cols) && fits(cols / (k * k))) {
                Some(k) => (b, cols / (k * k), Some((k, k))),
                None => (b, cols, None),
            }
        };
        Ok(Some(match kernel {
            Some((kh, kw)) => InferredBase::conv2d(a * b, c * d, kh, kw),
            None => InferredBase::linear(a * b, c * d, false),
        }))
    }
}

/// PEFT's (LyCORIS's) `factorization(dimension, factor)`: two factors `m <= n` of `dimension`.
/// A positive `factor` that divides `dimension` gives `(factor, dimension / factor)` as is (not
/// sorted); otherwise the divisor pair is walked up from `(1, dimension)` while the smaller
/// factor stays at most `factor` (any factor with `-1`), ending near the square root.
pub fn factorization(dimension: usize, factor: i64) -> (usize, usize) {
    if factor > 0 && dimension.is_multiple_of(factor as usize) {
        return (factor as usize, dimension / factor as usize);
    }
    let factor = if factor == -1 {
        dimension as i64
    } else {
        factor
    };
    let (mut m, mut n) = (1, dimension);
    // PEFT never updates this bound (a divisor pair never sums past 1 + dimension); kept as is.
    let length = m + n;
    while m < n {
        let mut new_m = m + 1;
        while !dimension.is_multiple_of(new_m) {
            new_m += 1;
        }
        let new_n = dimension / new_m;
        if new_m + new_n > length || new_m as i64 > factor {
            break;
        }
        (m, n) = (new_m, new_n);
    }
    if m > n { (n, m) } else { (m, n) }
}

/// How LoKr factors one module's weight (PEFT's `update_layer`): `out = a·b`, `in = c·d`
/// (`in/groups` for Conv2d).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct KronForm {
    a: usize,
    b: usize,
    c: usize,
    d: usize,
    /// Conv2d kernel size.
    kernel: Option<(usize, usize)>,
    /// `w1` is a full `(a, c)` matrix, not `w1_a · w1_b`.
    full_w1: bool,
    /// `w2` is a full `(b, d[, kh, kw])` tensor.
    full_w2: bool,
    /// A factored Conv2d `w2` is a CP kernel (`use_effective_conv2d`, kernel larger than 1×1).
    cp: bool,
}

impl KronForm {
    fn of(base: &BaseLayer, r: usize, config: &LoKrConfig) -> Result<Self> {
        check_kind("LoKr", base)?;
        let (inp, kernel) = match base.kind() {
            ModuleKind::Conv2d(_) => (base.weight_dims()[1], Some(base.kernel_size())),
            _ => (base.in_features(), None),
        };
        let (c, d) = factorization(inp, config.decompose_factor);
        let (a, b) = factorization(base.out_features(), config.decompose_factor);
        // PEFT: use_w1 = not (decompose_both and r < max(a, c) / 2), use_w2 = r >= max(b, d) / 2
        // (float division; doubled here to stay in integers).
        Ok(Self {
            a,
            b,
            c,
            d,
            kernel,
            full_w1: !(config.decompose_both && 2 * r < a.max(c)),
            full_w2: 2 * r >= b.max(d),
            cp: config.lycoris.use_effective_conv2d && kernel.is_some_and(|k| k != (1, 1)),
        })
    }

    /// The tensor names and shapes of a rank-`r` adapter (PEFT's `create_adapter_parameters`).
    fn expected_params(self, r: usize) -> Vec<(&'static str, Vec<usize>)> {
        let Self { a, b, c, d, .. } = self;
        let mut params = if self.full_w1 {
            vec![(LOKR_W1, vec![a, c])]
        } else {
            vec![(LOKR_W1_A, vec![a, r]), (LOKR_W1_B, vec![r, c])]
        };
        params.extend(match self.kernel {
            None if self.full_w2 => vec![(LOKR_W2, vec![b, d])],
            None => vec![(LOKR_W2_A, vec![b, r]), (LOKR_W2_B, vec![r, d])],
            Some((kh, kw)) if self.full_w2 => vec![(LOKR_W2, vec![b, d, kh, kw])],
            // In the CP form `w2_a` is stored transposed: (r, b).
            Some((kh, kw)) if self.cp => vec![
                (LOKR_T2, vec![r, r, kh, kw]),
                (LOKR_W2_A, vec![r, b]),
                (LOKR_W2_B, vec![r, d]),
            ],
            Some((kh, kw)) => vec![(LOKR_W2_A, vec![b, r]), (LOKR_W2_B, vec![r, d * kh * kw])],
        });
        params
    }
}

/// `torch.kron` of two tensors of the same rank: entry `(i₁·B₁ + j₁, …)` is `x[i] · y[j]`. The
/// dimensions of `x` and `y` are interleaved and broadcast, all on the tensors' device.
pub fn kron(x: &Tensor, y: &Tensor) -> Result<Tensor> {
    if x.rank() != y.rank() {
        return Err(PeftError::InvalidOperation(format!(
            "kron needs tensors of the same rank, found {:?} and {:?}",
            x.dims(),
            y.dims()
        )));
    }
    let x_shape: Vec<usize> = x.dims().iter().flat_map(|&n| [n, 1]).collect();
    let y_shape: Vec<usize> = y.dims().iter().flat_map(|&n| [1, n]).collect();
    let out: Vec<usize> = x.dims().iter().zip(y.dims()).map(|(m, n)| m * n).collect();
    let product = x.reshape(x_shape)?.broadcast_mul(&y.reshape(y_shape)?)?;
    Ok(product.reshape(out)?)
}

/// `scale · kron(x, y)`: the parallel kernel for 2-D f32, [`kron`] otherwise.
fn kron_scaled(x: &Tensor, y: &Tensor, scale: f64) -> Result<Tensor> {
    match crate::kernels::elementwise::kron_scaled(x, y, scale)? {
        Some(product) => Ok(product),
        None => Ok(kron(x, y)?.affine(scale, 0.0)?),
    }
}

/// A LoKr adapter on one module.
pub type LoKrAdapter = LycorisAdapter<LoKrConfig>;

impl LycorisAdapter<LoKrConfig> {
    /// The adapter for `module` on `base`: given tensors, or initialised following
    /// `init_weights`. `rank_pattern` / `alpha_pattern` pick the module's rank and alpha.
    pub fn new(
        module: &str,
        base: &BaseLayer,
        config: LoKrConfig,
        source: ParamSource,
    ) -> Result<Self> {
        let (r, alpha) = config.lycoris.rank_and_alpha(module)?;
        let expected = KronForm::of(base, r, &config)?.expected_params(r);
        let dtype = adapter_dtype(base.dtype());
        let given = match source {
            ParamSource::Given(tensors) => tensors,
            ParamSource::Init { seed } => {
                init_params(&config.init_weights, &expected, seed, dtype)?
            }
        };
        let what = format!("LoKr {:?} r={r}", base.kind());
        let params = take_params(module, &what, given, &expected, dtype, base.device())?;
        let l = &config.lycoris;
        let dropout =
            TrainingDropout::new(l.rank_dropout, l.module_dropout, config.rank_dropout_scale);
        Ok(Self {
            // alpha / r even when both factors are full matrices, as in PEFT.
            scaling: alpha / r as f64,
            config: Arc::new(config),
            params,
            r,
            dropout,
        })
    }
}

impl LycorisMethod for LoKrConfig {
    /// `ΔW` in the base weight's layout, without rank dropout (PEFT's `get_delta_weight`).
    fn delta_weight(adapter: &LycorisAdapter<Self>, base: &BaseLayer) -> Result<Tensor> {
        let p = &adapter.params;
        let w1 = match p.get_opt(LOKR_W1) {
            Some(w1) => w1,
            None => matmul_scaled(&p.get(LOKR_W1_A)?, &p.get(LOKR_W1_B)?, 1.0)?,
        };
        let w2 = match (p.get_opt(LOKR_W2), p.get_opt(LOKR_T2)) {
            (Some(w2), _) => w2,
            (None, Some(t2)) => cp_weight(&t2, &p.get(LOKR_W2_A)?, &p.get(LOKR_W2_B)?)?,
            (None, None) => matmul_scaled(&p.get(LOKR_W2_A)?, &p.get(LOKR_W2_B)?, 1.0)?,
        };
        // A 4-D w2 (Conv2d kernel) pairs with w1 as a (a, c, 1, 1) kernel.
        let w1 = if w2.rank() == 4 {
            w1.unsqueeze(2)?.unsqueeze(3)?
        } else {
            w1
        };
        Ok(kron_scaled(&w1, &w2, adapter.scaling)?.reshape(base.weight_dims())?)
    }

    /// With `w1 = P1·Q1` and `w2 = P2·Q2` (a factor pair where the file has one, else the matrix
    /// and the identity), `kron(w1, w2) = kron(P1, P2) · kron(Q1, Q2)`: rank `k1·k2`, the inner
    /// sizes of the pairs.
    fn low_rank_form(
        adapter: &LycorisAdapter<Self>,
        base: &BaseLayer,
        rows: usize,
    ) -> Result<Option<(Tensor, Tensor)>> {
        let p = &adapter.params;
        if p.get_opt(LOKR_T2).is_some() || !matches!(base.kind(), ModuleKind::Linear) {
            return Ok(None);
        }
        // (P, Q) per factor; `None` for Q is the identity of P's column count.
        let pair = |full: &str, a: &str, b: &str| -> Result<(Tensor, Option<Tensor>)> {
            Ok(match p.get_opt(full) {
                Some(w) => (w, None),
                None => (p.get(a)?, Some(p.get(b)?)),
            })
        };
        let (p1, q1) = pair(LOKR_W1, LOKR_W1_A, LOKR_W1_B)?;
        let (p2, q2) = pair(LOKR_W2, LOKR_W2_A, LOKR_W2_B)?;
        if q1.is_none() && q2.is_none() {
            return Ok(None); // rank = in_features: nothing to save
        }
        let ((out1, k1), (out2, k2)) = (p1.dims2()?, p2.dims2()?);
        let (out, inputs) = (out1 * out2, base.weight_dims()[1]);
        if !low_rank_pays(rows, k1 * k2, (out, inputs), out * inputs) {
            return Ok(None);
        }
        let identity = |k: usize| Tensor::eye(k, p1.dtype(), p1.device());
        let q1 = q1.map_or_else(|| identity(k1), Ok)?;
        let q2 = q2.map_or_else(|| identity(k2), Ok)?;
        let up = kron_scaled(&p1, &p2, adapter.scaling)?;
        Ok(Some((kron_scaled(&q1, &q2, 1.0)?, up)))
    }
}

/// Fresh tensors (PEFT's `reset_adapter_parameters*`): PyTorch's `kaiming_uniform_(a=√5)`
/// everywhere except one zero factor, so that `ΔW = 0`: `w1` / `w1_a` for `true`, `w2` / `w2_b`
/// for `"lycoris"`; none for `false`.
fn init_params(
    init_weights: &LoKrInit,
    expected: &[(&'static str, Vec<usize>)],
    seed: u64,
    dtype: DType,
) -> Result<Vec<(String, Tensor)>> {
    let mut init = Initializer::new(seed);
    expected
        .iter()
        .map(|(name, shape)| {
            let zero = match init_weights {
                LoKrInit::Flag(false) => false,
                LoKrInit::Flag(true) => matches!(*name, LOKR_W1 | LOKR_W1_A),
                LoKrInit::Named(_) => matches!(*name, LOKR_W2 | LOKR_W2_B),
            };
            let t = if zero {
                Tensor::zeros(shape.as_slice(), dtype, &Device::Cpu)?
            } else {
                init.kaiming_uniform(shape, dtype)?
            };
            Ok((name.to_string(), t))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};
    use serde_json::json;

    use super::*;
    use crate::base::Conv2dParams;
    use crate::method::MergeRule;
    use crate::methods::lycoris::testing::{Case, arange, assert_close, base, given};
    use crate::module::AdaptedModule;

    fn config(v: Value) -> LoKrConfig {
        LoKrConfig::from_json(v).unwrap()
    }

    fn delta(config: LoKrConfig, case: &Case) -> Tensor {
        let base = base(case.weight);
        let adapter = LoKrAdapter::new("l", &base, config, given(case)).unwrap();
        adapter.delta_weight(&base).unwrap()
    }

    fn names(adapter: &LoKrAdapter) -> Vec<(String, Vec<usize>)> {
        adapter
            .params()
            .entries()
            .iter()
            .map(|(n, t)| (n.clone(), t.dims().to_vec()))
            .collect()
    }

    #[test]
    fn factorization_matches_peft() {
        for &(dim, factor, m, n) in FACTORIZATION {
            assert_eq!(
                factorization(dim, factor),
                (m, n),
                "factorization({dim}, {factor})"
            );
        }
    }

    #[test]
    fn delta_weights_match_peft() {
        let c = |v: Value| config(v);
        assert_close(
            &delta(
                c(json!({"r": 1, "alpha": 3, "init_weights": false})),
                &LINEAR,
            ),
            LINEAR.delta,
            "Linear",
        );
        let both = json!({"r": 1, "alpha": 2, "decompose_both": true, "decompose_factor": 3});
        assert_close(
            &delta(c(both), &LINEAR_DECOMPOSE_BOTH),
            LINEAR_DECOMPOSE_BOTH.delta,
            "Linear decompose_both",
        );
        let conv = json!({"r": 2, "alpha": 3});
        assert_close(
            &delta(c(conv), &CONV_FULL_W2),
            CONV_FULL_W2.delta,
            "Conv2d full w2",
        );
        let conv = json!({"r": 1, "alpha": 3});
        assert_close(&delta(c(conv), &CONV_FLAT), CONV_FLAT.delta, "Conv2d");
        let cp = json!({"r": 1, "alpha": 3, "use_effective_conv2d": true});
        assert_close(&delta(c(cp), &CONV_CP), CONV_CP.delta, "Conv2d CP");
    }

    #[test]
    fn kron_matches_torch() {
        // torch.kron(tensor([[1., 2.]]), tensor([[0., 1.], [3., 4.]])).
        let x = Tensor::new(&[[1f32, 2.]], &Device::Cpu).unwrap();
        let y = Tensor::new(&[[0f32, 1.], [3., 4.]], &Device::Cpu).unwrap();
        let k = kron(&x, &y).unwrap();
        assert_eq!(
            k.to_vec2::<f32>().unwrap(),
            [[0., 1., 0., 2.], [3., 4., 6., 8.]]
        );
        assert!(kron(&x, &y.unsqueeze(0).unwrap()).is_err());
    }

    /// PEFT's `LoKrConfig().to_dict()` (peft 0.21.2).
    const PEFT_DEFAULT: &str = r#"{"alpha": 8, "alpha_pattern": {}, "auto_mapping": null,
        "base_model_name_or_path": null, "decompose_both": false, "decompose_factor": -1,
        "exclude_modules": null, "inference_mode": false, "init_weights": true,
        "layers_pattern": null, "layers_to_transform": null, "module_dropout": 0.0,
        "modules_to_save": null, "peft_type": "LOKR", "peft_version": "0.21.2", "r": 8,
        "rank_dropout": 0.0, "rank_dropout_scale": false, "rank_pattern": {}, "revision": null,
        "target_modules": null, "task_type": null, "use_effective_conv2d": false}"#;

    #[test]
    fn json_has_peft_keys_and_defaults() {
        let peft: Value = serde_json::from_str(PEFT_DEFAULT).unwrap();
        let ours = LoKrConfig::default().to_json();
        let (Value::Object(peft), Value::Object(ours)) = (&peft, &ours) else {
            panic!("objects expected")
        };
        assert_eq!(
            ours.keys().collect::<std::collections::BTreeSet<_>>(),
            peft.keys().collect()
        );
        for (k, v) in peft {
            if k != "peft_version" {
                assert_eq!(&ours[k], v, "{k}");
            }
        }
        let lycoris = config(json!({"init_weights": "lycoris", "decompose_factor": 4}));
        assert_eq!(lycoris.to_json()["init_weights"], json!("lycoris"));
        assert_eq!(lycoris.to_json()["decompose_factor"], json!(4));
    }

    #[test]
    fn invalid_fields_are_named() {
        let cases = [
            (json!({"r": 0}), "r"),
            (json!({"init_weights": "gaussian"}), "init_weights"),
            (json!({"decompose_factor": 2.5}), "decompose_factor"),
            (json!({"decompose_both": "yes"}), "decompose_both"),
            (json!({"rank_dropout": 1.5}), "rank_dropout"),
            (json!({"alpha_pattern": {"q": "x"}}), "alpha_pattern"),
            (json!({"peft_type": "LOHA"}), ""),
        ];
        for (value, field) in cases {
            match LoKrConfig::from_json(value.clone()) {
                Err(PeftError::InvalidConfig { field: f, .. }) => assert_eq!(f, field, "{value}"),
                Err(PeftError::UnsupportedPeftType { .. }) if field.is_empty() => {}
                other => panic!("{value}: expected an error naming {field:?}, got {other:?}"),
            }
        }
    }

    #[test]
    fn unsupported_kinds_are_refused() {
        let w = Tensor::zeros((4, 6), DType::F32, &Device::Cpu).unwrap();
        let base = BaseLayer::new(ModuleKind::Conv1D, w, None).unwrap();
        let err = LoKrAdapter::new(
            "m",
            &base,
            LoKrConfig::default(),
            ParamSource::Init { seed: 0 },
        )
        .unwrap_err();
        assert!(
            matches!(&err, PeftError::InvalidOperation(m) if m.contains("LoKr") && m.contains("Conv1D")),
            "{err}"
        );
    }

    #[test]
    fn shapes_follow_peft_rules() {
        // Linear(in=16, out=12), r=1: out = 3·4, in = 4·4; decompose_both factors w1 (2r < 4)
        // and w2 is factored too (2r < 4).
        let base16 = base(&[12, 16]);
        let cfg = config(json!({"r": 1, "decompose_both": true}));
        let a = LoKrAdapter::new("l", &base16, cfg, ParamSource::Init { seed: 0 }).unwrap();
        let expect = |v: &[(&str, &[usize])]| -> Vec<(String, Vec<usize>)> {
            v.iter().map(|(n, s)| (n.to_string(), s.to_vec())).collect()
        };
        assert_eq!(
            names(&a),
            expect(&[
                (LOKR_W1_A, &[3, 1]),
                (LOKR_W1_B, &[1, 4]),
                (LOKR_W2_A, &[4, 1]),
                (LOKR_W2_B, &[1, 4]),
            ])
        );
        // r=2 reaches max(b, d)/2 = 2: w2 is a full matrix, w1 too without decompose_both.
        let a = LoKrAdapter::new(
            "l",
            &base16,
            config(json!({"r": 2})),
            ParamSource::Init { seed: 0 },
        )
        .unwrap();
        assert_eq!(names(&a), expect(&[(LOKR_W1, &[3, 4]), (LOKR_W2, &[4, 4])]));
        // Effective conv: t2 and a transposed w2_a; ignored on a 1×1 kernel.
        let conv = |k| {
            let w = Tensor::zeros((8, 9, k, k), DType::F32, &Device::Cpu).unwrap();
            BaseLayer::new(ModuleKind::Conv2d(Conv2dParams::default()), w, None).unwrap()
        };
        let cfg = config(json!({"r": 1, "use_effective_conv2d": true}));
        let a =
            LoKrAdapter::new("c", &conv(3), cfg.clone(), ParamSource::Init { seed: 0 }).unwrap();
        assert_eq!(
            names(&a),
            expect(&[
                (LOKR_W1, &[2, 3]),
                (LOKR_T2, &[1, 1, 3, 3]),
                (LOKR_W2_A, &[1, 4]),
                (LOKR_W2_B, &[1, 3]),
            ])
        );
        let a = LoKrAdapter::new("c", &conv(1), cfg, ParamSource::Init { seed: 0 }).unwrap();
        assert_eq!(
            names(&a),
            expect(&[
                (LOKR_W1, &[2, 3]),
                (LOKR_W2_A, &[4, 1]),
                (LOKR_W2_B, &[1, 3])
            ])
        );
    }

    #[test]
    fn inits_true_and_lycoris_are_identity_false_is_not() {
        let base = base(&[12, 16]);
        for (init, zero) in [
            (json!(true), true),
            (json!("lycoris"), true),
            (json!(false), false),
        ] {
            for r in [1, 2] {
                let cfg = config(json!({"r": r, "decompose_both": true, "init_weights": init}));
                let a = LoKrAdapter::new("l", &base, cfg, ParamSource::Init { seed: 3 }).unwrap();
                let sum = a
                    .delta_weight(&base)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .sum_all()
                    .unwrap();
                assert_eq!(sum.to_scalar::<f32>().unwrap() == 0.0, zero, "{init} r={r}");
            }
        }
    }

    /// The adapted forward equals the base convolution with `W + ΔW`; merging gives the same and
    /// unmerging restores `W`, for every form of w2.
    #[test]
    fn forward_merge_unmerge_agree() {
        let p = Conv2dParams {
            stride: 1,
            padding: 1,
            dilation: 1,
            groups: 1,
        };
        let w = arange(&[8, 6, 3, 3], 0.003);
        let x = arange(&[2, 6, 7, 7], 0.01);
        for extra in [
            json!({"r": 1}),
            json!({"r": 4}),
            json!({"r": 1, "use_effective_conv2d": true}),
        ] {
            let base = BaseLayer::new(ModuleKind::Conv2d(p), w.clone(), None).unwrap();
            let mut v = extra.clone();
            v["init_weights"] = json!(false);
            let cfg = config(v);
            let mut m = AdaptedModule::new("conv", base);
            m.add("a", &cfg, ParamSource::Init { seed: 5 }, &BTreeMap::new())
                .unwrap();
            m.set_active(&["a"]).unwrap();
            let MergeRule::Add { delta, .. } =
                m.adapter("a").unwrap().merge_rule(m.base()).unwrap()
            else {
                panic!("LoKr merges additively")
            };
            let want = m
                .base()
                .forward_with(&x, &(&w + &delta).unwrap(), None)
                .unwrap();
            let want: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
            assert_close(&m.forward(&x).unwrap(), &want, &format!("{extra} unmerged"));
            m.merge(None, false).unwrap();
            assert_close(&m.forward(&x).unwrap(), &want, &format!("{extra} merged"));
            m.unmerge().unwrap();
            let w_v: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
            assert_close(&m.base().weight().unwrap(), &w_v, "restored");
        }
    }

    /// `(dimension, factor, m, n)`: `peft.tuners.lokr.layer.factorization(dimension, factor)`
    /// is `(m, n)` (peft 0.21.2), including the hf-peft.md §8.2 examples.
    #[rustfmt::skip]
    const FACTORIZATION: &[(usize, i64, usize, usize)] = &[
        (1, -1, 1, 1), (2, -1, 1, 2), (2, 2, 2, 1), (6, -1, 2, 3), (6, 0, 1, 6),
        (6, 3, 3, 2), (6, 4, 2, 3), (7, -1, 1, 7), (12, -1, 3, 4), (12, 4, 4, 3),
        (12, 5, 3, 4), (20, -1, 4, 5), (20, 3, 2, 10), (20, 5, 5, 4), (24, 8, 8, 3),
        (24, 5, 4, 6), (36, -1, 6, 6), (48, 16, 16, 3), (48, 100, 6, 8), (64, 3, 2, 32),
        (100, -1, 10, 10), (100, 8, 5, 20), (100, 100, 100, 1), (127, -1, 1, 127), (127, 2, 1, 127),
        (128, -1, 8, 16), (128, 4, 4, 32), (128, 16, 16, 8), (256, -1, 16, 16), (256, -2, 1, 256),
        (360, -1, 18, 20), (360, 16, 15, 24), (768, -1, 24, 32), (768, 5, 4, 192), (1000, -1, 25, 40),
        (1000, 16, 10, 100), (1024, 0, 1, 1024),
    ];

    /// PEFT's `get_delta_weight`, Linear(6, 4), r=1, alpha=3.
    #[rustfmt::skip]
    const LINEAR: Case = Case {
        weight: &[4, 6],
        params: &[
            ("lokr_w1", &[2, 2], 0.100),
            ("lokr_w2_a", &[2, 1], 0.087),
            ("lokr_w2_b", &[1, 3], 0.074),
        ],
        delta: &[
            -0.375, -0.3195, -0.264, -0.3, -0.2556, -0.2112,
            -0.30975, -0.263907, -0.218064, -0.2478, -0.21112558, -0.1744512,
            -0.22500001, -0.19170001, -0.15840001, -0.14999999, -0.12779999, -0.105599985,
            -0.18585001, -0.1583442, -0.1308384, -0.12389998, -0.10556279, -0.08722559,
        ],
    };

    /// PEFT's `get_delta_weight`, Linear(6, 6), r=1, alpha=2, decompose_both, decompose_factor=3.
    #[rustfmt::skip]
    const LINEAR_DECOMPOSE_BOTH: Case = Case {
        weight: &[6, 6],
        params: &[
            ("lokr_w1_a", &[3, 1], 0.100),
            ("lokr_w1_b", &[1, 3], 0.087),
            ("lokr_w2", &[2, 2], 0.074),
        ],
        delta: &[
            -0.25, -0.213, -0.2065, -0.175938, -0.163, -0.138876,
            -0.176, -0.139, -0.145376, -0.114814, -0.114752, -0.090628,
            -0.2, -0.17040001, -0.1652, -0.1407504, -0.1304, -0.1111008,
            -0.1408, -0.1112, -0.1163008, -0.0918512, -0.0918016, -0.0725024,
            -0.15, -0.1278, -0.123900004, -0.105562806, -0.09780001, -0.08332561,
            -0.10560001, -0.0834, -0.0872256, -0.0688884, -0.0688512, -0.054376803,
        ],
    };

    /// PEFT's `get_delta_weight`, Conv2d(2, 4, 2), r=2, alpha=3.
    #[rustfmt::skip]
    const CONV_FULL_W2: Case = Case {
        weight: &[4, 2, 2, 2],
        params: &[
            ("lokr_w1", &[2, 1], 0.100),
            ("lokr_w2", &[2, 2, 2, 2], 0.087),
        ],
        delta: &[
            0.375, 0.30975, 0.24450001, 0.17925002, 0.11400001, 0.04875,
            -0.016499966, -0.081749976, -0.14699998, -0.21225, -0.2775, -0.34274995,
            -0.40799993, -0.47324994, -0.53849995, -0.60375, 0.3, 0.2478,
            0.1956, 0.14340001, 0.09120001, 0.038999997, -0.013199974, -0.06539998,
            -0.117599994, -0.1698, -0.222, -0.27419996, -0.32639995, -0.37859997,
            -0.43079996, -0.48299998,
        ],
    };

    /// PEFT's `get_delta_weight`, Conv2d(4, 6, 2), r=1, alpha=3.
    #[rustfmt::skip]
    const CONV_FLAT: Case = Case {
        weight: &[6, 4, 2, 2],
        params: &[
            ("lokr_w1", &[2, 2], 0.100),
            ("lokr_w2_a", &[3, 1], 0.087),
            ("lokr_w2_b", &[1, 8], 0.074),
        ],
        delta: &[
            -0.375, -0.3195, -0.264, -0.2085, -0.153, -0.0975,
            -0.041999996, 0.013500005, -0.3, -0.2556, -0.2112, -0.16679999,
            -0.1224, -0.077999994, -0.033599995, 0.010800004, -0.30975, -0.263907,
            -0.218064, -0.172221, -0.12637798, -0.080534995, -0.034691997, 0.011151004,
            -0.2478, -0.21112558, -0.1744512, -0.13777679, -0.1011024, -0.064427994,
            -0.027753595, 0.008920803, -0.24450001, -0.208314, -0.172128, -0.135942,
            -0.099756, -0.06356999, -0.027383998, 0.008802003, -0.1956, -0.16665122,
            -0.1377024, -0.10875359, -0.07980481, -0.050855994, -0.0219072, 0.0070416024,
            -0.22500001, -0.19170001, -0.15840001, -0.1251, -0.091800004, -0.0585,
            -0.025199998, 0.008100003, -0.14999999, -0.12779999, -0.105599985, -0.083399996,
            -0.061199997, -0.038999997, -0.016799998, 0.0054000015, -0.18585001, -0.1583442,
            -0.1308384, -0.10333261, -0.075826794, -0.048321, -0.020815197, 0.0066906027,
            -0.12389998, -0.10556279, -0.08722559, -0.068888396, -0.05055119, -0.032213997,
            -0.013876798, 0.004460401, -0.14670001, -0.124988414, -0.103276804, -0.0815652,
            -0.059853606, -0.038142, -0.0164304, 0.005281202, -0.09779999, -0.0833256,
            -0.0688512, -0.054376796, -0.0399024, -0.025427997, -0.010953599, 0.0035208012,
        ],
    };

    /// PEFT's `get_delta_weight`, Conv2d(4, 6, 2), r=1, alpha=3, use_effective_conv2d.
    #[rustfmt::skip]
    const CONV_CP: Case = Case {
        weight: &[6, 4, 2, 2],
        params: &[
            ("lokr_t2", &[1, 1, 2, 2], 0.100),
            ("lokr_w1", &[2, 2], 0.087),
            ("lokr_w2_a", &[1, 3], 0.074),
            ("lokr_w2_b", &[1, 2], 0.061),
        ],
        delta: &[
            0.1875, 0.15, 0.112500004, 0.074999996, 0.164625, 0.13170001,
            0.09877501, 0.06585, 0.154875, 0.1239, 0.092925005, 0.06194999,
            0.13598025, 0.108784206, 0.08158816, 0.0543921, 0.15975, 0.1278,
            0.095850006, 0.063899994, 0.1402605, 0.1122084, 0.084156305, 0.0561042,
            0.1319535, 0.105562806, 0.0791721, 0.052781396, 0.11585517, 0.09268414,
            0.069513105, 0.04634207, 0.132, 0.1056, 0.07920001, 0.052799992,
            0.115896, 0.0927168, 0.0695376, 0.046358395, 0.109032, 0.0872256,
            0.0654192, 0.043612793, 0.095730096, 0.07658407, 0.05743806, 0.038292035,
            0.122250006, 0.0978, 0.073350005, 0.048899993, 0.1073355, 0.0858684,
            0.064401306, 0.042934198, 0.08962501, 0.07170001, 0.053775005, 0.03585,
            0.07869076, 0.06295261, 0.047214456, 0.0314763, 0.104157, 0.08332561,
            0.062494203, 0.0416628, 0.09144985, 0.07315988, 0.054869913, 0.03657994,
            0.07636051, 0.061088413, 0.045816302, 0.030544203, 0.06704453, 0.05363562,
            0.040226717, 0.02681781, 0.086064, 0.0688512, 0.051638402, 0.034425598,
            0.0755642, 0.06045136, 0.04533852, 0.030225674, 0.063096, 0.050476804,
            0.037857607, 0.025238398, 0.055398293, 0.044318635, 0.033238977, 0.022159316,
        ],
    };
}
