//! LoHa (PEFT `tuners/loha`): a low-rank Hadamard product update
//! `ΔW = (w1_a · w1_b) ⊙ (w2_a · w2_b) · alpha / r`, on `nn.Linear` and `nn.Conv2d`. With
//! `use_effective_conv2d` a Conv2d kernel larger than 1×1 uses the CP form: each factor is
//! `einsum("i j k l, j r, i p -> p r k l", t, w_b, w_a)`. The layer mechanics (forward, dropouts)
//! are LyCORIS's, in [`crate::methods::lycoris`].

use std::collections::BTreeMap;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::base::{BaseLayer, ModuleKind};
use crate::config::{CommonFields, check_extra_fields};
use crate::error::Result;
use crate::init::Initializer;
use crate::kernels::elementwise::hadamard_of_products;
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

pub const PEFT_TYPE: &str = "LOHA";

pub const ENTRY: MethodEntry = MethodEntry {
    peft_type: PEFT_TYPE,
    config_class: "LoHaConfig",
    from_json: |v| Ok(Arc::new(LoHaConfig::from_json(v)?)),
};

pub const HADA_W1_A: &str = "hada_w1_a";
pub const HADA_W1_B: &str = "hada_w1_b";
pub const HADA_W2_A: &str = "hada_w2_a";
pub const HADA_W2_B: &str = "hada_w2_b";
pub const HADA_T1: &str = "hada_t1";
pub const HADA_T2: &str = "hada_t2";

/// Every tensor name a LoHa layer can have, relative to its module (PEFT's `ParameterDict`s: no
/// `.weight` suffix).
pub const PARAM_NAMES: &[&str] = &[HADA_W1_A, HADA_W1_B, HADA_W2_A, HADA_W2_B, HADA_T1, HADA_T2];

/// PEFT's `LoHaConfig`, with PEFT's field names and defaults.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LoHaConfig {
    #[serde(flatten)]
    pub common: CommonFields,
    #[serde(flatten)]
    pub lycoris: LycorisFields,
    /// `true`: `hada_w2_b` starts at zero (the identity); `false`: every factor is random.
    pub init_weights: bool,
    /// Fields a newer PEFT may write; they must be "off" (see [`check_extra_fields`]).
    #[serde(skip_serializing)]
    pub unsupported: Map<String, Value>,
}

impl Default for LoHaConfig {
    fn default() -> Self {
        Self {
            common: CommonFields::default(),
            lycoris: LycorisFields::default(),
            init_weights: true,
            unsupported: Map::new(),
        }
    }
}

impl LoHaConfig {
    /// Reads a config from PEFT's JSON form (`adapter_config.json` or `LoHaConfig.to_dict()`).
    pub fn from_json(value: Value) -> Result<Self> {
        let mut map = config_object(value, PEFT_TYPE)?;
        let config = Self {
            common: take_fields(&mut map)?,
            lycoris: take_fields(&mut map)?,
            init_weights: take_field(&mut map, "init_weights", true)?,
            unsupported: map,
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks every field; every constructor calls it, so a config in hand is valid.
    pub fn validate(&self) -> Result<()> {
        self.common.validate()?;
        check_extra_fields(&self.unsupported, &[])?;
        self.lycoris.validate()
    }
}

impl MethodConfig for LoHaConfig {
    fn peft_type(&self) -> &'static str {
        PEFT_TYPE
    }

    fn validate(&self) -> Result<()> {
        LoHaConfig::validate(self)
    }

    fn fields(&self) -> Value {
        serde_json::to_value(self).expect("LoHaConfig serialises")
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
        Ok(Box::new(LoHaAdapter::new(
            module,
            base,
            self.clone(),
            source,
        )?))
    }

    /// The CP form (`hada_t1`) tells a Conv2d and its kernel, with outputs from `hada_w1_a`'s
    /// columns and inputs from `hada_w1_b`'s; otherwise outputs from `hada_w1_a`'s rows and
    /// inputs from `hada_w1_b`'s columns (a Conv2d's flattened `in · kh · kw` cannot be split,
    /// so it is told as a Linear of that many inputs).
    fn infer_base(
        &self,
        module: &str,
        tensors: &[(String, Tensor)],
        _shared: &BTreeMap<String, Tensor>,
    ) -> Result<Option<InferredBase>> {
        let w1_a = dims_with_rank(module, tensors, HADA_W1_A, &[2])?;
        let w1_b = dims_with_rank(module, tensors, HADA_W1_B, &[2])?;
        Ok(Some(match dims_of(tensors, HADA_T1) {
            Some(_) => {
                let t1 = dims_with_rank(module, tensors, HADA_T1, &[4])?;
                InferredBase::conv2d(w1_a[1], w1_b[1], t1[2], t1[3])
            }
            None => InferredBase::linear(w1_a[0], w1_b[1], false),
        }))
    }
}

/// How LoHa factors one module's weight (PEFT's `update_layer`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HadaForm {
    /// `ΔW` as an `(out, in_flat)` matrix: Linear, and Conv2d without the CP form
    /// (`in_flat = in/groups · kh · kw`).
    Flat { out: usize, inp: usize },
    /// CP form of a Conv2d kernel (`use_effective_conv2d` and a kernel larger than 1×1);
    /// `inp` is `in/groups`.
    Cp {
        out: usize,
        inp: usize,
        kh: usize,
        kw: usize,
    },
}

