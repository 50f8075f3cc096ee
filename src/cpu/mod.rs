//! Our CPU kernels, where the profile says candle's are slow.
//!
//! Each kernel is written once as plain Rust that the compiler vectorizes, and compiled
//! several times under `#[target_feature]`: AVX-512, AVX2+FMA, and a portable fallback. The
//! widest the CPU has is picked at run time (`Isa::detect`), so one binary runs on any
//! x86-64 and uses AVX-512 where it exists. Every kernel has a test against the
//! straightforward implementation on random inputs.

pub mod attention;
pub mod gemm;
pub mod math;
pub mod matmul;
pub mod norm;
pub mod quant;
pub mod team;

use std::sync::OnceLock;

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

/// The instruction sets our kernels are compiled for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// AVX-512F (+ VL, BW, DQ) with FMA.
    Avx512,
    /// AVX2 with FMA.
    Avx2,
    /// Whatever the target baseline is.
    Portable,
}

impl Isa {
    /// The widest instruction set this CPU supports (decided once).
    pub fn detect() -> Isa {
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                if std::env::var_os("EDGENODE_CPU_ISA").is_some_and(|v| v == "portable") {
                    return Isa::Portable;
                }
                let avx512 = std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512dq");
                let avx2 = std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma");
                let forced_avx2 = std::env::var_os("EDGENODE_CPU_ISA").is_some_and(|v| v == "avx2");
                if avx512 && !forced_avx2 {
                    return Isa::Avx512;
                }
                if avx2 {
                    return Isa::Avx2;
                }
            }
            Isa::Portable
        })
    }

    /// Its name, for `/info` and logs.
    pub fn name(self) -> &'static str {
        match self {
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
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")]
            unsafe fn avx512($($arg: $ty),*) $(-> $ret)? { body($($arg),*) }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
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
