//! Driver and device facts read at start-up through `dlopen` of `libcuda.so.1` and
//! `libnvidia-ml.so.1`, never through link-time CUDA, so the report works on any host.
//!
//! How a CUDA build starts without a driver: candle links libcuda dynamically, so the
//! binary has `DT_NEEDED libcuda.so.1`, and a loader that finds none would kill the process
//! before `main`. build.rs therefore compiles a stub `libcuda.so.1` (every entry point
//! returns CUDA_ERROR_NO_DEVICE), links against it, and gives the binary a RUNPATH of
//! `$ORIGIN`-relative directories where the stub is installed (`runpath.rs`). RUNPATH is
//! searched before the system's library cache, so the stub is what the loader usually
//! finds first. `reexec_with_real_driver`, the first thing `main` does, notices the stub
//! (it exports `zopilot_libcuda_stub`), looks for the real driver in the places drivers live
//! (Debian/Ubuntu multiarch, /usr/lib64, the NVIDIA container toolkit's /usr/local/nvidia,
//! NixOS's /run/opengl-driver, WSL), links only the driver's own libraries (`libcuda*`,
//! `libnvidia-*`) into a private directory, and re-executes itself with that directory on
//! `LD_LIBRARY_PATH` — never the whole system directory, whose glibc would shadow the
//! packaged one. With no driver anywhere, the stub stays loaded, nothing calls CUDA, and
//! `check` reports "no driver" with the fix. This is a start-up invariant outside
//! `Settings`, so it reads its two environment variables itself.

use std::ffi::{CStr, CString, c_char, c_int, c_uint, c_void};
use std::path::{Path, PathBuf};

use serde::Serialize;

/// Where NVIDIA drivers are installed on the hosts we run on.
pub const DRIVER_DIRS: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib64",
    "/usr/local/nvidia/lib64",
    "/usr/local/nvidia/lib",
    "/run/opengl-driver/lib",
    "/usr/lib/wsl/lib",
    "/usr/lib",
];

/// Set on the re-executed process so it never loops.
const REEXEC_GUARD: &str = "ZOPILOT_DRIVER_REEXEC";
/// Colon-separated directories searched instead of `DRIVER_DIRS`.
const DIRS_OVERRIDE: &str = "ZOPILOT_DRIVER_DIRS";

/// The directories searched for the driver.
pub fn driver_dirs() -> Vec<PathBuf> {
    match std::env::var(DIRS_OVERRIDE) {
        Ok(v) => v
            .split(':')
            .filter(|s| !s.is_empty())
            .map(PathBuf::from)
            .collect(),
        Err(_) => DRIVER_DIRS.iter().map(PathBuf::from).collect(),
    }
}

/// What the driver said about itself.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct DriverFacts {
    /// The libcuda.so.1 that answered (the real one), if any.
    pub libcuda: Option<PathBuf>,
    /// The loader picked our stub (no driver on the search path).
    pub stub_loaded: bool,
    /// e.g. "580.95.05".
    pub version: Option<String>,
    /// The newest CUDA version the driver supports, e.g. (13, 0).
    pub cuda: Option<(u32, u32)>,
    /// cuInit's complaint, if it had one.
    pub init_error: Option<String>,
    pub searched: Vec<PathBuf>,
}

/// One GPU.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DeviceFacts {
    pub index: u32,
    pub name: String,
    pub compute_capability: (u32, u32),
    pub total_bytes: u64,
    pub free_bytes: Option<u64>,
}

struct Lib(*mut c_void);

impl Lib {
    fn open(name: &str, global: bool) -> Option<Lib> {
        let c = CString::new(name).ok()?;
        let flags = libc::RTLD_NOW
            | if global {
                libc::RTLD_GLOBAL
            } else {
                libc::RTLD_LOCAL
            };
        // SAFETY: dlopen with a valid C string; a null result is handled.
        let h = unsafe { libc::dlopen(c.as_ptr(), flags) };
        (!h.is_null()).then_some(Lib(h))
    }

    fn sym(&self, name: &str) -> Option<*mut c_void> {
        let c = CString::new(name).ok()?;
        // SAFETY: a live handle and a valid C string.
        let p = unsafe { libc::dlsym(self.0, c.as_ptr()) };
        (!p.is_null()).then_some(p)
    }

