//! Our CPU kernels, where the profile says candle's are slow.
//!
//! Each kernel is written once as plain Rust that the compiler vectorizes, and compiled
//! several times under `#[target_feature]`: AVX-512, AVX2+FMA, and a portable fallback. The
//! widest the CPU has is picked at run time (`Isa::detect`), so one binary runs on any
//! x86-64 and uses AVX-512 where it exists. Every kernel has a test against the
//! straightforward implementation on random inputs.

pub mod attention;
pub mod bf16;
pub mod gemm;
pub mod math;
pub mod matmul;
pub mod norm;
pub mod qlinear;
pub mod quant;
pub mod team;

use std::sync::OnceLock;

static ISA: OnceLock<Isa> = OnceLock::new();

/// Something that runs `f(0..tasks)` in parallel and returns when all are done.
pub trait Parallel: Sync {
    /// Runs every task.
    fn for_each(&self, tasks: usize, f: &(dyn Fn(usize) + Sync));
    /// Threads it uses.
    fn threads(&self) -> usize;
}

impl Parallel for team::Team {
    fn for_each(&self, tasks: usize, f: &(dyn Fn(usize) + Sync)) {
        self.run(tasks, f)
    }
    fn threads(&self) -> usize {
        team::Team::threads(self)
    }
}

/// A pointer into a buffer whose parts the tasks of one parallel region write: the one
/// place the crate lets a raw pointer cross threads.
///
/// Whoever writes through it must write only its own part (rows, columns) while the region
/// runs; the buffer outlives the region because `Parallel::for_each` returns only when
/// every task is done. Each kernel that uses it is tested against its plain-Rust
/// specification on random shapes, single- and multi-threaded.
#[derive(Clone, Copy)]
pub struct Disjoint<T>(*mut T);

// SAFETY: see the type's contract: tasks write disjoint parts of a buffer that outlives them.
unsafe impl<T: Send> Send for Disjoint<T> {}
// SAFETY: as above; no two tasks touch the same element.
unsafe impl<T: Send> Sync for Disjoint<T> {}

impl<T> Disjoint<T> {
    pub fn new(ptr: *mut T) -> Self {
        Disjoint(ptr)
    }

    /// A method (not a field access) so closures capture the whole wrapper, not the pointer.
    pub fn get(&self) -> *mut T {
        self.0
    }
}

/// rayon's global pool (tests, benches, and callers without a team).
pub struct Rayon(pub usize);

impl Parallel for Rayon {
    fn for_each(&self, tasks: usize, f: &(dyn Fn(usize) + Sync)) {
        use rayon::prelude::*;
        if self.0 > 1 && tasks > 1 {
            (0..tasks).into_par_iter().for_each(f);
        } else {
            (0..tasks).for_each(f);
        }
    }
    fn threads(&self) -> usize {
        self.0
    }
}

/// The instruction sets our kernels are compiled for, widest first. `runtime.isa` (or
/// `EDGENODE_RUNTIME__ISA`) caps the ladder so every path can be run and compared on one
/// machine: `avx512` keeps AVX-512 but turns the bf16 kernel off, `avx2` drops AVX-512.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Isa {
    /// AVX-512 with BF16 (`vdpbf16ps`): Zen 4 and later, Xeons from Cooper Lake on.
    #[serde(rename = "avx512_bf16")]
    Avx512Bf16,
    /// AVX-512F (+ VL, BW, DQ) with FMA.
    Avx512,
    /// AVX2 with FMA.
    Avx2,
    /// Whatever the target baseline is.
    Portable,
}

impl Isa {
    /// The vector instruction set the f32 and int8 kernels use: the widest this CPU
    /// supports, or narrower if `limit` said so first (`runtime.isa`). Decided once per
    /// process. (`Avx512Bf16` counts as `Avx512` here; `level` tells them apart.)
    pub fn detect() -> Isa {
        match Isa::level() {
            Isa::Avx512Bf16 => Isa::Avx512,
            other => other,
        }
    }

    /// The highest rung of the ladder this process may use, extensions included.
    pub fn level() -> Isa {
        *ISA.get_or_init(Isa::widest)
    }

    /// Caps the instruction set (call before any kernel runs; later calls have no effect).
    /// Returns the level that will be used.
    pub fn limit(cap: Isa) -> Isa {
        let widest = Isa::widest();
        let chosen = if cap.rank() < widest.rank() { cap } else { widest };
        *ISA.get_or_init(|| chosen)
    }

    fn rank(self) -> u8 {
        match self {
            Isa::Portable => 0,
            Isa::Avx2 => 1,
            Isa::Avx512 => 2,
            Isa::Avx512Bf16 => 3,
        }
    }

    fn widest() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            let avx512 = std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512vl")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512dq");
            if avx512 && std::arch::is_x86_feature_detected!("avx512bf16") {
                return Isa::Avx512Bf16;
            }
            if avx512 {
                return Isa::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                return Isa::Avx2;
            }
        }
        Isa::Portable
    }

    /// Its name, for `/info` and logs (as `runtime.isa` spells it).
    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx512Bf16 => "avx512_bf16",
            Isa::Avx512 => "avx512",
            Isa::Avx2 => "avx2",
            Isa::Portable => "portable",
        }
    }
}

/// Defines `pub fn $name(args) -> ret` that runs `$body` compiled for the widest ISA the
/// CPU has. `$body` must be safe code; it is inlined into each target-feature wrapper so
/// the compiler vectorizes it for that ISA.
#[macro_export]
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        // Kernels take their slices and dimensions as they are; a struct per call would be noise.
        #[allow(clippy::too_many_arguments)]
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[allow(clippy::too_many_arguments)]
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn avx512($($arg: $ty),*) $(-> $ret)? { body($($arg),*) }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn avx2($($arg: $ty),*) $(-> $ret)? { body($($arg),*) }
            match $crate::cpu::Isa::detect() {
                // SAFETY: `Isa::detect` verified the CPU has these features.
                #[cfg(target_arch = "x86_64")]
                $crate::cpu::Isa::Avx512 => unsafe { avx512($($arg),*) },
                #[cfg(target_arch = "x86_64")]
                $crate::cpu::Isa::Avx2 => unsafe { avx2($($arg),*) },
                _ => body($($arg),*),
            }
        }
    };
}

/// `n` reproducible values in [-1, 1) from `seed` (a 64-bit LCG): test and benchmark data
/// for the kernels, the same on every machine without a random-number crate.
pub fn random_f32(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
        })
        .collect()
}
