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
//! `libnvidia-*`, WSL's `libdxcore.so`, and what those need through `DT_NEEDED` from the
//! same directory, glibc and the compiler runtime excepted) into a private directory, and
//! re-executes itself with that directory on `LD_LIBRARY_PATH` — never the whole system
//! directory, whose glibc would shadow the packaged one. The private directory is
//! `$XDG_RUNTIME_DIR/zopilot-driver` or `$TMPDIR/zopilot-driver-<uid>`, used only if it is a
//! real directory owned by this user with mode 0700 (it is created so); in a shared `/tmp`
//! anyone could otherwise create that name first and plant a library the re-exec would
//! load. With no driver anywhere, the stub stays loaded, nothing calls CUDA, and `check`
//! reports "no driver" with the fix. This is a start-up invariant that runs before
//! `Settings` exist, so `reexec_with_real_driver` reads its environment itself
//! (`ZOPILOT_DRIVER_REEXEC`, `ZOPILOT_DRIVER_DIRS`, `XDG_RUNTIME_DIR`, `TMPDIR`,
//! `LD_LIBRARY_PATH`); `probe` reads `ZOPILOT_DRIVER_DIRS` for the same reason.

use std::ffi::{CStr, CString, c_char, c_int, c_uint, c_void};
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt};
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
    let private = match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) => PathBuf::from(d).join("zopilot-driver"),
        None => {
            let uid = unsafe { libc::getuid() };
            std::env::temp_dir().join(format!("zopilot-driver-{uid}"))
        }
    };
    if let Err(e) = private_dir(&private).and_then(|()| link_driver_libraries(&dir, &private)) {
        eprintln!(
            "warning: not switching to the NVIDIA driver in {}: {e}",
            dir.display()
        );
        return;
    }
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

/// Creates `path` as a directory only this user can use (mode 0700), or accepts it if it
/// already is one: a real directory (not a symlink), owned by this user, with no group or
/// other permissions, in a parent that others cannot rename it out of (not writable by
/// others, or sticky like /tmp). Anything else is refused with the reason, because the
/// re-exec would load whatever libraries it holds.
pub fn private_dir(path: &Path) -> std::io::Result<()> {
    use std::io::{Error, ErrorKind};
    let refuse = |why: String| Err(Error::new(ErrorKind::PermissionDenied, why));
    let parent = path.parent().unwrap_or(Path::new("/"));
    let pm = std::fs::metadata(parent)?;
    let sticky = pm.mode() & libc::S_ISVTX != 0;
    if pm.mode() & 0o022 != 0 && !sticky {
        return refuse(format!(
            "{} is writable by other users and not sticky, so {} could be swapped for theirs",
            parent.display(),
            path.display()
        ));
    }
    match std::fs::DirBuilder::new().mode(0o700).create(path) {
        Err(e) if e.kind() != ErrorKind::AlreadyExists => return Err(e),
        _ => {}
    }
    let m = std::fs::symlink_metadata(path)?;
    let uid = unsafe { libc::getuid() };
    if !m.file_type().is_dir() {
        return refuse(format!(
            "{} exists and is not a directory (a symlink?); remove it",
            path.display()
        ));
    }
    if m.uid() != uid {
        return refuse(format!(
            "{} is owned by uid {}, not by this user (uid {uid}): another user may have \
             planted it; remove it, or set XDG_RUNTIME_DIR to a directory of your own",
            path.display(),
            m.uid()
        ));
    }
    if m.mode() & 0o077 != 0 {
        return refuse(format!(
            "{} has mode {:o}, open to other users; it must be 700 (remove it, or chmod 700 \
             it if you made it)",
            path.display(),
            m.mode() & 0o777
        ));
    }
    Ok(())
}

/// Libraries a driver library may need that must come from the package, never from the
/// system directory (the host's glibc would shadow the packaged one).
const FROM_THE_PACKAGE: &[&str] = &[
    "libc.so",
    "libm.so",
    "libdl.so",
    "libpthread.so",
    "librt.so",
    "libresolv.so",
    "libutil.so",
    "ld-linux",
    "libgcc_s.so",
    "libstdc++.so",
];

/// The driver's own libraries: `libcuda*` and `libnvidia-*` (some are opened later by name,
/// e.g. the PTX JIT compiler, so `DT_NEEDED` alone would miss them) and WSL's
/// `libdxcore.so`, which WSL's libcuda opens.
fn is_driver_library(name: &str) -> bool {
    name.contains(".so")
        && (name.starts_with("libcuda.so")
            || name.starts_with("libnvidia-")
            || name.starts_with("libdxcore.so"))
}

