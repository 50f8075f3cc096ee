//! Dense layers in bfloat16: `out = epilogue(x · wᵀ + bias)` with bf16 weights and
//! activations multiplied into f32 accumulators by AVX-512 BF16's `vdpbf16ps`: 32
//! multiply-adds an instruction where f32's FMA does 16 (on Zen 4, and on Xeons from Cooper
//! Lake on, Sapphire Rapids among them).
//!
//! This is the encoder's `precision = "bf16"`. Weights are rounded to bf16 once at load and
//! packed in panels of 32 output features, each k-pair of a feature side by side
//! (`[k/2][32][2]`): the layout `vdpbf16ps` multiplies, one pair per 32-bit lane. Each layer
//! rounds its input rows to bf16 (round to nearest even, `vcvtne2ps2bf16`), and the
//! microkernel broadcasts one row's pair against two weight vectors, 12 rows × 32 features
//! of f32 accumulators in registers over the whole k loop. The bias seeds the accumulators;
//! GELU is applied as they are stored.
//!
//! Where the CPU has no AVX-512 BF16 (or `runtime.isa` caps the ladder below
//! `avx512_bf16`), the same bf16-rounded weights run on the f32 kernel (`gemm::PackedLinear`), so
//! the answer stays the model's and only the speed changes. The specification the kernel is
//! tested against is the plain sum of the same bf16 products (in f64, in the unit test).

use half::bf16;

use super::gemm::{Epilogue, PackedLinear};
use super::{Disjoint, Isa, Parallel};

/// Output features per panel: two 16-lane vectors.
const NR: usize = 32;

/// Whether this CPU (within `runtime.isa`) runs the bf16 kernel.
pub fn available() -> bool {
    // `level` is `Avx512Bf16` only where the CPU has AVX-512 BF16 and `runtime.isa` allows it.
    Isa::level() == Isa::Avx512Bf16
}

/// `v` rounded to bf16 (nearest, ties to even), as its bits.
fn round(v: f32) -> u16 {
    bf16::from_f32(v).to_bits()
}

/// A weight matrix `[n × k]` (PyTorch `Linear` layout) in bf16, and its bias.
pub struct Bf16Linear {
    pub k: usize,
    pub n: usize,
    kernel: Kernel,
}

enum Kernel {
    /// `n_pad / 32` panels of `k/2 × 32 × 2` bf16 values; the bias padded to `n_pad`.
    Native { panels: Vec<u16>, bias: Vec<f32> },
    /// No AVX-512 BF16: the bf16-rounded weights on the f32 kernel.
    F32(PackedLinear),
}

impl Bf16Linear {
    /// Rounds `w` (`n × k`, row-major; `k` even) to bf16 and packs it for this CPU.
    pub fn new(w: &[f32], bias: &[f32], n: usize, k: usize) -> Result<Bf16Linear, String> {
        Self::build(w, bias, n, k, available())
    }

    fn build(w: &[f32], bias: &[f32], n: usize, k: usize, native: bool) -> Result<Bf16Linear, String> {
        if !k.is_multiple_of(2) || w.len() < n * k || bias.len() != n {
            return Err(format!("a bf16 layer needs an even input width (this one is {k} → {n})"));
        }
        if !native {
            let rounded: Vec<f32> = w[..n * k].iter().map(|v| bf16::from_bits(round(*v)).to_f32()).collect();
            return Ok(Bf16Linear { k, n, kernel: Kernel::F32(PackedLinear::new(&rounded, bias, n, k)) });
        }
        let n_pad = n.div_ceil(NR) * NR;
        let mut panels = vec![0u16; n_pad * k];
        for p in 0..n_pad / NR {
            let panel = &mut panels[p * k * NR..(p + 1) * k * NR];
            for j in 0..NR.min(n - p * NR) {
                let row = &w[(p * NR + j) * k..(p * NR + j + 1) * k];
                for pair in 0..k / 2 {
                    panel[pair * NR * 2 + j * 2] = round(row[2 * pair]);
                    panel[pair * NR * 2 + j * 2 + 1] = round(row[2 * pair + 1]);
                }
            }
        }
        let mut b = bias.to_vec();
        b.resize(n_pad, 0.0);
        Ok(Bf16Linear { k, n, kernel: Kernel::Native { panels, bias: b } })
    }

