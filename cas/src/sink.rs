//! Writing content out while its whole-content check is computed beside it.

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::ContentCheck;

/// Writes chunks, in order, to a writer on one blocking thread while another computes the
/// whole-content check ([`ContentCheck`]: length and SHA-256) of the same chunks (shared, not
/// copied).
///
/// SHA-256 of a GiB takes about 0.9 s here and writing it into the page cache a third of that
/// or more; in one thread the two added up, side by side they overlap. Used by every
/// verified read that ends in a writer: the embedded store's downloads and a remote client's.
#[derive(Debug)]
pub struct ContentSink<W> {
    to_writer: mpsc::Sender<Bytes>,
    to_hasher: mpsc::Sender<Bytes>,
    writer: JoinHandle<std::io::Result<W>>,
    hasher: JoinHandle<ContentCheck>,
}

impl<W: std::io::Write + Send + 'static> ContentSink<W> {
    /// Starts both threads; up to `depth` chunks wait for each.
    pub fn spawn(mut out: W, depth: usize) -> Self {
        let (to_writer, mut chunks) = mpsc::channel::<Bytes>(depth.max(1));
        let (to_hasher, mut hashed) = mpsc::channel::<Bytes>(depth.max(1));
        let writer = tokio::task::spawn_blocking(move || {
            while let Some(chunk) = chunks.blocking_recv() {
                out.write_all(&chunk)?;
            }
            out.flush()?;
            Ok(out)
        });
        let hasher = tokio::task::spawn_blocking(move || {
            let mut check = ContentCheck::default();
            while let Some(chunk) = hashed.blocking_recv() {
                check.update(&chunk);
            }
            check
        });
        Self {
            to_writer,
            to_hasher,
            writer,
            hasher,
        }
    }

    /// Hands over the next chunk. `false` when the writer has failed: stop sending, and
    /// [`ContentSink::finish`] says why.
    pub async fn send(&self, chunk: Bytes) -> bool {
        self.to_hasher.send(chunk.clone()).await.is_ok() && self.to_writer.send(chunk).await.is_ok()
    }

    /// Waits for both threads: the writer back (flushed) and the check of everything sent, or
    /// the writer's error.
    pub async fn finish(self) -> std::io::Result<(W, ContentCheck)> {
        drop((self.to_writer, self.to_hasher));
        let out = self.writer.await.map_err(std::io::Error::other)??;
        let hasher = self.hasher.await.map_err(std::io::Error::other)?;
        Ok((out, hasher))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn writes_and_hashes_the_same_bytes() {
        let sink = ContentSink::spawn(Vec::new(), 2);
        let (mut sent, mut expected) = (Vec::new(), ContentCheck::default());
        for i in 0..50u8 {
            let chunk = Bytes::from(vec![i; 1000 + usize::from(i)]);
            expected.update(&chunk);
            sent.extend_from_slice(&chunk);
            assert!(sink.send(chunk).await);
        }
        let (out, check) = sink.finish().await.unwrap();
        assert_eq!(out, sent);
        assert_eq!(check.len(), sent.len() as u64);
        assert_eq!(check.sha256(), expected.sha256());
    }

    #[tokio::test]
    async fn a_failing_writer_stops_the_sender_and_is_reported() {
        #[derive(Debug)]
        struct Full;
        impl std::io::Write for Full {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                Err(std::io::Error::other("disk full"))
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let sink = ContentSink::spawn(Full, 1);
        let mut refused = false;
        for _ in 0..100 {
            if !sink.send(Bytes::from_static(b"x")).await {
                refused = true;
                break;
            }
        }
        assert!(refused, "a dead writer must stop the sender");
        let err = sink.finish().await.unwrap_err();
        assert!(err.to_string().contains("disk full"), "{err}");
    }
}
