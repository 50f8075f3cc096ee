//! Dense layers with weights packed once, at load: `out = epilogue(x · wᵀ + bias)`.
//!
//! A general GEMM packs its right-hand side on every call; for an encoder the right-hand
//! side is a weight matrix that never changes, and measured on a single sentence the
//! packing was 59% of the forward pass. Here each weight matrix is packed once into panels
//! of NR output features (`[K][NR]`, k-major), and a register-tiled microkernel streams a
//! panel against MR activation rows: MR × NR accumulators stay in registers over the whole
//! K loop, each weight vector is loaded once per MR rows, each activation is broadcast from
//! memory into the multiply-add. The bias seeds the accumulators and GELU is applied as they
//! are stored (fused epilogue). AVX-512 tiles are 12 × 32, AVX2 6 × 16; a portable loop is
//! the specification.

use super::math::{gelu, gelu_tanh};
use super::Isa;

/// What happens to each output as it is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Epilogue {
    None,
    Gelu,
    GeluTanh,
}

impl Epilogue {
    /// The epilogue on one output value (the f32 and bf16 kernels apply it as they store).
    #[inline(always)]
    pub(crate) fn apply(self, v: f32) -> f32 {
        match self {
            Epilogue::None => v,
            Epilogue::Gelu => gelu(v),
            Epilogue::GeluTanh => gelu_tanh(v),
        }
    }
}

/// A weight matrix `[n × k]` (PyTorch `Linear` layout) and bias, packed for the microkernel.
pub struct PackedLinear {
    pub k: usize,
    pub n: usize,
    nr: usize,
    isa: Isa,
    /// `n_pad / nr` panels of `k × nr`.
    panels: Vec<f32>,
    /// Bias padded to `n_pad`.
    bias: Vec<f32>,
}

impl PackedLinear {
    /// Packs `w` (`n × k`, row-major) and `bias` (`n`) for this CPU's microkernel.
    pub fn new(w: &[f32], bias: &[f32], n: usize, k: usize) -> PackedLinear {
        Self::for_isa(w, bias, n, k, Isa::detect())
    }

    /// Packs for a given instruction set (tests use every one).
    pub fn for_isa(w: &[f32], bias: &[f32], n: usize, k: usize, isa: Isa) -> PackedLinear {
        assert!(w.len() >= n * k && bias.len() == n);
        let nr = match isa {
            Isa::Avx512 => 32,
            _ => 16,
        };
        let n_pad = n.div_ceil(nr) * nr;
        let mut panels = vec![0f32; n_pad * k];
        for p in 0..n_pad / nr {
            let panel = &mut panels[p * k * nr..(p + 1) * k * nr];
            for j in 0..nr {
                let col = p * nr + j;
                if col >= n {
                    continue;
                }
                for kk in 0..k {
                    panel[kk * nr + j] = w[col * k + kk];
                }
            }
        }
        let mut b = bias.to_vec();
        b.resize(n_pad, 0.0);
        PackedLinear { k, n, nr, isa, panels, bias: b }
    }

    /// `out[m × n] = epilogue(x[m × k] · wᵀ + bias)`; splits panels over `par`'s threads.
    pub fn forward(&self, x: &[f32], m: usize, out: &mut [f32], epilogue: Epilogue, par: &dyn super::Parallel) {
        assert!(x.len() >= m * self.k && out.len() >= m * self.n, "packed linear: shape mismatch");
        if m == 0 {
            return;
        }
        let panels = self.panels.len() / (self.k * self.nr);
        let out_ptr = super::Disjoint::new(out.as_mut_ptr()); // tasks write disjoint columns
        let run = |p: usize| {
            // SAFETY: panel p writes only columns p·nr..(p+1)·nr (clipped to n) of `out`,
            // which holds m × n values (asserted); panels are disjoint.
            unsafe { self.panel(x, m, p, out_ptr.get(), epilogue) };
        };
        if par.threads() > 1 && panels > 1 && m * self.n * self.k >= 1 << 18 {
            par.for_each(panels, &run);
        } else {
            (0..panels).for_each(run);
        }
    }

