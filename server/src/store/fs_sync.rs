//! Making the embedded database durable against a power loss before the journal lets go of
//! events.
//!
//! sled's `flush` writes its log with `sync_file_range`: that survives a killed process, not
//! a power loss (neither the file's size and other metadata, nor sled's separate blob files of
//! large values, nor the disk's write cache are flushed), and sled's own periodic `fsync` logs
//! a failure and goes on. Every journal segment deleted is an acknowledged event that then
//! lives only in sled, so before a checkpoint lets the journal delete segments, [`FileSystem::sync`]
//! flushes the whole filesystem the database lives on (`syncfs`: data, metadata and the
//! device's cache), and fails should any write-back since this handle was opened have failed.
//! Every ten seconds (see `writer::SYNC_EVERY`), off the intake's line. Writes of
//! producers, keys, hashes and listeners, answered once on disk, follow sled's flush with
//! [`FileSystem::sync_database`]. This module never decides what is durable; it only makes it
//! so.

use std::fs::File;
use std::io;
use std::path::Path;

/// Handles on the database's directory and its file, held open so that write-back errors from
/// the moment they were opened are reported, even those sled's own `fsync` took and logged.
#[derive(Debug)]
pub(crate) struct FileSystem {
    dir: File,
    /// sled's one file of pages (small values; large ones go to blob files beside it).
    database: File,
    /// The pipeline's database's file of pages (see `sled_pipeline`).
    queue: File,
}

impl FileSystem {
    /// Opens the handles on the sled databases at `dir` and `queue_dir` (already open, so their
    /// files exist).
    pub(crate) fn open(dir: &Path, queue_dir: &Path) -> io::Result<Self> {
        Ok(Self {
            dir: File::open(dir)?,
            database: File::open(dir.join("db"))?,
            queue: File::open(queue_dir.join("db"))?,
        })
    }

    /// Flushes every file of the filesystem to stable storage: what sled wrote, blob files
    /// included. For checkpoints, which let the journal delete events' only other copy.
    pub(crate) fn sync(&self) -> io::Result<()> {
        #[cfg(target_os = "linux")]
        {
            use std::os::unix::io::AsRawFd as _;
            // SAFETY: the descriptor is open for as long as `self` lives.
            if unsafe { libc::syncfs(self.dir.as_raw_fd()) } != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        }
        #[cfg(not(target_os = "linux"))]
        {
            self.database.sync_all()?;
            self.dir.sync_all()
        }
    }

    /// Flushes sled's file of pages (`fdatasync`): enough for small records written through
    /// sled's flush (producers, keys, hashes, listeners), which never go to blob files.
    pub(crate) fn sync_database(&self) -> io::Result<()> {
        self.database.sync_data()
    }

    /// The same for the pipeline's database: for what an answer promises is queued (a manual
    /// attempt, a replay) or what must be on disk before another write (a deleted listener's
    /// record of what it was owed).
    pub(crate) fn sync_queue(&self) -> io::Result<()> {
        self.queue.sync_data()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_database_on_a_working_filesystem_syncs() {
        let dir = tempfile::tempdir().unwrap();
        let (db, queue) = (sled::open(dir.path().join("db")).unwrap(), sled::open(dir.path().join("queue")).unwrap());
        db.insert(b"key", b"value".as_slice()).unwrap();
        db.flush().unwrap();
        queue.flush().unwrap();
        let filesystem = FileSystem::open(&dir.path().join("db"), &dir.path().join("queue")).unwrap();
        filesystem.sync().unwrap();
        filesystem.sync_database().unwrap();
        filesystem.sync_queue().unwrap();
    }
}
