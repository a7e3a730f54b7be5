//! f32 GEMM on the CPU for the hand-written BERT encoder path (`model/bert/fast.rs`): one call
//! per product over the whole matrix, from one thread, using every core (the `gemm` crate
//! over rayon's workers).

/// A strided f32 matrix view: element (i, j) at `ptr + i·rs + j·cs`.
#[derive(Clone, Copy)]
pub(crate) struct Mat {
    pub(crate) ptr: *const f32,
    pub(crate) rs: usize,
    pub(crate) cs: usize,
}

impl Mat {
    /// A row-major block with row stride `ld`.
    pub(crate) fn rows(ptr: *const f32, ld: usize) -> Self {
        Mat { ptr, rs: ld, cs: 1 }
    }

    /// The transpose (no copy).
    pub(crate) fn t(self) -> Self {
        Mat {
            ptr: self.ptr,
            rs: self.cs,
            cs: self.rs,
        }
    }
}

/// dst (m × n, row stride `ld`) ← [dst +] alpha·a·b, a (m × k), b (k × n); over all of rayon's
/// threads when `parallel` (callers already inside a parallel loop pass false).
///
/// # Safety
/// `dst` must address m × n elements at row stride `ld` that nothing else touches during the
/// call, and `a`, `b` m × k and k × n readable elements at their strides.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn sgemm(
    dst: *mut f32,
    ld: usize,
    (m, n, k): (usize, usize, usize),
    a: Mat,
    b: Mat,
    alpha: f32,
    accumulate: bool,
    parallel: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                // SAFETY: row i of dst, as the caller promises.
                unsafe { std::slice::from_raw_parts_mut(dst.add(i * ld), n).fill(0.0) };
            }
        }
        return;
    }
    let threads = if parallel { super::cpu_threads() } else { 1 };
    let par = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the caller's contract above.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            ld as isize,
            accumulate,
            a.ptr,
            a.cs as isize,
            a.rs as isize,
            b.ptr,
            b.cs as isize,
            b.rs as isize,
            1.0,
            alpha,
            false,
            false,
            false,
            par,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], b: &[f32], m: usize, n: usize, k: usize, ta: bool, tb: bool) -> Vec<f32> {
        let mut c = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0f64;
                for l in 0..k {
                    let x = if ta { a[l * m + i] } else { a[i * k + l] };
                    let y = if tb { b[j * k + l] } else { b[l * n + j] };
                    s += x as f64 * y as f64;
                }
                c[i * n + j] = s as f32;
            }
        }
        c
    }

    #[test]
    fn sgemm_matches_naive_with_transposes_and_accumulation() {
        let (m, n, k) = (37, 29, 41);
        let a: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7 % 13) as f32 - 6.0) / 5.0)
            .collect();
        let b: Vec<f32> = (0..k * n)
            .map(|i| ((i * 5 % 11) as f32 - 5.0) / 4.0)
            .collect();
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let want = naive(&a, &b, m, n, k, ta, tb);
            let av = if ta {
                Mat::rows(a.as_ptr(), m).t()
            } else {
                Mat::rows(a.as_ptr(), k)
            };
            let bv = if tb {
                Mat::rows(b.as_ptr(), k).t()
            } else {
                Mat::rows(b.as_ptr(), n)
            };
            // into a wider destination (row stride n + 3), then accumulated once more at 0.5
            let ld = n + 3;
            let mut c = vec![1f32; m * ld];
            for parallel in [false, true] {
                unsafe { sgemm(c.as_mut_ptr(), ld, (m, n, k), av, bv, 1.0, false, parallel) };
                unsafe { sgemm(c.as_mut_ptr(), ld, (m, n, k), av, bv, 0.5, true, parallel) };
                for i in 0..m {
                    for j in 0..n {
                        let (got, w) = (c[i * ld + j], 1.5 * want[i * n + j]);
                        assert!((got - w).abs() < 1e-4 * (1.0 + w.abs()), "{ta} {tb}");
                    }
                    assert_eq!(c[i * ld + n], 1.0, "padding untouched");
                }
            }
        }
    }
}
