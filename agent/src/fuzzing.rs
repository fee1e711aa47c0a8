//! The entry point of the `wire` fuzz target: every message an agent or a client decodes from
//! the network, decoded as prost decodes it and passed through the same checks the services
//! and the client apply. Nothing here may panic, whatever the bytes.

use prost::Message;
use sloth_proto::{artifacts as pb, registry as reg, workflows as wf};

use crate::convert;
use crate::server::{list_limit, optional_name, selector_arg};

/// Decodes `bytes` as message kind `kind` (taken modulo the number of kinds) and checks it.
pub fn decode(kind: u8, bytes: &[u8]) {
    match kind % 13 {
        0 => {
            if let Ok(s) = pb::Selector::decode(bytes) {
                let _ = selector_arg(s);
            }
        }
        1 => {
            if let Ok(r) = pb::ListRequest::decode(bytes) {
                let _ = optional_name("stack", r.stack);
                let _ = optional_name("task", r.task);
                let _ = list_limit(r.limit);
            }
        }
        2 => {
            if let Ok(r) = pb::EventsRequest::decode(bytes) {
                let _ = list_limit(r.limit);
            }
        }
        3 => {
            if let Ok(pb::UploadRequest { step: Some(step) }) = pb::UploadRequest::decode(bytes) {
                use pb::upload_request::Step;
                match step {
                    Step::Begin(b) => {
                        let _ = sloth_engine::ArtifactKey::new(
                            &b.name,
                            b.stack.as_deref(),
                            b.task.as_deref(),
                        );
                    }
                    Step::Offer(o) => {
                        for c in &o.chunks {
                            let _ = convert::chunk_ref_from(c);
                        }
                    }
                    Step::Frames(f) => {
                        // As the receiver takes them: split or whole, then decoded and checked
                        // against their ids.
                        for frame in f.frames {
                            if let Ok((id, frame)) = convert::frame(frame) {
                                let _ = frame.decode(&id);
                            }
                        }
                    }
                    Step::Commit(c) => {
                        let _ = convert::claim(&c.sha256, &c.blake3);
                    }
                }
            }
        }
        4 => {
            if let Ok(r) = pb::GetChunksRequest::decode(bytes) {
                for id in &r.ids {
                    let _ = convert::chunk_id(id);
                }
            }
        }
        5 => {
            if let Ok(r) = pb::CleanupRequest::decode(bytes) {
                let _ = optional_name("stack", r.stack);
            }
        }
        6 => {
            if let Ok(r) = pb::VerifyRequest::decode(bytes) {
                let _ = optional_name("stack", r.stack);
            }
        }
        7 => {
            if let Ok(r) = wf::RunRequest::decode(bytes) {
                let _ = serde_json::from_str::<serde_json::Value>(&r.values_json);
            }
        }
        // What a client decodes from an agent.
        8 => {
            if let Ok(h) = pb::DownloadHeader::decode(bytes) {
                let _ = convert::header(h);
            }
        }
        9 => {
            if let Ok(e) = pb::Event::decode(bytes) {
                let _ = convert::event_from(e);
            }
        }
        10 => {
            if let Ok(e) = wf::RunEvent::decode(bytes) {
                let _ = crate::workflows::event_from_wire(e);
            }
        }
        11 => {
            if let Ok(r) = pb::VerifyResponse::decode(bytes) {
                let _ = convert::verify_report_from(r);
            }
        }
        _ => {
            if let Ok(h) = reg::HeartbeatRequest::decode(bytes) {
                let _ = optional_name("agent name", Some(h.name));
            }
        }
    }
}

/// The entry point of the `grpc_messages` fuzz target: `bytes`, received in pieces cut where
/// `cuts` says, decode to the same answers as the whole of `bytes` decoded one message after
/// another from a slice, failing at the same message for the same reason.
pub fn grpc_messages(cuts: &[u8], bytes: &[u8]) {
    use crate::wire::{Segments, next_decoded};
    const MAX: usize = 1 << 16;

    // The plain way: each prefix, then the message from a slice.
    let mut expected = Vec::new();
    let mut rest = bytes;
    let expected_failure = loop {
        if rest.len() < 5 {
            break None;
        }
        let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        if rest[0] != 0 || len > MAX {
            break Some(());
        }
        if rest.len() < 5 + len {
            break None;
        }
        match pb::DownloadResponse::decode(&rest[5..5 + len]) {
            Ok(m) => expected.push(m),
            Err(_) => break Some(()),
        }
        rest = &rest[5 + len..];
    };

    let mut received = Segments::default();
    let mut decoded = Vec::new();
    let mut failure = None;
    let mut at = 0;
    let mut cuts = cuts.iter().map(|&c| c as usize + 1).cycle();
    'receiving: while at < bytes.len() {
        let n = cuts.next().unwrap_or(bytes.len()).min(bytes.len() - at);
        received.push(bytes::Bytes::copy_from_slice(&bytes[at..at + n]));
        at += n;
        loop {
            match next_decoded::<pb::DownloadResponse>(&mut received, MAX) {
                Ok(Some(m)) => decoded.push(m),
                Ok(None) => break,
                Err(_) => {
                    failure = Some(());
                    break 'receiving;
                }
            }
        }
    }
    assert_eq!(decoded, expected, "pieces decode as the whole does");
    assert_eq!(failure, expected_failure, "and fail at the same message");
}
