//! Keeping glibc's allocator from holding on to memory over long runs.
//!
//! Every reconnect of a camera and every loop of a file builds a new GStreamer pipeline: new
//! streaming and decoder threads, new frame pools. With glibc's defaults each new thread can land
//! in another malloc arena (up to 8 per core), and after the first large block is freed the mmap
//! threshold rises (up to 32 MiB), so decoded frames come from the arenas instead of fresh
//! mappings. Freed frames then stay in fragmented arenas, and RSS creeps up with every rebuild
//! (measured: +26 MiB in 4 minutes for 3 looped files; see the README's Soak section). Capping
//! arenas at 2 and trimming once a minute keeps it flat at no measured cost in throughput. A fixed
//! mmap threshold (128 KiB) also kept RSS flat but cost 9% of frames per second (every frame
//! mapped and unmapped), so it is not set. Other platforms and allocators: nothing to do.

/// Caps malloc arenas. Call before any thread starts.
pub fn tune() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; it is called before other threads exist.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Returns free memory at the ends and in the middle of malloc arenas to the system.
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim is thread-safe and only releases memory that is free.
    unsafe {
        libc::malloc_trim(0);
    }
}
