//! One decode token's attention (`cuda/attention.cu`): rotary embedding and the paged-cache
//! write in one launch, and split-context attention over the paged KV cache with them fused in.

use std::ffi::c_void;

use candle_core::{DType, Result, Tensor};

use crate::ffi::{zopilot_decode_attention, zopilot_rope_cache};
use crate::launch::{check, cuda_dev, half_dtype_code, stream, tensor_ptr};
use crate::pool::{Out, Q8Rows, Scratch};

/// One decode token's attention inputs in one kernel: q `[1, qh, 1, d]` rotated in place and
/// `rope.k` rotated (candle's GPT-NeoX `rope`, the same arithmetic) with the position's
/// `cos`/`sin` rows, then k and v written into the paged cache at the slot as paged attention's
/// `reshape_and_cache` writes them (key cache `[blocks, kvh, d/x, block_size, x]`, x = 16 bytes
/// of the dtype; value cache `[blocks, kvh, d, block_size]`). bf16 or f16, cache in the same
/// dtype.
pub fn rope_cache_decode(
    q: &Tensor,
    rope: &DecodeRope<'_>,
    key_cache: &Tensor,
    value_cache: &Tensor,
) -> Result<()> {
    let dev = cuda_dev(q)?;
    let dtype = half_dtype_code(q.dtype(), "rope_cache_decode")?;
    rope.check(q, key_cache, value_cache)?;
    let DecodeRope {
        k,
        v,
        cos,
        sin,
        slot_mapping,
    } = *rope;
    let (_, qh, _, d) = q.dims4()?;
    let (_, kvh, _, _) = k.dims4()?;
    let (_, _, _, block_size, _) = key_cache.dims5()?;
    let ptr = |t: &Tensor| tensor_ptr(t).map(|p| p as *mut c_void);
    // SAFETY: every pointer is a contiguous CUDA tensor checked above to have the shape the
    // kernel indexes (q is rotated in place; the caches are written at one slot).
    let code = unsafe {
        zopilot_rope_cache(
            ptr(q)?,
            ptr(k)?,
            ptr(v)?,
            ptr(cos)?,
            ptr(sin)?,
            qh as i32,
            kvh as i32,
            d as i32,
            tensor_ptr(slot_mapping)? as *const i64,
            block_size as i32,
            ptr(key_cache)?,
            ptr(value_cache)?,
            dtype,
            stream(&dev),
        )
    };
    check(code, "rope_cache_decode")
}

/// One token's rotary-embedding inputs for [`rope_cache_decode`] or, fused, for
/// [`decode_attention`]: k and v `[1, kvh, 1, d]` before rotation, the position's `cos` / `sin`
/// rows (`[1, d / 2]`, NeoX halves), and the token's cache slot (one i64).
pub struct DecodeRope<'a> {
    pub k: &'a Tensor,
    pub v: &'a Tensor,
    pub cos: &'a Tensor,
    pub sin: &'a Tensor,
    pub slot_mapping: &'a Tensor,
}

impl DecodeRope<'_> {
    /// Shapes and dtypes as the kernels index them, against q `[1, qh, 1, d]` and the paged
    /// caches (key `[blocks, kvh, d / x, block_size, x]`, value `[blocks, kvh, d, block_size]`).
    fn check(&self, q: &Tensor, key_cache: &Tensor, value_cache: &Tensor) -> Result<()> {
        let (b, _, s, d) = q.dims4()?;
        let (kb, kvh, ks, kd) = self.k.dims4()?;
        let (nb, ckvh, dx, block_size, x) = key_cache.dims5()?;
        let x_want = 16 / q.dtype().size_in_bytes();
        if (b, s, kb, ks, kd) != (1, 1, 1, 1, d)
            || self.v.dims4()? != (1, kvh, 1, d)
            || self.cos.dims2()? != (1, d / 2)
            || self.sin.dims2()? != (1, d / 2)
            || (ckvh, dx * x, x) != (kvh, d, x_want)
            || value_cache.dims4()? != (nb, kvh, d, block_size)
            || self.slot_mapping.elem_count() != 1
            || self.slot_mapping.dtype() != DType::I64
            || [self.k, self.v, self.cos, self.sin, key_cache, value_cache]
                .iter()
                .any(|t| t.dtype() != q.dtype())
        {
            candle_core::bail!(
                "decode rope: shapes q {:?} k {:?} v {:?} cos {:?} cache {:?}/{:?} slots {:?}",
                q.shape(),
                self.k.shape(),
                self.v.shape(),
                self.cos.shape(),
                key_cache.shape(),
                value_cache.shape(),
                self.slot_mapping.shape()
            );
        }
        Ok(())
    }
}

