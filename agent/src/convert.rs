//! Engine types ↔ protocol messages. Everything that comes off the wire is checked here.

use sloth_cas::frame::Frame;
use sloth_cas::{ChunkId, ChunkRef, Claim, ContentDigests, ManifestId};
use sloth_engine::{ArtifactId, ArtifactRecord, Event, Selector};
use sloth_proto::artifacts as pb;

use crate::{Error, Result};

pub(crate) fn artifact(record: &ArtifactRecord, layout_path: Option<String>) -> pb::Artifact {
    pb::Artifact {
        id: record.id.as_u128().to_be_bytes().to_vec().into(),
        name: record.name.clone(),
        stack: record.stack.clone(),
        task: record.task.clone(),
        version: record.version,
        size: record.size,
        checksum: record.checksum.clone(),
        manifest: record.manifest.as_bytes().to_vec().into(),
        stored_bytes: record.stored_bytes,
        created_at: record.created_at,
        modified_at: record.modified_at,
        download_count: record.download_count,
        last_download_at: record.last_download_at,
        damaged: record.damaged.clone(),
        layout_path,
    }
}

/// A record as the agent sent it, and the layout path it reported.
pub(crate) fn record(a: pb::Artifact) -> Result<(ArtifactRecord, Option<String>)> {
    let id = <[u8; 16]>::try_from(a.id.as_ref())
        .map_err(|_| Error::Protocol(format!("artifact id of {} bytes", a.id.len())))?;
    let manifest = ManifestId::from_slice(&a.manifest)
        .ok_or_else(|| Error::Protocol("malformed manifest id".into()))?;
    let record = ArtifactRecord {
        id: ArtifactId::from_u128(u128::from_be_bytes(id)),
        name: a.name,
        stack: a.stack,
        task: a.task,
        version: a.version,
        size: a.size,
        checksum: a.checksum,
        manifest,
        stored_bytes: a.stored_bytes,
        created_at: a.created_at,
        modified_at: a.modified_at,
        download_count: a.download_count,
        last_download_at: a.last_download_at,
        damaged: a.damaged,
    };
    // The names are shown and used as file names: hold them to the engine's rules.
    record.key()?;
    Ok((record, a.layout_path))
}

/// A frame to send: its header apart from its payload, which is not copied, or (`split`
/// false, for an agent that does not take them so) whole.
pub(crate) fn wire_frame(id: &ChunkId, frame: &Frame, split: bool) -> pb::Frame {
    let (data, header) = match split {
        true => (
            frame.payload().clone(),
            bytes::Bytes::copy_from_slice(frame.header()),
        ),
        false => (frame.to_bytes(), bytes::Bytes::new()),
    };
    pb::Frame {
        id: bytes::Bytes::copy_from_slice(id.as_bytes()),
        data,
        header,
    }
}

/// A frame off the wire, whole or in parts (see `Frame` in `artifacts.proto`). Only its shape
/// is checked here; the receiver decodes it and checks it against its id.
pub(crate) fn frame(f: pb::Frame) -> Result<(ChunkId, Frame)> {
    let id = chunk_id(&f.id)?;
    let frame = if f.header.is_empty() {
        Frame::from_bytes(f.data)
    } else {
        Frame::from_parts(&f.header, f.data)
    }
    .map_err(|reason| Error::Protocol(format!("chunk {id}: {reason}")))?;
    Ok((id, frame))
}

pub(crate) fn event(e: &Event) -> pb::Event {
    pb::Event {
        seq: e.seq,
        time: e.time,
        kind: e.kind.clone(),
        agent: e.agent.clone(),
        principal: e.principal.clone(),
        artifact_id: e.artifact_id.as_u128().to_be_bytes().to_vec().into(),
        stack: e.stack.clone(),
        task: e.task.clone(),
        name: e.name.clone(),
        version: e.version,
        size: e.size,
    }
}