    /// # Safety
    /// `out` holds `m × n` floats; `p` is a panel index.
    unsafe fn panel(&self, x: &[f32], m: usize, p: usize, out: *mut f32, e: Epilogue) {
        match self.isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => x86::panel_avx512(self, x, m, p, out, e),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => x86::panel_avx2(self, x, m, p, out, e),
            _ => self.panel_portable(x, m, p, out, e),
        }
    }

    /// The specification.
    unsafe fn panel_portable(&self, x: &[f32], m: usize, p: usize, out: *mut f32, e: Epilogue) {
        let (k, nr) = (self.k, self.nr);
        let panel = &self.panels[p * k * nr..(p + 1) * k * nr];
        for r in 0..m {
            for j in 0..nr {
                let col = p * nr + j;
                if col >= self.n {
                    break;
                }
                let mut acc = self.bias[col];
                for kk in 0..k {
                    acc = x[r * k + kk].mul_add(panel[kk * nr + j], acc);
                }
                *out.add(r * self.n + col) = e.apply(acc);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Epilogue, PackedLinear};

    /// Stores `R × 2` vectors of `W` lanes to rows of `out`, columns `col..col + 2W`, applying
    /// the epilogue and clipping at `n`.
    #[inline(always)]
    unsafe fn store<const W: usize>(vals: &[f32], out: *mut f32, n: usize, row: usize, col: usize, e: Epilogue) {
        for (j, v) in vals.iter().enumerate() {
            if col + j < n {
                *out.add(row * n + col + j) = e.apply(*v);
            }
        }
    }

    // The accumulators are a register tile indexed in lockstep with the rows' pointers.
    #[allow(clippy::needless_range_loop)]
    #[inline(always)]
    unsafe fn tile512<const R: usize>(l: &PackedLinear, x: &[f32], r0: usize, p: usize, out: *mut f32, e: Epilogue) {
        let k = l.k;
        let panel = l.panels.as_ptr().add(p * k * 32);
        let b0 = _mm512_loadu_ps(l.bias.as_ptr().add(p * 32));
        let b1 = _mm512_loadu_ps(l.bias.as_ptr().add(p * 32 + 16));
        let mut acc = [[b0, b1]; R];
        let xp = x.as_ptr().add(r0 * k);
        for kk in 0..k {
            let w0 = _mm512_loadu_ps(panel.add(kk * 32));
            let w1 = _mm512_loadu_ps(panel.add(kk * 32 + 16));
            for r in 0..R {
                let a = _mm512_set1_ps(*xp.add(r * k + kk));
                acc[r][0] = _mm512_fmadd_ps(a, w0, acc[r][0]);
                acc[r][1] = _mm512_fmadd_ps(a, w1, acc[r][1]);
            }
        }
        let mut buf = [0f32; 32];
        for r in 0..R {
            _mm512_storeu_ps(buf.as_mut_ptr(), acc[r][0]);
            _mm512_storeu_ps(buf.as_mut_ptr().add(16), acc[r][1]);
            store::<16>(&buf, out, l.n, r0 + r, p * 32, e);
        }
    }

    #[allow(clippy::needless_range_loop)]
    #[inline(always)]
    unsafe fn tile256<const R: usize>(l: &PackedLinear, x: &[f32], r0: usize, p: usize, out: *mut f32, e: Epilogue) {
        let k = l.k;
        let panel = l.panels.as_ptr().add(p * k * 16);
        let b0 = _mm256_loadu_ps(l.bias.as_ptr().add(p * 16));
        let b1 = _mm256_loadu_ps(l.bias.as_ptr().add(p * 16 + 8));
        let mut acc = [[b0, b1]; R];
        let xp = x.as_ptr().add(r0 * k);
        for kk in 0..k {
            let w0 = _mm256_loadu_ps(panel.add(kk * 16));
            let w1 = _mm256_loadu_ps(panel.add(kk * 16 + 8));
            for r in 0..R {
                let a = _mm256_set1_ps(*xp.add(r * k + kk));
                acc[r][0] = _mm256_fmadd_ps(a, w0, acc[r][0]);
                acc[r][1] = _mm256_fmadd_ps(a, w1, acc[r][1]);
            }
        }
        let mut buf = [0f32; 16];
        for r in 0..R {
            _mm256_storeu_ps(buf.as_mut_ptr(), acc[r][0]);
            _mm256_storeu_ps(buf.as_mut_ptr().add(8), acc[r][1]);
            store::<8>(&buf, out, l.n, r0 + r, p * 16, e);
        }
    }

    macro_rules! panel_fn {
        ($name:ident, $tile:ident, $mr:literal, $features:literal) => {
            #[target_feature(enable = $features)]
            pub(super) unsafe fn $name(l: &PackedLinear, x: &[f32], m: usize, p: usize, out: *mut f32, e: Epilogue) {
                let mut r0 = 0;
                while r0 < m {
                    let left = m - r0;
                    macro_rules! go {
                        ($r:literal) => {{
                            $tile::<$r>(l, x, r0, p, out, e);
                            r0 += $r;
                        }};
                    }
                    if left >= $mr {
                        go!($mr)
                    } else {
                        match left {
                            1 => go!(1),
                            2 => go!(2),
                            3 => go!(3),
                            4 => go!(4),
                            5 => go!(5),
                            6 => go!(6),
                            7 => go!(7),
                            8 => go!(8),
                            9 => go!(9),
                            10 => go!(10),
                            _ => go!(11),
                        }
                    }
                }
            }
        };
    }

    panel_fn!(panel_avx512, tile512, 12, "avx512f,avx2,fma");
    panel_fn!(panel_avx2, tile256, 6, "avx2,fma");
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::cpu::random_f32 as random;

    #[test]
    fn every_isa_matches_the_naive_product() {
        let mut isas = vec![Isa::Portable];
        if Isa::detect() != Isa::Portable {
            isas.push(Isa::Avx2);
        }
        if Isa::detect() == Isa::Avx512 {
            isas.push(Isa::Avx512);
        }
        for (m, k, n) in [(1, 40, 7), (13, 70, 33), (25, 64, 96), (12, 384, 64)] {
            let x = random(m * k, 1);
            let w = random(n * k, 2);
            let b = random(n, 3);
            for &isa in &isas {
                for e in [Epilogue::None, Epilogue::Gelu] {
                    let l = PackedLinear::for_isa(&w, &b, n, k, isa);
                    for threads in [1, 2] {
                        let mut out = vec![f32::NAN; m * n];
                        l.forward(&x, m, &mut out, e, &crate::cpu::Rayon(threads));
                        for i in 0..m {
                            for j in 0..n {
                                let v = b[j] as f64 + (0..k).map(|t| x[i * k + t] as f64 * w[j * k + t] as f64).sum::<f64>();
                                let want = if e == Epilogue::Gelu { e.apply(v as f32) as f64 } else { v };
                                assert!((out[i * n + j] as f64 - want).abs() < 1e-4, "{isa:?} {e:?} ({i},{j})");
                            }
                        }
                    }
                }
            }
        }
    }
}
