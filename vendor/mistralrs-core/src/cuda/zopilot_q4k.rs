//! zopilot-gpu patch: safe wrappers over `zopilot_q4k.cu`'s Q4K decode kernels (activation
//! quantization, the fused Mixtral expert pair w1‖w3·SiLU and w2 with the weighted sum per
//! (token, expert) pair, the same grouped by expert on tensor cores for a few dozen tokens,
//! and a mat-vec for up to 8 tokens). Every wrapper checks shapes and types and returns an
//! error on a shape it does not take; callers decide when a kernel applies with
//! [`q4k_applies`].
#![cfg(feature = "cuda")]

use std::ffi::c_void;

use crate::models::mixtral_stacked_moe::{env_usize, switch_on};
use candle_core::{
    cuda_backend::{
        cudarc::driver::{CudaSlice, DevicePtr},
        CudaStorageSlice,
    },
    quantized::{GgmlDType, QTensor},
    CudaDevice, CudaStorage, DType, Device, Result, Shape, Storage, Tensor,
};

extern "C" {
    fn zopilot_set_pdl(on: i32) -> i32;
    fn zopilot_spin(us: i32, stream: i64) -> i32;
    fn zopilot_decode_attention(
        q: *const c_void,
        k: *const c_void,
        v: *const c_void,
        cos: *const c_void,
        sin: *const c_void,
        slot_mapping: *const i64,
        key_cache: *mut c_void,
        value_cache: *mut c_void,
        block_table: *const u32,
        ctx: i32,
        block_size: i32,
        qh: i32,
        kvh: i32,
        scale: f32,
        part: *mut f32,
        out: *mut c_void,
        oq: *mut i8,
        od: *mut f32,
        os: *mut f32,
        dtype: i32,
        stream: i64,
    ) -> i32;
    fn zopilot_rope_cache(
        q: *mut c_void,
        k: *const c_void,
        v: *const c_void,
        cos: *const c_void,
        sin: *const c_void,
        qh: i32,
        kvh: i32,
        d: i32,
        slot_mapping: *const i64,
        block_size: i32,
        key_cache: *mut c_void,
        value_cache: *mut c_void,
        dtype: i32,
        stream: i64,
    ) -> i32;
    fn zopilot_q8_quantize(
        x: *const c_void,
        dtype: i32,
        stride: i64,
        rows: i32,
        k: i32,
        q: *mut i8,
        d: *mut f32,
        s: *mut f32,
        stream: i64,
    ) -> i32;
    fn zopilot_moe_w13_silu(
        w1: *const c_void,
        w3: *const c_void,
        ids: *const u32,
        pairs: i32,
        topk: i32,
        xq: *const i8,
        xd: *const f32,
        xs: *const f32,
        n: i32,
        k: i32,
        aq: *mut i8,
        ad: *mut f32,
        as_: *mut f32,
        stream: i64,
    ) -> i32;
    fn zopilot_moe_w2(
        w2: *const c_void,
        ids: *const u32,
        topw: *const f32,
        tokens: i32,
        topk: i32,
        aq: *const i8,
        ad: *const f32,
        as_: *const f32,
        n: i32,
        k: i32,
        resid: *const c_void,
        out: *mut c_void,
        dtype: i32,
        stream: i64,
    ) -> i32;
    fn zopilot_q4k_matvec(
        w: *const *const c_void,
        n: *const i32,
        out: *const *mut c_void,
        count: i32,
        k: i32,
        xq: *const i8,
        xd: *const f32,
        xs: *const f32,
        tokens: i32,
        dtype: i32,
        stream: i64,
    ) -> i32;
    fn zopilot_q4k_dequant_f16(src: *const c_void, dst: *mut c_void, nblocks: i64, stream: i64) -> i32;
    fn zopilot_router_topk(
        w: *const c_void,
        experts: i32,
        k: i32,
        xq: *const i8,
        xd: *const f32,
        xs: *const f32,
        tokens: i32,
        topk: i32,
        round: i32,
        ids: *mut u32,
        weights: *mut f32,
        stream: i64,
    ) -> i32;
    fn zopilot_moe_plan(
        ids: *const u32,
        pairs: i32,
        experts: i32,
        nt: i32,
        max_chunks: i32,
        order: *mut i32,
        chunks: *mut c_void,
        stream: i64,
    ) -> i32;
    fn zopilot_moe_pack(
        q: *const i8,
        d: *const f32,
        s: *const f32,
        order: *const i32,
        chunks: *const c_void,
        max_chunks: i32,
        nt: i32,
        div: i32,
        k: i32,
        pq: *mut i8,
        pf: *mut c_void,
        stream: i64,
    ) -> i32;
    fn zopilot_moe_w13_mma(
        w1: *const c_void,
        w3: *const c_void,
        order: *const i32,
        chunks: *const c_void,
        max_chunks: i32,
        nt: i32,
        topk: i32,
        pq: *const i8,
        pf: *const c_void,
        n: i32,
        k: i32,
        aq: *mut i8,
        ad: *mut f32,
        as_: *mut f32,
        stream: i64,
    ) -> i32;
    fn zopilot_moe_w2_mma(
        w2: *const c_void,
        order: *const i32,
        chunks: *const c_void,
        max_chunks: i32,
        nt: i32,
        topk: i32,
        pq: *const i8,
        pf: *const c_void,
        n: i32,
        k: i32,
        y: *mut f32,
        stream: i64,
    ) -> i32;
    fn zopilot_moe_combine(
        y: *const f32,
        topw: *const f32,
        tokens: i32,
        topk: i32,
        n: i32,
        resid: *const c_void,
        out: *mut c_void,
        dtype: i32,
        stream: i64,
    ) -> i32;
    fn zopilot_q4k_pack_rows(
        q: *const i8,
        d: *const f32,
        s: *const f32,
        rows: i32,
        k: i32,
        nt: i32,
        pq: *mut i8,
        pf: *mut c_void,
        stream: i64,
    ) -> i32;
    fn zopilot_q4k_mma(
        w: *const c_void,
        n: i32,
        k: i32,
        rows: i32,
        nt: i32,
        pq: *const i8,
        pf: *const c_void,
        out: *mut c_void,
        dtype: i32,
        stream: i64,
    ) -> i32;
    fn zopilot_rmsnorm_quantize(
        x: *const c_void,
        resid: *const c_void,
        h_out: *mut c_void,
        alpha: *const c_void,
        rows: i32,
        k: i32,
        eps: f32,
        dtype: i32,
        q: *mut i8,
        d: *mut f32,
        s: *mut f32,
        router: *const c_void,
        experts: i32,
        topk: i32,
        ids: *mut u32,
        weights: *mut f32,
        stream: i64,
    ) -> i32;
}