pub(crate) fn event_from(e: pb::Event) -> Result<Event> {
    let id = <[u8; 16]>::try_from(e.artifact_id.as_ref())
        .map_err(|_| Error::Protocol("malformed artifact id in an event".into()))?;
    Ok(Event {
        seq: e.seq,
        time: e.time,
        kind: e.kind,
        agent: e.agent,
        principal: e.principal,
        artifact_id: ArtifactId::from_u128(u128::from_be_bytes(id)),
        stack: e.stack,
        task: e.task,
        name: e.name,
        version: e.version,
        size: e.size,
    })
}

pub(crate) fn selector(s: &Selector) -> pb::Selector {
    pb::Selector {
        name: s.name.clone(),
        stack: s.stack.clone(),
        task: s.task.clone(),
        version: s.version,
    }
}

pub(crate) fn selector_from(s: pb::Selector) -> Selector {
    Selector {
        name: s.name,
        stack: s.stack,
        task: s.task,
        version: s.version,
    }
}

pub(crate) fn chunk_ref(c: &ChunkRef) -> pb::ChunkRef {
    pb::ChunkRef {
        id: c.id.as_bytes().to_vec().into(),
        len: c.len,
    }
}

pub(crate) fn chunk_ref_from(c: &pb::ChunkRef) -> Result<ChunkRef> {
    Ok(ChunkRef {
        id: chunk_id(&c.id)?,
        len: c.len,
    })
}

pub(crate) fn chunk_id(bytes: &[u8]) -> Result<ChunkId> {
    ChunkId::from_slice(bytes)
        .ok_or_else(|| Error::Protocol(format!("chunk id of {} bytes", bytes.len())))
}

/// A commit's claim: its SHA-256 with or without its BLAKE3, or nothing (both empty) for
/// content the agent holds whole (see `Commit` in `artifacts.proto`).
pub(crate) fn claim(sha256: &[u8], blake3: &[u8]) -> Result<Option<Claim>> {
    if sha256.is_empty() && blake3.is_empty() {
        return Ok(None);
    }
    let sha256 = digest(sha256, "SHA-256")?;
    let blake3 = match blake3 {
        [] => None,
        bytes => Some(digest(bytes, "BLAKE3")?),
    };
    Ok(Some(Claim { sha256, blake3 }))
}

pub(crate) fn digests(sha256: &[u8], blake3: &[u8]) -> Result<ContentDigests> {
    let sha256 = digest(sha256, "SHA-256")?;
    Ok(ContentDigests {
        blake3: digest(blake3, "BLAKE3")?,
        sha256,
    })
}

/// A 32-byte digest off the wire.
fn digest(bytes: &[u8], algorithm: &str) -> Result<[u8; 32]> {
    <[u8; 32]>::try_from(bytes)
        .map_err(|_| Error::Protocol(format!("{algorithm} digest is not 32 bytes")))
}

/// A download header's record, chunk list and digests, checked: the chunks must add up to the
/// declared length, and be no more than a store accepts.
pub(crate) fn header(
    h: pb::DownloadHeader,
) -> Result<(ArtifactRecord, Vec<ChunkRef>, ContentDigests)> {
    let artifact = h
        .artifact
        .ok_or_else(|| Error::Protocol("a header without an artifact".into()))?;
    let (record, _) = record(artifact)?;
    if h.chunks.len() > sloth_cas::MAX_RECEIVED_CHUNKS {
        return Err(Error::Protocol(format!(
            "a header of {} chunks",
            h.chunks.len()
        )));
    }
    let refs = h
        .chunks
        .iter()
        .map(chunk_ref_from)
        .collect::<Result<Vec<_>>>()?;
    let total: u64 = refs.iter().map(|r| u64::from(r.len)).sum();
    if total != h.length {
        return Err(Error::Protocol(format!(
            "the header's chunks add up to {total} bytes, it says {}",
            h.length
        )));
    }
    Ok((record, refs, digests(&h.sha256, &h.blake3)?))
}

