use std::mem::MaybeUninit;

use half::bf16;

use super::{Addend, Backend, LowRank, Out, Problem, round_bf16, round_into, run, widen_into};

/// Deterministic pseudo-random bf16 values in about [-2, 2].
fn data(len: usize, seed: u64) -> Vec<bf16> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            bf16::from_f32(((s >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0)
        })
        .collect()
}

struct Case {
    m: usize,
    n: usize,
    k: usize,
    lda: usize,
    ldw: usize,
    off: usize,
    w_off: usize,
    x_buf: Vec<bf16>,
    w_buf: Vec<bf16>,
}

impl Case {
    /// Operands with row strides `k + pad` and `k + 2·pad (+1)`; an odd
    /// `pad` also starts both one element into their buffers (misaligned).
    fn new(m: usize, n: usize, k: usize, pad: usize) -> Self {
        let (lda, ldw) = (k + pad, k + 2 * pad + usize::from(pad > 0));
        let off = pad % 2;
        let x_len = if m == 0 { 0 } else { (m - 1) * lda + k };
        let w_len = if n == 0 { 0 } else { (n - 1) * ldw + k };
        // Without padding, `w` starts 64-byte aligned, so the AMX kernel may
        // read it in place; with an odd pad it is misaligned.
        let w_buf = data(w_len + off + 32, (n * 17 + k + 5) as u64);
        let w_off = if pad == 0 {
            (0..32)
                .find(|o| (w_buf[*o..].as_ptr() as usize).is_multiple_of(64))
                .expect("an aligned start")
        } else {
            off
        };
        Self {
            m,
            n,
            k,
            lda,
            ldw,
            off,
            w_off,
            x_buf: data(x_len + off, (m * 31 + k) as u64),
            w_buf,
        }
    }

    fn x(&self) -> &[bf16] {
        &self.x_buf[self.off..]
    }

    fn w(&self) -> &[bf16] {
        &self.w_buf[self.w_off..]
    }

    fn problem(&self) -> Problem<'_> {
        Problem::new(
            self.m,
            self.n,
            self.k,
            self.x(),
            self.lda,
            self.w(),
            self.ldw,
        )
    }

    /// Exact product (f64) and the error scale `Σ|x||w|` per element.
    fn reference(&self) -> (Vec<f64>, Vec<f64>) {
        let mut exact = vec![0.0; self.m * self.n];
        let mut scale = vec![0.0; self.m * self.n];
        for i in 0..self.m {
            for j in 0..self.n {
                for l in 0..self.k {
                    let a = self.x()[i * self.lda + l].to_f64();
                    let b = self.w()[j * self.ldw + l].to_f64();
                    exact[i * self.n + j] += a * b;
                    scale[i * self.n + j] += (a * b).abs();
                }
            }
        }
        (exact, scale)
    }
}

const SHAPES: &[(usize, usize, usize)] = &[
    (1, 1, 1),
    (3, 5, 7),
    (17, 33, 65),
    (64, 100, 1000),
    (5, 4096, 31),
    (15, 70, 33),
    (16, 130, 513),
    (40, 7, 2),
    (100, 65, 300),
    (2, 3, 0),
    (1600, 20, 300),
    (3, 700, 1100),
    // x packed (m ≤ n): a part-filled panel, odd k, k across cache blocks.
    (50, 77, 33),
    (150, 301, 257),
    // AMX tiles (k a multiple of 32, n of 16): one or two column tiles per
    // step, part-filled panels, several row passes, k across cache blocks.
    (16, 16, 32),
    (40, 48, 64),
    (50, 80, 96),
    (40, 64, 1088),
    (100, 80, 96),
    (300, 112, 160),
    (700, 64, 64),
    (70, 48, 1088),
    // AMX with `w` copied into tiles although aligned (many rows).
    (1040, 32, 64),
];

fn backends() -> Vec<Backend> {
    let mut b = vec![Backend::Portable];
    if super::has_bf16_dot() {
        b.push(Backend::Bf16Dot);
    }
    if super::has_amx() {
        b.push(Backend::Amx);
    }
    b
}

fn check_close(got: f64, want: f64, scale: f64, slack: f64, what: &str) {
    let tol = 1e-5 * scale + slack;
    assert!(
        (got - want).abs() <= tol,
        "{what}: got {got}, want {want} (tol {tol})"
    );
}

