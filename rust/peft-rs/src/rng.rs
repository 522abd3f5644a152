//! Random streams that must equal PyTorch's.

/// PyTorch's CPU generator (`at::mt19937`, what `torch.manual_seed` seeds): the standard 32-bit
/// Mersenne Twister seeded with `init_genrand`. VeRA's projections and DARE's masks draw from it
/// so that they equal torch's bit for bit.
pub(crate) struct TorchGenerator {
    state: [u32; 624],
    index: usize,
}

impl TorchGenerator {
    pub(crate) fn new(seed: u64) -> Self {
        let mut state = [0u32; 624];
        state[0] = seed as u32;
        for i in 1..624 {
            let prev = state[i - 1];
            state[i] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(i as u32);
        }
        Self { state, index: 624 }
    }

    pub(crate) fn next_u32(&mut self) -> u32 {
        if self.index >= 624 {
            for i in 0..624 {
                let y = (self.state[i] & 0x8000_0000) | (self.state[(i + 1) % 624] & 0x7fff_ffff);
                let mut next = self.state[(i + 397) % 624] ^ (y >> 1);
                if y & 1 != 0 {
                    next ^= 0x9908_b0df;
                }
                self.state[i] = next;
            }
            self.index = 0;
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }
}

/// The random stream of training-time dropout (adapter dropout, LyCORIS rank and module dropout).
/// Counter-based: draw `i` is a hash of `(seed, i)`, so the whole state is the number of values
/// drawn, which a checkpoint stores to resume on the same stream. One stream is shared by every
/// layer of a model; layers draw in forward order, which is deterministic.
#[derive(Debug)]
pub struct DropoutRng {
    seed: u64,
    drawn: std::sync::atomic::AtomicU64,
}

impl DropoutRng {
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            drawn: std::sync::atomic::AtomicU64::new(0),
        }
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// How many values were drawn: the stream's position.
    pub fn position(&self) -> u64 {
        self.drawn.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn set_position(&self, position: u64) {
        self.drawn
            .store(position, std::sync::atomic::Ordering::SeqCst);
    }

    /// `n` values uniform in `[0, 1)`.
    pub fn uniform(&self, n: usize) -> Vec<f32> {
        use rayon::prelude::*;
        let start = self
            .drawn
            .fetch_add(n as u64, std::sync::atomic::Ordering::SeqCst);
        // Each draw depends only on its index, so large masks fill in parallel.
        (0..n)
            .into_par_iter()
            .with_min_len(1 << 14)
            .map(|i| {
                let i = i as u64;
                // 24 random bits: every f32 in [0, 1) with that spacing is equally likely.
                (splitmix64(self.seed ^ splitmix64(start + i)) >> 40) as f32 / (1u64 << 24) as f32
            })
            .collect()
    }
}

/// SplitMix64's output function: a bijective 64-bit mix.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A permutation of `0..n` (Fisher–Yates) drawn from `(seed, stream)`: the data order of one
/// training epoch, the same on every platform and version.
pub fn permutation(n: usize, seed: u64, stream: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let key = splitmix64(seed ^ splitmix64(stream.wrapping_mul(0x2545_f491_4f6c_dd1d)));
    for i in (1..n).rev() {
        let r = splitmix64(key ^ splitmix64(i as u64));
        // Lemire's multiply-shift: uniform enough for shuffling (bias below 2⁻³²).
        let j = ((r >> 32) * (i as u64 + 1)) >> 32;
        order.swap(i, j as usize);
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropout_stream_is_uniform_and_resumable() {
        let rng = DropoutRng::new(7);
        let draws = rng.uniform(200_000);
        assert!(draws.iter().all(|u| (0.0..1.0).contains(u)));
        let mean = draws.iter().map(|u| f64::from(*u)).sum::<f64>() / draws.len() as f64;
        assert!((mean - 0.5).abs() < 0.005, "{mean}");
        let below = draws.iter().filter(|u| **u < 0.1).count() as f64 / draws.len() as f64;
        assert!((below - 0.1).abs() < 0.005, "{below}");
        // The position is the whole state: a new stream set there draws the same values.
        let next = rng.uniform(5);
        let resumed = DropoutRng::new(7);
        resumed.set_position(200_000);
        assert_eq!(resumed.uniform(5), next);
        assert_ne!(DropoutRng::new(8).uniform(5), DropoutRng::new(7).uniform(5));
    }

    #[test]
    fn epoch_orders_are_permutations_that_depend_on_seed_and_epoch() {
        let a = permutation(1000, 3, 0);
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..1000).collect::<Vec<_>>());
        assert_eq!(a, permutation(1000, 3, 0));
        assert_ne!(a, permutation(1000, 3, 1));
        assert_ne!(a, permutation(1000, 4, 0));
        assert_eq!(permutation(1, 3, 0), vec![0]);
        assert!(permutation(0, 3, 0).is_empty());
    }
}