pub(crate) fn verify_report(r: &sloth_engine::VerifyReport) -> pb::VerifyResponse {
    pb::VerifyResponse {
        chunks_checked: r.chunks_checked,
        bytes_checked: r.bytes_checked,
        manifests_checked: r.manifests_checked,
        versions_checked: r.versions_checked,
        bad_chunks: r
            .bad_chunks
            .iter()
            .map(|b| pb::BadChunk {
                chunk: b.chunk.clone(),
                reason: b.reason.clone(),
                versions: b.versions.iter().map(|v| artifact(v, None)).collect(),
            })
            .collect(),
        bad_manifests: r
            .bad_manifests
            .iter()
            .map(|(manifest, reason)| pb::BadManifest {
                manifest: manifest.clone(),
                reason: reason.clone(),
            })
            .collect(),
        damaged: r
            .damaged
            .iter()
            .map(|(record, reason)| pb::DamagedVersion {
                artifact: Some(artifact(record, None)),
                reason: reason.clone(),
            })
            .collect(),
        newly_marked: r.newly_marked as u64,
        healed: r.healed.iter().map(|v| artifact(v, None)).collect(),
        chunks_removed: r.chunks_removed,
        projection_problems: r.projection_problems.clone(),
        projections_rebuilt: r.projections_rebuilt,
        ref_mismatches: r.ref_mismatches,
    }
}

pub(crate) fn verify_report_from(r: pb::VerifyResponse) -> Result<sloth_engine::VerifyReport> {
    let records = |artifacts: Vec<pb::Artifact>| -> Result<Vec<ArtifactRecord>> {
        artifacts.into_iter().map(|a| Ok(record(a)?.0)).collect()
    };
    Ok(sloth_engine::VerifyReport {
        chunks_checked: r.chunks_checked,
        bytes_checked: r.bytes_checked,
        manifests_checked: r.manifests_checked,
        versions_checked: r.versions_checked,
        bad_chunks: r
            .bad_chunks
            .into_iter()
            .map(|b| {
                Ok(sloth_engine::BadChunkUse {
                    chunk: b.chunk,
                    reason: b.reason,
                    versions: records(b.versions)?,
                })
            })
            .collect::<Result<_>>()?,
        bad_manifests: r
            .bad_manifests
            .into_iter()
            .map(|b| (b.manifest, b.reason))
            .collect(),
        damaged: r
            .damaged
            .into_iter()
            .map(|d| {
                let artifact = d
                    .artifact
                    .ok_or_else(|| Error::Protocol("a damaged entry without an artifact".into()))?;
                Ok((record(artifact)?.0, d.reason))
            })
            .collect::<Result<_>>()?,
        newly_marked: r.newly_marked as usize,
        healed: records(r.healed)?,
        chunks_removed: r.chunks_removed,
        projection_problems: r.projection_problems,
        projections_rebuilt: r.projections_rebuilt,
        ref_mismatches: r.ref_mismatches,
    })
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use sloth_cas::frame;

    use super::*;

    #[test]
    fn frames_travel_split_or_whole_and_come_back_the_same() {
        // An incompressible chunk (stored raw) and a compressible one.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let random: Bytes = (0..100_000)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 32) as u8
            })
            .collect::<Vec<u8>>()
            .into();
        let text = Bytes::from(b"sloth ".repeat(10_000));
        for (chunk, codec) in [(random, frame::Codec::Raw), (text, frame::Codec::Zstd)] {
            let id = ChunkId::digest(&chunk);
            let sent = frame::encode(&chunk, 3);
            assert_eq!(
                frame::FrameHeader::parse(sent.header()).unwrap().codec,
                codec
            );
            for split in [true, false] {
                let wire = wire_frame(&id, &sent, split);
                assert_eq!(wire.header.is_empty(), !split);
                let (got_id, got) = frame(wire).unwrap();
                assert_eq!((got_id, &got), (id, &sent));
                assert_eq!(got.decode(&id).unwrap(), chunk);
            }
        }
    }
}
