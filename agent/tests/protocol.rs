//! A client that lies or breaks off gets an error and leaves nothing visible: the upload
//! conversation driven by hand against an agent served in this process.

#![allow(clippy::unwrap_used)]

use bytes::Bytes;
use sloth_agent::server::{AgentConfig, Bound};
use sloth_cas::{ChunkId, ContentDigests, frame};
use sloth_engine::{Engine, EngineConfig, ListQuery};
use sloth_proto::artifacts::{self as pb, artifacts_client::ArtifactsClient, upload_request::Step};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

struct Agent {
    addr: std::net::SocketAddr,
    client: ArtifactsClient<tonic::transport::Channel>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: tokio::task::JoinHandle<sloth_agent::Result<()>>,
    dir: tempfile::TempDir,
}

impl Agent {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(dir.path(), EngineConfig::default())
            .await
            .unwrap();
        let bound = Bound::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = bound.local_addr();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(sloth_agent::server::serve(
            engine,
            AgentConfig::new("test", addr),
            bound,
            None,
            async {
                let _ = stopped.await;
            },
        ));
        let client = ArtifactsClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        Self {
            addr,
            client,
            stop: Some(stop),
            server,
            dir,
        }
    }

    /// Runs an upload conversation made of `steps`; returns the agent's final error, if any.
    async fn upload(&mut self, steps: Vec<Step>) -> Result<Vec<pb::UploadResponse>, tonic::Status> {
        let (tx, rx) = mpsc::channel(16);
        for step in steps {
            tx.send(pb::UploadRequest { step: Some(step) })
                .await
                .unwrap();
        }
        drop(tx); // the stream ends here, committed or not
        let mut responses = self
            .client
            .upload(ReceiverStream::new(rx))
            .await?
            .into_inner();
        let mut out = Vec::new();
        while let Some(r) = responses.message().await? {
            out.push(r);
        }
        Ok(out)
    }

    /// Stops the agent and returns how many versions its catalog holds.
    async fn stop(mut self) -> usize {
        let _ = self.stop.take().unwrap().send(());
        self.server.await.unwrap().unwrap();
        let engine = Engine::open(self.dir.path(), EngineConfig::default())
            .await
            .unwrap();
        engine
            .list(&ListQuery {
                all_versions: true,
                ..ListQuery::default()
            })
            .unwrap()
            .len()
    }
}

fn begin() -> Step {
    Step::Begin(pb::Begin {
        name: "app.bin".into(),
        stack: Some("prod".into()),
        task: Some("build".into()),
    })
}

fn offer(data: &[u8]) -> (Step, ChunkId) {
    let id = ChunkId::digest(data);
    let step = Step::Offer(pb::Offer {
        chunks: vec![pb::ChunkRef {
            id: Bytes::copy_from_slice(id.as_bytes()),
            len: data.len() as u32,
        }],
    });
    (step, id)
}

/// The frame of `content` with its header apart from its payload, as a client sends it.
fn frames(id: ChunkId, content: &[u8]) -> Step {
    let frame = frame::encode(&Bytes::copy_from_slice(content), 3);
    frame_parts(id, frame.header(), frame.payload().clone())
}

fn frame_parts(id: ChunkId, header: &[u8], payload: Bytes) -> Step {
    Step::Frames(pb::Frames {
        frames: vec![pb::Frame {
            id: Bytes::copy_from_slice(id.as_bytes()),
            data: payload,
            header: Bytes::copy_from_slice(header),
        }],
    })
}

/// The frame of `content` in one piece, as an agent sends what it stores.
fn whole_frame(id: ChunkId, content: &[u8]) -> Step {
    Step::Frames(pb::Frames {
        frames: vec![pb::Frame {
            id: Bytes::copy_from_slice(id.as_bytes()),
            data: frame::encode(&Bytes::copy_from_slice(content), 3).to_bytes(),
            header: Bytes::new(),
        }],
    })
}

/// A commit that claims no digests: for content the agent holds whole.
fn commit_unclaimed(data: &[u8]) -> Step {
    Step::Commit(pb::Commit {
        length: data.len() as u64,
        sha256: Bytes::new(),
        blake3: Bytes::new(),
    })
}

