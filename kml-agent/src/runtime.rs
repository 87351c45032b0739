//! The agent's async runtime (one thread: one core for the agent) and the signals
//! that stop a session cleanly.

/// Runs an async command on a current-thread runtime (one core for the agent).
pub fn block_on<F: std::future::Future<Output = anyhow::Result<()>>>(f: F) -> anyhow::Result<()> {
    use anyhow::Context as _;
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(f)
}

/// Resolves on SIGINT or SIGTERM, with the signal's name. The handlers are
/// installed when this is called (not when first awaited), so a signal sent right
/// after the agent says it is ready still stops it cleanly.
pub fn shutdown_signal() -> impl std::future::Future<Output = anyhow::Result<&'static str>> {
    use tokio::signal::unix::{signal, SignalKind};
    let int = signal(SignalKind::interrupt());
    let term = signal(SignalKind::terminate());
    async move {
        let (mut int, mut term) = (int?, term?);
        Ok(tokio::select! {
            _ = int.recv() => "SIGINT",
            _ = term.recv() => "SIGTERM",
        })
    }
}

/// Gives memory the allocator holds free back to the kernel (glibc keeps what a
/// burst of allocations freed, in the main heap below its top and in the other
/// threads' arenas, for reuse): called after the one-off peaks, loading (BTF,
/// the object) and a training, so the agent's resident set is what it uses.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}
