//! The client's `Upload` call, with its request stream encoded here rather than by tonic, so
//! that chunk payloads reach the socket without being copied.
//!
//! tonic encodes every outgoing message into a buffer of its own, which copies each chunk once
//! more on its way out: about 2.4% of a loopback upload's client CPU (`docs/benchmarks.md`).
//! This body writes the same bytes prost would — the gRPC message prefix, then the protobuf
//! encoding — but hands each chunk's payload on as the `Bytes` it already is, between small
//! buffers holding the fields around it. h2 sends payloads that large from where they are
//! (vectored writes), so the only copy left on the client is the kernel's.
//!
//! The responses are still decoded by tonic ([`tonic::codec::Streaming`]), and the request
//! carries the headers tonic's client would: the path, `te`, `content-type`, the deadline and
//! the credentials.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use http_body::Frame as BodyFrame;
use prost::Message;
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint};
use sloth_proto::artifacts as pb;
use sloth_proto::codec::SizedCodec;
use tokio::sync::mpsc;
use tonic::Status;
use tonic::codec::Codec;
use tonic::transport::Channel;
use tower::Service;

/// Payloads at least this long travel as their own `Bytes`; shorter ones are copied in with
/// the fields around them (h2 itself copies anything under 256 bytes into its write buffer).
const CHAIN_AT: usize = 4 << 10;

const UPLOAD_PATH: &str = "/sloth.artifacts.v1.Artifacts/Upload";

