//! GEMM on the CPU for our fused ops and the hand-written BERT encoder path
//! (`model/bert/fast.rs`): strided views and one call per product over the whole matrix,
//! using every core (the `gemm` crate over rayon's workers) unless the caller is already
//! inside a parallel loop.

use super::Real;

/// A strided matrix view: element (i, j) at `ptr + i·rs + j·cs`.
#[derive(Clone, Copy)]
pub(crate) struct View<T> {
    pub(crate) ptr: *const T,
    pub(crate) rs: isize,
    pub(crate) cs: isize,
}

impl<T> View<T> {
    /// A row-major block with row stride `ld`.
    pub(crate) fn rows(ptr: *const T, ld: usize) -> Self {
        View {
            ptr,
            rs: ld as isize,
            cs: 1,
        }
    }

    /// The transpose (no copy).
    pub(crate) fn t(self) -> Self {
        View {
            ptr: self.ptr,
            rs: self.cs,
            cs: self.rs,
        }
    }
}

/// dst (m × n at row stride `ld`) ← [dst +] alpha·a·b, a (m × k), b (k × n); over all of
/// rayon's threads when `parallel` (callers already inside a parallel loop pass false). An
/// empty product (k = 0) writes zeros, or leaves dst as it is when accumulating.
///
/// # Safety
/// `dst` must address m × n elements at row stride `ld` that nothing else touches during the
/// call, and `a`, `b` m × k and k × n readable elements at their strides.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_at<T: Real + 'static>(
    dst: *mut T,
    ld: usize,
    (m, n, k): (usize, usize, usize),
    a: View<T>,
    b: View<T>,
    alpha: T,
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
                unsafe { std::slice::from_raw_parts_mut(dst.add(i * ld), n).fill(T::zero()) };
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
            a.cs,
            a.rs,
            b.ptr,
            b.cs,
            b.rs,
            T::one(),
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
    fn gemm_at_matches_naive_with_transposes_and_accumulation() {
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
                View::rows(a.as_ptr(), m).t()
            } else {
                View::rows(a.as_ptr(), k)
            };
            let bv = if tb {
                View::rows(b.as_ptr(), k).t()
            } else {
                View::rows(b.as_ptr(), n)
            };
            // into a wider destination (row stride n + 3), then accumulated once more at 0.5
            let ld = n + 3;
            let mut c = vec![1f32; m * ld];
            for parallel in [false, true] {
                unsafe { gemm_at(c.as_mut_ptr(), ld, (m, n, k), av, bv, 1.0, false, parallel) };
                unsafe { gemm_at(c.as_mut_ptr(), ld, (m, n, k), av, bv, 0.5, true, parallel) };
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