#[test]
fn f32_output_matches_reference() {
    for backend in backends() {
        for &(m, n, k) in SHAPES {
            for pad in [0, 3] {
                let case = Case::new(m, n, k, pad);
                let (exact, scale) = case.reference();
                let what = format!("{backend:?} m={m} n={n} k={k} pad={pad}");

                let mut y = vec![f32::NAN; m * n];
                run(
                    backend,
                    case.problem(),
                    Out::F32 {
                        y: &mut y,
                        accumulate: false,
                    },
                );
                for ((&g, &e), &s) in y.iter().zip(&exact).zip(&scale) {
                    check_close(g.into(), e, s, 0.0, &what);
                }

                let base: Vec<f32> = (0..m * n).map(|i| i as f32 * 0.25 - 3.0).collect();
                let mut y = base.clone();
                run(
                    backend,
                    case.problem(),
                    Out::F32 {
                        y: &mut y,
                        accumulate: true,
                    },
                );
                for (((&g, &b), &e), &s) in y.iter().zip(&base).zip(&exact).zip(&scale) {
                    let want = e + f64::from(b);
                    check_close(g.into(), want, s, 1e-6 * want.abs(), &what);
                }
            }
        }
    }
}

#[test]
fn bf16_output_matches_reference() {
    for backend in backends() {
        for &(m, n, k) in SHAPES {
            let case = Case::new(m, n, k, 2);
            let (exact, scale) = case.reference();
            let bias_bf16: Vec<bf16> = data(n, 99);
            let biases = [None, Some(&bias_bf16[..])];
            for bias in biases {
                let what = format!("{backend:?} m={m} n={n} k={k} bias={bias:?}");
                let mut y = nan_out(m * n);
                run(backend, case.problem(), Out::Bf16 { y: &mut y, bias });
                let y = written(y);
                for (idx, ((&g, &e), &s)) in y.iter().zip(&exact).zip(&scale).enumerate() {
                    let b = bias.map_or(0.0, |b| b[idx % n].to_f64());
                    let want = e + b;
                    // One bf16 rounding of the result: half an ulp (2^-9 relative).
                    check_close(g.to_f64(), want, s, want.abs() / 256.0, &what);
                }
            }
        }
    }
}

/// A bf16 output buffer filled with NaN, so an element the kernel skips
/// shows.
fn nan_out(len: usize) -> Vec<MaybeUninit<bf16>> {
    vec![MaybeUninit::new(bf16::NAN); len]
}

fn written(y: Vec<MaybeUninit<bf16>>) -> Vec<bf16> {
    // SAFETY: every element was initialized by `nan_out`.
    y.into_iter().map(|v| unsafe { v.assume_init() }).collect()
}

/// f32 values in about [-1, 1] from [`data`].
fn data_f32(len: usize, seed: u64) -> Vec<f32> {
    data(len, seed).iter().map(|v| v.to_f32() / 2.0).collect()
}

/// The adapted mode equals its definition applied to the kernel's own f32
/// sums: `bf16((bf16(sum + bias) + addend) ⊙ scale)`, bit for bit (the same
/// operations in the same order), with low-rank, dense and no addend.
#[test]
fn adapted_output_is_the_rounded_base_plus_the_addend() {
    for backend in backends() {
        for &(m, n, k) in SHAPES {
            let case = Case::new(m, n, k, 1);
            let mut sums = vec![0.0f32; m * n];
            let out = Out::F32 {
                y: &mut sums,
                accumulate: false,
            };
            run(backend, case.problem(), out);
            let (bias, scale) = (data_f32(n, 11), data_f32(n, 12));
            let ranks = [3, 1];
            let hs: Vec<Vec<f32>> = ranks
                .iter()
                .map(|&r| data_f32(m * r, 13 + r as u64))
                .collect();
            // One term packed (stride n), one with padded rows.
            let ldbts = [n, LowRank::padded_stride(n)];
            let bts: Vec<Vec<f32>> = ranks
                .iter()
                .zip(ldbts)
                .map(|(&r, ld)| data_f32(r * ld, 17 + r as u64))
                .collect();
            let terms: Vec<LowRank> = (0..2)
                .map(|t| LowRank {
                    h: &hs[t],
                    bt: &bts[t],
                    rank: ranks[t],
                    ldbt: ldbts[t],
                })
                .collect();
            let dense = data_f32(m * n, 19);
            let addends = [Addend::None, Addend::LowRank(&terms), Addend::Dense(&dense)];
            for (addend, with_bias, with_scale) in addends
                .iter()
                .flat_map(|a| [(a, true, false), (a, false, true), (a, true, true)])
            {
                let kind = match addend {
                    Addend::None => "none",
                    Addend::LowRank(_) => "low rank",
                    Addend::Dense(_) => "dense",
                };
                let bias = with_bias.then_some(&bias[..]);
                let scale = with_scale.then_some(&scale[..]);
                let mut y = nan_out(m * n);
                let out = Out::Adapted {
                    y: super::HalfOut::Bf16(&mut y),
                    bias,
                    addend: *addend,
                    scale,
                };
                run(backend, case.problem(), out);
                let y = written(y);
                for i in 0..m {
                    for j in 0..n {
                        let b = bias.map_or(0.0, |b| b[j]);
                        let mut v = round_bf16(sums[i * n + j] + b).to_f32();
                        match addend {
                            Addend::None => {}
                            Addend::Dense(d) => v += d[i * n + j],
                            Addend::LowRank(terms) => {
                                for t in *terms {
                                    for q in 0..t.rank {
                                        v += t.h[i * t.rank + q] * t.bt[q * t.ldbt + j];
                                    }
                                }
                            }
                        }
                        if let Some(s) = scale {
                            v *= s[j];
                        }
                        assert_eq!(
                            y[i * n + j].to_bits(),
                            round_bf16(v).to_bits(),
                            "{backend:?} {m}x{n}x{k} {kind} bias {with_bias} scale {with_scale} \
                             ({i}, {j})"
                        );
                    }
                }
            }
        }
    }
}

