//! Making the embedded databases durable against a power loss where a promise needs it.
//!
//! sled's `flush` writes its log with `sync_file_range`: that survives a killed process, not
//! a power loss (neither the file's size and other metadata, nor sled's separate blob files of
//! large values, nor the disk's write cache are flushed), and sled's own periodic `fsync` logs
//! a failure and goes on. So [`FileSystem::sync`] flushes sled's blob files written or grown
//! since the last time, their directories, and each database's file, and fails should any
//! write-back since these handles were opened have failed. It runs before a checkpoint lets
//! the journal delete segments (their events then live only in sled; at every checkpoint, on a
//! thread of its own, see `writer::sync_loop`), and before the answer to a write promised on
//! disk (producers, keys, hashes, listeners; a manual attempt, a replay). At start one
//! `syncfs` stands for all the blob files already there. (A `syncfs` of the whole filesystem
//! at every sync was tried first: it also flushes every other file there, many hookd
//! instances' in the test suite.) This module never decides what is durable; it only makes
//! it so.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Handles on the databases' files, held open so that write-back errors from the moment they
/// were opened are reported, even those sled's own `fsync` took and logged.
#[derive(Debug)]
pub(crate) struct FileSystem {
    /// The intake database's directory, for the one whole-filesystem sync at start.
    dir: File,
    /// Each database's file of pages (small values; large ones go to blob files beside it).
    databases: [File; 2],
    /// Each database's blob files (named by the log position that wrote them), with the length
    /// each had when it was last synced: a blob seen while sled was still writing it is synced
    /// again once it has grown.
    blobs: [(PathBuf, Mutex<HashMap<u64, u64>>); 2],
}

impl FileSystem {
    /// Opens the handles on the sled databases at `dir` and `queue_dir` (already open, so their
    /// files exist).
    pub(crate) fn open(dir: &Path, queue_dir: &Path) -> io::Result<Self> {
        Ok(Self {
            dir: File::open(dir)?,
            databases: [File::open(dir.join("db"))?, File::open(queue_dir.join("db"))?],
            blobs: [(dir.join("blobs"), Mutex::default()), (queue_dir.join("blobs"), Mutex::default())],
        })
    }

    /// At start, before the journal starts afresh: everything on the filesystem, once
    /// (`syncfs`; one flush rather than one per blob file already there), and notes every
    /// blob file as synced.
    pub(crate) fn sync_at_start(&self) -> io::Result<()> {
        #[cfg(target_os = "linux")]
        {
            use std::os::unix::io::AsRawFd as _;
            // SAFETY: the descriptor is open for as long as `self` lives.
            if unsafe { libc::syncfs(self.dir.as_raw_fd()) } != 0 {
                return Err(io::Error::last_os_error());
            }
            for (dir, synced) in &self.blobs {
                let mut synced = synced.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                *synced = blob_files(dir)?.into_iter().collect();
            }
            Ok(())
        }
        #[cfg(not(target_os = "linux"))]
        {
            self.dir.sync_all()?;
            self.sync()
        }
    }

    /// Flushes what sled wrote so far to stable storage: the blob files new or grown since the
    /// last time (sled writes a blob before the log record that points to it, and reads its
    /// log only up to the first blob it cannot read, so every one matters), their directory,
    /// then each database's file. For checkpoints, which let the journal delete events' only
    /// other copy, and for writes answered once on disk.
    pub(crate) fn sync(&self) -> io::Result<()> {
        for (dir, synced) in &self.blobs {
            let mut synced = synced.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let found = blob_files(dir)?;
            let mut any = false;
            for (id, len) in &found {
                if synced.get(id) == Some(len) {
                    continue;
                }
                match File::open(dir.join(id.to_string())) {
                    Ok(blob) => blob.sync_all()?,
                    // Removed by sled meanwhile (its value was replaced or deleted).
                    Err(error) if error.kind() == io::ErrorKind::NotFound => {}
                    Err(error) => return Err(error),
                }
                any = true;
            }
            if any {
                File::open(dir)?.sync_all()?;
            }
            *synced = found.into_iter().collect();
        }
        for database in &self.databases {
            database.sync_all()?;
        }
        Ok(())
    }
}

/// The blob files under `dir` with their lengths; none when sled has written none yet.
fn blob_files(dir: &Path) -> io::Result<Vec<(u64, u64)>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(error),
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry?;
        let Some(id) = entry.file_name().to_str().and_then(|name| name.parse::<u64>().ok()) else { continue };
        match entry.metadata() {
            Ok(metadata) => found.push((id, metadata.len())),
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(error) => return Err(error),
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blob_file_is_synced_again_once_it_has_grown() {
        let dir = tempfile::tempdir().unwrap();
        let (db, queue) = (sled::open(dir.path().join("db")).unwrap(), sled::open(dir.path().join("queue")).unwrap());
        db.insert(b"key", b"value".as_slice()).unwrap();
        // A value large enough for sled to keep in a blob file of its own.
        db.insert(b"large", vec![7u8; 1 << 20]).unwrap();
        db.flush().unwrap();
        queue.flush().unwrap();
        let filesystem = FileSystem::open(&dir.path().join("db"), &dir.path().join("queue")).unwrap();
        filesystem.sync().unwrap();
        let synced = filesystem.blobs[0].1.lock().unwrap().clone();
        assert!(!synced.is_empty(), "the blob file is found and synced");
        // As if the sync had seen it while sled was still writing it.
        let (&id, _) = synced.iter().next().unwrap();
        filesystem.blobs[0].1.lock().unwrap().insert(id, 1);
        filesystem.sync().unwrap();
        assert_eq!(*filesystem.blobs[0].1.lock().unwrap(), synced, "synced again at its full length");
        filesystem.sync_at_start().unwrap();
    }
}