/// Most tokens one mat-vec launch takes.
pub(crate) const MATVEC_MAX_TOKENS: usize = 8;
/// From this many rows [`matvec_many`] multiplies on tensor cores (`ZOPILOT_MMA_MIN_TOKENS`
/// overrides; default 3).
fn mma_min_tokens() -> usize {
    static N: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *N.get_or_init(|| env_usize("ZOPILOT_MMA_MIN_TOKENS").unwrap_or(3))
}

/// The tensor-core kernels (grouped experts, dense matmul) are on unless `ZOPILOT_MMA=0`
/// (the dp4a mat-vec and the host-routed grouped path then, for comparison).
pub(crate) fn mma_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| switch_on("ZOPILOT_MMA"))
}

/// Device scratch that goes back to a small per-thread pool when dropped instead of being
/// freed, and is taken from it by the next request of the same size on the same stream. Our
/// scratch (quantized activations, attention partials) is only ever touched by kernels on the
/// device's one stream, so a buffer dropped once its last use is queued can back the next
/// request: stream order puts that use before any later kernel's writes. A one-token step
/// makes about a hundred such requests; each pooled one saves a `cuMemAllocAsync` /
/// `cuMemFreeAsync` pair of host time, which at batch 1 is time the GPU waits for launches.
struct Scratch(Option<CudaSlice<u8>>);

