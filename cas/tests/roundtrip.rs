//! Any input reads back bit-exact; streaming equals one-shot; reopen keeps everything.

mod common;

use common::{random_bytes, read_all, small_chunks, text_bytes};
use proptest::prelude::*;
use sloth_cas::{Cas, CasConfig, ChunkerParams, ContentDigests, Error, MemoryChunkStore};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Sizes at the edges of the chunker's bounds for a 4 KiB average (min 1 KiB, max 16 KiB).
#[test]
fn boundary_sizes_round_trip() {
    let rt = runtime();
    rt.block_on(async {
        let cas = Cas::temporary(small_chunks()).unwrap();
        let p = cas.params();
        let (min, avg, max) = (p.min() as usize, p.avg() as usize, p.max() as usize);
        for len in [
            0,
            1,
            2,
            min - 1,
            min,
            min + 1,
            avg - 1,
            avg,
            avg + 1,
            max - 1,
            max,
            max + 1,
            3 * max + 7,
        ] {
            for data in [random_bytes(len as u64, len), text_bytes(len as u64, len)] {
                let staged = cas.ingest_bytes(data.clone()).await.unwrap();
                assert_eq!(staged.manifest().len(), len as u64);
                assert_eq!(*staged.manifest().digests(), ContentDigests::of(&data));
                assert!(
                    staged
                        .manifest()
                        .chunks()
                        .iter()
                        .all(|c| c.len as usize <= max)
                );
                let id = cas.commit(staged).await.unwrap();
                assert_eq!(read_all(&cas, id).await.unwrap(), data, "len {len}");
            }
        }
    });
}

/// The streaming chunker cuts exactly where the one-shot FastCDC does.
#[test]
fn streaming_equals_one_shot() {
    let rt = runtime();
    rt.block_on(async {
        let cas = Cas::temporary(small_chunks()).unwrap();
        let data = random_bytes(7, 1 << 20);
        let staged = cas.ingest_bytes(data.clone()).await.unwrap();
        let streamed: Vec<usize> = staged
            .manifest()
            .chunks()
            .iter()
            .map(|c| c.len as usize)
            .collect();
        assert_eq!(streamed, cas.params().chunk_lengths(&data));
    });
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]

    #[test]
    fn any_input_reads_back(seed in any::<u64>(), len in 0usize..(3 << 20), text in any::<bool>()) {
        let data = if text { text_bytes(seed, len) } else { random_bytes(seed, len) };
        let rt = runtime();
        let back = rt.block_on(async {
            let cas = Cas::temporary(small_chunks()).unwrap();
            let staged = cas.ingest_bytes(data.clone()).await.unwrap();
            let lengths: Vec<usize> = staged.manifest().chunks().iter().map(|c| c.len as usize).collect();
            assert_eq!(lengths, cas.params().chunk_lengths(&data), "streaming == one-shot");
            let id = cas.commit(staged).await.unwrap();
            read_all(&cas, id).await.unwrap()
        });
        prop_assert_eq!(back, data);
    }

    /// Ingesting content that shares pieces with earlier content never changes what any of it
    /// reads back as.
    #[test]
    fn dedup_never_changes_content(seeds in proptest::collection::vec((any::<u64>(), 0usize..200_000), 1..6)) {
        let rt = runtime();
        rt.block_on(async {
            let cas = Cas::with_store(
                sled::Config::new().temporary(true).open().unwrap(),
                MemoryChunkStore::new(),
                small_chunks(),
                "memory".into(),
            ).unwrap();
            let base = text_bytes(1, 300_000);
            let mut committed = Vec::new();
            for (seed, cut) in seeds {
                // Each input is the shared base with a random splice, so chunks repeat.
                let mut data = base.clone();
                let cut = cut.min(data.len());
                data.splice(cut..cut, random_bytes(seed, (seed % 5000) as usize));
                let id = cas.commit(cas.ingest_bytes(data.clone()).await.unwrap()).await.unwrap();
                committed.push((id, data));
                for (id, data) in &committed {
                    assert_eq!(&read_all(&cas, *id).await.unwrap(), data);
                }
            }
        });
    }
}

#[test]
fn tens_of_mib_round_trip() {
    let rt = runtime();
    rt.block_on(async {
        let cas = Cas::temporary(CasConfig::default()).unwrap();
        let mut data = text_bytes(3, 20 << 20);
        data.extend(random_bytes(4, 12 << 20));
        let id = cas
            .commit(cas.ingest_bytes(data.clone()).await.unwrap())
            .await
            .unwrap();
        assert_eq!(read_all(&cas, id).await.unwrap(), data);
    });
}