fn commit(data: &[u8]) -> Step {
    let d = ContentDigests::of(data);
    Step::Commit(pb::Commit {
        length: data.len() as u64,
        sha256: Bytes::copy_from_slice(&d.sha256),
        blake3: Bytes::copy_from_slice(&d.blake3),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lies_and_broken_conversations_leave_nothing() {
    let mut agent = Agent::start().await;
    let data = b"the real release binary".repeat(100);
    let (offered, id) = offer(&data);

    // The honest conversation works (and is the control for the rest).
    let ok = agent
        .upload(vec![
            begin(),
            offered.clone(),
            frames(id, &data),
            commit(&data),
        ])
        .await
        .unwrap();
    assert!(matches!(
        ok.last().and_then(|r| r.step.as_ref()),
        Some(pb::upload_response::Step::Committed(_))
    ));

    // Each case offers content of its own: chunks a failed case stored stay (unreferenced,
    // for GC) and would not be asked for again.
    let fresh = |n: u8| -> (Vec<u8>, Step, ChunkId) {
        let content = [b"something else entirely, case ".as_slice(), &[n]]
            .concat()
            .repeat(100);
        let (step, id) = offer(&content);
        (content, step, id)
    };
    let (other, offered_other, other_id) = fresh(1);
    let (other2, offered_other2, other2_id) = fresh(2);
    let (other3, offered_other3, other3_id) = fresh(3);
    let (other4, offered_other4, other4_id) = fresh(4);
    let (other6, offered_other6, other6_id) = fresh(6);
    let raw = noise(100_000, 9);
    let (offered_raw, raw_id) = offer(&raw);
    let raw_frame = frame::encode(&Bytes::from(raw.clone()), 3);
    assert_eq!(
        frame::FrameHeader::parse(raw_frame.header()).unwrap().codec,
        frame::Codec::Raw
    );
    // Same length as `other2`, one byte different.
    let mut flipped = other2.clone();
    flipped[0] ^= 1;
    let cases: Vec<(&str, Vec<Step>, tonic::Code, &str)> = vec![
        (
            "bytes that are not the chunk",
            vec![
                begin(),
                offered_other.clone(),
                frames(other_id, &data),
                commit(&other),
            ],
            tonic::Code::InvalidArgument,
            "does not hash",
        ),
        (
            "a commit whose digest is of other content",
            vec![
                begin(),
                offered_other2,
                frames(other2_id, &other2),
                commit(&flipped),
            ],
            tonic::Code::InvalidArgument,
            "does not match",
        ),
        (
            "a stream cut before its commit",
            vec![begin(), offered_other3, frames(other3_id, &other3)],
            tonic::Code::Cancelled,
            "nothing was stored",
        ),
        (
            "a commit without digests after chunks were sent",
            vec![
                begin(),
                offered_other4,
                frames(other4_id, &other4),
                commit_unclaimed(&other4),
            ],
            tonic::Code::InvalidArgument,
            "claims no digests",
        ),
        (
            "a SHA-256 claim of the wrong size",
            vec![
                begin(),
                offered.clone(),
                Step::Commit(pb::Commit {
                    length: data.len() as u64,
                    sha256: Bytes::copy_from_slice(&ContentDigests::of(&data).sha256[1..]),
                    blake3: Bytes::new(),
                }),
            ],
            tonic::Code::InvalidArgument,
            "SHA-256 digest is not 32 bytes",
        ),
        (
            "a BLAKE3 claim of the wrong size",
            vec![
                begin(),
                offered.clone(),
                Step::Commit(pb::Commit {
                    length: data.len() as u64,
                    sha256: Bytes::copy_from_slice(&ContentDigests::of(&data).sha256),
                    blake3: Bytes::from_static(b"short"),
                }),
            ],
            tonic::Code::InvalidArgument,
            "BLAKE3 digest is not 32 bytes",
        ),
        (
            "a frame header of the wrong size",
            vec![
                begin(),
                offered_other6,
                frame_parts(other6_id, b"\x01\x01\x03", Bytes::from(other6.clone())),
            ],
            tonic::Code::InvalidArgument,
            "a frame header of 3 bytes",
        ),
        (
            "a header that does not describe its payload",
            vec![
                begin(),
                offered_raw,
                frame_parts(raw_id, raw_frame.header(), raw_frame.payload().slice(1..)),
            ],
            tonic::Code::InvalidArgument,
            "header says 100000",
        ),
        (
            "no Begin",
            vec![offered_other.clone()],
            tonic::Code::InvalidArgument,
            "must start with Begin",
        ),
        (
            "a bad name",
            vec![Step::Begin(pb::Begin {
                name: "../etc/passwd".into(),
                stack: None,
                task: None,
            })],
            tonic::Code::InvalidArgument,
            "invalid artifact name",
        ),
        (
            "a chunk never asked for",
            vec![begin(), frames(other_id, &other)],
            tonic::Code::InvalidArgument,
            "not asked for",
        ),
        (
            "an oversized offer",
            vec![
                begin(),
                Step::Offer(pb::Offer {
                    chunks: vec![
                        pb::ChunkRef {
                            id: Bytes::copy_from_slice(other_id.as_bytes()),
                            len: 1,
                        };
                        5000
                    ],
                }),
            ],
            tonic::Code::InvalidArgument,
            "at most",
        ),
        (
            "a malformed chunk id",
            vec![
                begin(),
                Step::Offer(pb::Offer {
                    chunks: vec![pb::ChunkRef {
                        id: Bytes::from_static(b"short"),
                        len: 1,
                    }],
                }),
            ],
            tonic::Code::InvalidArgument,
            "chunk id of 5 bytes",
        ),
    ];
    for (what, steps, code, says) in cases {
        let err = agent.upload(steps).await.unwrap_err();
        assert_eq!(err.code(), code, "{what}: {err:?}");
        assert!(err.message().contains(says), "{what}: {}", err.message());
    }
    // A claim may leave the BLAKE3 out: the agent hashes it itself. (And a frame may come
    // whole, as agents copy what they store.)
    let (content, offered_fresh, fresh_id) = fresh(5);
    let sha256_only = agent
        .upload(vec![
            begin(),
            offered_fresh,
            whole_frame(fresh_id, &content),
            Step::Commit(pb::Commit {
                length: content.len() as u64,
                sha256: Bytes::copy_from_slice(&ContentDigests::of(&content).sha256),
                blake3: Bytes::new(),
            }),
        ])
        .await
        .unwrap();
    assert!(
        matches!(
            sha256_only.last().and_then(|r| r.step.as_ref()),
            Some(pb::upload_response::Step::Committed(_))
        ),
        "{sha256_only:?}"
    );
    // Content the agent holds whole needs no claim: its digests are the stored version's.
    let again = agent
        .upload(vec![begin(), offered.clone(), commit_unclaimed(&data)])
        .await
        .unwrap();
    let Some(pb::upload_response::Step::Committed(committed)) =
        again.last().and_then(|r| r.step.clone())
    else {
        panic!("an unclaimed re-upload was not committed: {again:?}");
    };
    let sha256: String = ContentDigests::of(&data)
        .sha256
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(
        committed.artifact.unwrap().checksum,
        format!("sha256:{sha256}")
    );
    // The agent still serves, and holds only the honest uploads.
    let listed = agent
        .client
        .list(pb::ListRequest {
            all_versions: true,
            ..pb::ListRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.artifacts.len(), 3);
    assert_eq!(agent.stop().await, 3);
}

/// Reads a file, and flips one of its bytes (through another handle) after the first read.
struct ChangeAfterFirstRead {
    reader: std::fs::File,
    writer: Option<std::fs::File>,
}

impl std::io::Read for ChangeAfterFirstRead {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.reader.read(buf)?;
        if let Some(writer) = self.writer.take() {
            use std::os::unix::fs::FileExt;
            // A moment later, so that the times differ on any clock granularity.
            std::thread::sleep(std::time::Duration::from_millis(20));
            let mut byte = [0u8];
            writer.read_at(&mut byte, 2 << 20)?;
            writer.write_at(&[byte[0] ^ 1], 2 << 20)?;
        }
        Ok(n)
    }
}

/// Pseudo-random bytes (incompressible, so chunk boundaries fall everywhere).
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_uploads_hash_only_what_the_agent_lacks_and_catch_a_changing_file() {
    let agent = Agent::start().await;
    let remote = sloth_agent::client::Remote::connect(
        "test",
        &sloth_agent::client::Link {
            addr: agent.addr.to_string(),
            ..sloth_agent::client::Link::default()
        },
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.bin");
    let data = noise(3 << 20, 7);
    std::fs::write(&path, &data).unwrap();
    let key = sloth_engine::ArtifactKey::new("app.bin", Some("prod"), Some("build")).unwrap();
    let upload = |reader: Box<dyn std::io::Read + Send>| {
        let (remote, key, path) = (&remote, &key, &path);
        async move {
            let file = std::fs::File::open(path).unwrap();
            remote
                .upload_rereadable(key, reader, Some(file), None)
                .await
        }
    };
    let open = || Box::new(std::fs::File::open(&path).unwrap());
    let sha256 = |d: &[u8]| {
        let digest = ContentDigests::of(d).sha256;
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        format!("sha256:{hex}")
    };
    // First upload: chunks travel, so the content is hashed (from the chunks cut) and claimed.
    let first = upload(open()).await.unwrap();
    assert!(first.chunks_sent > 0);
    assert_eq!(first.record.checksum, sha256(&data));
    // Again: nothing travels, nothing is claimed, and the version carries the same checksum.
    let again = upload(open()).await.unwrap();
    assert_eq!((again.chunks_sent, again.record.version), (0, 2));
    assert_eq!(again.record.checksum, sha256(&data));
    // The file is written to while it is read: its times change, and nothing becomes visible
    // (its chunks, as read, would have made a consistent claim).
    let writer = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let err = upload(Box::new(ChangeAfterFirstRead {
        reader: std::fs::File::open(&path).unwrap(),
        writer: Some(writer),
    }))
    .await
    .unwrap_err();
    assert!(
        err.to_string().contains("changed while it was uploaded"),
        "{err}"
    );
    let listed = remote
        .list(&sloth_engine::ListQuery {
            all_versions: true,
            ..sloth_engine::ListQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(listed.len(), 2);
    assert_eq!(agent.stop().await, 2);
}

/// The agent encodes Download and GetChunks answers itself (`wire.rs`): tonic's own client
/// reads them as it reads any answer, with an error after some frames as the call's status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_sent_without_tonics_encoder_read_back_with_tonics_client() {
    let mut agent = Agent::start().await;
    let data = noise(300_000, 4);
    let (offered, id) = offer(&data);
    agent
        .upload(vec![begin(), offered, frames(id, &data), commit(&data)])
        .await
        .unwrap();

    let selector = pb::Selector {
        name: "app.bin".into(),
        stack: Some("prod".into()),
        task: Some("build".into()),
        ..Default::default()
    };
    let mut answers = agent.client.download(selector).await.unwrap().into_inner();
    let mut header = None;
    let mut content = Vec::new();
    while let Some(answer) = answers.message().await.unwrap() {
        match answer.step.unwrap() {
            pb::download_response::Step::Header(h) => header = Some(h),
            pb::download_response::Step::Frames(f) => {
                for f in f.frames {
                    assert_eq!(&f.id[..], id.as_bytes());
                    content.extend_from_slice(&frame::decode(&id, &f.data).unwrap());
                }
            }
        }
    }
    assert_eq!(header.unwrap().length, data.len() as u64);
    assert_eq!(content, data);

    // A known chunk, then one the agent does not hold: the first arrives, then the error.
    let unknown = ChunkId::digest(b"never stored");
    let mut answers = agent
        .client
        .get_chunks(pb::GetChunksRequest {
            ids: vec![
                Bytes::copy_from_slice(id.as_bytes()),
                Bytes::copy_from_slice(unknown.as_bytes()),
            ],
        })
        .await
        .unwrap()
        .into_inner();
    let mut received = Vec::new();
    let status = loop {
        match answers.message().await {
            Ok(Some(m)) => received.extend(m.frames),
            Ok(None) => panic!("the stream ended without the error"),
            Err(status) => break status,
        }
    };
    assert!(received.len() <= 1, "{} frames", received.len());
    assert_eq!(status.code(), tonic::Code::NotFound, "{status}");
    assert!(
        status
            .message()
            .contains(&format!("chunk {unknown} is not stored")),
        "{status}"
    );
    assert_eq!(agent.stop().await, 1);
}