thread_local! {
    static SCRATCH_POOL: std::cell::RefCell<Vec<CudaSlice<u8>>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// Most buffers the pool keeps per thread, and the largest it keeps (a prompt's activations
/// are freed as usual): at most 64 MiB of device memory held, where a one-token step reuses
/// about five buffers of a few KB to 40 KB.
const SCRATCH_POOL_MAX: usize = 16;
const SCRATCH_POOL_MAX_BYTES: usize = 4 << 20;

impl Scratch {
    /// `bytes` of uninitialised device memory (our kernels fill them).
    fn alloc(dev: &CudaDevice, bytes: usize) -> Result<Self> {
        let stream = dev.cuda_stream();
        let pooled = SCRATCH_POOL
            .try_with(|p| {
                let mut p = p.borrow_mut();
                let i = p
                    .iter()
                    .rposition(|b| b.len() == bytes && std::sync::Arc::ptr_eq(b.stream(), &stream))?;
                Some(p.swap_remove(i))
            })
            .ok()
            .flatten();
        match pooled {
            Some(b) => Ok(Self(Some(b))),
            // SAFETY: uninitialised bytes, written by our kernels before they are read.
            None => Ok(Self(Some(unsafe { dev.alloc::<u8>(bytes)? }))),
        }
    }

    fn ptr(&self) -> u64 {
        self.0.as_ref().map_or(0, slice_ptr)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Some(b) = self.0.take().filter(|b| b.len() <= SCRATCH_POOL_MAX_BYTES) {
            // Outside the pool's thread-local lifetime `b` is freed; a full pool frees its
            // oldest buffer (sizes that stopped coming back, e.g. a past batch's).
            let _ = SCRATCH_POOL.try_with(|p| {
                let mut p = p.borrow_mut();
                if p.len() >= SCRATCH_POOL_MAX {
                    p.remove(0);
                }
                p.push(b);
            });
        }
    }
}

/// Rows of activations quantized to int8 with one f32 scale per 32 values and the
/// scaled sum of every 16 values (`zopilot_q4k.cu` has the layout), in one pooled buffer:
/// values, then scales, then sums, each part 256-byte aligned.
pub(crate) struct Q8Rows {
    buf: Scratch,
    rows: usize,
    k: usize,
}

impl Q8Rows {
    /// Byte offsets of the scales and the sums, and the whole size.
    fn layout(rows: usize, k: usize) -> (usize, usize, usize) {
        let d = (rows * k).next_multiple_of(256);
        let s = (d + rows * k / 32 * 4).next_multiple_of(256);
        (d, s, s + rows * k / 16 * 4)
    }

    /// Uninitialised buffers for `rows` rows of `k` values (our kernels fill them).
    fn alloc(dev: &CudaDevice, rows: usize, k: usize) -> Result<Self> {
        let (_, _, bytes) = Self::layout(rows, k);
        Ok(Self {
            buf: Scratch::alloc(dev, bytes)?,
            rows,
            k,
        })
    }

    /// Device addresses of the values, scales and sums from row `row` on.
    fn ptrs(&self, row: usize) -> (*mut i8, *mut f32, *mut f32) {
        let (d, s, _) = Self::layout(self.rows, self.k);
        let (base, k, row) = (self.buf.ptr(), self.k as u64, row as u64);
        (
            (base + row * k) as *mut i8,
            (base + d as u64 + row * k / 32 * 4) as *mut f32,
            (base + s as u64 + row * k / 16 * 4) as *mut f32,
        )
    }
}

/// Whether `q` is a CUDA Q4K tensor whose row length (last dim) these kernels take (a
/// multiple of 256; the fused expert kernel also wants rows in multiples of 32).
pub(crate) fn q4k_applies(q: &QTensor) -> bool {
    let dims = q.shape().dims();
    q.dtype() == GgmlDType::Q4K
        && q.device().is_cuda()
        && dims.len() >= 2
        && dims[dims.len() - 1] % 256 == 0
}

fn cuda_dev(t: &Tensor) -> Result<CudaDevice> {
    match t.device() {
        Device::Cuda(d) => Ok(d.clone()),
        _ => candle_core::bail!("zopilot q4k kernels need CUDA tensors"),
    }
}

fn stream(dev: &CudaDevice) -> i64 {
    pdl_init();
    dev.cuda_stream().cu_stream() as i64
}

/// One decode token's attention inputs in one kernel: q `[1, qh, 1, d]` rotated in place and
/// `rope.k` rotated (candle's GPT-NeoX `rope`, the same arithmetic) with the position's
/// `cos`/`sin` rows, then k and v written into the paged cache at the slot as paged attention's
/// `reshape_and_cache` writes them (key cache `[blocks, kvh, d/x, block_size, x]`, x = 16 bytes
/// of the dtype; value cache `[blocks, kvh, d, block_size]`). bf16 or f16, cache in the same
/// dtype.
pub(crate) fn rope_cache_decode(
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
pub(crate) struct DecodeRope<'a> {
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
/// values) quantized for the o_proj mat-vec — what [`quantize`] of the returned tensor would
/// give, without its launch.
#[allow(clippy::too_many_arguments)]
pub(crate) fn decode_attention(
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
        (std::ptr::null_mut(), std::ptr::null_mut(), std::ptr::null_mut()),
        |x| x.ptrs(0),
    );
    let opt = |t: Option<&Tensor>| t.map_or(Ok(std::ptr::null()), |t| tensor_ptr(t).map(|p| p as *const c_void));
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

/// Profiling: the GPU spins `us` microseconds on the device's stream (the step trace's head
/// start, `ZOPILOT_STEP_TRACE_HEAD_US`).
pub(crate) fn spin(dev: &Device, us: i32) -> Result<()> {
    if let Device::Cuda(d) = dev {
        // SAFETY: a one-thread kernel on the device's stream; no pointers.
        check(unsafe { zopilot_spin(us, stream(d)) }, "spin")?;
    }
    Ok(())
}

/// Programmatic dependent launch for every kernel of ours (`ZOPILOT_PDL`, on unless `0`; the
/// kernels take it only on Hopper and later): each may start while the one before it in the
/// stream finishes. Set once per process, before the first launch.
fn pdl_init() {
    static DONE: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    DONE.get_or_init(|| {
        // SAFETY: sets a flag the launchers read; no pointers are passed.
        unsafe { zopilot_set_pdl(i32::from(switch_on("ZOPILOT_PDL"))) };
    });
}

fn check(code: i32, what: &str) -> Result<()> {
    if code != 0 {
        candle_core::bail!("{what}: CUDA error {code}");
    }
    Ok(())
}

fn dtype_code(dtype: DType) -> Result<i32> {
    Ok(match dtype {
        DType::F32 => 0,
        DType::BF16 => 1,
        DType::F16 => 2,
        other => candle_core::bail!("zopilot q4k kernels: no {other:?} activations"),
    })
}

/// [`dtype_code`] for the kernels that take only 16-bit activations (bf16, f16).
fn half_dtype_code(dtype: DType, what: &str) -> Result<i32> {
    match dtype_code(dtype) {
        Ok(code) if code != 0 => Ok(code),
        _ => candle_core::bail!("{what}: no {dtype:?}"),
    }
}

/// Device address of a contiguous tensor's first element.
fn tensor_ptr(t: &Tensor) -> Result<u64> {
    if !t.is_contiguous() {
        candle_core::bail!("zopilot q4k kernels need contiguous tensors");
    }
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(s) = &*storage else {
        candle_core::bail!("zopilot q4k kernels need CUDA tensors");
    };
    let offset = layout.start_offset();
    let ptr = match &s.slice {
        CudaStorageSlice::F32(x) => x.slice(offset..).device_ptr(x.stream()).0,
        CudaStorageSlice::BF16(x) => x.slice(offset..).device_ptr(x.stream()).0,
        CudaStorageSlice::F16(x) => x.slice(offset..).device_ptr(x.stream()).0,
        CudaStorageSlice::U32(x) => x.slice(offset..).device_ptr(x.stream()).0,
        CudaStorageSlice::I64(x) => x.slice(offset..).device_ptr(x.stream()).0,
        _ => candle_core::bail!("zopilot q4k kernels: unsupported dtype {:?}", t.dtype()),
    };
    Ok(ptr)
}

fn weight_ptr(q: &QTensor) -> Result<*const c_void> {
    Ok(q.device_ptr()? as *const c_void)
}

fn slice_ptr<T: candle_core::cuda_backend::cudarc::driver::DeviceRepr>(s: &CudaSlice<T>) -> u64 {
    s.device_ptr(s.stream()).0
}

/// `x` `[rows, k]` (f32, bf16 or f16; `k` a multiple of 32) quantized to int8 rows.
pub(crate) fn quantize(x: &Tensor) -> Result<Q8Rows> {
    let dev = cuda_dev(x)?;
    let (rows, k) = x.dims2()?;
    if k % 32 != 0 || rows == 0 {
        candle_core::bail!("zopilot quantize: x [{rows}, {k}]");
    }
    let x = x.contiguous()?;
    let out = Q8Rows::alloc(&dev, rows, k)?;
    let (q, d, s) = out.ptrs(0);
    let code = unsafe {
        zopilot_q8_quantize(
            tensor_ptr(&x)? as *const c_void,
            dtype_code(x.dtype())?,
            k as i64,
            rows as i32,
            k as i32,
            q,
            d,
            s,
            stream(&dev),
        )
    };
    check(code, "zopilot quantize")?;
    Ok(out)
}

/// Checks `ids` (u32) and `weights` (f32) are `[tokens, topk]`; returns `topk`.
fn routing_dims(ids: &Tensor, weights: Option<&Tensor>, tokens: usize) -> Result<usize> {
    let (t, topk) = ids.dims2()?;
    if t != tokens || ids.dtype() != DType::U32 || topk == 0 {
        candle_core::bail!("zopilot moe: ids {:?} {:?} for {tokens} tokens", ids.dims(), ids.dtype());
    }
    if let Some(w) = weights {
        if w.dims2()? != (t, topk) || w.dtype() != DType::F32 {
            candle_core::bail!("zopilot moe: weights {:?} {:?}", w.dims(), w.dtype());
        }
    }
    Ok(topk)
}

/// Expert pair of Mixtral's FFN for each (token, slot): `silu(x·w1[e]) * (x·w3[e])`,
/// quantized, `[tokens * topk, N]`. `w1`, `w3`: `[E, N, K]` Q4K; `ids`: `[tokens, topk]` u32.
pub(crate) fn moe_w13_silu(w1: &QTensor, w3: &QTensor, ids: &Tensor, x: &Q8Rows) -> Result<Q8Rows> {
    let dev = cuda_dev(ids)?;
    let (e, n, k) = w1.shape().dims3()?;
    if !q4k_applies(w1)
        || !q4k_applies(w3)
        || w3.shape().dims3()? != (e, n, k)
        || n % 32 != 0
        || x.k != k
    {
        candle_core::bail!("zopilot moe w13: w1 {:?} w3 {:?} x k {}", w1.shape(), w3.shape(), x.k);
    }
    let topk = routing_dims(ids, None, x.rows)?;
    let ids = ids.contiguous()?;
    let pairs = x.rows * topk;
    let act = Q8Rows::alloc(&dev, pairs, n)?;
    let (xq, xd, xs) = x.ptrs(0);
    let (aq, ad, as_) = act.ptrs(0);
    let code = unsafe {
        zopilot_moe_w13_silu(
            weight_ptr(w1)?,
            weight_ptr(w3)?,
            tensor_ptr(&ids)? as *const u32,
            pairs as i32,
            topk as i32,
            xq,
            xd,
            xs,
            n as i32,
            k as i32,
            aq,
            ad,
            as_,
            stream(&dev),
        )
    };
    check(code, "zopilot moe w13")?;
    Ok(act)
}

/// `Σ_slot weights[t, slot] · act[t, slot] · w2[ids[t, slot]]` → `[tokens, H]` in `dtype`,
/// plus `resid` (`[tokens, H]`, `dtype`) when given. `w2`: `[E, H, N]` Q4K; `act`:
/// `[tokens * topk, N]` from [`moe_w13_silu`].
pub(crate) fn moe_w2(
    w2: &QTensor,
    ids: &Tensor,
    weights: &Tensor,
    act: &Q8Rows,
    dtype: DType,
    resid: Option<&Tensor>,
) -> Result<Tensor> {
    let dev = cuda_dev(ids)?;
    let (_, h, k) = w2.shape().dims3()?;
    let tokens = ids.dim(0)?;
    let topk = routing_dims(ids, Some(weights), tokens)?;
    if !q4k_applies(w2) || act.k != k || act.rows != tokens * topk {
        candle_core::bail!("zopilot moe w2: w2 {:?}, act [{}, {}]", w2.shape(), act.rows, act.k);
    }
    let (ids, weights) = (ids.contiguous()?, weights.contiguous()?);
    let resid = resid.map(|r| r.contiguous()).transpose()?;
    if let Some(r) = &resid {
        if r.dims2()? != (tokens, h) || r.dtype() != dtype {
            candle_core::bail!("zopilot moe w2: residual {:?} {:?}", r.dims(), r.dtype());
        }
    }
    let resid_ptr = match &resid {
        Some(r) => tensor_ptr(r)? as *const c_void,
        None => std::ptr::null(),
    };
    let out = Out::alloc(&dev, dtype, tokens * h)?;
    let (aq, ad, as_) = act.ptrs(0);
    let code = unsafe {
        zopilot_moe_w2(
            weight_ptr(w2)?,
            tensor_ptr(&ids)? as *const u32,
            tensor_ptr(&weights)? as *const f32,
            tokens as i32,
            topk as i32,
            aq,
            ad,
            as_,
            h as i32,
            k as i32,
            resid_ptr,
            out.ptr() as *mut c_void,
            dtype_code(dtype)?,
            stream(&dev),
        )
    };
    check(code, "zopilot moe w2")?;
    Ok(out.into_tensor(&dev, tokens, h))
}

/// `x · wᵀ` for each `w` `[N, K]` Q4K of the same row length (q, k and v: three to a launch),
/// `x` any number of quantized rows → `[rows, N]` each, in `dtype`: up to 2 rows the mat-vec
/// (launches of [`MATVEC_MAX_TOKENS`]), from 3 rows on (`ZOPILOT_MMA_MIN_TOKENS`) tensor cores,
/// each weight read once per 8 or 16 rows — on an H100 2–6× faster than mat-vec launches
/// from 4 rows on (scripts/q4k-kernel-bench.cu --dense), slower end to end at one row (the
/// activation packing costs more than it saves) — unless `ZOPILOT_MMA=0`. With `round_via`
/// (bf16 or f16) and `dtype` f32, the values are rounded through that type first, as a layer
/// computing in it would return them.
pub(crate) fn matvec_many(
    ws: &[&QTensor],
    x: &Q8Rows,
    dtype: DType,
    round_via: Option<DType>,
) -> Result<Vec<Tensor>> {
    let Some(first) = ws.first() else {
        return Ok(Vec::new());
    };
    let Device::Cuda(dev) = first.device() else {
        candle_core::bail!("zopilot matvec needs CUDA weights");
    };
    let code = match (dtype, round_via) {
        (DType::F32, Some(DType::BF16)) => 3,
        (DType::F32, Some(DType::F16)) => 4,
        _ => dtype_code(dtype)?,
    };
    let mut outs = Vec::with_capacity(ws.len());
    for w in ws {
        let (n, k) = w.shape().dims2()?;
        if !q4k_applies(w) || x.k != k || x.rows == 0 || !w.device().same_device(&first.device()) {
            candle_core::bail!("zopilot matvec: w {:?}, x [{}, {}]", w.shape(), x.rows, x.k);
        }
        outs.push((n, Out::alloc(&dev, dtype, x.rows * n)?));
    }
    let k = x.k;
    if x.rows >= mma_min_tokens() && mma_enabled() && outs.iter().all(|(n, _)| n % 16 == 0) {
        // Tensor cores: the rows packed once for every weight, each weight read once per
        // 8 or 16 rows.
        let nt = if x.rows <= 8 { 8 } else { 16 };
        let packed = Packed::rows(&dev, x, nt)?;
        let (pq, pf) = packed.ptrs();
        for (w, (n, out)) in ws.iter().zip(&outs) {
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
                    stream(&dev),
                )
            };
            check(status, "zopilot mma matmul")?;
        }
    } else {
        let elem = dtype.size_in_bytes() as u64;
        for group in (0..ws.len()).collect::<Vec<_>>().chunks(3) {
            for start in (0..x.rows).step_by(MATVEC_MAX_TOKENS) {
                let tokens = MATVEC_MAX_TOKENS.min(x.rows - start);
                let mut w_ptrs = Vec::with_capacity(3);
                let mut n_rows = Vec::with_capacity(3);
                let mut out_ptrs = Vec::with_capacity(3);
                for &i in group {
                    let (n, buf) = &outs[i];
                    w_ptrs.push(weight_ptr(ws[i])?);
                    n_rows.push(*n as i32);
                    out_ptrs.push((buf.ptr() + (start * n) as u64 * elem) as *mut c_void);
                }
                let (xq, xd, xs) = x.ptrs(start);
                let status = unsafe {
                    zopilot_q4k_matvec(
                        w_ptrs.as_ptr(),
                        n_rows.as_ptr(),
                        out_ptrs.as_ptr(),
                        group.len() as i32,
                        k as i32,
                        xq,
                        xd,
                        xs,
                        tokens as i32,
                        code,
                        stream(&dev),
                    )
                };
                check(status, "zopilot matvec")?;
            }
        }
    }
    Ok(outs
        .into_iter()
        .map(|(n, buf)| buf.into_tensor(&dev, x.rows, n))
        .collect())
}