#[test]
fn async_reader_equals_sync_reader() {
    let rt = runtime();
    rt.block_on(async {
        let cas = Cas::temporary(small_chunks()).unwrap();
        let data = text_bytes(5, 700_000);
        let a = cas.ingest_bytes(data.clone()).await.unwrap();
        let b = cas
            .ingest(std::io::Cursor::new(data.clone()))
            .await
            .unwrap();
        assert_eq!(a.manifest(), b.manifest());
    });
}

#[test]
fn reopen_keeps_everything() {
    let dir = tempfile::tempdir().unwrap();
    let data = text_bytes(9, 2 << 20);
    let rt = runtime();
    let id = rt.block_on(async {
        let cas = Cas::open(dir.path(), small_chunks()).unwrap();
        cas.commit(cas.ingest_bytes(data.clone()).await.unwrap())
            .await
            .unwrap()
    });
    rt.block_on(async {
        // No chunker given: the recorded parameters are used.
        let cas = Cas::open(dir.path(), CasConfig::default()).unwrap();
        assert_eq!(cas.params(), ChunkerParams::new(4096).unwrap());
        assert_eq!(read_all(&cas, id).await.unwrap(), data);
        assert!(cas.scrub().await.unwrap().is_clean());
        let again = cas.ingest_bytes(data.clone()).await.unwrap();
        assert_eq!(
            again.stats().new_chunks,
            0,
            "reopened store still deduplicates"
        );
    });
}

/// Enough new frames that pack writes are synced in the background during the ingest (every
/// 32 MiB), then once more before indexing: all of it reads back after a reopen.
#[test]
fn content_synced_in_the_background_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let data = random_bytes(11, 80 << 20);
    let rt = runtime();
    let id = rt.block_on(async {
        let cas = Cas::open(dir.path(), CasConfig::default()).unwrap();
        cas.commit(cas.ingest_bytes(data.clone()).await.unwrap())
            .await
            .unwrap()
    });
    rt.block_on(async {
        let cas = Cas::open(dir.path(), CasConfig::default()).unwrap();
        assert_eq!(read_all(&cas, id).await.unwrap(), data);
        assert!(cas.scrub().await.unwrap().is_clean());
    });
}

#[test]
fn reopen_with_other_params_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    drop(Cas::open(dir.path(), small_chunks()).unwrap());
    let other = CasConfig {
        chunker: Some(ChunkerParams::new(512 * 1024).unwrap()),
        ..CasConfig::default()
    };
    let err = Cas::open(dir.path(), other).unwrap_err();
    assert!(
        matches!(
            err,
            Error::ParamsMismatch {
                stored: 4096,
                requested: 524288,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("4096"), "{err}");
}

#[test]
fn second_open_of_a_live_store_fails() {
    let dir = tempfile::tempdir().unwrap();
    let _first = Cas::open(dir.path(), small_chunks()).unwrap();
    let err = Cas::open(dir.path(), small_chunks()).unwrap_err();
    assert!(matches!(err, Error::Locked { .. }), "{err}");
    assert!(err.to_string().contains("in use"), "{err}");
}

#[test]
fn failing_reader_stores_nothing_visible() {
    struct Broken(usize);
    impl std::io::Read for Broken {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if self.0 == 0 {
                return Err(std::io::Error::other("disk went away"));
            }
            let n = buf.len().min(self.0);
            buf[..n].fill(7);
            self.0 -= n;
            Ok(n)
        }
    }
    let rt = runtime();
    rt.block_on(async {
        let cas = Cas::temporary(small_chunks()).unwrap();
        let err = cas.ingest_reader(Broken(100_000)).await.unwrap_err();
        assert!(matches!(err, Error::Input(_)), "{err}");
        assert!(err.to_string().contains("disk went away"));
        assert_eq!(cas.stats().await.unwrap().manifests, 0);
        // Whatever chunks made it in are unreferenced and go at the next GC.
        cas.gc().await.unwrap();
        assert_eq!(cas.stats().await.unwrap().chunks, 0);
    });
}

/// Regression: CPU slots were once semaphore permits, which a read stream that its caller
/// stopped polling (without dropping it) could keep forever, stalling every other read.
#[test]
fn an_abandoned_read_stream_does_not_stall_others() {
    use futures::StreamExt;
    let rt = runtime();
    rt.block_on(async {
        let cas = Cas::temporary(small_chunks()).unwrap();
        let data = random_bytes(21, 3 << 20);
        let id = cas
            .commit(cas.ingest_bytes(data.clone()).await.unwrap())
            .await
            .unwrap();
        let manifest = cas.manifest(id).await.unwrap();
        let mut stalled = std::pin::pin!(cas.read_chunks(&manifest));
        stalled.next().await.unwrap().unwrap();
        // `stalled` stays alive, unpolled, with many chunk loads in flight.
        let back = tokio::time::timeout(std::time::Duration::from_secs(30), read_all(&cas, id))
            .await
            .expect("a second read must not wait for the abandoned stream")
            .unwrap();
        assert_eq!(back, data);
    });
}
