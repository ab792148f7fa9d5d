//! Dense Q4K matmul on tensor cores (`cuda/matmul.cu`): the rows packed once for every
//! weight, each weight read once per 8 or 16 rows. [`crate::matvec_many`] takes it from a few
//! rows on.

use std::ffi::c_void;

use candle_core::{CudaDevice, Result, quantized::QTensor};

use crate::ffi::zopilot_q4k_mma;
use crate::launch::{check, stream, weight_ptr};
use crate::mma::Packed;
use crate::pool::{Out, Q8Rows};

/// `x · wᵀ` for each `w` into `outs` (`[x.rows, n]` each, dtype code `code` as the mat-vec's).
pub(crate) fn matmul(
    dev: &CudaDevice,
    ws: &[&QTensor],
    x: &Q8Rows,
    outs: &[(usize, Out)],
    code: i32,
) -> Result<()> {
    let k = x.k;
    // Tensor cores: the rows packed once for every weight, each weight read once per
    // 8 or 16 rows.
    let nt = if x.rows <= 8 { 8 } else { 16 };
    let packed = Packed::rows(dev, x, nt)?;
    let (pq, pf) = packed.ptrs();
    for (w, (n, out)) in ws.iter().zip(outs) {
        let status = unsafe {
            zopilot_q4k_mma(
                weight_ptr(w)?,
                *n as i32,
                k as i32,
                x.rows as i32,
                nt as i32,
                pq,
                pf,
                out.ptr() as *mut c_void,
                code,
                stream(dev),
            )
        };
        check(status, "zopilot mma matmul")?;
    }
    Ok(())
}