    fn path_of(&self, symbol: &str) -> Option<PathBuf> {
        let p = self.sym(symbol)?;
        let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
        // SAFETY: p is an address inside a loaded object.
        if unsafe { libc::dladdr(p, &mut info) } == 0 || info.dli_fname.is_null() {
            return None;
        }
        let name = unsafe { CStr::from_ptr(info.dli_fname) }
            .to_string_lossy()
            .into_owned();
        Some(std::fs::canonicalize(&name).unwrap_or_else(|_| PathBuf::from(name)))
    }
}

/// Finds a real (non-stub) `libcuda.so.1`: first what the loader gives, then the usual dirs.
fn open_real_libcuda(dirs: &[PathBuf]) -> (Option<(Lib, PathBuf)>, bool) {
    let mut stub_loaded = false;
    if let Some(lib) = Lib::open("libcuda.so.1", false) {
        if lib.sym("zopilot_libcuda_stub").is_some() {
            stub_loaded = true;
        } else if let Some(path) = lib.path_of("cuInit") {
            return (Some((lib, path)), false);
        }
    }
    for dir in dirs {
        let candidate = dir.join("libcuda.so.1");
        if !candidate.exists() {
            continue;
        }
        if let Some(lib) = Lib::open(&candidate.to_string_lossy(), false)
            && lib.sym("zopilot_libcuda_stub").is_none()
            && lib.sym("cuInit").is_some()
        {
            let path = std::fs::canonicalize(&candidate).unwrap_or(candidate);
            return (Some((lib, path)), stub_loaded);
        }
    }
    (None, stub_loaded)
}

/// Reinterprets a symbol's address as the function type its API documents.
///
/// # Safety
/// `F` must be the symbol's true signature.
unsafe fn as_fn<F: Copy>(p: *mut c_void) -> F {
    unsafe { std::mem::transmute_copy::<*mut c_void, F>(&p) }
}

type CuInit = unsafe extern "C" fn(c_uint) -> c_int;
type CuInt = unsafe extern "C" fn(*mut c_int) -> c_int;
type CuDeviceGet = unsafe extern "C" fn(*mut c_int, c_int) -> c_int;
type CuDeviceGetName = unsafe extern "C" fn(*mut c_char, c_int, c_int) -> c_int;
type CuDeviceGetAttribute = unsafe extern "C" fn(*mut c_int, c_int, c_int) -> c_int;
type CuDeviceTotalMem = unsafe extern "C" fn(*mut usize, c_int) -> c_int;

const CU_ATTR_CC_MAJOR: c_int = 75;
const CU_ATTR_CC_MINOR: c_int = 76;

fn cuda_error_name(code: c_int) -> String {
    let name = match code {
        3 => "CUDA_ERROR_NOT_INITIALIZED",
        34 => "CUDA_ERROR_STUB_LIBRARY",
        35 => "CUDA_ERROR_INSUFFICIENT_DRIVER",
        46 => "CUDA_ERROR_DEVICES_UNAVAILABLE",
        100 => "CUDA_ERROR_NO_DEVICE",
        101 => "CUDA_ERROR_INVALID_DEVICE",
        304 => "CUDA_ERROR_OPERATING_SYSTEM",
        999 => "CUDA_ERROR_UNKNOWN",
        _ => "CUDA error",
    };
    format!("{name} ({code})")
}

/// Reads the driver and its devices. Safe to call on any host, with or without a GPU.
pub fn probe() -> (DriverFacts, Vec<DeviceFacts>) {
    let dirs = driver_dirs();
    let (lib, stub_loaded) = open_real_libcuda(&dirs);
    let mut facts = DriverFacts {
        stub_loaded,
        searched: dirs.clone(),
        ..Default::default()
    };
    let Some((cuda, path)) = lib else {
        facts.version = proc_driver_version();
        return (facts, vec![]);
    };
    let driver_dir = path.parent().map(Path::to_path_buf);
    facts.libcuda = Some(path);
    let mut devices = Vec::new();
    // SAFETY: each symbol is cast to the signature the CUDA driver API documents.
    unsafe {
        if let Some(f) = cuda.sym("cuDriverGetVersion") {
            let mut v: c_int = 0;
            if as_fn::<CuInt>(f)(&mut v) == 0 && v > 0 {
                facts.cuda = Some(((v / 1000) as u32, ((v % 1000) / 10) as u32));
            }
        }
        let init = cuda.sym("cuInit").map(|f| as_fn::<CuInit>(f)(0));
        match init {
            Some(0) => devices = cuda_devices(&cuda),
            Some(code) => facts.init_error = Some(cuda_error_name(code)),
            None => facts.init_error = Some("libcuda.so.1 has no cuInit".into()),
        }
    }
    let nvml = nvml_facts(driver_dir.as_deref(), &dirs);
    facts.version = nvml
        .as_ref()
        .and_then(|n| n.0.clone())
        .or_else(proc_driver_version);
    if let Some((_, free)) = nvml {
        for d in devices.iter_mut() {
            d.free_bytes = free.get(d.index as usize).copied().flatten();
        }
    }
    (facts, devices)
}