/// Symlinks the driver's libraries from `dir` into `private` (checked by `private_dir`):
/// those `is_driver_library` names and, transitively, every `DT_NEEDED` entry of theirs
/// found in `dir`, except the C library and compiler runtime. Each link is replaced
/// atomically, so a process starting at the same moment never misses one.
pub fn link_driver_libraries(dir: &Path, private: &Path) -> std::io::Result<()> {
    let mut wanted: Vec<String> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| is_driver_library(n))
        .collect();
    let mut done = std::collections::BTreeSet::new();
    while let Some(name) = wanted.pop() {
        let source = dir.join(&name);
        if !source.exists() || !done.insert(name.clone()) {
            continue;
        }
        wanted.extend(
            elf_needed(&source)
                .into_iter()
                .filter(|n| !FROM_THE_PACKAGE.iter().any(|p| n.starts_with(p))),
        );
        let tmp = private.join(format!(".{name}.{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&source, &tmp)?;
        std::fs::rename(&tmp, private.join(&name))?;
    }
    Ok(())
}

/// The `DT_NEEDED` names of a 64-bit little-endian ELF file (empty for anything else), read
/// through its program headers, so stripped section headers do not matter.
pub fn elf_needed(path: &Path) -> Vec<String> {
    std::fs::File::open(path)
        .ok()
        .and_then(|f| read_needed(&f))
        .unwrap_or_default()
}

fn read_needed(f: &std::fs::File) -> Option<Vec<String>> {
    const PT_LOAD: u32 = 1;
    const PT_DYNAMIC: u32 = 2;
    const DT_NEEDED: u64 = 1;
    const DT_STRTAB: u64 = 5;
    const DT_STRSZ: u64 = 10;
    let read = |off: u64, len: usize| {
        let mut b = vec![0; len];
        f.read_exact_at(&mut b, off).ok().map(|()| b)
    };
    let u64_at = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
    let header = read(0, 64)?;
    if header[..6] != *b"\x7fELF\x02\x01" {
        return None;
    }
    let phoff = u64_at(&header, 0x20);
    let phentsize = u16::from_le_bytes([header[0x36], header[0x37]]) as usize;
    let phnum = u16::from_le_bytes([header[0x38], header[0x39]]) as usize;
    if phentsize < 56 {
        return None;
    }
    // (type, file offset, address, size in the file) of each segment.
    let segments: Vec<(u32, u64, u64, u64)> = read(phoff, phentsize * phnum)?
        .chunks_exact(phentsize)
        .map(|p| {
            let kind = u32::from_le_bytes(p[0..4].try_into().unwrap());
            (kind, u64_at(p, 8), u64_at(p, 16), u64_at(p, 32))
        })
        .collect();
    let &(_, dyn_off, _, dyn_size) = segments.iter().find(|s| s.0 == PT_DYNAMIC)?;
    let (mut needed, mut strtab, mut strsz) = (Vec::new(), None, 0);
    for entry in read(dyn_off, dyn_size as usize)?.chunks_exact(16) {
        match (u64_at(entry, 0), u64_at(entry, 8)) {
            (0, _) => break,
            (DT_NEEDED, v) => needed.push(v as usize),
            (DT_STRTAB, v) => strtab = Some(v),
            (DT_STRSZ, v) => strsz = v as usize,
            _ => {}
        }
    }
    // DT_STRTAB is an address: find the loaded segment that holds it.
    let strtab = strtab?;
    let &(_, load_off, load_addr, _) = segments
        .iter()
        .find(|&&(kind, _, addr, size)| kind == PT_LOAD && (addr..addr + size).contains(&strtab))?;
    let strings = read(strtab - load_addr + load_off, strsz)?;
    needed
        .into_iter()
        .map(|at| {
            let tail = strings.get(at..)?;
            let end = tail.iter().position(|&b| b == 0)?;
            Some(String::from_utf8_lossy(&tail[..end]).into_owned())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::process::Command;

    fn set_mode(p: &Path, mode: u32) {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    fn refusal(p: &Path) -> String {
        private_dir(p).expect_err("must be refused").to_string()
    }

    /// The private directory's path, already there (as another process or user left it).
    fn pre_created(mode: u32) -> (tempfile::TempDir, PathBuf) {
        let base = tempfile::tempdir().unwrap();
        let p = base.path().join("zopilot-driver");
        std::fs::create_dir(&p).unwrap();
        set_mode(&p, mode);
        (base, p)
    }

    #[test]
    fn private_dir_is_created_for_this_user_only_and_reused() {
        let base = tempfile::tempdir().unwrap();
        let p = base.path().join("zopilot-driver");
        private_dir(&p).unwrap();
        let m = std::fs::symlink_metadata(&p).unwrap();
        assert!(m.is_dir());
        assert_eq!(m.mode() & 0o777, 0o700);
        assert_eq!(m.uid(), unsafe { libc::getuid() });
        private_dir(&p).unwrap();
    }

    #[test]
    fn private_dir_pre_created_with_a_looser_mode_is_refused() {
        let (_base, p) = pre_created(0o755);
        let why = refusal(&p);
        assert!(
            why.contains("has mode 755") && why.contains("must be 700"),
            "{why}"
        );
    }

    #[test]
    fn private_dir_pre_created_by_another_owner_is_refused() {
        if unsafe { libc::getuid() } != 0 {
            eprintln!("skipped: only root can give a directory to another user (CI runs as root)");
            return;
        }
        let (_base, p) = pre_created(0o700);
        let c = CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
        assert_eq!(unsafe { libc::chown(c.as_ptr(), 4242, 4242) }, 0);
        let why = refusal(&p);
        assert!(
            why.contains("owned by uid 4242") && why.contains("planted"),
            "{why}"
        );
    }

    #[test]
    fn private_dir_that_is_a_symlink_is_refused() {
        let base = tempfile::tempdir().unwrap();
        let target = base.path().join("elsewhere");
        std::fs::create_dir(&target).unwrap();
        set_mode(&target, 0o700);
        let p = base.path().join("zopilot-driver");
        std::os::unix::fs::symlink(&target, &p).unwrap();
        assert!(refusal(&p).contains("not a directory"));
    }

    #[test]
    fn private_dir_in_a_parent_others_can_rename_in_is_refused_unless_sticky() {
        let base = tempfile::tempdir().unwrap();
        let shared = base.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        set_mode(&shared, 0o777);
        let p = shared.join("zopilot-driver");
        assert!(refusal(&p).contains("not sticky"));
        assert!(!p.exists(), "nothing is created in such a parent");
        set_mode(&shared, 0o1777);
        private_dir(&p).unwrap();
    }

    /// A shared library named `file` with soname `file`, needing `needs` from `dir`.
    fn library(dir: &Path, file: &str, needs: &[&str]) {
        let src = dir.join(format!("{file}.c"));
        std::fs::write(&src, "int f(void) { return 1; }\n").unwrap();
        let mut cc = Command::new("cc");
        cc.args(["-shared", "-fPIC", "-Wl,--no-as-needed", "-o"])
            .arg(dir.join(file))
            .arg(format!("-Wl,-soname,{file}"))
            .arg(&src)
            .arg("-L")
            .arg(dir);
        for n in needs {
            cc.arg(format!("-l:{n}"));
        }
        assert!(cc.status().expect("a C compiler (cc)").success());
        std::fs::remove_file(src).unwrap();
    }

    #[test]
    fn driver_libraries_are_linked_with_their_needed_closure_but_not_glibc() {
        let driver = tempfile::tempdir().unwrap();
        let d = driver.path();
        // WSL's layout: libcuda opens libdxcore.so; a helper reached only through DT_NEEDED.
        library(d, "libhelper.so.2", &[]);
        library(d, "libdxcore.so", &[]);
        library(
            d,
            "libcuda.so.1",
            &["libhelper.so.2", "libdxcore.so", "libc.so.6"],
        );
        library(d, "libnvidia-ptxjitcompiler.so.1", &[]);
        library(d, "libunrelated.so.1", &[]);
        // The system directory also holds glibc: it must never be linked.
        std::fs::write(d.join("libc.so.6"), "not the packaged glibc").unwrap();
        assert_eq!(
            elf_needed(&d.join("libcuda.so.1")),
            ["libhelper.so.2", "libdxcore.so", "libc.so.6"]
        );

        let base = tempfile::tempdir().unwrap();
        let private = base.path().join("zopilot-driver");
        private_dir(&private).unwrap();
        link_driver_libraries(d, &private).unwrap();
        let mut linked: Vec<String> = std::fs::read_dir(&private)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        linked.sort();
        assert_eq!(
            linked,
            [
                "libcuda.so.1",
                "libdxcore.so",
                "libhelper.so.2",
                "libnvidia-ptxjitcompiler.so.1"
            ]
        );
        for name in &linked {
            assert_eq!(
                std::fs::read_link(private.join(name)).unwrap(),
                d.join(name)
            );
        }
        // A second start replaces the links in place.
        link_driver_libraries(d, &private).unwrap();
        assert_eq!(std::fs::read_dir(&private).unwrap().count(), 4);
    }

    #[test]
    fn elf_needed_of_this_test_binary_names_the_c_library_and_of_text_nothing() {
        let me = std::env::current_exe().unwrap();
        assert!(elf_needed(&me).iter().any(|n| n.starts_with("libc.so")));
        let text = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(text.path(), "not an ELF file").unwrap();
        assert!(elf_needed(text.path()).is_empty());
    }
}
