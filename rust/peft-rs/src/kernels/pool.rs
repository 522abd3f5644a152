//! Keeping rayon's workers awake for a moment after a parallel kernel.
//!
//! A worker that went to sleep can start late when woken: on the 2-core VMs this project runs on,
//! 0.4–4 ms (the idle virtual CPU has to be scheduled again), so a kernel of a millisecond called
//! after a pause ran on the calling thread alone, and often so did the next few. OpenMP, which
//! runs torch's kernels, avoids this by letting its threads spin for a while after each parallel
//! region before they sleep; [`after_parallel_work`] does the same for rayon's workers: for
//! `PEFT_RS_SPIN_MS` milliseconds (default 2, `0` turns it off) each worker keeps looking for
//! rayon work and yields the core to any other runnable thread meanwhile.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Workers currently spinning.
static SPINNING: AtomicUsize = AtomicUsize::new(0);
/// When the spinning stops, in nanoseconds since [`epoch`].
static DEADLINE_NS: AtomicU64 = AtomicU64::new(0);

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ns() -> u64 {
    epoch().elapsed().as_nanos() as u64
}

/// How long workers stay awake after a kernel (`PEFT_RS_SPIN_MS`, read once).
fn spin_window() -> Duration {
    static WINDOW: OnceLock<Duration> = OnceLock::new();
    *WINDOW.get_or_init(|| {
        let ms = std::env::var("PEFT_RS_SPIN_MS")
            .ok()
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|ms| ms.is_finite() && *ms >= 0.0)
            .unwrap_or(2.0);
        Duration::from_secs_f64(ms / 1e3)
    })
}

/// Multiply-adds below which a product runs on the calling thread and is not followed by the
/// spin window: waking workers costs more than they save, and awake workers spin for a while
/// (rayon's own idle rounds, or the window) competing with the caller for the cores.
pub(crate) const PARALLEL_MIN_WORK: usize = 1 << 20;

/// To be called at the end of a kernel of `work` multiply-adds that may have run on rayon's pool
/// (any thread, outside the pool or in it): clears the vector registers' upper halves on this
/// thread and the workers (see [`zero_upper`]) and, after enough work, keeps the workers awake
/// for the spin window.
pub(crate) fn after_parallel_work(work: usize) {
    zero_upper();
    if work < PARALLEL_MIN_WORK
        || rayon::current_num_threads() == 1
        || rayon::current_thread_index().is_some()
    {
        return;
    }
    let window = spin_window();
    if window.is_zero() {
        rayon::broadcast(|_| zero_upper());
        return;
    }
    let deadline = now_ns() + window.as_nanos() as u64;
    DEADLINE_NS.fetch_max(deadline, Ordering::Relaxed);
    // Workers already spinning clear their registers after each job they run; new spinners
    // start only once the last ones have stopped, so that none runs inside another.
    let threads = rayon::current_num_threads();
    if SPINNING
        .compare_exchange(0, threads, Ordering::AcqRel, Ordering::Relaxed)
        .is_ok()
    {
        rayon::spawn_broadcast(|_| spin());
    }
}

/// Runs rayon jobs as they come until the deadline, yielding the core when there are none.
fn spin() {
    zero_upper();
    while now_ns() < DEADLINE_NS.load(Ordering::Relaxed) {
        match rayon::yield_now() {
            Some(rayon::Yield::Executed) => zero_upper(),
            _ => std::thread::yield_now(),
        }
    }
    SPINNING.fetch_sub(1, Ordering::AcqRel);
}

/// faer's x86 kernels return with the upper halves of the vector registers in use (no
/// `vzeroupper`), on every thread that ran them; code compiled for the baseline (SSE) then runs
/// several times slower on those threads, Python's interpreter included (measured: an IA³ merge of
/// a 1024² weight 0.2 ms before a faer GEMM, 0.65 ms after, 0.2 ms again after this).
fn zero_upper() {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx") {
        #[target_feature(enable = "avx")]
        fn clear() {
            std::arch::x86_64::_mm256_zeroupper();
        }
        // SAFETY: the CPU has AVX (checked above).
        unsafe { clear() };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;

    /// Spinning workers still run new work, and stop once the window has passed.
    #[test]
    fn spinning_workers_take_new_work_and_then_stop() {
        if rayon::current_num_threads() == 1 || spin_window().is_zero() {
            return;
        }
        after_parallel_work(PARALLEL_MIN_WORK);
        let sum: u64 = (0..100_000u64).into_par_iter().sum();
        assert_eq!(sum, 100_000 * 99_999 / 2);
        after_parallel_work(PARALLEL_MIN_WORK);
        let deadline = Instant::now() + Duration::from_secs(5);
        while SPINNING.load(Ordering::Acquire) != 0 {
            assert!(
                Instant::now() < deadline,
                "workers still spinning after 5 s"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}
