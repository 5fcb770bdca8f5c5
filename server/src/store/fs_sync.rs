//! Making the embedded database durable against a power loss before the journal lets go of
//! events.
//!
//! sled's `flush` writes its log with `sync_file_range`: that survives a killed process, not
//! a power loss (neither the file's size and other metadata, nor sled's separate blob files of
//! large values, nor the disk's write cache are flushed), and sled's own periodic `fsync` logs
//! a failure and goes on. Every journal segment deleted is an acknowledged event that then
//! lives only in sled, so before a checkpoint lets the journal delete segments,
//! [`FileSystem::sync`] flushes sled's blob files written since the last time, their
//! directory, and sled's file of pages, down to the disk, and fails should any write-back
//! since these handles were opened have failed. Every ten seconds (see
//! `writer::SYNC_EVERY`), off the intake's line. (A `syncfs` of the whole filesystem was
//! tried first: it also flushes every other file there, many hookd instances' in the test
//! suite.) Writes of producers, keys, hashes and listeners, answered once on disk, follow
//! sled's flush with [`FileSystem::sync_database`]. This module never decides what is durable;
//! it only makes it so.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Handles on the database's files, held open so that write-back errors from the moment they
/// were opened are reported, even those sled's own `fsync` took and logged.
#[derive(Debug)]
pub(crate) struct FileSystem {
    /// sled's one file of pages (small values; large ones go to blob files beside it).
    database: File,
    /// The pipeline's database's file of pages (see `sled_pipeline`).
    queue: File,
    /// Where sled keeps blob files, each named by the log position that wrote it.
    blobs: PathBuf,
    /// The highest blob file synced so far.
    synced_blob: Mutex<u64>,
}

impl FileSystem {
    /// Opens the handles on the sled databases at `dir` and `queue_dir` (already open, so their
    /// files exist).
    pub(crate) fn open(dir: &Path, queue_dir: &Path) -> io::Result<Self> {
        Ok(Self {
            database: File::open(dir.join("db"))?,
            queue: File::open(queue_dir.join("db"))?,
            blobs: dir.join("blobs"),
            synced_blob: Mutex::new(0),
        })
    }

    /// Flushes what sled wrote of the events applied so far to stable storage: the blob files
    /// written since the last time (written before the log records that point to them, so
    /// every one an applied event needs is there), their directory, then sled's file. For
    /// checkpoints, which let the journal delete events' only other copy.
    pub(crate) fn sync(&self) -> io::Result<()> {
        let mut synced = self.synced_blob.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut newest = *synced;
        match std::fs::read_dir(&self.blobs) {
            Ok(entries) => {
                for entry in entries {
                    let entry = entry?;
                    let Some(id) = entry.file_name().to_str().and_then(|name| name.parse::<u64>().ok()) else {
                        continue;
                    };
                    if id > *synced {
                        match File::open(entry.path()) {
                            Ok(blob) => blob.sync_all()?,
                            // Removed by sled meanwhile (its value was replaced or deleted).
                            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
                            Err(error) => return Err(error),
                        }
                        newest = newest.max(id);
                    }
                }
                if newest > *synced {
                    File::open(&self.blobs)?.sync_all()?;
                }
            }
            // No blob written yet.
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(error) => return Err(error),
        }
        self.database.sync_all()?;
        *synced = newest;
        Ok(())
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
        // A value large enough for sled to keep in a blob file of its own.
        db.insert(b"large", vec![7u8; 1 << 20]).unwrap();
        db.flush().unwrap();
        queue.flush().unwrap();
        let filesystem = FileSystem::open(&dir.path().join("db"), &dir.path().join("queue")).unwrap();
        filesystem.sync().unwrap();
        assert!(*filesystem.synced_blob.lock().unwrap() > 0, "the blob file is found and synced");
        filesystem.sync_database().unwrap();
        filesystem.sync_queue().unwrap();
    }
}