/// An output buffer our kernels write (uninitialised until they do).
enum Out {
    F32(CudaSlice<f32>),
    BF16(CudaSlice<half::bf16>),
    F16(CudaSlice<half::f16>),
}

impl Out {
    fn alloc(dev: &CudaDevice, dtype: DType, len: usize) -> Result<Self> {
        Ok(match dtype {
            DType::F32 => Self::F32(unsafe { dev.alloc::<f32>(len)? }),
            DType::BF16 => Self::BF16(unsafe { dev.alloc::<half::bf16>(len)? }),
            DType::F16 => Self::F16(unsafe { dev.alloc::<half::f16>(len)? }),
            other => candle_core::bail!("zopilot q4k kernels: no {other:?} output"),
        })
    }

    fn into_tensor(self, dev: &CudaDevice, rows: usize, n: usize) -> Tensor {
        let storage = match self {
            Self::F32(s) => CudaStorage::wrap_cuda_slice(s, dev.clone()),
            Self::BF16(s) => CudaStorage::wrap_cuda_slice(s, dev.clone()),
            Self::F16(s) => CudaStorage::wrap_cuda_slice(s, dev.clone()),
        };
        Tensor::from((Storage::Cuda(storage), Shape::from((rows, n))))
    }

    fn ptr(&self) -> u64 {
        match self {
            Self::F32(s) => slice_ptr(s),
            Self::BF16(s) => slice_ptr(s),
            Self::F16(s) => slice_ptr(s),
        }
    }
}

