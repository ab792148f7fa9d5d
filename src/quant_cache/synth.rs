//! Synthetic models written straight to a quantized GGUF (`synth --quantized q4k`): valid
//! Q4_K blocks of seeded random quants and scales, shaped like the bf16 synth's weights
//! (mean 0, standard deviation 1/sqrt(fan_in), the output head 8× that with a zero EOS row),
//! so the whole Mixtral-8x7B (26 GB) fits a disk its 93 GB of bf16 would not.

use std::os::unix::fs::FileExt;
use std::path::Path;

use anyhow::{Result, bail};
use candle_core::quantized::GgmlDType;
use rayon::prelude::*;

use super::gguf;
use super::layout::{Arch, Entry, Kind, entries};

/// Q4_K: 256 weights in 144 bytes (f16 d, f16 dmin, 12 bytes of 6-bit scales and mins,
/// 128 bytes of 4-bit quants); weight = d·scale·q − dmin·min per 32-weight sub-block.
const Q4K_BYTES: usize = 144;
/// Blocks generated per task (and per random stream: any split gives the same bytes).
const BLOCKS_PER_TASK: usize = 4096;

struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// Packs eight 6-bit scales and mins as llama.cpp's `get_scale_min_k4` reads them.
fn pack_scales(sc: &[u8; 8], m: &[u8; 8]) -> [u8; 12] {
    let mut q = [0u8; 12];
    for j in 0..4 {
        q[j] = sc[j] & 63;
        q[j + 4] = m[j] & 63;
    }
    for j in 4..8 {
        q[j + 4] = (sc[j] & 0xF) | ((m[j] & 0xF) << 4);
        q[j - 4] |= (sc[j] >> 4) << 6;
        q[j] |= (m[j] >> 4) << 6;
    }
    q
}

/// One Q4_K block of weights with standard deviation about `std` and mean about 0:
/// quants uniform in 0..16 (std 4.61, mean 7.5), sub-block scales 6–8 with mins
/// `round(7.5·scale)` so each sub-block centres on 0, `d = dmin = std / (7 · 4.61)`.
fn q4k_block(rng: &mut SplitMix, std: f32, out: &mut [u8]) {
    let d = half::f16::from_f32(std / (7.0 * 4.61));
    let mut sc = [0u8; 8];
    let mut m = [0u8; 8];
    let r = rng.next();
    for j in 0..8 {
        sc[j] = 6 + ((r >> (4 * j)) % 3) as u8;
        m[j] = (7.5 * sc[j] as f32).round() as u8;
    }
    out[0..2].copy_from_slice(&d.to_le_bytes());
    out[2..4].copy_from_slice(&d.to_le_bytes());
    out[4..16].copy_from_slice(&pack_scales(&sc, &m));
    for c in out[16..Q4K_BYTES].chunks_exact_mut(8) {
        c.copy_from_slice(&rng.next().to_le_bytes());
    }
}

