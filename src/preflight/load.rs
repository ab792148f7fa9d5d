//! What loading will read, write and hold, told before any weight is touched: which path the
//! weights take (a GGUF file mapped, bf16 quantized in situ, or loaded as they are), the
//! `cache`, `disk` and `host_memory` checks that follow from it, and the estimate of the
//! anonymous memory a start holds.
//!
//! Weights are read from mapped files: they pass through the page cache, which the kernel
//! reclaims under pressure, so they do not count against a host-memory limit the way
//! anonymous memory does (16 layers of bf16, 47.5 GB, loaded under a 16 GiB cgroup cap). The
//! estimate counts what loading allocates itself; docs/serving.md has the measurements.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::rules::{self, Check, Verdict};
use super::{HostFacts, disk_free, nearest_existing};
use crate::quant_cache;
use crate::settings::{Isq, ModelSettings, ModelSource};
use crate::synth::Shapes;

/// How the weights will be loaded, as far as can be told before loading.
#[derive(Debug, Clone, PartialEq)]
pub enum LoadPath {
    /// A GGUF file mapped and uploaded: the model itself (`cached: false`) or the
    /// quantized-weights cache file of this checkpoint.
    Gguf {
        file: PathBuf,
        cached: bool,
        tensor_bytes: u64,
        largest_tensor: u64,
    },
    /// bf16 safetensors quantized in situ; `writes`: the cache file this load writes.
    Quantize { writes: Option<PathBuf> },
    /// Loaded as they are: no ISQ, or a synthetic model written at start-up.
    Plain,
}

/// A GGUF file whose header read as `inspected`, and the config it carries.
fn mapped(
    file: PathBuf,
    cached: bool,
    inspected: quant_cache::Inspected,
) -> (LoadPath, Option<serde_json::Value>, Option<String>) {
    let path = LoadPath::Gguf {
        file,
        cached,
        tensor_bytes: inspected.tensor_bytes,
        largest_tensor: inspected.largest_tensor,
    };
    (path, Some(inspected.config), None)
}

/// Decides the load path as `quant_cache::prepare` will, from headers only. Also returns
/// the config a GGUF file carries (its shapes), and why a GGUF model is unusable, if it is.
pub fn load_path(m: &ModelSettings) -> (LoadPath, Option<serde_json::Value>, Option<String>) {
    match quant_cache::gguf_model(&m.source) {
        Ok(Some(file)) => {
            return match quant_cache::inspect(&file, None) {
                Ok(i) => mapped(file, false, i),
                Err(e) => {
                    let why = format!("GGUF model {}: {e:#}", file.display());
                    (LoadPath::Plain, None, Some(why))
                }
            };
        }
        Err(e) => return (LoadPath::Plain, None, Some(format!("{e:#}"))),
        Ok(None) => {}
    }
    let Some(isq) = m.isq else {
        return (LoadPath::Plain, None, None);
    };
    let cache = quant_cache::cache_dir(m)
        .zip(quant_cache::cache_key(m, isq))
        .map(|(dir, key)| (quant_cache::cache_file(&dir, m, &key, isq), key));
    let Some((file, key)) = cache else {
        return (LoadPath::Quantize { writes: None }, None, None);
    };
    if let Ok(i) = quant_cache::inspect(&file, Some(&key)) {
        return mapped(file, true, i);
    }
    (LoadPath::Quantize { writes: Some(file) }, None, None)
}

/// Anonymous memory every start holds whatever the weights: the runtime and its threads'
/// arenas, the tokenizer, the host side of the CUDA context and its libraries. Measured
/// (RssAnon, sampled every 0.2 s through a start of the whole Mixtral from its GGUF on an
/// H100, 2026-12-05): 616–729 MiB at the peak, of which one expert stack (264 MB) staged.
pub const ANON_BASE_BYTES: u64 = 1 << 29;

/// The anonymous memory loading holds at its peak (bytes), and why.
pub fn anon_estimate(path: &LoadPath, shapes: Option<&Shapes>) -> (u64, &'static str) {
    // The largest bf16 matrix of a layer (an expert's w1, w2 or w3).
    let expert_bf16 = shapes.map_or(0, |s| (s.hidden * s.intermediate * 2) as u64);
    match path {
        // The file is mapped; each tensor is checked and uploaded from the mapping, at most
        // the largest one (an expert stack) staged at a time.
        LoadPath::Gguf { largest_tensor, .. } => (
            ANON_BASE_BYTES + largest_tensor,
            "GGUF mapped and uploaded tensor by tensor",
        ),
        // One layer's experts read to the host in bf16 and widened to f32 for the quantizer
        // (three times their bf16 size), their quantized stack, and the cache writer's queue
        // (two stacks). Measured: 4,220 MiB at the peak of 16 layers' ISQ load writing the
        // cache (H100, 2026-12-05, the driver's first-start JIT included); this gives 3.9 GiB.
        LoadPath::Quantize { writes } => {
            let experts = shapes.map_or(0, |s| s.experts as u64);
            let stack_q = experts * expert_bf16 * 9 / 32; // 4.5 bits of 16
            let queue = if writes.is_some() { 2 * stack_q } else { 0 };
            (
                ANON_BASE_BYTES + 3 * experts * expert_bf16 + stack_q + queue,
                "bf16 mapped, one layer's experts at a time quantized in situ",
            )
        }
        LoadPath::Plain => (
            ANON_BASE_BYTES + expert_bf16,
            "weights mapped and uploaded as they are",
        ),
    }
}