/// RMSNorm of `x` `[rows, K]` with `alpha` `[K]` (candle's arithmetic), quantized for the
/// mat-vec; with `resid`, of `h = x + resid` instead, `h` returned too (the next residual).
/// With `route` (a Q4K router `[E, K]` and top k), each row's MoE routing from the quantized
/// row in the same launch: what [`router_topk`] of the returned rows would give (logits
/// rounded through x's dtype).
pub(crate) fn rmsnorm_quantize(
    x: &Tensor,
    resid: Option<&Tensor>,
    alpha: &Tensor,
    eps: f32,
    route: Option<(&QTensor, usize)>,
) -> Result<(Option<Tensor>, Q8Rows, Option<(Tensor, Tensor)>)> {
    let dev = cuda_dev(x)?;
    let (rows, k) = x.dims2()?;
    let dtype = x.dtype();
    if k % 32 != 0 || rows == 0 || alpha.dims1()? != k || alpha.dtype() != dtype {
        candle_core::bail!("zopilot rmsnorm: x {:?}, alpha {:?} {:?}", x.dims(), alpha.dims(), alpha.dtype());
    }
    let (x, alpha) = (x.contiguous()?, alpha.contiguous()?);
    let resid = resid.map(|r| r.contiguous()).transpose()?;
    let h = match &resid {
        Some(r) if r.dims() != x.dims() || r.dtype() != dtype => {
            candle_core::bail!("zopilot rmsnorm: residual {:?} {:?}", r.dims(), r.dtype())
        }
        Some(_) => Some(Out::alloc(&dev, dtype, rows * k)?),
        None => None,
    };
    let out = Q8Rows::alloc(&dev, rows, k)?;
    let (q, d, s) = out.ptrs(0);
    let resid_ptr = resid.as_ref().map_or(Ok(0), tensor_ptr)?;
    let routing = match route {
        Some((w, top_k)) => {
            let experts = router_experts(w, k, top_k)?;
            Some((w, experts, top_k, Routing::alloc(&dev, rows, top_k)?))
        }
        None => None,
    };
    let (router, experts, top_k, ids, weights) = match &routing {
        Some((w, experts, top_k, r)) => (
            weight_ptr(w)?,
            *experts as i32,
            *top_k as i32,
            slice_ptr(&r.ids) as *mut u32,
            slice_ptr(&r.weights) as *mut f32,
        ),
        None => (std::ptr::null(), 0, 0, std::ptr::null_mut(), std::ptr::null_mut()),
    };
    // SAFETY: x, resid, alpha: contiguous CUDA tensors of the checked shapes; h, the quantized
    // rows and the routing buffers allocated above for `rows` rows (null when not asked for).
    let code = unsafe {
        zopilot_rmsnorm_quantize(
            tensor_ptr(&x)? as *const c_void,
            resid_ptr as *const c_void,
            h.as_ref().map_or(0, Out::ptr) as *mut c_void,
            tensor_ptr(&alpha)? as *const c_void,
            rows as i32,
            k as i32,
            eps,
            dtype_code(dtype)?,
            q,
            d,
            s,
            router,
            experts,
            top_k,
            ids,
            weights,
            stream(&dev),
        )
    };
    check(code, "zopilot rmsnorm")?;
    let h = h.map(|h| h.into_tensor(&dev, rows, k));
    let routing = routing.map(|(_, _, top_k, r)| r.into_tensors(&dev, rows, top_k));
    Ok((h, out, routing))
}