impl HadaForm {
    fn of(base: &BaseLayer, use_effective_conv2d: bool) -> Result<Self> {
        check_kind("LoHa", base)?;
        let dims = base.weight_dims();
        let out = base.out_features();
        Ok(match base.kind() {
            ModuleKind::Conv2d(_) => {
                let (kh, kw) = base.kernel_size();
                // PEFT ignores use_effective_conv2d for 1×1 kernels.
                if use_effective_conv2d && (kh, kw) != (1, 1) {
                    Self::Cp {
                        out,
                        inp: dims[1],
                        kh,
                        kw,
                    }
                } else {
                    Self::Flat {
                        out,
                        inp: dims[1] * kh * kw,
                    }
                }
            }
            _ => Self::Flat {
                out,
                inp: base.in_features(),
            },
        })
    }

    /// The tensor names and shapes of a rank-`r` adapter (PEFT's `create_adapter_parameters`).
    fn expected_params(self, r: usize) -> Vec<(&'static str, Vec<usize>)> {
        match self {
            Self::Flat { out, inp } => vec![
                (HADA_W1_A, vec![out, r]),
                (HADA_W1_B, vec![r, inp]),
                (HADA_W2_A, vec![out, r]),
                (HADA_W2_B, vec![r, inp]),
            ],
            // In the CP form the `a` factors are stored transposed: (r, out).
            Self::Cp { out, inp, kh, kw } => vec![
                (HADA_T1, vec![r, r, kh, kw]),
                (HADA_W1_A, vec![r, out]),
                (HADA_W1_B, vec![r, inp]),
                (HADA_T2, vec![r, r, kh, kw]),
                (HADA_W2_A, vec![r, out]),
                (HADA_W2_B, vec![r, inp]),
            ],
        }
    }
}

/// A LoHa adapter on one module.
pub type LoHaAdapter = LycorisAdapter<LoHaConfig>;

impl LycorisAdapter<LoHaConfig> {
    /// The adapter for `module` on `base`: given tensors, or initialised following
    /// `init_weights`. `rank_pattern` / `alpha_pattern` pick the module's rank and alpha.
    pub fn new(
        module: &str,
        base: &BaseLayer,
        config: LoHaConfig,
        source: ParamSource,
    ) -> Result<Self> {
        let (r, alpha) = config.lycoris.rank_and_alpha(module)?;
        let form = HadaForm::of(base, config.lycoris.use_effective_conv2d)?;
        let expected = form.expected_params(r);
        let dtype = adapter_dtype(base.dtype());
        let given = match source {
            ParamSource::Given(tensors) => tensors,
            ParamSource::Init { seed } => init_params(config.init_weights, &expected, seed, dtype)?,
        };
        let what = format!("LoHa {:?} r={r}", base.kind());
        let params = take_params(module, &what, given, &expected, dtype, base.device())?;
        let l = &config.lycoris;
        Ok(Self {
            dropout: TrainingDropout::new(l.rank_dropout, l.module_dropout, true),
            scaling: alpha / r as f64,
            config: Arc::new(config),
            params,
            r,
        })
    }
}