    /// Whether it runs on the `vdpbf16ps` kernel (else on the f32 fallback).
    pub fn native(&self) -> bool {
        matches!(self.kernel, Kernel::Native { .. })
    }

    /// `out[m × n] = epilogue(x[m × k] · wᵀ + bias)`; `acts` is the caller's buffer for the
    /// bf16 rows, reused across calls. Splits panels over `par`'s threads.
    pub fn forward(&self, x: &[f32], m: usize, out: &mut [f32], epilogue: Epilogue, acts: &mut Vec<u16>, par: &dyn Parallel) {
        assert!(x.len() >= m * self.k && out.len() >= m * self.n, "bf16 linear: shape mismatch");
        let (panels, bias) = match &self.kernel {
            Kernel::F32(l) => return l.forward(x, m, out, epilogue, par),
            Kernel::Native { panels, bias } => (panels, bias),
        };
        if m == 0 {
            return;
        }
        to_bf16(&x[..m * self.k], acts);
        let count = panels.len() / (self.k * NR);
        let out_ptr = Disjoint::new(out.as_mut_ptr());
        let acts = &acts[..];
        let run = |p: usize| {
            // SAFETY: panel p writes only columns p·32..(p+1)·32 (clipped to n) of `out`, which
            // holds m × n values (asserted); panels are disjoint. `Native` exists only where
            // `available()` found AVX-512 BF16.
            unsafe { self.panel(acts, m, p, panels, bias, out_ptr.get(), epilogue) };
        };
        if par.threads() > 1 && count > 1 && m * self.n * self.k >= 1 << 18 {
            par.for_each(count, &run);
        } else {
            (0..count).for_each(run);
        }
    }

    /// # Safety
    /// `out` holds `m × n` floats; `p` is a panel index; the CPU has AVX-512 BF16.
    #[allow(clippy::too_many_arguments)]
    unsafe fn panel(&self, acts: &[u16], m: usize, p: usize, panels: &[u16], bias: &[f32], out: *mut f32, e: Epilogue) {
        #[cfg(target_arch = "x86_64")]
        x86::panel(self.k, self.n, acts, m, &panels[p * self.k * NR..(p + 1) * self.k * NR], &bias[p * NR..(p + 1) * NR], p, out, e);
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("the bf16 kernel is built only on x86_64 (`available`)");
    }
}

