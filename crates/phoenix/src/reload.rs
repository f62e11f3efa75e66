//! Watches files for changes and calls back once per burst of changes.
//!
//! Editors and tools such as certbot replace files by renaming a new one over the old, which removes the
//! watched inode; so the parent directories are watched and events are filtered by path. Several events
//! arrive for one save: they are debounced into one reload.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Quiet time after the last event before the callback runs.
const DEBOUNCE: Duration = Duration::from_millis(200);

/// Calls `on_change` with the set of changed paths (a subset of `paths`) after each burst of changes,
/// until `shutdown` is cancelled.
pub async fn watch(
    paths: Vec<PathBuf>,
    shutdown: CancellationToken,
    mut on_change: impl FnMut(&HashSet<PathBuf>) + Send,
) -> anyhow::Result<()> {
    let wanted: HashSet<PathBuf> = paths.iter().map(|p| absolute(p)).collect();
    let (tx, mut rx) = mpsc::unbounded_channel::<PathBuf>();
    let filter = wanted.clone();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // Reading a file (as the reload itself does) raises access events: only changes count.
        if let Ok(event) = event {
            if matches!(event.kind, notify::EventKind::Access(_)) {
                return;
            }
            // Other files in the same directories (a log file, say) must not hold the debounce open.
            for path in event.paths.into_iter().filter(|p| filter.contains(p)) {
                let _ = tx.send(path);
            }
        }
    })?;
    let dirs: HashSet<PathBuf> = wanted
        .iter()
        .filter_map(|p| p.parent().map(Path::to_path_buf))
        .collect();
    for dir in &dirs {
        watcher.watch(dir, RecursiveMode::NonRecursive)?;
    }
    loop {
        let first = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            p = rx.recv() => match p { Some(p) => p, None => return Ok(()) },
        };
        let mut changed = HashSet::from([first]);
        // Collect the rest of the burst.
        loop {
            match tokio::time::timeout(DEBOUNCE, rx.recv()).await {
                Ok(Some(p)) => {
                    changed.insert(p);
                }
                Ok(None) => return Ok(()),
                Err(_) => break,
            }
        }
        on_change(&changed);
    }
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}
