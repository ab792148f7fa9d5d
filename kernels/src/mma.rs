//! Activation rows packed for the tensor-core kernels (`cuda/mma.cuh`'s layout): all rows in
//! chunks for the dense matmul, or chunk by chunk of a grouped MoE plan.

use std::ffi::c_void;

use candle_core::{CudaDevice, Result, cuda_backend::cudarc::driver::CudaSlice};

use crate::ffi::{zopilot_moe_pack, zopilot_q4k_pack_rows};
use crate::launch::{check, slice_ptr, stream};
use crate::moe_grouped::GroupPlan;
use crate::pool::Q8Rows;

/// Activation rows packed per chunk for the grouped expert kernels.
pub(crate) struct Packed {
    pub(crate) q: CudaSlice<i8>,
    pub(crate) f: CudaSlice<f32>,
}

impl Packed {
    /// Uninitialised room for `slots` rows of `k` values (the pack kernels fill it).
    pub(crate) fn alloc(dev: &CudaDevice, slots: usize, k: usize) -> Result<Self> {
        Ok(Self {
            q: unsafe { dev.alloc::<i8>(slots * k)? },
            f: unsafe { dev.alloc::<f32>(slots * k / 64 * 4)? },
        })
    }

    /// Packs all of `x`'s rows in chunks of `nt` (8 or 16) for the dense matmul.
    pub(crate) fn rows(dev: &CudaDevice, x: &Q8Rows, nt: usize) -> Result<Self> {
        let packed = Self::alloc(dev, x.rows.div_ceil(nt) * nt, x.k)?;
        let (q, d, s) = x.ptrs(0);
        let code = unsafe {
            zopilot_q4k_pack_rows(
                q,
                d,
                s,
                x.rows as i32,
                x.k as i32,
                nt as i32,
                slice_ptr(&packed.q) as *mut i8,
                slice_ptr(&packed.f) as *mut c_void,
                stream(dev),
            )
        };
        check(code, "zopilot pack rows")?;
        Ok(packed)
    }

    /// Packs `x`'s rows (token rows when `div` = top-k, pair rows when 1) chunk by chunk.
    pub(crate) fn new(dev: &CudaDevice, x: &Q8Rows, plan: &GroupPlan, div: usize) -> Result<Self> {
        let packed = Self::alloc(dev, plan.max_chunks * plan.nt, x.k)?;
        let (q, d, s) = x.ptrs(0);
        let code = unsafe {
            zopilot_moe_pack(
                q,
                d,
                s,
                slice_ptr(&plan.order) as *const i32,
                slice_ptr(&plan.chunks) as *const c_void,
                plan.max_chunks as i32,
                plan.nt as i32,
                div as i32,
                x.k as i32,
                slice_ptr(&packed.q) as *mut i8,
                slice_ptr(&packed.f) as *mut c_void,
                stream(dev),
            )
        };
        check(code, "zopilot moe pack")?;
        Ok(packed)
    }

    pub(crate) fn ptrs(&self) -> (*const i8, *const c_void) {
        (
            slice_ptr(&self.q) as *const i8,
            slice_ptr(&self.f) as *const c_void,
        )
    }
}