impl LycorisMethod for LoHaConfig {
    /// `ΔW` in the base weight's layout, without rank dropout (PEFT's `get_delta_weight`).
    fn delta_weight(adapter: &LycorisAdapter<Self>, base: &BaseLayer) -> Result<Tensor> {
        let p = &adapter.params;
        // PEFT passes the scaling as a float32 tensor, so an f64 adapter sees it rounded.
        let scale = adapter.scaling as f32 as f64;
        if p.get_opt(HADA_T1).is_none() {
            let first = (&p.get(HADA_W1_A)?, &p.get(HADA_W1_B)?);
            let second = (&p.get(HADA_W2_A)?, &p.get(HADA_W2_B)?);
            if let Some(delta) = hadamard_of_products(first, second, scale)? {
                return Ok(delta.reshape(base.weight_dims())?);
            }
        }
        let (w1, w2) = match p.get_opt(HADA_T1) {
            Some(t1) => (
                cp_weight(&t1, &p.get(HADA_W1_A)?, &p.get(HADA_W1_B)?)?,
                cp_weight(&p.get(HADA_T2)?, &p.get(HADA_W2_A)?, &p.get(HADA_W2_B)?)?,
            ),
            None => (
                matmul_scaled(&p.get(HADA_W1_A)?, &p.get(HADA_W1_B)?, 1.0)?,
                matmul_scaled(&p.get(HADA_W2_A)?, &p.get(HADA_W2_B)?, 1.0)?,
            ),
        };
        let delta = match crate::kernels::elementwise::mul_scaled(&w1, &w2, scale)? {
            Some(delta) => delta,
            None => w1.mul(&w2)?.affine(scale, 0.0)?,
        };
        Ok(delta.reshape(base.weight_dims())?)
    }

    /// `(w1a·w1b) ⊙ (w2a·w2b)` has rank at most `r1·r2`: entry `(i, j)` is
    /// `Σ_pq w1a[i,p]·w2a[i,q] · w1b[p,j]·w2b[q,j]`, so `up[i, pq] = w1a[i,p]·w2a[i,q]` and
    /// `down[pq, j] = w1b[p,j]·w2b[q,j]`.
    fn low_rank_form(
        adapter: &LycorisAdapter<Self>,
        base: &BaseLayer,
        rows: usize,
    ) -> Result<Option<(Tensor, Tensor)>> {
        let p = &adapter.params;
        let [w1a, w1b, w2a, w2b] = [HADA_W1_A, HADA_W1_B, HADA_W2_A, HADA_W2_B].map(|n| p.get(n));
        let (w1a, w1b, w2a, w2b) = (w1a?, w1b?, w2a?, w2b?);
        if p.get_opt(HADA_T1).is_some() || !matches!(base.kind(), ModuleKind::Linear) {
            return Ok(None);
        }
        let (out, r1) = w1a.dims2()?;
        let (r2, inputs) = w2b.dims2()?;
        let rank = r1 * r2;
        if !low_rank_pays(rows, rank, (out, inputs), out * inputs * (r1 + r2)) {
            return Ok(None);
        }
        let scale = adapter.scaling as f32 as f64; // as in `delta_weight`
        let up = w1a
            .unsqueeze(2)?
            .broadcast_mul(&w2a.unsqueeze(1)?)?
            .reshape((out, rank))?
            .affine(scale, 0.0)?;
        let down = w1b
            .unsqueeze(1)?
            .broadcast_mul(&w2b.unsqueeze(0)?)?
            .reshape((rank, inputs))?;
        Ok(Some((down, up)))
    }
}