/// Both back ends agree to f32 summation-order rounding on a larger shape
/// that exercises several cache blocks.
#[test]
fn backends_agree_on_blocked_shape() {
    let case = Case::new(200, 600, 1100, 1);
    let (_, scale) = case.reference();
    let mut outs = Vec::new();
    for backend in backends() {
        let mut y = vec![0.0f32; 200 * 600];
        run(
            backend,
            case.problem(),
            Out::F32 {
                y: &mut y,
                accumulate: false,
            },
        );
        outs.push(y);
    }
    for y in &outs[1..] {
        for ((&a, &b), &s) in y.iter().zip(&outs[0]).zip(&scale) {
            check_close(a.into(), b.into(), s, 0.0, "backends");
        }
    }
}

#[test]
fn rounding_matches_half() {
    let mut s = 0x1234_5678_9abc_def1u64;
    let specials = [
        0.0f32,
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        f32::MAX,
        f32::MIN_POSITIVE,
        1.0e-40,
        f32::from_bits(0x3f80_8000),
        f32::from_bits(0x3f81_8000),
        f32::from_bits(0x7f7f_ffff),
        f32::from_bits(0xff80_0001),
    ];
    let random = (0..100_000).map(|_| {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        f32::from_bits(s as u32)
    });
    let values: Vec<f32> = specials.into_iter().chain(random).collect();
    for &v in &values {
        assert_eq!(
            round_bf16(v).to_bits(),
            bf16::from_f32(v).to_bits(),
            "{v:e}"
        );
    }
    // The vectorised slice forms, on every length's tail (odd lengths leave remainders).
    for len in [0, 1, 15, 17, 63, values.len()] {
        let mut rounded = vec![bf16::ZERO; len];
        round_into(&values[..len], &mut rounded);
        for (r, v) in rounded.iter().zip(&values) {
            assert_eq!(r.to_bits(), bf16::from_f32(*v).to_bits(), "{v:e}");
        }
    }
}

#[test]
fn widening_matches_half_for_every_bf16() {
    let all: Vec<bf16> = (0..=u16::MAX).map(bf16::from_bits).collect();
    for len in [0, 1, 33, all.len()] {
        let mut wide = vec![0f32; len];
        widen_into(&all[..len], &mut wide);
        for (w, b) in wide.iter().zip(&all) {
            let want = f32::from_bits(u32::from(b.to_bits()) << 16);
            assert_eq!(w.to_bits(), want.to_bits(), "{:#06x}", b.to_bits());
            if !b.is_nan() {
                assert_eq!(*w, b.to_f32());
            }
        }
    }
}

#[test]
fn public_entry_point_runs() {
    let case = Case::new(4, 3, 9, 0);
    let mut y = vec![0.0f32; 12];
    super::matmul_bf16_nt(
        4,
        3,
        9,
        case.x(),
        9,
        case.w(),
        9,
        Out::F32 {
            y: &mut y,
            accumulate: false,
        },
    );
    let (exact, scale) = case.reference();
    for ((&g, &e), &s) in y.iter().zip(&exact).zip(&scale) {
        check_close(g.into(), e, s, 0.0, "public");
    }
}

/// The AMX kernel's two ways to read `w` (in place when aligned and `x` has
/// few rows, copied into tiles otherwise) both occur among the test shapes.
#[cfg(target_arch = "x86_64")]
#[test]
fn amx_schemes_are_both_tested() {
    let in_place = |m, n, k, pad| super::amx::w_in_place_pays(&Case::new(m, n, k, pad).problem());
    assert!(in_place(40, 64, 1088, 0));
    assert!(in_place(300, 112, 160, 0));
    assert!(!in_place(40, 64, 1088, 3), "misaligned w");
    assert!(!in_place(1040, 32, 64, 0), "many rows");
    assert!(!in_place(50, 77, 33, 0), "part tiles");
}

