//! Shared by the runtime's integration tests: a store in a temporary file, removed on drop.

use bpftime_maps::Store;
use std::sync::Arc;

/// A store in its own temporary file.
pub struct T {
    pub store: Arc<Store>,
    path: std::path::PathBuf,
}

impl Drop for T {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A fresh store named after `tag`, the process and a counter.
pub fn temp_store(tag: &str) -> T {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let path = std::env::temp_dir().join(format!(
        "bpftime-rt-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let _ = std::fs::remove_file(&path);
    T {
        store: Arc::new(Store::open(&path).expect("store opens")),
        path,
    }
}