/// Fresh tensors: PyTorch's `kaiming_uniform_(a=√5)` everywhere, except `hada_w2_b` at zero
/// with `init_weights=true` (PEFT's `reset_adapter_parameters`).
fn init_params(
    init_weights: bool,
    expected: &[(&'static str, Vec<usize>)],
    seed: u64,
    dtype: DType,
) -> Result<Vec<(String, Tensor)>> {
    let mut init = Initializer::new(seed);
    expected
        .iter()
        .map(|(name, shape)| {
            let t = if init_weights && *name == HADA_W2_B {
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
    use crate::error::PeftError;
    use crate::method::MergeRule;
    use crate::methods::lycoris::testing::{Case, arange, assert_close, base, given};
    use crate::module::AdaptedModule;

    fn config(v: Value) -> LoHaConfig {
        LoHaConfig::from_json(v).unwrap()
    }

    fn delta(config: LoHaConfig, case: &Case) -> Tensor {
        let base = base(case.weight);
        let adapter = LoHaAdapter::new("l", &base, config, given(case)).unwrap();
        adapter.delta_weight(&base).unwrap()
    }

    #[test]
    fn delta_weights_match_peft() {
        let c = || config(json!({"r": 2, "alpha": 3, "init_weights": false}));
        assert_close(&delta(c(), &LINEAR), LINEAR.delta, "Linear");
        assert_close(&delta(c(), &CONV_FLAT), CONV_FLAT.delta, "Conv2d");
        let mut cp = c();
        cp.lycoris.use_effective_conv2d = true;
        assert_close(&delta(cp, &CONV_CP), CONV_CP.delta, "Conv2d CP");
    }

    #[test]
    fn effective_conv_is_ignored_for_1x1_kernels() {
        let cfg = config(json!({"r": 2, "use_effective_conv2d": true}));
        let w = Tensor::zeros((4, 3, 1, 1), DType::F32, &Device::Cpu).unwrap();
        let base = BaseLayer::new(ModuleKind::Conv2d(Conv2dParams::default()), w, None).unwrap();
        let adapter = LoHaAdapter::new("c", &base, cfg, ParamSource::Init { seed: 0 }).unwrap();
        let names: Vec<&str> = adapter
            .params()
            .entries()
            .iter()
            .map(|(n, _)| n.as_str())
            .collect();
        assert_eq!(names, [HADA_W1_A, HADA_W1_B, HADA_W2_A, HADA_W2_B]);
        assert_eq!(adapter.params().get(HADA_W1_B).unwrap().dims(), &[2, 3]);
    }

    /// PEFT's `LoHaConfig().to_dict()` (peft 0.21.2).
    const PEFT_DEFAULT: &str = r#"{"alpha": 8, "alpha_pattern": {}, "auto_mapping": null,
        "base_model_name_or_path": null, "exclude_modules": null, "inference_mode": false,
        "init_weights": true, "layers_pattern": null, "layers_to_transform": null,
        "module_dropout": 0.0, "modules_to_save": null, "peft_type": "LOHA",
        "peft_version": "0.21.2", "r": 8, "rank_dropout": 0.0, "rank_pattern": {},
        "revision": null, "target_modules": null, "task_type": null,
        "use_effective_conv2d": false}"#;

    #[test]
    fn json_has_peft_keys_and_defaults() {
        let peft: Value = serde_json::from_str(PEFT_DEFAULT).unwrap();
        let ours = LoHaConfig::default().to_json();
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
        let back = LoHaConfig::from_json(Value::Object(peft.clone())).unwrap();
        assert_eq!(back.lycoris.r, 8);
    }

    #[test]
    fn invalid_fields_are_named() {
        let cases = [
            (json!({"r": 0}), "r"),
            (json!({"r": "8"}), "r"),
            (json!({"rank_pattern": {"q": 0}}), "rank_pattern"),
            (json!({"rank_dropout": 1.0}), "rank_dropout"),
            (json!({"module_dropout": -0.1}), "module_dropout"),
            (json!({"init_weights": "lycoris"}), "init_weights"),
            (json!({"layers_pattern": "layers"}), "layers_pattern"),
            (
                json!({"target_modules": ".*", "layers_to_transform": [0]}),
                "layers_to_transform",
            ),
            (json!({"use_dora": true}), "use_dora"),
            (json!({"task_type": "NOPE"}), "task_type"),
        ];
        for (value, field) in cases {
            match LoHaConfig::from_json(value.clone()) {
                Err(PeftError::InvalidConfig { field: f, .. }) => assert_eq!(f, field, "{value}"),
                other => panic!("{value}: expected an error naming {field}, got {other:?}"),
            }
        }
        let mut c = LoHaConfig::default();
        c.lycoris.alpha = f64::NAN;
        assert!(
            matches!(c.validate(), Err(PeftError::InvalidConfig { field, .. }) if field == "alpha")
        );
        // A field a newer PEFT writes with its "off" value is accepted.
        config(json!({"some_future_flag": false}));
    }

    #[test]
    fn unsupported_kinds_are_refused() {
        for (kind, w) in [
            (ModuleKind::Conv1D, (4, 6)),
            (ModuleKind::Embedding, (10, 4)),
        ] {
            let base = BaseLayer::new(
                kind,
                Tensor::zeros(w, DType::F32, &Device::Cpu).unwrap(),
                None,
            )
            .unwrap();
            let err = LoHaAdapter::new(
                "m",
                &base,
                LoHaConfig::default(),
                ParamSource::Init { seed: 0 },
            )
            .unwrap_err();
            assert!(
                matches!(&err, PeftError::InvalidOperation(m) if m.contains("LoHa") && m.contains(&format!("{kind:?}"))),
                "{err}"
            );
        }
    }

    #[test]
    fn wrong_shape_names_the_key() {
        let base = base(LINEAR.weight);
        let mut tensors: Vec<(String, Tensor)> = LINEAR
            .params
            .iter()
            .map(|(n, s, sc)| (n.to_string(), arange(s, *sc)))
            .collect();
        tensors[1].1 = arange(&[2, 5], 0.1);
        let cfg = config(json!({"r": 2}));
        let err = LoHaAdapter::new(
            "lin0",
            &base,
            cfg.clone(),
            ParamSource::Given(tensors.clone()),
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("base_model.model.lin0.hada_w1_b"),
            "{err}"
        );
        tensors.remove(0);
        let err = LoHaAdapter::new("lin0", &base, cfg, ParamSource::Given(tensors)).unwrap_err();
        assert!(
            matches!(&err, PeftError::MissingKey { key, .. } if key.ends_with("lin0.hada_w1_a"))
        );
    }

    #[test]
    fn patterns_pick_rank_and_alpha() {
        let cfg = config(json!({
            "r": 4, "alpha": 8, "rank_pattern": {"layers.1.q": 2}, "alpha_pattern": {"q": 3}
        }));
        let base = base(&[6, 5]);
        let init = || ParamSource::Init { seed: 1 };
        let a = LoHaAdapter::new("model.layers.1.q", &base, cfg.clone(), init()).unwrap();
        assert_eq!((a.r(), a.scaling()), (2, 1.5));
        assert_eq!(a.params().get(HADA_W1_A).unwrap().dims(), &[6, 2]);
        let b = LoHaAdapter::new("model.layers.0.v", &base, cfg, init()).unwrap();
        assert_eq!((b.r(), b.scaling()), (4, 2.0));
    }

    /// A Conv2d with stride, padding, dilation and groups: the adapted forward equals the base
    /// convolution with `W + ΔW`, merging gives the same, and unmerging restores `W`.
    #[test]
    fn forward_merge_unmerge_agree() {
        let p = Conv2dParams {
            stride: 2,
            padding: 1,
            dilation: 2,
            groups: 2,
        };
        let w = arange(&[4, 3, 3, 3], 0.01);
        let b = arange(&[4], 0.2);
        let x = arange(&[2, 6, 9, 9], 0.003);
        for effective in [false, true] {
            let base = BaseLayer::new(ModuleKind::Conv2d(p), w.clone(), Some(b.clone())).unwrap();
            let mut cfg = config(json!({"r": 3, "alpha": 5, "init_weights": false}));
            cfg.lycoris.use_effective_conv2d = effective;
            let mut m = AdaptedModule::new("conv", base);
            m.add("a", &cfg, ParamSource::Init { seed: 7 }, &BTreeMap::new())
                .unwrap();
            m.set_active(&["a"]).unwrap();
            let delta = match m.adapter("a").unwrap().merge_rule(m.base()).unwrap() {
                MergeRule::Add { delta, bias: None } => delta,
                other => panic!("{other:?}"),
            };
            let want = m
                .base()
                .forward_with(&x, &(&w + &delta).unwrap(), Some(&b))
                .unwrap();
            let got = m.forward(&x).unwrap();
            let want_v: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
            assert_close(&got, &want_v, "unmerged");
            m.merge(None, true).unwrap();
            assert_close(&m.forward(&x).unwrap(), &want_v, "merged");
            m.unmerge().unwrap();
            let w_v: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
            assert_close(&m.base().weight().unwrap(), &w_v, "unmerged weight");
        }
    }

    #[test]
    fn default_init_is_identity_and_false_is_not() {
        let base = base(&[6, 5]);
        for (init, zero) in [(true, true), (false, false)] {
            let mut cfg = config(json!({"r": 2}));
            cfg.init_weights = init;
            let a = LoHaAdapter::new("l", &base, cfg, ParamSource::Init { seed: 3 }).unwrap();
            let sum = a
                .delta_weight(&base)
                .unwrap()
                .abs()
                .unwrap()
                .sum_all()
                .unwrap();
            assert_eq!(sum.to_scalar::<f32>().unwrap() == 0.0, zero);
        }
    }

    /// PEFT's `get_delta_weight`, Linear(6, 4), r=2, alpha=3.
    #[rustfmt::skip]
    const LINEAR: Case = Case {
        weight: &[4, 6],
        params: &[
            ("hada_w1_a", &[4, 2], 0.100),
            ("hada_w1_b", &[2, 6], 0.087),
            ("hada_w2_a", &[4, 2], 0.074),
            ("hada_w2_b", &[2, 6], 0.061),
        ],
        delta: &[
            0.111103, 0.061233625, 0.024632815, 0.0013005676, -0.008763118, -0.005558242,
            0.046574246, 0.026773995, 0.01198886, 0.002218841, -0.0025360617, -0.0022758492,
            0.008956499, 0.0061358986, 0.0038470603, 0.0020899833, 0.000864667, 0.00017111248,
            -0.0017502198, -0.000680648, 0.00020742431, 0.0009139974, 0.0014390708, 0.001782645,
        ],
    };

    /// PEFT's `get_delta_weight`, Conv2d(2, 3, 2), r=2, alpha=3.
    #[rustfmt::skip]
    const CONV_FLAT: Case = Case {
        weight: &[3, 2, 2, 2],
        params: &[
            ("hada_w1_a", &[3, 2], 0.100),
            ("hada_w1_b", &[2, 8], 0.087),
            ("hada_w2_a", &[3, 2], 0.074),
            ("hada_w2_b", &[2, 8], 0.061),
        ],
        delta: &[
            0.065665826, 0.027797706, 0.0031981496, -0.008132843, -0.0061952807, 0.009010839,
            0.03748553, 0.07922878, 0.029805645, 0.014224462, 0.0036583955, -0.0018925569,
            -0.0024283957, 0.0020508803, 0.011545272, 0.02605478, 0.007767, 0.005153372,
            0.003071506, 0.0015214024, 0.0005030591, 1.6477501e-05, 6.1657076e-05, 0.0006385981,
        ],
    };

    /// PEFT's `get_delta_weight`, Conv2d(2, 3, 2), r=2, alpha=3, use_effective_conv2d.
    #[rustfmt::skip]
    const CONV_CP: Case = Case {
        weight: &[3, 2, 2, 2],
        params: &[
            ("hada_t1", &[2, 2, 2, 2], 0.100),
            ("hada_t2", &[2, 2, 2, 2], 0.087),
            ("hada_w1_a", &[2, 3], 0.074),
            ("hada_w1_b", &[2, 2], 0.061),
            ("hada_w2_a", &[2, 3], 0.048),
            ("hada_w2_b", &[2, 2], 0.035),
        ],
        delta: &[
            0.001697699, 0.0017697015, 0.016034607, 0.04449241, 0.0015284913, 0.0012631798,
            0.012298793, 0.034635335, 0.0022992229, 0.00054929656, 0.009003407, 0.027661555,
            0.001986614, 0.00036129152, 0.0068608075, 0.021485165, 0.0029231226, -9.63004e-05,
            0.0037050394, 0.014327145, 0.002459445, -9.978767e-05, 0.002771929, 0.011074596,
        ],
    };
}