/// One sequence's decode attention over its paged KV cache (split over the context in
/// 64-token partitions, then merged): q `[1, qh, 1, 128]`, the caches as [`rope_cache_decode`]
/// writes them (block size a multiple of 8), `block_table` the sequence's u32 cache blocks
/// (`[1, max_blocks]`), `ctx` its length including this token. With `rope`, q and the token's
/// k / v are not yet rotated: the kernel does what [`rope_cache_decode`] would (q rotated in
/// its own copy, k / v into the caches) in the same launch; without, q is rotated and the token
/// cached. Returns `[1, qh, 128]` in q's dtype and, with `quantize`, the same row (`qh · 128`
/// values) quantized for the o_proj mat-vec — what [`quantize`](crate::quantize()) of the returned tensor would
/// give, without its launch.
#[allow(clippy::too_many_arguments)]
pub fn decode_attention(
    q: &Tensor,
    rope: Option<&DecodeRope<'_>>,
    key_cache: &Tensor,
    value_cache: &Tensor,
    block_table: &Tensor,
    ctx: usize,
    scale: f32,
    quantize: bool,
) -> Result<(Tensor, Option<Q8Rows>)> {
    let dev = cuda_dev(q)?;
    let dtype = half_dtype_code(q.dtype(), "decode_attention")?;
    let (b, qh, s, d) = q.dims4()?;
    let (nb, kvh, dx, block_size, x) = key_cache.dims5()?;
    let (_, max_blocks) = block_table.dims2()?;
    if (b, s, d, dx * x, x) != (1, 1, 128, d, 16 / q.dtype().size_in_bytes())
        || value_cache.dims4()? != (nb, kvh, d, block_size)
        || qh % kvh != 0
        || ![1, 2, 4, 8].contains(&(qh / kvh))
        || block_table.dtype() != DType::U32
        || ctx == 0
        || ctx > max_blocks * block_size
        || block_size % 8 != 0
        || key_cache.dtype() != q.dtype()
        || value_cache.dtype() != q.dtype()
    {
        candle_core::bail!(
            "decode_attention: q {:?} cache {:?}/{:?} block table {:?} ctx {ctx}",
            q.shape(),
            key_cache.shape(),
            value_cache.shape(),
            block_table.shape()
        );
    }
    if let Some(r) = rope {
        r.check(q, key_cache, value_cache)?;
    }
    let parts = ctx.div_ceil(64);
    // Written in full by the partition kernel before the merge reads it.
    let part = Scratch::alloc(&dev, kvh * parts * (qh / kvh) * (d + 2) * 4)?;
    let out = Out::alloc(&dev, q.dtype(), qh * d)?;
    let q8 = if quantize {
        Some(Q8Rows::alloc(&dev, 1, qh * d)?)
    } else {
        None
    };
    let (oq, od, os) = q8.as_ref().map_or(
        (
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        ),
        |x| x.ptrs(0),
    );
    let opt = |t: Option<&Tensor>| {
        t.map_or(Ok(std::ptr::null()), |t| {
            tensor_ptr(t).map(|p| p as *const c_void)
        })
    };
    // SAFETY: shapes checked above; every pointer is a contiguous CUDA buffer of them (the
    // quantized row: qh · d values, null when not asked for; the rope inputs null without
    // `rope`, and the caches written at one slot with it).
    let code = unsafe {
        zopilot_decode_attention(
            tensor_ptr(q)? as *const c_void,
            opt(rope.map(|r| r.k))?,
            opt(rope.map(|r| r.v))?,
            opt(rope.map(|r| r.cos))?,
            opt(rope.map(|r| r.sin))?,
            opt(rope.map(|r| r.slot_mapping))? as *const i64,
            tensor_ptr(key_cache)? as *mut c_void,
            tensor_ptr(value_cache)? as *mut c_void,
            tensor_ptr(block_table)? as *const u32,
            ctx as i32,
            block_size as i32,
            qh as i32,
            kvh as i32,
            scale,
            part.ptr() as *mut f32,
            out.ptr() as *mut c_void,
            oq,
            od,
            os,
            dtype,
            stream(&dev),
        )
    };
    check(code, "decode_attention")?;
    Ok((out.into_tensor(&dev, qh, d).reshape((1, qh, d))?, q8))
}