unsafe fn cuda_devices(cuda: &Lib) -> Vec<DeviceFacts> {
    let (Some(count), Some(get), Some(name), Some(attr), Some(mem)) = (
        cuda.sym("cuDeviceGetCount"),
        cuda.sym("cuDeviceGet"),
        cuda.sym("cuDeviceGetName"),
        cuda.sym("cuDeviceGetAttribute"),
        cuda.sym("cuDeviceTotalMem_v2"),
    ) else {
        return vec![];
    };
    // SAFETY: documented driver API signatures; buffers are sized as passed.
    unsafe {
        let count: CuInt = as_fn(count);
        let get: CuDeviceGet = as_fn(get);
        let name: CuDeviceGetName = as_fn(name);
        let attr: CuDeviceGetAttribute = as_fn(attr);
        let mem: CuDeviceTotalMem = as_fn(mem);
        let mut n: c_int = 0;
        if count(&mut n) != 0 {
            return vec![];
        }
        (0..n)
            .filter_map(|i| {
                let mut dev: c_int = 0;
                if get(&mut dev, i) != 0 {
                    return None;
                }
                let mut buf = [0 as c_char; 256];
                name(buf.as_mut_ptr(), buf.len() as c_int, dev);
                let (mut major, mut minor, mut total) = (0, 0, 0usize);
                attr(&mut major, CU_ATTR_CC_MAJOR, dev);
                attr(&mut minor, CU_ATTR_CC_MINOR, dev);
                mem(&mut total, dev);
                Some(DeviceFacts {
                    index: i as u32,
                    name: CStr::from_ptr(buf.as_ptr()).to_string_lossy().into_owned(),
                    compute_capability: (major as u32, minor as u32),
                    total_bytes: total as u64,
                    free_bytes: None,
                })
            })
            .collect()
    }
}

#[repr(C)]
struct NvmlMemory {
    total: u64,
    free: u64,
    used: u64,
}

type NvmlInit = unsafe extern "C" fn() -> c_int;
type NvmlVersion = unsafe extern "C" fn(*mut c_char, c_uint) -> c_int;
type NvmlCount = unsafe extern "C" fn(*mut c_uint) -> c_int;
type NvmlHandle = unsafe extern "C" fn(c_uint, *mut *mut c_void) -> c_int;
type NvmlMemInfo = unsafe extern "C" fn(*mut c_void, *mut NvmlMemory) -> c_int;