/// Rounds `x` to bf16 into `acts` (grown as needed).
fn to_bf16(x: &[f32], acts: &mut Vec<u16>) {
    if acts.len() < x.len() {
        acts.resize(x.len(), 0);
    }
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: `available()` found AVX-512 BF16.
        unsafe { x86::round_rows(x, &mut acts[..x.len()]) };
        return;
    }
    for (a, v) in acts.iter_mut().zip(x) {
        *a = round(*v);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{round, Epilogue, NR};

    /// `vcvtne2ps2bf16` over whole vectors, the scalar rounding (the same: nearest, ties to
    /// even) on the tail.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn round_rows(x: &[f32], out: &mut [u16]) {
        let chunks = x.len() / 32;
        for c in 0..chunks {
            let lo = _mm512_loadu_ps(x.as_ptr().add(c * 32));
            let hi = _mm512_loadu_ps(x.as_ptr().add(c * 32 + 16));
            let packed: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
            _mm512_storeu_si512(out.as_mut_ptr().add(c * 32) as *mut _, packed);
        }
        for i in chunks * 32..x.len() {
            out[i] = round(x[i]);
        }
    }

    // The accumulators are a register tile indexed in lockstep with the rows.
    #[allow(clippy::needless_range_loop, clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn tile<const R: usize>(k: usize, n: usize, acts: &[u16], r0: usize, panel: &[u16], bias: &[f32], p: usize, out: *mut f32, e: Epilogue) {
        let b0 = _mm512_loadu_ps(bias.as_ptr());
        let b1 = _mm512_loadu_ps(bias.as_ptr().add(16));
        let mut acc = [[b0, b1]; R];
        // Each row's k values as k/2 pairs of bf16, one 32-bit word each.
        let rows = acts.as_ptr().add(r0 * k) as *const i32;
        let w = panel.as_ptr();
        for pair in 0..k / 2 {
            let w0: __m512bh = std::mem::transmute(_mm512_loadu_si512(w.add(pair * NR * 2) as *const _));
            let w1: __m512bh = std::mem::transmute(_mm512_loadu_si512(w.add(pair * NR * 2 + NR) as *const _));
            for r in 0..R {
                let a: __m512bh = std::mem::transmute(_mm512_set1_epi32(rows.add(r * k / 2 + pair).read_unaligned()));
                acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a, w0);
                acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a, w1);
            }
        }
        let mut buf = [0f32; NR];
        let cols = NR.min(n - p * NR);
        for r in 0..R {
            _mm512_storeu_ps(buf.as_mut_ptr(), acc[r][0]);
            _mm512_storeu_ps(buf.as_mut_ptr().add(16), acc[r][1]);
            for (j, v) in buf[..cols].iter().enumerate() {
                *out.add((r0 + r) * n + p * NR + j) = e.apply(*v);
            }
        }
    }

    /// One panel against every row, 12 rows at a time.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn panel(k: usize, n: usize, acts: &[u16], m: usize, panel: &[u16], bias: &[f32], p: usize, out: *mut f32, e: Epilogue) {
        let mut r0 = 0;
        while r0 < m {
            macro_rules! go {
                ($r:literal) => {{
                    tile::<$r>(k, n, acts, r0, panel, bias, p, out, e);
                    r0 += $r;
                }};
            }
            // The remainder in a few narrower tiles: the panel is in L1 by then.
            match m - r0 {
                12.. => go!(12),
                8..=11 => go!(8),
                4..=7 => go!(4),
                2 | 3 => go!(2),
                _ => go!(1),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::random_f32 as random;

    /// The kernel against its specification (bf16 products summed in f64), and the
    /// fallback against the same rounded weights.
    #[test]
    fn the_kernel_and_the_fallback_match_the_specification() {
        for (m, k, n) in [(1, 40, 7), (13, 70, 33), (25, 64, 96), (12, 384, 64), (3, 384, 1536)] {
            let x = random(m * k, 1);
            let w = random(n * k, 2);
            let b = random(n, 3);
            let r = |v: f32| bf16::from_bits(round(v)).to_f32() as f64;
            for native in [false, true] {
                if native && !available() {
                    eprintln!("no AVX-512 BF16 on this CPU: only the fallback is tested");
                    continue;
                }
                let l = Bf16Linear::build(&w, &b, n, k, native).unwrap();
                assert_eq!(l.native(), native);
                for e in [Epilogue::None, Epilogue::Gelu] {
                    for threads in [1, 2] {
                        let mut out = vec![f32::NAN; m * n];
                        let mut acts = Vec::new();
                        l.forward(&x, m, &mut out, e, &mut acts, &crate::cpu::Rayon(threads));
                        for i in 0..m {
                            for j in 0..n {
                                // The fallback keeps the activations in f32.
                                let xv = |t: usize| if native { r(x[i * k + t]) } else { x[i * k + t] as f64 };
                                let v = b[j] as f64 + (0..k).map(|t| xv(t) * r(w[j * k + t])).sum::<f64>();
                                let want = if e == Epilogue::Gelu { e.apply(v as f32) as f64 } else { v };
                                let got = out[i * n + j] as f64;
                                assert!((got - want).abs() < 1e-4 * (1.0 + want.abs()), "native {native} {e:?} ({i},{j}): {got} vs {want}");
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn rounding_is_to_nearest_even_on_every_path() {
        let x: Vec<f32> = random(100, 9).iter().map(|v| v * 1000.0).chain([1.0 + 1.0 / 256.0, 1.0 + 3.0 / 256.0, -0.0, 65504.0]).collect();
        let mut acts = Vec::new();
        to_bf16(&x, &mut acts);
        for (a, v) in acts.iter().zip(&x) {
            assert_eq!(*a, round(*v), "{v}");
        }
        assert_eq!(round(1.0 + 1.0 / 256.0), 0x3f80, "a tie rounds to the even neighbour");
    }
}