/// Device buffers for `rows` tokens' top-k routing: expert ids (u32) and weights (f32).
struct Routing {
    ids: CudaSlice<u32>,
    weights: CudaSlice<f32>,
}

impl Routing {
    fn alloc(dev: &CudaDevice, rows: usize, top_k: usize) -> Result<Self> {
        // SAFETY: written in full by the routing kernel before any read.
        Ok(Self {
            ids: unsafe { dev.alloc::<u32>(rows * top_k)? },
            weights: unsafe { dev.alloc::<f32>(rows * top_k)? },
        })
    }

    /// ids `[rows, top_k]` u32 and weights `[rows, top_k]` f32.
    fn into_tensors(self, dev: &CudaDevice, rows: usize, top_k: usize) -> (Tensor, Tensor) {
        let shape = Shape::from((rows, top_k));
        let ids = Tensor::from((
            Storage::Cuda(CudaStorage::wrap_cuda_slice(self.ids, dev.clone())),
            shape.clone(),
        ));
        let weights = Tensor::from((
            Storage::Cuda(CudaStorage::wrap_cuda_slice(self.weights, dev.clone())),
            shape,
        ));
        (ids, weights)
    }
}

/// The number of experts of a Q4K router `[E, K]` that the routing kernels take (E ≤ 256,
/// top_k ≤ min(8, E)), for rows of length `k`.
fn router_experts(w: &QTensor, k: usize, top_k: usize) -> Result<usize> {
    let (experts, wk) = w.shape().dims2()?;
    if !q4k_applies(w) || wk != k || experts > 256 || top_k == 0 || top_k > 8.min(experts) {
        candle_core::bail!("zopilot router: w {:?}, x k {k}, top_k {top_k}", w.shape());
    }
    Ok(experts)
}

