//! The heap handed back to the operating system once the server goes idle after work.
//!
//! glibc keeps what a burst's threads freed in its per-thread arenas, ready for reuse but
//! resident: without a trim an idle server holds the memory of its busiest moment (after a
//! burst of 256 requests against the tiny model, 80 MB of anonymous memory, of which 11 MB
//! stays once trimmed). `malloc_trim` returns those free pages; it runs once per quiet
//! spell, never while a sequence runs or waits, so it costs no request anything.
//!
//! Trimming returns only whole free pages, so the allocator is also told, once at start, to
//! serve every block of 1 MiB or more with its own mapping (returned the moment it is
//! freed). glibc's default raises that threshold after the first such block is freed, up to
//! 32 MiB, after which a step's large buffers (logits, KV tensors on CPU) come from the
//! arenas and leave them fragmented: what an idle server then kept after identical bursts
//! ranged from 11 to 42 MB, 11 MB with the fixed threshold. On a GPU a step's host buffers
//! are a few MiB at most, so the extra mappings cost microseconds a step.

use std::sync::Weak;
use std::time::Duration;

use super::Engine;

/// Blocks at least this large get a mapping of their own (see the module's notes).
const MMAP_THRESHOLD: i32 = 1 << 20;

/// Fixes the allocator's mapping threshold at [`MMAP_THRESHOLD`], unless the environment
/// sets glibc's own `MALLOC_MMAP_THRESHOLD_`. Call first thing, before threads start.
pub fn fix_mmap_threshold() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
        // SAFETY: mallopt only sets a parameter of glibc's allocator.
        unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) };
    }
}

/// How long the slots must stay idle before the heap is trimmed.
const QUIET: Duration = Duration::from_millis(500);

/// Trims the heap after each spell of work, once the engine has been idle for [`QUIET`];
/// ends when the engine is gone.
pub(super) async fn trim_when_idle(engine: Weak<Engine>) {
    let mut trimmed_at = 0;
    loop {
        tokio::time::sleep(QUIET).await;
        let Some(e) = engine.upgrade() else { return };
        let admitted = e.admission.admitted();
        if admitted == trimmed_at || !e.admission.idle() {
            continue;
        }
        // Idle now; still idle a quiet spell later, with nothing admitted in between?
        drop(e);
        tokio::time::sleep(QUIET).await;
        let Some(e) = engine.upgrade() else { return };
        if e.admission.admitted() != admitted || !e.admission.idle() {
            continue;
        }
        trimmed_at = admitted;
        let _ = tokio::task::spawn_blocking(trim).await;
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim() {
    // SAFETY: malloc_trim only walks glibc's own arenas under their locks.
    let released = unsafe { libc::malloc_trim(0) };
    tracing::debug!(released = released == 1, "heap trimmed after work");
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() {}