/// Driver version and free memory per device from NVML (same index order as CUDA's
/// default on single-GPU machines; free memory is a hint for the plan, not a promise).
fn nvml_facts(near: Option<&Path>, dirs: &[PathBuf]) -> Option<(Option<String>, Vec<Option<u64>>)> {
    let lib = near
        .into_iter()
        .chain(dirs.iter().map(PathBuf::as_path))
        .map(|d| d.join("libnvidia-ml.so.1"))
        .filter(|p| p.exists())
        .find_map(|p| Lib::open(&p.to_string_lossy(), false))
        .or_else(|| Lib::open("libnvidia-ml.so.1", false))?;
    // SAFETY: documented NVML signatures; buffers sized as passed.
    unsafe {
        let init: NvmlInit = as_fn(lib.sym("nvmlInit_v2")?);
        if init() != 0 {
            return None;
        }
        let mut version = None;
        if let Some(f) = lib.sym("nvmlSystemGetDriverVersion") {
            let f: NvmlVersion = as_fn(f);
            let mut buf = [0 as c_char; 96];
            if f(buf.as_mut_ptr(), buf.len() as c_uint) == 0 {
                version = Some(CStr::from_ptr(buf.as_ptr()).to_string_lossy().into_owned());
            }
        }
        let mut free = Vec::new();
        if let (Some(c), Some(h), Some(m)) = (
            lib.sym("nvmlDeviceGetCount_v2"),
            lib.sym("nvmlDeviceGetHandleByIndex_v2"),
            lib.sym("nvmlDeviceGetMemoryInfo"),
        ) {
            let (c, h, m): (NvmlCount, NvmlHandle, NvmlMemInfo) = (as_fn(c), as_fn(h), as_fn(m));
            let mut n: c_uint = 0;
            if c(&mut n) == 0 {
                for i in 0..n {
                    let mut handle = std::ptr::null_mut();
                    let mut mem = NvmlMemory {
                        total: 0,
                        free: 0,
                        used: 0,
                    };
                    let ok = h(i, &mut handle) == 0 && m(handle, &mut mem) == 0;
                    free.push(ok.then_some(mem.free));
                }
            }
        }
        if let Some(f) = lib.sym("nvmlShutdown") {
            as_fn::<NvmlInit>(f)();
        }
        Some((version, free))
    }
}

/// Memory in use on GPU 0 now, from NVML (for benchmark peaks).
pub fn gpu_used_bytes() -> Option<u64> {
    if !cfg!(feature = "cuda") {
        return None;
    }
    // `probe` already reads free memory from NVML.
    let (_, devices) = probe();
    let d = devices.first()?;
    Some(d.total_bytes.saturating_sub(d.free_bytes?))
}

/// The kernel module's version, readable even when user-space libraries are missing.
fn proc_driver_version() -> Option<String> {
    let text = std::fs::read_to_string("/proc/driver/nvidia/version").ok()?;
    let line = text.lines().next()?;
    line.split_whitespace()
        .find(|w| w.chars().next().is_some_and(|c| c.is_ascii_digit()) && w.contains('.'))
        .map(str::to_owned)
}

/// If the loader gave us the stub but a real driver exists, re-executes this program with
/// a private directory of the driver's libraries on `LD_LIBRARY_PATH`. Returns when there
/// is nothing to do (CPU build, driver already loaded, no driver anywhere, or already
/// re-executed).
pub fn reexec_with_real_driver() {
    if !cfg!(feature = "cuda") || std::env::var_os(REEXEC_GUARD).is_some() {
        return;
    }
    let Some(stub) = Lib::open("libcuda.so.1", false) else {
        return;
    };
    if stub.sym("zopilot_libcuda_stub").is_none() {
        return;
    }
    let Some(dir) = driver_dirs().into_iter().find(|d| {
        let p = d.join("libcuda.so.1");
        p.exists()
            && Lib::open(&p.to_string_lossy(), false)
                .is_some_and(|l| l.sym("zopilot_libcuda_stub").is_none())
    }) else {
        return;
    };
    let Ok(private) = link_driver_libraries(&dir) else {
        return;
    };
    let shown = dir.display().to_string();
    let mut path = private.into_os_string();
    if let Some(old) = std::env::var_os("LD_LIBRARY_PATH") {
        path.push(":");
        path.push(old);
    }
    use std::os::unix::process::CommandExt;
    let args: Vec<_> = std::env::args_os().skip(1).collect();
    let err = std::process::Command::new("/proc/self/exe")
        .arg0(std::env::args_os().next().unwrap_or_default())
        .args(args)
        .env("LD_LIBRARY_PATH", path)
        .env(REEXEC_GUARD, dir)
        .exec();
    eprintln!("warning: could not re-execute with the NVIDIA driver found in {shown}: {err}");
}

/// Symlinks `libcuda*` and `libnvidia-*` from `dir` into a private directory.
fn link_driver_libraries(dir: &Path) -> std::io::Result<PathBuf> {
    let base = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let uid = unsafe { libc::getuid() };
    let private = base.join(format!("zopilot-driver-{uid}"));
    std::fs::create_dir_all(&private)?;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let n = name.to_string_lossy();
        if (n.starts_with("libcuda.so") || n.starts_with("libnvidia-")) && n.contains(".so") {
            let link = private.join(&name);
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(entry.path(), &link)?;
        }
    }
    Ok(private)
}