/// The headers every call carries besides gRPC's own: the bearer token and the user name.
pub(crate) type CallHeaders = [(&'static str, Option<http::HeaderValue>); 2];

/// Opens an `Upload` call on `channel` sending what `requests` yields, each message at most
/// `max_message` bytes encoded. Returns the agent's response stream once it answered the
/// call's headers.
pub(crate) async fn upload(
    channel: &Channel,
    headers: CallHeaders,
    timeout: Duration,
    max_message: usize,
    requests: mpsc::Receiver<pb::UploadRequest>,
) -> Result<tonic::Streaming<pb::UploadResponse>, Status> {
    let body = UploadBody {
        requests,
        pending: VecDeque::new(),
        max_message,
    };
    let mut request = http::Request::builder()
        .method(http::Method::POST)
        .version(http::Version::HTTP_2)
        .uri(UPLOAD_PATH)
        .header(http::header::TE, "trailers")
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header("grpc-timeout", format!("{}S", timeout.as_secs().max(1)))
        .body(tonic::body::Body::new(body))
        .map_err(|e| Status::internal(format!("building the upload request: {e}")))?;
    for (name, value) in headers {
        if let Some(value) = value {
            request.headers_mut().insert(name, value);
        }
    }
    let mut channel = channel.clone();
    std::future::poll_fn(|cx| channel.poll_ready(cx))
        .await
        .map_err(|e| Status::from_error(e.into()))?;
    let response = channel
        .call(request)
        .await
        .map_err(|e| Status::from_error(e.into()))?;
    // As tonic's client: a `grpc-status` among the headers is a trailers-only answer, an error
    // unless it says OK (and then the stream is empty).
    let decoder = SizedCodec::<pb::UploadRequest, pb::UploadResponse>::default().decoder();
    let status = response.status();
    let (parts, body) = response.into_parts();
    match Status::from_header_map(&parts.headers) {
        Some(s) if s.code() != tonic::Code::Ok => Err(s),
        Some(_) => Ok(tonic::Streaming::new_empty(decoder, body)),
        None => Ok(tonic::Streaming::new_response(
            decoder,
            body,
            status,
            None,
            Some(max_message),
        )),
    }
}

/// The request body: each message from `requests`, encoded into `pending` as it is polled.
struct UploadBody {
    requests: mpsc::Receiver<pb::UploadRequest>,
    pending: VecDeque<Bytes>,
    max_message: usize,
}

impl http_body::Body for UploadBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<BodyFrame<Bytes>, Status>>> {
        loop {
            if let Some(bytes) = self.pending.pop_front() {
                return Poll::Ready(Some(Ok(BodyFrame::data(bytes))));
            }
            let Some(request) = ready!(self.requests.poll_recv(cx)) else {
                return Poll::Ready(None);
            };
            let max = self.max_message;
            if let Err(status) = encode(request, max, &mut self.pending) {
                return Poll::Ready(Some(Err(status)));
            }
        }
    }
}

/// Appends `request` to `out` as one length-prefixed gRPC message, exactly as prost and tonic
/// would encode it, with each long chunk payload in `out` as its own `Bytes`.
fn encode(request: pb::UploadRequest, max: usize, out: &mut VecDeque<Bytes>) -> Result<(), Status> {
    let len = request.encoded_len();
    if len > max {
        return Err(Status::out_of_range(format!(
            "an upload message of {len} bytes exceeds the limit of {max}"
        )));
    }
    let mut small = BytesMut::with_capacity(256);
    small.put_u8(0); // not compressed
    small.put_u32(len as u32); // len <= max, which is far below 4 GiB
    let frames = match request.step {
        Some(pb::upload_request::Step::Frames(frames)) => frames,
        step => {
            pb::UploadRequest { step }
                .encode(&mut small)
                .map_err(|e| Status::internal(format!("encoding an upload message: {e}")))?;
            out.push_back(small.freeze());
            return Ok(());
        }
    };
    // UploadRequest { frames = 3: Frames { repeated frames = 1: Frame { id = 1, data = 2,
    // header = 3 } } }; prost writes fields in tag order and leaves empty ones out.
    encode_key(3, WireType::LengthDelimited, &mut small);
    encode_varint(frames.encoded_len() as u64, &mut small);
    for frame in frames.frames {
        encode_key(1, WireType::LengthDelimited, &mut small);
        encode_varint(frame.encoded_len() as u64, &mut small);
        put_bytes_field(1, frame.id, &mut small, out);
        put_bytes_field(2, frame.data, &mut small, out);
        put_bytes_field(3, frame.header, &mut small, out);
    }
    if !small.is_empty() {
        out.push_back(small.freeze());
    }
    Ok(())
}

/// Writes a `bytes` field: its key and length into `small`, and its value there too when short,
/// or else into `out` after what `small` held.
fn put_bytes_field(tag: u32, value: Bytes, small: &mut BytesMut, out: &mut VecDeque<Bytes>) {
    if value.is_empty() {
        return;
    }
    small.reserve(1 + encoded_len_varint(value.len() as u64));
    encode_key(tag, WireType::LengthDelimited, small);
    encode_varint(value.len() as u64, small);
    if value.len() < CHAIN_AT {
        small.put_slice(&value);
    } else {
        out.push_back(small.split().freeze());
        out.push_back(value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn joined(request: pb::UploadRequest) -> (Vec<u8>, usize) {
        let mut out = VecDeque::new();
        encode(request, usize::MAX >> 1, &mut out).unwrap();
        let pieces = out.len();
        (out.into_iter().flatten().collect(), pieces)
    }

    fn prost_framed(request: &pb::UploadRequest) -> Vec<u8> {
        let body = request.encode_to_vec();
        let mut framed = vec![0];
        framed.extend_from_slice(&(body.len() as u32).to_be_bytes());
        framed.extend_from_slice(&body);
        framed
    }

    fn frames(parts: Vec<(Vec<u8>, Vec<u8>, Vec<u8>)>) -> pb::UploadRequest {
        pb::UploadRequest {
            step: Some(pb::upload_request::Step::Frames(pb::Frames {
                frames: parts
                    .into_iter()
                    .map(|(id, data, header)| pb::Frame {
                        id: id.into(),
                        data: data.into(),
                        header: header.into(),
                    })
                    .collect(),
            })),
        }
    }

    proptest! {
        #[test]
        fn frames_encode_exactly_as_prost_does(
            parts in prop::collection::vec(
                (
                    prop::collection::vec(any::<u8>(), 0..40),
                    prop_oneof![
                        prop::collection::vec(any::<u8>(), 0..64),
                        prop::collection::vec(any::<u8>(), CHAIN_AT - 2..CHAIN_AT + 300),
                    ],
                    prop::collection::vec(any::<u8>(), 0..12),
                ),
                0..8,
            )
        ) {
            let request = frames(parts);
            prop_assert_eq!(joined(request.clone()).0, prost_framed(&request));
        }
    }

    #[test]
    fn long_payloads_travel_as_their_own_bytes() {
        let payload = Bytes::from(vec![7u8; 1 << 20]);
        let request = pb::UploadRequest {
            step: Some(pb::upload_request::Step::Frames(pb::Frames {
                frames: vec![
                    pb::Frame {
                        id: vec![1; 32].into(),
                        data: payload.clone(),
                        header: vec![2; 8].into(),
                    };
                    2
                ],
            })),
        };
        let mut out = VecDeque::new();
        encode(request, usize::MAX >> 1, &mut out).unwrap();
        // prefix + fields, payload, fields between, payload, trailing header field
        assert_eq!(out.len(), 5);
        assert_eq!(out[1].as_ptr(), payload.as_ptr());
        assert_eq!(out[3].as_ptr(), payload.as_ptr());
    }

    #[test]
    fn other_steps_encode_as_prost_does() {
        for step in [
            pb::upload_request::Step::Begin(pb::Begin {
                name: "app".into(),
                stack: Some("s".into()),
                task: None,
            }),
            pb::upload_request::Step::Offer(pb::Offer {
                chunks: vec![pb::ChunkRef {
                    id: vec![3; 32].into(),
                    len: 4096,
                }],
            }),
            pb::upload_request::Step::Commit(pb::Commit {
                length: 9,
                sha256: vec![4; 32].into(),
                blake3: Bytes::new(),
            }),
        ] {
            let request = pb::UploadRequest { step: Some(step) };
            assert_eq!(joined(request.clone()), (prost_framed(&request), 1));
        }
        let empty = pb::UploadRequest { step: None };
        assert_eq!(joined(empty.clone()).0, prost_framed(&empty));
    }

    #[test]
    fn a_message_over_the_limit_is_refused() {
        let request = frames(vec![(vec![1; 32], vec![0; 100], vec![])]);
        let mut out = VecDeque::new();
        let err = encode(request, 64, &mut out).unwrap_err();
        assert_eq!(err.code(), tonic::Code::OutOfRange);
        assert!(err.message().contains("exceeds the limit of 64"), "{err}");
        assert!(out.is_empty());
    }
}