/// The `cache` check: whether a quantized-weights cache serves this start or this start
/// writes one.
pub fn cache_check(m: &ModelSettings, path: &LoadPath) -> Check {
    match path {
        LoadPath::Gguf {
            file,
            cached: true,
            tensor_bytes,
            ..
        } => Check::new(
            "cache",
            Verdict::Pass,
            format!(
                "quantized-weights cache {} ({:.1} GiB): loading maps it; no bf16 is read or quantized",
                file.display(),
                rules::gib(*tensor_bytes)
            ),
        ),
        LoadPath::Gguf { cached: false, .. } => Check::new(
            "cache",
            Verdict::Skip,
            "a GGUF model is loaded as it is: nothing to cache",
        ),
        LoadPath::Quantize { writes: Some(file) } => Check::new(
            "cache",
            Verdict::Pass,
            format!(
                "no quantized-weights cache yet: this start quantizes the bf16 weights and writes {}; later starts load it",
                file.display()
            ),
        ),
        LoadPath::Quantize { writes: None }
            if m.quant_cache.is_none()
                && matches!(m.source, ModelSource::Hub(_) | ModelSource::Local(_)) =>
        {
            Check::new(
                "cache",
                Verdict::Pass,
                "quantized-weights cache off (--quant-cache off): every start quantizes the bf16 weights again",
            )
        }
        LoadPath::Quantize { writes: None } => Check::new(
            "cache",
            Verdict::Skip,
            "this model source has no cache key: every start quantizes",
        ),
        LoadPath::Plain => Check::new(
            "cache",
            Verdict::Skip,
            "no in-situ quantization: nothing to cache",
        ),
    }
}

/// The filesystem a path is on (its nearest existing ancestor's device).
fn filesystem(path: &Path) -> Option<u64> {
    std::fs::metadata(nearest_existing(path)?)
        .ok()
        .map(|m| m.dev())
}

/// What a start writes to disk: (directory, bytes, what).
pub fn disk_needs(
    m: &ModelSettings,
    path: &LoadPath,
    shapes: Option<&Shapes>,
    host: &HostFacts,
) -> Option<Vec<(PathBuf, u64, &'static str)>> {
    let mut needs = Vec::new();
    let cached = matches!(path, LoadPath::Gguf { cached: true, .. });
    if matches!(m.source, ModelSource::Hub(_)) && !cached {
        needs.push((
            host.cache_dir.clone(),
            shapes?.parameters() * 2,
            "the bf16 download",
        ));
    }
    if let LoadPath::Quantize { writes: Some(file) } = path {
        let plan = super::memory_plan(shapes?, m.isq.or(Some(Isq::Q4K)), 0, 0);
        let dir = file.parent().map(Path::to_path_buf).unwrap_or_default();
        needs.push((dir, plan.weights_bytes, "the quantized-weights cache"));
    }
    Some(needs)
}