/// `n × k` values of Q4K blocks at `src` (an address inside `dev`'s memory, e.g. one expert
/// of a stacked tensor) dequantized to an f16 `[n, k]` tensor — at ~2.5× the speed of candle's
/// kernel on an H100, which matters for the grouped MoE path that dequantizes every expert
/// with more than 16 tokens.
pub(crate) fn dequant_q4k_f16(dev: &CudaDevice, src: u64, n: usize, k: usize) -> Result<Tensor> {
    if k % 256 != 0 {
        candle_core::bail!("zopilot dequant: row length {k} is not a multiple of 256");
    }
    let out = Out::alloc(dev, DType::F16, n * k)?;
    let code = unsafe {
        zopilot_q4k_dequant_f16(
            src as *const c_void,
            out.ptr() as *mut c_void,
            (n * k / 256) as i64,
            stream(dev),
        )
    };
    check(code, "zopilot dequant")?;
    Ok(out.into_tensor(dev, n, k))
}

/// Router and routing in one launch: logits `x · wᵀ` (`w` `[E, K]` Q4K, E ≤ 256), rounded
/// through `round_via` (bf16/f16) as the model's dtype would return them, then per token the
/// `top_k` (≤ 8) largest and their softmax — what mistral.rs' `topk_softmax` computes.
/// Returns ids `[tokens, top_k]` u32 and weights `[tokens, top_k]` f32.
pub(crate) fn router_topk(
    w: &QTensor,
    x: &Q8Rows,
    top_k: usize,
    round_via: Option<DType>,
) -> Result<(Tensor, Tensor)> {
    let Device::Cuda(dev) = w.device() else {
        candle_core::bail!("zopilot router needs a CUDA weight");
    };
    let experts = router_experts(w, x.k, top_k)?;
    let round = match round_via {
        Some(DType::BF16) => 1,
        Some(DType::F16) => 2,
        _ => 0,
    };
    let r = Routing::alloc(&dev, x.rows, top_k)?;
    let (xq, xd, xs) = x.ptrs(0);
    let code = unsafe {
        zopilot_router_topk(
            weight_ptr(w)?,
            experts as i32,
            x.k as i32,
            xq,
            xd,
            xs,
            x.rows as i32,
            top_k as i32,
            round,
            slice_ptr(&r.ids) as *mut u32,
            slice_ptr(&r.weights) as *mut f32,
            stream(&dev),
        )
    };
    check(code, "zopilot router")?;
    Ok(r.into_tensors(&dev, x.rows, top_k))
}

/// Pairs per chunk of the grouped expert kernels for `tokens` tokens: 8 (measured faster up
/// to 32 tokens on an H100, scripts/q4k-kernel-bench.cu), then 16.
fn grouped_chunk(tokens: usize) -> usize {
    if tokens <= 32 {
        8
    } else {
        16
    }
}

/// Activation rows packed per chunk for the grouped expert kernels.
struct Packed {
    q: CudaSlice<i8>,
    f: CudaSlice<f32>,
}

impl Packed {
    /// Uninitialised room for `slots` rows of `k` values (the pack kernels fill it).
    fn alloc(dev: &CudaDevice, slots: usize, k: usize) -> Result<Self> {
        Ok(Self {
            q: unsafe { dev.alloc::<i8>(slots * k)? },
            f: unsafe { dev.alloc::<f32>(slots * k / 64 * 4)? },
        })
    }

