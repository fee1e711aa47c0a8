//! A file writer that makes its data durable while it is still being written.

use std::fs::File;
use std::io::{self, Write};
use std::thread::JoinHandle;

/// Start writing back after this many new bytes.
const EVERY: u64 = 32 << 20;

/// Writes into a file and, every 32 MiB, starts an `fdatasync` of what is there so far on a
/// thread of its own, so that the disk works while the content is still being verified and
/// written. [`SyncBehind::finish`] then finds little left to flush: a 1 GiB download no longer
/// writes the whole GiB to disk only after the last byte (the kernel's dirty-page writeback
/// would start late, and the final `sync_all` would wait for all of it).
#[derive(Debug)]
pub struct SyncBehind {
    file: File,
    unsynced: u64,
    running: Option<JoinHandle<io::Result<()>>>,
}

impl SyncBehind {
    /// Writes into `file`, syncing behind from the start.
    pub fn new(file: File) -> Self {
        Self {
            file,
            unsynced: 0,
            running: None,
        }
    }

    /// Waits for a sync in flight, then makes everything durable (`sync_all`).
    pub fn finish(mut self) -> io::Result<File> {
        self.wait()?;
        self.file.sync_all()?;
        Ok(self.file)
    }

    fn wait(&mut self) -> io::Result<()> {
        match self.running.take() {
            Some(sync) => sync
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("the sync thread panicked"))),
            None => Ok(()),
        }
    }
}

impl Write for SyncBehind {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.unsynced += n as u64;
        // One sync at a time; a sync still running means the disk is busy already.
        if self.unsynced >= EVERY && self.running.as_ref().is_none_or(JoinHandle::is_finished) {
            self.wait()?;
            let file = self.file.try_clone()?;
            self.running = Some(std::thread::spawn(move || file.sync_data()));
            self.unsynced = 0;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read as _;

    #[test]
    fn writes_everything_in_order_across_syncs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let mut w = SyncBehind::new(File::create(&path).unwrap());
        let piece: Vec<u8> = (0..=255u8).cycle().take(3 << 20).collect();
        for _ in 0..40 {
            w.write_all(&piece).unwrap();
        }
        drop(w.finish().unwrap());
        let mut back = Vec::new();
        File::open(&path).unwrap().read_to_end(&mut back).unwrap();
        assert_eq!(back.len(), 40 * piece.len());
        assert!(back.chunks(piece.len()).all(|c| c == piece.as_slice()));
    }
}
