//! f16 ↔ f32 conversions for the f16 layer path, with the CPU's conversion instructions
//! (AVX-512F, or F16C; checked at run time): `half`'s per-element conversions check the CPU on
//! every call and do not vectorise. Both directions are exact IEEE conversions (widening is
//! exact; narrowing rounds to nearest even, subnormals and NaNs kept), as torch's casts are.

use std::mem::MaybeUninit;

use half::f16;

/// `dst[i] = src[i]` widened to f32, over the shorter of the two.
pub(crate) fn widen_into(src: &[f16], dst: &mut [f32]) {
    widen_at(Level::detect(), src, dst);
}

/// `dst[i] = f16(src[i])`, rounded to nearest even, over the shorter of the two; `dst` need not
/// be initialized.
pub(crate) fn round_into_uninit(src: &[f32], dst: &mut [MaybeUninit<f16>]) {
    round_at(Level::detect(), src, dst);
}

/// [`widen_into`] with the instructions of `level`, which the CPU must have.
fn widen_at(level: Level, src: &[f16], dst: &mut [f32]) {
    let len = src.len().min(dst.len());
    let (src, dst) = (&src[..len], &mut dst[..len]);
    match level {
        // SAFETY: the CPU has the features (the caller's contract); equal lengths.
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 => unsafe { x86::widen_avx512(src, dst) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Level::F16c => unsafe { x86::widen_f16c(src, dst) },
        Level::Scalar => dst.iter_mut().zip(src).for_each(|(d, s)| *d = s.to_f32()),
    }
}

/// [`round_into_uninit`] with the instructions of `level`, which the CPU must have.
fn round_at(level: Level, src: &[f32], dst: &mut [MaybeUninit<f16>]) {
    let len = src.len().min(dst.len());
    let (src, dst) = (&src[..len], &mut dst[..len]);
    match level {
        // SAFETY: the CPU has the features (the caller's contract); equal lengths.
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 => unsafe { x86::round_avx512(src, dst) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Level::F16c => unsafe { x86::round_f16c(src, dst) },
        Level::Scalar => dst.iter_mut().zip(src).for_each(|(d, s)| {
            d.write(f16::from_f32(*s));
        }),
    }
}

/// [`round_into_uninit`] into initialized memory.
pub(crate) fn round_into(src: &[f32], dst: &mut [f16]) {
    // SAFETY: `MaybeUninit<f16>` has f16's layout, and only initialized values are written
    // through the view.
    let dst = unsafe { &mut *(std::ptr::from_mut(dst) as *mut [MaybeUninit<f16>]) };
    round_into_uninit(src, dst);
}

/// `v[i] = f32(f16(v[i]))`: the value an f16 tensor would hold, kept in f32.
pub(crate) fn round_in_place(v: &mut [f32]) {
    const CHUNK: usize = 256;
    let mut halves = [MaybeUninit::<f16>::uninit(); CHUNK];
    for chunk in v.chunks_mut(CHUNK) {
        let halves = &mut halves[..chunk.len()];
        round_into_uninit(chunk, halves);
        // SAFETY: `round_into_uninit` wrote every element of `halves`.
        let halves = unsafe { &*(std::ptr::from_ref(halves) as *const [f16]) };
        widen_into(halves, chunk);
    }
}

/// The conversion instructions used.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Level {
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    F16c,
    Scalar,
}

impl Level {
    /// The best this CPU has (the feature checks are cached by std).
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f") {
                return Self::Avx512;
            }
            if is_x86_feature_detected!("f16c") && is_x86_feature_detected!("avx") {
                return Self::F16c;
            }
        }
        Self::Scalar
    }

    /// Every level this CPU has, best first.
    #[cfg(test)]
    fn available() -> Vec<Self> {
        let mut levels = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f") {
                levels.push(Self::Avx512);
            }
            if is_x86_feature_detected!("f16c") && is_x86_feature_detected!("avx") {
                levels.push(Self::F16c);
            }
        }
        levels.push(Self::Scalar);
        levels
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;
    use std::mem::MaybeUninit;

    use half::f16;

    /// Round to nearest even, no exceptions raised.
    const NEAREST: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;

    /// # Safety
    /// The CPU supports AVX-512F; `src` and `dst` have equal lengths.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn widen_avx512(src: &[f16], dst: &mut [f32]) {
        let body = src.len() - src.len() % 16;
        for i in (0..body).step_by(16) {
            // SAFETY: i + 16 <= body, within both slices.
            unsafe {
                let h = _mm256_loadu_si256(src.as_ptr().add(i).cast());
                _mm512_storeu_ps(dst.as_mut_ptr().add(i), _mm512_cvtph_ps(h));
            }
        }
        dst[body..]
            .iter_mut()
            .zip(&src[body..])
            .for_each(|(d, s)| *d = s.to_f32());
    }

    /// # Safety
    /// The CPU supports AVX and F16C; `src` and `dst` have equal lengths.
    #[target_feature(enable = "avx,f16c")]
    pub(super) unsafe fn widen_f16c(src: &[f16], dst: &mut [f32]) {
        let body = src.len() - src.len() % 8;
        for i in (0..body).step_by(8) {
            // SAFETY: i + 8 <= body, within both slices.
            unsafe {
                let h = _mm_loadu_si128(src.as_ptr().add(i).cast());
                _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
            }
        }
        dst[body..]
            .iter_mut()
            .zip(&src[body..])
            .for_each(|(d, s)| *d = s.to_f32());
    }

    /// # Safety
    /// The CPU supports AVX-512F; `src` and `dst` have equal lengths.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn round_avx512(src: &[f32], dst: &mut [MaybeUninit<f16>]) {
        let body = src.len() - src.len() % 16;
        for i in (0..body).step_by(16) {
            // SAFETY: i + 16 <= body, within both slices.
            unsafe {
                let h = _mm512_cvtps_ph::<NEAREST>(_mm512_loadu_ps(src.as_ptr().add(i)));
                _mm256_storeu_si256(dst.as_mut_ptr().add(i).cast(), h);
            }
        }
        dst[body..].iter_mut().zip(&src[body..]).for_each(|(d, s)| {
            d.write(f16::from_f32(*s));
        });
    }

    /// # Safety
    /// The CPU supports AVX and F16C; `src` and `dst` have equal lengths.
    #[target_feature(enable = "avx,f16c")]
    pub(super) unsafe fn round_f16c(src: &[f32], dst: &mut [MaybeUninit<f16>]) {
        let body = src.len() - src.len() % 8;
        for i in (0..body).step_by(8) {
            // SAFETY: i + 8 <= body, within both slices.
            unsafe {
                let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(
                    src.as_ptr().add(i),
                ));
                _mm_storeu_si128(dst.as_mut_ptr().add(i).cast(), h);
            }
        }
        dst[body..].iter_mut().zip(&src[body..]).for_each(|(d, s)| {
            d.write(f16::from_f32(*s));
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// At every level the CPU has: every f16 bit pattern widened, and f32 values around every
    /// f16 (halfway points, the range's ends, subnormals, infinities, NaNs) narrowed, equal
    /// `half`'s software conversions bit for bit.
    #[test]
    fn conversions_equal_halfs_bit_for_bit() {
        let halves: Vec<f16> = (0..=u16::MAX).map(f16::from_bits).collect();
        let mut values: Vec<f32> = Vec::new();
        for h in halves.iter().filter(|h| h.is_finite()) {
            let bits = h.to_f32().to_bits();
            // The value, its neighbours, and the points halfway to the next f16 and next to them.
            let near = [0, 1, u32::MAX, 0x1000, 0x0fff, 0x1001];
            values.extend(near.map(|d| f32::from_bits(bits.wrapping_add(d))));
        }
        values.extend([
            f32::MAX,
            f32::MIN,
            65520.0,
            65519.996,
            f32::INFINITY,
            f32::NAN,
        ]);
        values.extend([1e-8, -3e-8, f32::MIN_POSITIVE, f32::from_bits(0x7f80_0001)]);
        let levels = Level::available();
        assert_eq!(levels[0], Level::detect());
        for level in levels {
            let mut wide = vec![0f32; halves.len()];
            widen_at(level, &halves, &mut wide);
            for (h, w) in halves.iter().zip(&wide) {
                assert_eq!(h.to_f32().to_bits(), w.to_bits(), "{level:?}: {h:?}");
            }
            let mut narrow = vec![MaybeUninit::<f16>::uninit(); values.len()];
            round_at(level, &values, &mut narrow);
            for (v, n) in values.iter().zip(&narrow) {
                // SAFETY: written by `round_at`.
                let n = unsafe { n.assume_init() };
                let want = f16::from_f32(*v);
                assert_eq!(
                    n.to_bits(),
                    want.to_bits(),
                    "{level:?}: {v:e} ({:#x})",
                    v.to_bits()
                );
            }
        }
        let mut kept = values.clone();
        round_in_place(&mut kept);
        for (v, k) in values.iter().zip(&kept) {
            assert_eq!(k.to_bits(), f16::from_f32(*v).to_f32().to_bits(), "{v:e}");
        }
    }
}