/// The `disk` check: every write of this start against the free space of its filesystem,
/// writes to one filesystem summed.
pub fn disk_check(needs: Option<Vec<(PathBuf, u64, &'static str)>>) -> Check {
    let Some(needs) = needs else {
        return Check::new("disk", Verdict::Warn, "model size unknown")
            .fix("make sure the model cache has room for the download");
    };
    if needs.is_empty() {
        return Check::new("disk", Verdict::Pass, "nothing to download or write");
    }
    let mut parts = Vec::new();
    let mut short = None;
    for (i, (dir, bytes, what)) in needs.iter().enumerate() {
        let fs = filesystem(dir);
        let shared: u64 = needs
            .iter()
            .filter(|(d, _, _)| fs.is_some() && filesystem(d) == fs)
            .map(|(_, b, _)| *b)
            .sum::<u64>()
            .max(*bytes);
        match disk_free(dir) {
            Some(free) => {
                parts.push(format!(
                    "{what} up to {:.1} GiB in {} ({:.1} GiB free)",
                    rules::gib(*bytes),
                    dir.display(),
                    rules::gib(free)
                ));
                if shared > free && short.is_none() {
                    short = Some((i, shared - free));
                }
            }
            None => parts.push(format!(
                "{what} up to {:.1} GiB in {} (free space unknown)",
                rules::gib(*bytes),
                dir.display()
            )),
        }
    }
    let summary = parts.join("; ");
    match short {
        Some((i, lack)) => Check::new("disk", Verdict::Fail, summary).fix(format!(
            "free {:.1} GiB on the filesystem of {}, or point HF_HOME / --quant-cache at a larger volume (RunPod: /runpod-volume)",
            rules::gib(lack),
            needs[i].0.display()
        )),
        None => Check::new("disk", Verdict::Pass, summary),
    }
}

/// The `host_memory` check: the anonymous memory loading holds against what is available.
pub fn host_memory_check(path: &LoadPath, shapes: Option<&Shapes>, host: &HostFacts) -> Check {
    let (need, why) = anon_estimate(path, shapes);
    let summary = format!(
        "loading holds ~{:.1} GiB of anonymous memory ({why}; weights pass through the page cache); {:.1} GiB available",
        rules::gib(need),
        rules::gib(host.ram_available_bytes)
    );
    if host.ram_available_bytes >= need {
        Check::new("host_memory", Verdict::Pass, summary)
    } else {
        Check::new("host_memory", Verdict::Warn, summary)
            .fix("loading may fail for memory; use a host (or container limit) with more RAM")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synth::Preset;

    fn gib(b: u64) -> f64 {
        rules::gib(b)
    }

    /// The estimates for the whole Mixtral-8x7B stay far below its 87 GiB of bf16, and
    /// within the host-memory cap loading was measured under (16 GiB).
    #[test]
    fn mixtral_loads_hold_a_few_gib_not_the_weights() {
        let s = Shapes::of(Preset::Mixtral8x7b, None);
        assert!(gib(s.parameters() * 2) > 80.0);
        let gguf = LoadPath::Gguf {
            file: "m.gguf".into(),
            cached: true,
            tensor_bytes: 26_460_000_000,
            largest_tensor: 8 * 14336 * 4096 * 9 / 16,
        };
        let quantize = LoadPath::Quantize {
            writes: Some("c.gguf".into()),
        };
        let (g, _) = anon_estimate(&gguf, Some(&s));
        let (q, _) = anon_estimate(&quantize, Some(&s));
        let (p, _) = anon_estimate(&LoadPath::Plain, Some(&s));
        assert!((0.6..1.0).contains(&gib(g)), "{}", gib(g));
        // Measured 4,220 MiB (16 layers; the peak is one layer's, whatever the depth).
        assert!((3.5..4.5).contains(&gib(q)), "{}", gib(q));
        assert!(q > g && g > p, "{q} {g} {p}");
        // Writing the cache queues quantized stacks on top of quantizing alone.
        let (q_off, _) = anon_estimate(&LoadPath::Quantize { writes: None }, Some(&s));
        assert!(q > q_off);
    }

    fn host(avail_gib: u64, dir: &Path) -> HostFacts {
        HostFacts {
            ram_total_bytes: avail_gib << 30,
            ram_available_bytes: avail_gib << 30,
            cache_dir: dir.to_path_buf(),
            cache_free_bytes: disk_free(dir),
            cache_writable: true,
        }
    }

    #[test]
    fn host_memory_warns_only_below_the_estimate() {
        let dir = tempfile::tempdir().unwrap();
        let s = Shapes::of(Preset::Mixtral8x7b, None);
        let path = LoadPath::Quantize { writes: None };
        let c = host_memory_check(&path, Some(&s), &host(16, dir.path()));
        assert_eq!(c.verdict, Verdict::Pass, "{c:?}");
        assert!(c.summary.contains("anonymous memory"), "{c:?}");
        let c = host_memory_check(&path, Some(&s), &host(1, dir.path()));
        assert_eq!(c.verdict, Verdict::Warn, "{c:?}");
        assert!(c.fix.is_some());
    }

    #[test]
    fn writes_to_one_filesystem_are_summed_against_its_free_space() {
        let dir = tempfile::tempdir().unwrap();
        let free = disk_free(dir.path()).unwrap();
        let a = dir.path().join("hub");
        let b = dir.path().join("cache");
        // Each alone fits; together they do not.
        let half = free / 2 + (1 << 20);
        let c = disk_check(Some(vec![(a.clone(), half, "the bf16 download")]));
        assert_eq!(c.verdict, Verdict::Pass, "{c:?}");
        let c = disk_check(Some(vec![
            (a, half, "the bf16 download"),
            (b, half, "the quantized-weights cache"),
        ]));
        assert_eq!(c.verdict, Verdict::Fail, "{c:?}");
        assert!(c.summary.contains("quantized-weights cache"), "{c:?}");
        assert!(c.fix.unwrap().contains("--quant-cache"));
        assert_eq!(disk_check(Some(vec![])).verdict, Verdict::Pass);
    }
}
