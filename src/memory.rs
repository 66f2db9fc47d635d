//! Giving freed memory back to the system. glibc's allocator keeps memory freed in the middle
//! of its heap for reuse: after a burst of connections goes idle (and is parked) or closes,
//! the process would otherwise keep its peak resident size for good. Every few seconds, if
//! enough connections have let go of their buffers since the last time, the free pages are
//! returned with `malloc_trim`.

use std::time::Duration;

use berth_proxy::metrics::ConnectionCounts;
use tokio_util::sync::CancellationToken;

/// How often to look.
const EVERY: Duration = Duration::from_secs(5);

/// Connections closed or parked since the last trim before another is worth it: each frees
/// hyper's 16 KB of buffers, so this is about 4 MB.
const WORTH_IT: u64 = 256;

/// Runs until `stop`, trimming the heap after enough connections let go of their buffers.
pub async fn return_freed_memory(stop: CancellationToken) {
    let mut trimmed_at = ConnectionCounts::now().let_go;
    let mut ticks = tokio::time::interval(EVERY);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stop.cancelled() => return,
        }
        let let_go = ConnectionCounts::now().let_go;
        if let_go.wrapping_sub(trimmed_at) < WORTH_IT {
            continue;
        }
        trimmed_at = let_go;
        let started = std::time::Instant::now();
        // Off the runtime's threads: a trim walks the whole heap.
        let _ = tokio::task::spawn_blocking(trim).await;
        tracing::debug!(
            took_us = started.elapsed().as_micros() as u64,
            "Returned freed memory to the system"
        );
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim() {
    // SAFETY: `malloc_trim` only releases free pages; it takes the allocator's own locks and
    // may be called from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Other allocators (musl's) return memory themselves, or cannot be asked to.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() {}
