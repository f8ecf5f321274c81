//! Attempts' working directories.
//!
//! Every attempt starts in an empty directory of its own, `WORK_DIR/attempts/ATTEMPT_ID`.
//! Creating a directory and deleting it costs the filesystem an inode each time (on
//! ext4 about 0.1 ms of CPU, a fifth of what a short tool costs), so a finished
//! attempt's directory that its tool left empty is kept and renamed for a later
//! attempt; one with anything in it is deleted.
//!
//! The runtime threads make the calls of constant cost here themselves (mkdir, rename,
//! a readdir of an empty directory), as they write an attempt's small record and
//! cgroup (`contain`): a trip to the blocking pool and back costs more CPU than such a
//! call (three trips per attempt made `baton-bench` B1 about 20 % slower on a 2-core
//! VM). Work that grows with what a tool left, deleting its tree or reading its
//! results, goes to the blocking pool.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Empty directories kept for reuse, at most.
const KEEP: usize = 64;

#[derive(Clone)]
pub struct Scratch {
    root: PathBuf,
    free: Arc<Mutex<Vec<PathBuf>>>,
}

impl Scratch {
    pub fn new(root: PathBuf) -> Scratch {
        Scratch { root, free: Arc::default() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// An empty directory named for the attempt: one kept from an earlier attempt
    /// (renamed), or a new one.
    pub async fn take(&self, attempt_id: &str) -> std::io::Result<PathBuf> {
        let dir = self.root.join(attempt_id);
        while let Some(old) = self.free.lock().ok().and_then(|mut f| f.pop()) {
            if std::fs::rename(&old, &dir).is_err() {
                let _ = std::fs::remove_dir(&old);
                break;
            }
            if is_empty(&dir) {
                return Ok(dir);
            }
            // Written to after it was given back (by a process that left its group).
            remove_tree(dir.clone()).await?;
        }
        std::fs::create_dir_all(&dir)?;
        Ok(dir)
    }

    /// Takes back a finished attempt's directory: kept when empty, else deleted.
    pub async fn give_back(&self, dir: PathBuf) {
        if is_empty(&dir)
            && let Ok(mut free) = self.free.lock()
            && free.len() < KEEP
        {
            free.push(dir);
            return;
        }
        let _ = remove_tree(dir).await;
    }
}

/// Deletes a directory tree on the blocking pool: its time grows with what a tool left.
async fn remove_tree(dir: PathBuf) -> std::io::Result<()> {
    tokio::task::spawn_blocking(move || std::fs::remove_dir_all(&dir)).await.map_err(std::io::Error::other)?
}

fn is_empty(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_none())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    fn inode(p: &Path) -> u64 {
        std::fs::metadata(p).unwrap().ino()
    }

    #[tokio::test]
    async fn an_empty_directory_is_reused_under_the_next_attempts_name() {
        let root = tempfile::tempdir().unwrap();
        let s = Scratch::new(root.path().to_path_buf());
        let a = s.take("att-a").await.unwrap();
        assert_eq!(a, root.path().join("att-a"));
        let ino = inode(&a);
        s.give_back(a.clone()).await;
        let b = s.take("att-b").await.unwrap();
        assert_eq!(b, root.path().join("att-b"));
        assert_eq!(inode(&b), ino, "the same directory, renamed");
        assert!(!a.exists());
        assert!(is_empty(&b));
    }

    #[tokio::test]
    async fn a_directory_with_files_is_deleted_not_reused() {
        let root = tempfile::tempdir().unwrap();
        let s = Scratch::new(root.path().to_path_buf());
        let a = s.take("att-a").await.unwrap();
        std::fs::create_dir(a.join("sub")).unwrap();
        std::fs::write(a.join("sub/f"), "x").unwrap();
        s.give_back(a.clone()).await;
        assert!(!a.exists());
        let b = s.take("att-b").await.unwrap();
        assert!(is_empty(&b));
    }

    #[tokio::test]
    async fn a_kept_directory_written_to_later_is_not_handed_out() {
        let root = tempfile::tempdir().unwrap();
        let s = Scratch::new(root.path().to_path_buf());
        let a = s.take("att-a").await.unwrap();
        s.give_back(a.clone()).await;
        std::fs::write(a.join("late"), "from a stray process").unwrap();
        let b = s.take("att-b").await.unwrap();
        assert!(is_empty(&b), "the next attempt starts empty");
        assert!(!a.exists());
    }
}