/// The bytes of block range `first..first + count` of quantized tensor `e`.
fn q4k_blocks(e: &Entry, seed: u64, first: usize, count: usize, eos_row: Option<usize>) -> Vec<u8> {
    let k = *e.spec.dims.last().unwrap_or(&256);
    let blocks_per_row = k / 256;
    let head = e.hf == "lm_head.weight";
    let std = (1.0 / k as f32).sqrt() * if head { 8.0 } else { 1.0 };
    let mut rng = SplitMix(
        fnv1a(&e.spec.name)
            ^ seed.wrapping_mul(0x2545_F491_4F6C_DD1D)
            ^ (first as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
    );
    let mut out = vec![0u8; count * Q4K_BYTES];
    for (b, block) in out.chunks_exact_mut(Q4K_BYTES).enumerate() {
        let row = (first + b) / blocks_per_row;
        if Some(row) == eos_row {
            continue; // d = dmin = 0: exactly zero
        }
        q4k_block(&mut rng, std, block);
    }
    out
}

fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// Writes `dir/model-q4k.gguf` for the synthetic model whose config.json, tokenizer files
/// and (for the embedding) bf16 generator `embed` are given. Returns the file's bytes.
pub fn write_q4k(
    dir: &Path,
    arch: &Arch,
    files: &super::HfFiles,
    seed: u64,
    embed: impl Fn(&[usize], &mut [u8]) + Sync,
) -> Result<u64> {
    let table = entries(arch, GgmlDType::Q4K);
    for e in &table {
        if e.spec.dims.last().unwrap() % 256 != 0 {
            bail!(
                "{} has rows of {} weights: Q4_K needs multiples of 256",
                e.spec.name,
                e.spec.dims.last().unwrap()
            );
        }
    }
    let meta = super::metadata(arch, files, "zopilot-gpu synthetic", None)?;
    let path = dir.join("model-q4k.gguf");
    let tmp = dir.join(".model-q4k.gguf.partial");
    let specs: Vec<_> = table.iter().map(|e| e.spec.clone()).collect();
    let (file, layout) = gguf::create(&tmp, &meta, &specs)?;
    let mut checksums = Vec::with_capacity(table.len());
    for (i, e) in table.iter().enumerate() {
        let at = layout.offsets[i];
        let crc = match e.kind {
            Kind::Plain if e.spec.dtype == GgmlDType::F32 => {
                let bytes: Vec<u8> = (0..e.spec.dims.iter().product::<usize>())
                    .flat_map(|_| 1f32.to_le_bytes())
                    .collect();
                file.write_all_at(&bytes, at)?;
                crc32fast::hash(&bytes)
            }
            Kind::Plain => {
                let mut bytes = vec![0u8; layout.sizes[i] as usize];
                embed(&e.spec.dims, &mut bytes);
                file.write_all_at(&bytes, at)?;
                crc32fast::hash(&bytes)
            }
            Kind::Quantized => {
                let total = layout.sizes[i] as usize / Q4K_BYTES;
                let eos_row = (e.hf == "lm_head.weight").then_some(2);
                // Tasks in parallel, written in order so the CRC can be combined.
                let tasks: Vec<usize> = (0..total.div_ceil(BLOCKS_PER_TASK)).collect();
                let mut hasher = crc32fast::Hasher::new();
                for group in tasks.chunks(rayon::current_num_threads().max(1) * 4) {
                    let parts: Vec<Vec<u8>> = group
                        .par_iter()
                        .map(|&t| {
                            let first = t * BLOCKS_PER_TASK;
                            q4k_blocks(e, seed, first, BLOCKS_PER_TASK.min(total - first), eos_row)
                        })
                        .collect();
                    for (&t, part) in group.iter().zip(&parts) {
                        file.write_all_at(part, at + (t * BLOCKS_PER_TASK * Q4K_BYTES) as u64)?;
                        hasher.update(part);
                    }
                }
                hasher.finalize()
            }
        };
        checksums.push(crc);
    }
    gguf::write_checksums(&file, &layout, &checksums)?;
    file.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    Ok(layout.total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_q4k_blocks_are_valid_and_scaled() {
        let e = Entry {
            spec: gguf::TensorSpec {
                name: "blk.0.attn_q.weight".into(),
                dtype: GgmlDType::Q4K,
                dims: vec![64, 1024],
            },
            hf: "model.layers.0.self_attn.q_proj.weight".into(),
            kind: Kind::Quantized,
            permute_heads: None,
        };
        let blocks = 64 * 1024 / 256;
        let bytes = q4k_blocks(&e, 7, 0, blocks, None);
        let cpu = candle_core::Device::Cpu;
        let q = candle_core::quantized::ggml_file::qtensor_from_ggml(
            GgmlDType::Q4K,
            &bytes,
            vec![64, 1024],
            &cpu,
        )
        .unwrap();
        let w: Vec<f32> = q
            .dequantize(&cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let n = w.len() as f32;
        let mean = w.iter().sum::<f32>() / n;
        let std = (w.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / n).sqrt();
        let want = (1.0f32 / 1024.0).sqrt();
        assert!(mean.abs() < 0.05 * want, "mean {mean}");
        assert!((std / want - 1.0).abs() < 0.15, "std {std}, want {want}");
        // Seeded: the same blocks again are the same bytes.
        assert_eq!(q4k_blocks(&e, 7, 0, blocks, None), bytes);
        let zero = q4k_blocks(&e, 7, 0, 8, Some(0));
        assert!(zero[..4 * Q4K_BYTES].iter().all(|b| *b == 0));
    }
}
