//! The verdicts: pure functions from facts to checks, so every rule is tested against a
//! table of hosts (no driver, stub, old driver, wrong architecture, small VRAM, ...).
//! Versions are compared against ranges, never for equality.

use serde::Serialize;

use super::driver::{DeviceFacts, DriverFacts};

/// How a check came out. Warnings never fail the start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Pass,
    Skip,
    Warn,
    Fail,
}

/// One line of the report.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// Stable identifier: build, driver, device, memory, host_memory, disk, model.
    pub id: &'static str,
    pub verdict: Verdict,
    pub summary: String,
    /// What to do about a warning or failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Check {
    pub fn new(id: &'static str, verdict: Verdict, summary: impl Into<String>) -> Self {
        Check {
            id,
            verdict,
            summary: summary.into(),
            fix: None,
        }
    }
    pub fn fix(mut self, fix: impl Into<String>) -> Self {
        self.fix = Some(fix.into());
        self
    }
}

/// What this binary was built for.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct BuildTarget {
    /// CUDA toolkit the kernels were compiled with, e.g. (13, 0); None for CPU builds.
    pub cuda: Option<(u32, u32)>,
    /// e.g. 120 for sm_120; None for CPU builds.
    pub compute_cap: Option<u32>,
}

/// Minimum driver per CUDA toolkit (NVIDIA's CUDA release notes, Linux x86_64).
pub const MIN_DRIVER: &[((u32, u32), &str)] = &[
    ((12, 0), "525.60.13"),
    ((12, 1), "530.30.02"),
    ((12, 2), "535.54.03"),
    ((12, 3), "545.23.06"),
    ((12, 4), "550.54.14"),
    ((12, 5), "555.42.02"),
    ((12, 6), "560.28.03"),
    ((12, 8), "570.26"),
    ((12, 9), "575.51.03"),
    ((13, 0), "580.65.06"),
    ((13, 1), "590.44.01"),
];

/// The oldest CUDA toolkit that can target each compute capability.
const MIN_TOOLKIT_FOR_CC: &[(u32, (u32, u32))] = &[
    (120, (12, 8)),
    (100, (12, 8)),
    (90, (11, 8)),
    (89, (11, 8)),
    (86, (11, 1)),
    (80, (11, 0)),
];

/// Which package / image variant is built for which capability (see flake.nix).
pub fn variant_for(cc: u32) -> Option<(&'static str, &'static str)> {
    match cc {
        120 => Some(("default (sm_120)", "RTX 5090 / Blackwell workstation")),
        90 => Some(("sm90", "H100 / H200")),
        89 => Some(("sm89", "RTX 4090 / L40S")),
        80 | 86 | 87 => Some(("sm80", "A100 / A10 / RTX 30xx")),
        _ => None,
    }
}

/// Parses "580.65.06" into comparable numbers.
pub fn parse_version(v: &str) -> Vec<u32> {
    v.split('.')
        .map(|p| p.trim().parse().unwrap_or(0))
        .collect()
}

/// The minimum driver for a toolkit: the entry for the newest listed toolkit not newer.
pub fn min_driver_for(cuda: (u32, u32)) -> Option<&'static str> {
    MIN_DRIVER
        .iter()
        .rev()
        .find(|(t, _)| *t <= cuda)
        .map(|(_, d)| *d)
}

/// Can kernels built for `build` run on a device of capability `device`?
/// sm_90 and sm_120 builds use the arch-specific `a` targets (mistral.rs does), which run
/// only on that exact capability; other builds run on the same major, same or newer minor.
pub fn arch_runs(build: u32, device: u32) -> bool {
    if build == 90 || build == 100 || build == 120 {
        return build == device;
    }
    build / 10 == device / 10 && device % 10 >= build % 10
}