/// f16 operands on the AMX tiles: every output equals the f64 sum of the exact products to f32
/// accuracy (1e-6 of Σ|x·w|), with odd shapes, rows further apart than k, f16's subnormals and
/// largest values among the inputs, accumulation onto what the output holds, `w` split in the
/// tasks (up to 512 rows) and packed up front (530 rows); infinities as described below.
#[test]
fn f16_split_product_matches_the_exact_products() {
    use half::f16;
    if !super::has_amx() {
        return;
    }
    let values = |len: usize, seed: u64| -> Vec<f16> {
        let mut v: Vec<f16> = data(len, seed)
            .iter()
            .map(|b| f16::from_f32(b.to_f32() * 3.7))
            .collect();
        // Subnormals, the largest finite values and values needing all 11 bits, spread out.
        let special = [
            f16::from_bits(0x0001),
            f16::from_bits(0x83ff),
            f16::MAX,
            f16::from_f32(-1.0009766),
            f16::from_bits(0x3bff),
        ];
        for (i, s) in special.iter().enumerate() {
            if let Some(e) = v.get_mut(i * 97 + 5) {
                *e = *s;
            }
        }
        v
    };
    for (m, n, k, pad) in [
        (16, 16, 32, 0),
        (37, 45, 70, 3),
        (300, 40, 129, 1),
        (530, 24, 70, 2),
        (64, 600, 1024, 0),
    ] {
        let (lda, ldw) = (k + pad, k + 2 * pad);
        let x = values((m - 1) * lda + k, (m * 7 + k) as u64);
        let w = values((n - 1) * ldw + k, (n * 13 + k) as u64);
        let start = data_f32(m * n, 5);
        for accumulate in [false, true] {
            let mut y = start.clone();
            let out = Out::F32 {
                y: &mut y,
                accumulate,
            };
            assert!(super::matmul_f16_nt_amx(m, n, k, &x, lda, &w, ldw, out));
            for i in 0..m {
                for j in 0..n {
                    let terms = (0..k).map(|t| x[i * lda + t].to_f64() * w[j * ldw + t].to_f64());
                    let (sum, scale) = terms.fold((0.0, 0.0), |(s, a), p| (s + p, a + p.abs()));
                    let want = sum
                        + if accumulate {
                            f64::from(start[i * n + j])
                        } else {
                            0.0
                        };
                    let got = f64::from(y[i * n + j]);
                    let bound = 1e-6 * (scale + f64::from(start[i * n + j].abs())) + 1e-30;
                    assert!(
                        (got - want).abs() <= bound,
                        "{m}x{n}x{k} ({i}, {j}): {got} vs {want}"
                    );
                }
            }
        }
    }
    // An infinity in `x`, or in `w` packed up front (more rows than two tasks): refused (split,
    // ∞ · 0 would be NaN), nothing written. In `w` split per task: that task's block takes the
    // exact f32 sums instead, ∞ where torch's product has it.
    let k = 32;
    for (m, n, in_x) in [
        (16, 16, true),
        (300, 16, false),
        (16, 40, false),
        (256, 16, false),
    ] {
        let (mut x, mut w) = (values(m * k, 1), vec![f16::from_f32(0.5); n * k]);
        let at = 3 * k + 7;
        if in_x {
            x[at] = f16::NEG_INFINITY
        } else {
            w[at] = f16::INFINITY
        }
        let mut y = vec![1f32; m * n];
        let out = Out::F32 {
            y: &mut y,
            accumulate: false,
        };
        let done = super::matmul_f16_nt_amx(m, n, k, &x, k, &w, k, out);
        if in_x || m > 512 {
            assert!(!done, "{m} {n} {in_x}");
            assert!(y.iter().all(|v| *v == 1.0));
            continue;
        }
        assert!(done);
        for i in 0..m {
            for j in 0..n {
                let want = (0..k).fold(0f32, |s, t| {
                    s + x[i * k + t].to_f32() * w[j * k + t].to_f32()
                });
                let got = y[i * n + j];
                let bound = 1e-6
                    * (0..k)
                        .map(|t| (x[i * k + t].to_f32() * w[j * k + t].to_f32()).abs())
                        .sum::<f32>();
                if want.is_finite() {
                    assert!((got - want).abs() <= bound, "({i}, {j}): {got} vs {want}");
                } else {
                    assert!(
                        got == want || (got.is_nan() && want.is_nan()),
                        "({i}, {j}): {got} vs {want}"
                    );
                }
            }
        }
        assert!(y.iter().any(|v| v.is_infinite()));
    }
}
