//! Criterion benches of the store's building blocks: chunking, hashing, frame encode/decode.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use sloth_cas::{ChunkId, Chunker, ChunkerParams, ContentHasher, frame};

/// 8 MiB of text-like data: half words, half pseudo-random, so zstd has real work.
fn input() -> Vec<u8> {
    let words: Vec<&[u8]> = vec![
        b"fn ",
        b"let ",
        b"artifact",
        b"chunk",
        b" = ",
        b"{\n",
        b"}\n",
        b"stack",
    ];
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut out = Vec::with_capacity(8 << 20);
    while out.len() < 8 << 20 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        if state.is_multiple_of(4) {
            out.extend_from_slice(&state.to_le_bytes());
        } else {
            out.extend_from_slice(words[(state >> 8) as usize % words.len()]);
        }
    }
    out
}

fn benches(c: &mut Criterion) {
    let data = input();
    let mut g = c.benchmark_group("cas");
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.sample_size(10);

    for avg in [64 * 1024, 256 * 1024, 512 * 1024] {
        let params = ChunkerParams::new(avg).expect("valid");
        g.bench_function(format!("chunk/stream/avg{}k", avg / 1024), |b| {
            b.iter(|| {
                Chunker::new(&data[..], params)
                    .map(|c| c.map(|c| c.len()))
                    .sum::<std::io::Result<usize>>()
            })
        });
    }
    // The crate's cut on its own, over an input already in memory. The stream benches above
    // also read the input into fresh multi-MiB blocks each iteration (page faults that a long
    // ingest, which recycles its blocks, does not pay), so they run well below this.
    g.bench_function("chunk/cut-only/avg256k", |b| {
        use fastcdc::v2020::{FastCDC, Normalization};
        b.iter(|| {
            FastCDC::with_level(&data, 64 << 10, 256 << 10, 1 << 20, Normalization::Level2)
                .map(|c| c.length)
                .sum::<usize>()
        })
    });
    g.bench_function("hash/blake3", |b| {
        b.iter(|| ChunkId::digest(black_box(&data)))
    });
    g.bench_function("hash/sha256", |b| {
        use sha2::Digest;
        b.iter(|| sha2::Sha256::digest(black_box(&data)))
    });
    g.bench_function("hash/content(blake3+sha256)", |b| {
        b.iter(|| {
            let mut h = ContentHasher::default();
            h.update(black_box(&data));
            h.finish()
        })
    });

    let params = ChunkerParams::default();
    let chunks: Vec<_> = Chunker::new(&data[..], params)
        .map(|c| c.expect("in memory"))
        .collect();
    for level in [1, 3, 9] {
        g.bench_function(format!("frame/encode/zstd{level}"), |b| {
            b.iter(|| {
                chunks
                    .iter()
                    .map(|c| frame::encode(c, level).stored_len())
                    .sum::<usize>()
            })
        });
    }
    g.finish();

    // Incompressible chunks (8 MiB of random bytes): the entropy check that skips zstd, and
    // what trying zstd on them costs (the encoder before the check).
    let random: Vec<u8> = (0u64..)
        .flat_map(|i| *blake3::hash(&i.to_le_bytes()).as_bytes())
        .take(8 << 20)
        .collect();
    let random_chunks: Vec<_> = Chunker::new(&random[..], params)
        .map(|c| c.expect("in memory"))
        .collect();
    let mut g = c.benchmark_group("cas-random");
    g.throughput(Throughput::Bytes(random.len() as u64));
    g.sample_size(10);
    g.bench_function("frame/encode/zstd3", |b| {
        b.iter(|| {
            random_chunks
                .iter()
                .map(|c| frame::encode(c, 3).stored_len())
                .sum::<usize>()
        })
    });
    g.bench_function("frame/encode/zstd3-attempted", |b| {
        b.iter(|| {
            random_chunks
                .iter()
                .map(|c| {
                    let compressed = zstd::bulk::compress(c, 3).expect("in memory");
                    if compressed.len() < c.len() {
                        compressed.len()
                    } else {
                        // The encoder then copied the chunk in behind the frame's header.
                        frame::encode_raw(c).to_bytes().len()
                    }
                })
                .sum::<usize>()
        })
    });
    g.bench_function("frame/judge", |b| {
        b.iter(|| {
            random_chunks
                .iter()
                .filter(|c| frame::looks_incompressible(c))
                .count()
        })
    });
    g.finish();

    let mut g = c.benchmark_group("cas");
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.sample_size(10);
    let frames: Vec<_> = chunks
        .iter()
        .map(|c| (ChunkId::digest(c), frame::encode(c, 3).to_bytes()))
        .collect();
    g.bench_function("frame/decode+verify", |b| {
        b.iter(|| {
            frames
                .iter()
                .map(|(id, f)| frame::decode(id, f).map(|d| d.len()))
                .sum::<sloth_cas::Result<usize>>()
        })
    });
    g.finish();
}

criterion_group!(cas, benches);
criterion_main!(cas);