pub fn driver_check(build: &BuildTarget, d: &DriverFacts) -> Check {
    let Some(cuda) = build.cuda else {
        return Check::new("driver", Verdict::Skip, "CPU build: no driver needed");
    };
    let Some(path) = &d.libcuda else {
        let kernel = d
            .version
            .as_deref()
            .map(|v| {
                format!(" (the kernel module {v} is loaded, its user-space libraries are not)")
            })
            .unwrap_or_default();
        let dirs: Vec<String> = d.searched.iter().map(|p| p.display().to_string()).collect();
        return Check::new("driver", Verdict::Fail, format!("no NVIDIA driver library (libcuda.so.1) found{kernel}; searched the loader path and {}", dirs.join(", ")))
            .fix("install the NVIDIA driver (>= the minimum for CUDA ".to_owned() + &format!("{}.{}", cuda.0, cuda.1) + "), or run the container with the NVIDIA container toolkit (`--gpus all`, NVIDIA_DRIVER_CAPABILITIES=compute,utility)");
    };
    let min = min_driver_for(cuda).unwrap_or("0");
    let version = d.version.clone().unwrap_or_else(|| "unknown".into());
    let supports = d
        .cuda
        .map(|(a, b)| format!("{a}.{b}"))
        .unwrap_or_else(|| "?".into());
    let too_old = d
        .version
        .as_deref()
        .is_some_and(|v| parse_version(v) < parse_version(min))
        || d.cuda.is_some_and(|c| c.0 < cuda.0);
    let summary = format!(
        "driver {version} at {} supports CUDA {supports}; this build needs CUDA {}.{} (driver >= {min})",
        path.display(),
        cuda.0,
        cuda.1
    );
    if d.stub_loaded {
        // The probe found the driver, but this process runs on the stand-in: the re-exec
        // that switches to the real driver did not happen (src/preflight/driver.rs).
        return Check::new("driver", Verdict::Fail, format!("{summary}; but this process loaded the stand-in libcuda, not the driver"))
            .fix(format!(
                "put {} on LD_LIBRARY_PATH, or make $XDG_RUNTIME_DIR or /tmp writable so the binary can switch to it",
                path.parent().map_or_else(|| path.display().to_string(), |p| p.display().to_string())
            ));
    }
    if too_old {
        return Check::new("driver", Verdict::Fail, summary).fix(format!(
            "upgrade the NVIDIA driver to >= {min}, or use a build made with an older CUDA toolkit"
        ));
    }
    if let Some(e) = &d.init_error {
        return Check::new("driver", Verdict::Fail, format!("{summary}; cuInit failed: {e}"))
            .fix("check that the GPU is visible to this process (nvidia-smi; in containers --gpus all and NVIDIA_VISIBLE_DEVICES)");
    }
    Check::new("driver", Verdict::Pass, summary)
}

pub fn device_check(build: &BuildTarget, devices: &[DeviceFacts], driver_ok: bool) -> Check {
    let Some(cap) = build.compute_cap else {
        return Check::new("device", Verdict::Skip, "CPU build: runs on the CPU");
    };
    if !driver_ok {
        return Check::new(
            "device",
            Verdict::Skip,
            "no usable driver, so no devices to check",
        );
    }
    let Some(first) = devices.first() else {
        return Check::new("device", Verdict::Fail, "the driver sees no GPU")
            .fix("check nvidia-smi and the container's GPU assignment");
    };
    let list: Vec<String> = devices
        .iter()
        .map(|d| {
            format!(
                "#{} {} (cc {}.{}, {:.1} GiB)",
                d.index,
                d.name,
                d.compute_capability.0,
                d.compute_capability.1,
                gib(d.total_bytes)
            )
        })
        .collect();
    let dev_cc = first.compute_capability.0 * 10 + first.compute_capability.1;
    let summary = format!(
        "{} GPU(s): {}; this build's kernels are for cc {}.{}",
        devices.len(),
        list.join(", "),
        cap / 10,
        cap % 10
    );
    if let Some((_, min_cuda)) = MIN_TOOLKIT_FOR_CC.iter().find(|(c, _)| *c == dev_cc)
        && build.cuda.is_some_and(|c| c < *min_cuda)
    {
        return Check::new(
            "device",
            Verdict::Fail,
            format!(
                "{summary}; cc {}.{} needs CUDA >= {}.{}",
                dev_cc / 10,
                dev_cc % 10,
                min_cuda.0,
                min_cuda.1
            ),
        )
        .fix("use a build made with a newer CUDA toolkit");
    }
    if !arch_runs(cap, dev_cc) {
        let fits = match variant_for(dev_cc) {
            Some((variant, cards)) => format!(
                "use the `{variant}` package/image (built for {cards}), or build with CUDA_COMPUTE_CAP={dev_cc}"
            ),
            None => format!("build with CUDA_COMPUTE_CAP={dev_cc}"),
        };
        return Check::new(
            "device",
            Verdict::Fail,
            format!(
                "{summary}: they cannot run on {} (cc {}.{})",
                first.name,
                dev_cc / 10,
                dev_cc % 10
            ),
        )
        .fix(fits);
    }
    let v = if devices.len() > 1 {
        Verdict::Warn
    } else {
        Verdict::Pass
    };
    let c = Check::new("device", v, summary);
    if devices.len() > 1 {
        c.fix("only GPU #0 is used; set CUDA_VISIBLE_DEVICES to choose another")
    } else {
        c
    }
}

pub fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

/// The bytes the model will need on the GPU.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct MemoryPlan {
    pub weights_bytes: u64,
    pub kv_cache_bytes: u64,
    /// The activations of the largest prefill pass (`prefill_tokens` tokens at once).
    pub prefill_bytes: u64,
    pub prefill_tokens: usize,
    /// The CUDA context, cuBLAS workspaces and the engine's standing buffers.
    pub overhead_bytes: u64,
    pub kv_bytes_per_token: u64,
}