    /// Packs all of `x`'s rows in chunks of `nt` (8 or 16) for the dense matmul.
    fn rows(dev: &CudaDevice, x: &Q8Rows, nt: usize) -> Result<Self> {
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
    fn new(dev: &CudaDevice, x: &Q8Rows, plan: &GroupPlan, div: usize) -> Result<Self> {
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

    fn ptrs(&self) -> (*const i8, *const c_void) {
        (slice_ptr(&self.q) as *const i8, slice_ptr(&self.f) as *const c_void)
    }
}

/// The (token, slot) pairs grouped by expert on the device, in chunks of `nt`.
struct GroupPlan {
    order: CudaSlice<i32>,
    chunks: CudaSlice<i32>,
    max_chunks: usize,
    nt: usize,
}

impl GroupPlan {
    fn new(dev: &CudaDevice, ids: &Tensor, experts: usize, tokens: usize) -> Result<Self> {
        let pairs = ids.elem_count();
        let nt = grouped_chunk(tokens);
        let max_chunks = pairs / nt + experts.min(pairs);
        let plan = Self {
            order: unsafe { dev.alloc::<i32>(pairs)? },
            chunks: unsafe { dev.alloc::<i32>(max_chunks * 4)? },
            max_chunks,
            nt,
        };
        let code = unsafe {
            zopilot_moe_plan(
                tensor_ptr(ids)? as *const u32,
                pairs as i32,
                experts as i32,
                nt as i32,
                max_chunks as i32,
                slice_ptr(&plan.order) as *mut i32,
                slice_ptr(&plan.chunks) as *mut c_void,
                stream(dev),
            )
        };
        check(code, "zopilot moe plan")?;
        Ok(plan)
    }
}

/// Most pairs the grouped kernels' plan takes in one launch.
pub(crate) const GROUPED_MAX_PAIRS: usize = 4096;

/// Mixtral's experts for a few dozen tokens with each expert's weights read once per chunk of
/// pairs routed to it (the per-pair kernels, [`moe_w13_silu`] and [`moe_w2`], read an expert
/// once per pair): pairs grouped by expert on the device, then w1‖w3·SiLU and w2 on tensor
/// cores, then the routing-weighted sum (plus `resid`) → `[tokens, H]` in `dtype`. `w1`, `w3`:
/// `[E, N, K]` Q4K, `w2`: `[E, H, N]`; `ids` `[tokens, topk]` u32 and `weights` f32 as
/// [`router_topk`] returns them; `x`: the tokens quantized.
pub(crate) fn moe_grouped(
    (w1, w3, w2): (&QTensor, &QTensor, &QTensor),
    ids: &Tensor,
    weights: &Tensor,
    x: &Q8Rows,
    dtype: DType,
    resid: Option<&Tensor>,
) -> Result<Tensor> {
    let dev = cuda_dev(ids)?;
    let (experts, n, k) = w1.shape().dims3()?;
    let (_, h, k2) = w2.shape().dims3()?;
    let tokens = x.rows;
    let topk = routing_dims(ids, Some(weights), tokens)?;
    let pairs = tokens * topk;
    if !q4k_applies(w1)
        || !q4k_applies(w3)
        || !q4k_applies(w2)
        || w3.shape().dims3()? != (experts, n, k)
        || w2.shape().dims3()?.0 != experts
        || k2 != n
        || x.k != k
        || n % 256 != 0
        || h % 32 != 0
        || experts > 256
        || pairs > GROUPED_MAX_PAIRS
    {
        candle_core::bail!(
            "zopilot grouped moe: w1 {:?} w3 {:?} w2 {:?}, {tokens} tokens × {topk}",
            w1.shape(),
            w3.shape(),
            w2.shape()
        );
    }
    let (ids, weights) = (ids.contiguous()?, weights.contiguous()?);
    let resid = resid.map(|r| r.contiguous()).transpose()?;
    if let Some(r) = &resid {
        if r.dims2()? != (tokens, h) || r.dtype() != dtype {
            candle_core::bail!("zopilot grouped moe: residual {:?} {:?}", r.dims(), r.dtype());
        }
    }
    let plan = GroupPlan::new(&dev, &ids, experts, tokens)?;
    let order = slice_ptr(&plan.order) as *const i32;
    let chunks = slice_ptr(&plan.chunks) as *const c_void;
    let (max_chunks, nt) = (plan.max_chunks as i32, plan.nt as i32);

    let px = Packed::new(&dev, x, &plan, topk)?;
    let act = Q8Rows::alloc(&dev, pairs, n)?;
    let (aq, ad, as_) = act.ptrs(0);
    let (pq, pf) = px.ptrs();
    let code = unsafe {
        zopilot_moe_w13_mma(
            weight_ptr(w1)?,
            weight_ptr(w3)?,
            order,
            chunks,
            max_chunks,
            nt,
            topk as i32,
            pq,
            pf,
            n as i32,
            k as i32,
            aq,
            ad,
            as_,
            stream(&dev),
        )
    };
    check(code, "zopilot grouped moe w13")?;

    let pa = Packed::new(&dev, &act, &plan, 1)?;
    let y = unsafe { dev.alloc::<f32>(pairs * h)? };
    let (pq, pf) = pa.ptrs();
    let code = unsafe {
        zopilot_moe_w2_mma(
            weight_ptr(w2)?,
            order,
            chunks,
            max_chunks,
            nt,
            topk as i32,
            pq,
            pf,
            h as i32,
            n as i32,
            slice_ptr(&y) as *mut f32,
            stream(&dev),
        )
    };
    check(code, "zopilot grouped moe w2")?;

    let out = Out::alloc(&dev, dtype, tokens * h)?;
    let resid_ptr = resid.as_ref().map_or(Ok(0), tensor_ptr)?;
    let code = unsafe {
        zopilot_moe_combine(
            slice_ptr(&y) as *const f32,
            tensor_ptr(&weights)? as *const f32,
            tokens as i32,
            topk as i32,
            h as i32,
            resid_ptr as *const c_void,
            out.ptr() as *mut c_void,
            dtype_code(dtype)?,
            stream(&dev),
        )
    };
    check(code, "zopilot grouped moe combine")?;
    Ok(out.into_tensor(&dev, tokens, h))
}