impl MemoryPlan {
    pub fn total(&self) -> u64 {
        self.weights_bytes + self.kv_cache_bytes + self.prefill_bytes + self.overhead_bytes
    }

    fn parts(&self, kv_tokens: usize) -> String {
        format!(
            "weights {:.1} + KV cache {:.1} for {kv_tokens} tokens + prefill {:.1} for {} tokens + CUDA and buffers {:.1}",
            gib(self.weights_bytes),
            gib(self.kv_cache_bytes),
            gib(self.prefill_bytes),
            self.prefill_tokens,
            gib(self.overhead_bytes)
        )
    }
}

pub fn memory_check(plan: &MemoryPlan, device: Option<&DeviceFacts>, kv_tokens: usize) -> Check {
    let Some(d) = device else {
        return Check::new(
            "memory",
            Verdict::Skip,
            format!(
                "needs {:.1} GiB on a GPU ({}); no GPU to compare with",
                gib(plan.total()),
                plan.parts(kv_tokens)
            ),
        );
    };
    let have = d.free_bytes.unwrap_or(d.total_bytes);
    let summary = format!(
        "needs {:.1} GiB ({}); {} has {:.1} GiB free",
        gib(plan.total()),
        plan.parts(kv_tokens),
        d.name,
        gib(have)
    );
    if plan.total() <= have {
        return Check::new("memory", Verdict::Pass, summary);
    }
    let short = plan.total() - have;
    let fewer_tokens = short.div_ceil(plan.kv_bytes_per_token.max(1));
    let fixed = plan.weights_bytes + plan.prefill_bytes + plan.overhead_bytes;
    if fixed < have && (fewer_tokens as usize) < kv_tokens {
        let max_tokens = kv_tokens - fewer_tokens as usize;
        return Check::new("memory", Verdict::Fail, summary)
            .fix(format!("lower --kv-cache-tokens to <= {max_tokens} (and --max-model-len with it), {:.1} GiB less KV cache", gib(short)));
    }
    Check::new("memory", Verdict::Fail, summary).fix(format!(
        "the weights alone do not fit: use a smaller --isq type or a GPU with >= {:.0} GiB",
        gib(plan.total()).ceil()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu(cc: (u32, u32), total_gib: u64, free_gib: u64) -> DeviceFacts {
        DeviceFacts {
            index: 0,
            name: format!("GPU cc{}{}", cc.0, cc.1),
            compute_capability: cc,
            total_bytes: total_gib << 30,
            free_bytes: Some(free_gib << 30),
        }
    }
    fn driver(version: &str, cuda: (u32, u32)) -> DriverFacts {
        DriverFacts {
            libcuda: Some("/usr/lib/x86_64-linux-gnu/libcuda.so.1".into()),
            version: Some(version.into()),
            cuda: Some(cuda),
            ..Default::default()
        }
    }
    const B5090: BuildTarget = BuildTarget {
        cuda: Some((13, 0)),
        compute_cap: Some(120),
    };
    const BH100: BuildTarget = BuildTarget {
        cuda: Some((13, 0)),
        compute_cap: Some(90),
    };

    type HostCase = (
        &'static str,
        BuildTarget,
        DriverFacts,
        Vec<DeviceFacts>,
        Verdict,
        Verdict,
    );

    /// The host table: (what, build, driver, devices) → driver verdict, device verdict.
    #[test]
    fn verdicts_for_a_table_of_hosts() {
        let none = DriverFacts {
            searched: vec!["/usr/lib64".into()],
            ..Default::default()
        };
        let stub = DriverFacts {
            stub_loaded: true,
            version: Some("580.95.05".into()),
            ..Default::default()
        };
        let broken = DriverFacts {
            init_error: Some("CUDA_ERROR_NO_DEVICE (100)".into()),
            ..driver("580.95.05", (13, 0))
        };
        let cases: Vec<HostCase> = vec![
            (
                "no driver",
                B5090,
                none,
                vec![],
                Verdict::Fail,
                Verdict::Skip,
            ),
            (
                "stub only, kernel module present",
                B5090,
                stub,
                vec![],
                Verdict::Fail,
                Verdict::Skip,
            ),
            (
                "driver too old for the toolkit",
                B5090,
                driver("570.86.15", (12, 8)),
                vec![gpu((12, 0), 32, 31)],
                Verdict::Fail,
                Verdict::Skip,
            ),
            (
                "driver found, but the process runs on the stand-in",
                BH100,
                DriverFacts {
                    stub_loaded: true,
                    ..driver("580.95.05", (13, 0))
                },
                vec![gpu((9, 0), 80, 79)],
                Verdict::Fail,
                Verdict::Skip,
            ),
            (
                "cuInit fails",
                BH100,
                broken,
                vec![],
                Verdict::Fail,
                Verdict::Skip,
            ),
            (
                "5090 build on an H100",
                B5090,
                driver("580.95.05", (13, 0)),
                vec![gpu((9, 0), 80, 79)],
                Verdict::Pass,
                Verdict::Fail,
            ),
            (
                "H100 build on a 5090",
                BH100,
                driver("580.95.05", (13, 0)),
                vec![gpu((12, 0), 32, 31)],
                Verdict::Pass,
                Verdict::Fail,
            ),
            (
                "5090 build on a 5090",
                B5090,
                driver("580.95.05", (13, 0)),
                vec![gpu((12, 0), 32, 31)],
                Verdict::Pass,
                Verdict::Pass,
            ),
            (
                "newer driver is fine",
                BH100,
                driver("590.48.01", (13, 1)),
                vec![gpu((9, 0), 80, 79)],
                Verdict::Pass,
                Verdict::Pass,
            ),
            (
                "several GPUs warn",
                BH100,
                driver("580.95.05", (13, 0)),
                vec![gpu((9, 0), 80, 79), gpu((9, 0), 80, 79)],
                Verdict::Pass,
                Verdict::Warn,
            ),
            (
                "driver sees no GPU",
                BH100,
                driver("580.95.05", (13, 0)),
                vec![],
                Verdict::Pass,
                Verdict::Fail,
            ),
        ];
        for (what, build, d, devs, want_driver, want_device) in cases {
            let dc = driver_check(&build, &d);
            assert_eq!(dc.verdict, want_driver, "{what}: {dc:?}");
            let vc = device_check(&build, &devs, dc.verdict == Verdict::Pass);
            assert_eq!(vc.verdict, want_device, "{what}: {vc:?}");
            if vc.verdict == Verdict::Fail || dc.verdict == Verdict::Fail {
                assert!(
                    vc.fix.is_some() || dc.fix.is_some(),
                    "{what}: a failure names its fix"
                );
            }
        }
    }

    #[test]
    fn wrong_architecture_names_the_variant_that_fits() {
        let c = device_check(&B5090, &[gpu((9, 0), 80, 79)], true);
        let fix = c.fix.unwrap();
        assert!(
            fix.contains("sm90") && fix.contains("CUDA_COMPUTE_CAP=90"),
            "{fix}"
        );
        assert!(
            c.summary.contains("cc 12.0") && c.summary.contains("9.0"),
            "{}",
            c.summary
        );
    }

    #[test]
    fn a_5090_needs_cuda_12_8() {
        let old = BuildTarget {
            cuda: Some((12, 6)),
            compute_cap: Some(120),
        };
        let c = device_check(&old, &[gpu((12, 0), 32, 31)], true);
        assert_eq!(c.verdict, Verdict::Fail);
        assert!(c.summary.contains("12.8"), "{}", c.summary);
    }

    #[test]
    fn driver_minimums_are_ranges() {
        assert_eq!(min_driver_for((12, 8)), Some("570.26"));
        assert_eq!(min_driver_for((12, 9)), Some("575.51.03"));
        assert_eq!(min_driver_for((13, 0)), Some("580.65.06"));
        assert_eq!(
            min_driver_for((12, 7)),
            Some("560.28.03"),
            "an unlisted minor takes the one below"
        );
        assert!(parse_version("580.65.06") < parse_version("580.159.04"));
        assert!(arch_runs(80, 86) && !arch_runs(86, 80) && !arch_runs(90, 120));
    }

    #[test]
    fn vram_too_small_names_the_knob_and_amount() {
        let plan = MemoryPlan {
            weights_bytes: 25 << 30,
            kv_cache_bytes: 4 << 30,
            prefill_bytes: 1 << 30,
            prefill_tokens: 8192,
            overhead_bytes: 1 << 30,
            kv_bytes_per_token: 128 << 10,
        };
        let c = memory_check(&plan, Some(&gpu((12, 0), 32, 30)), 32768);
        assert_eq!(c.verdict, Verdict::Fail);
        assert!(
            c.fix
                .as_deref()
                .unwrap()
                .contains("--kv-cache-tokens to <= 24576"),
            "{c:?}"
        );
        let c = memory_check(&plan, Some(&gpu((12, 0), 32, 20)), 32768);
        assert!(c.fix.as_deref().unwrap().contains("--isq"), "{c:?}");
        assert_eq!(
            memory_check(&plan, Some(&gpu((9, 0), 80, 79)), 32768).verdict,
            Verdict::Pass
        );
    }
}
