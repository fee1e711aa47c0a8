//! Messages that carry chunk frames, encoded here rather than by tonic, so that chunk payloads
//! reach the socket without being copied: the client's `Upload` requests, and the agent's
//! `Download` and `GetChunks` responses.
//!
//! tonic encodes every outgoing message into a buffer of its own, which copies each chunk once
//! more on its way out: about 2.4% of a loopback upload's client CPU (`docs/benchmarks.md`).
//! [`EncodedBody`] writes the same bytes prost would — the gRPC message prefix, then the
//! protobuf encoding — but hands each chunk's payload on as the `Bytes` it already is, between
//! small buffers holding the fields around it. h2 sends payloads that large from where they are
//! (vectored writes), so the only copy left is the kernel's.
//!
//! Everything else stays tonic's. On the client, [`upload`] sends the headers tonic's client
//! would (the path, `te`, `content-type`, the deadline, the credentials) and decodes the answers
//! with [`tonic::Streaming`]. On the agent, tonic decodes the request and runs the handler; the
//! handler leaves its messages in the response's extensions ([`unencoded`]) and
//! [`SendUnencoded`], around the service, sends them.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use futures::{Stream, StreamExt};
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

/// A message that may hold a `Frames`: in a oneof, or as the whole message.
pub(crate) trait CarriesFrames: Message + Sized + 'static {
    /// The message's `Frames` and its field number here (`None`: the message is the `Frames`),
    /// or the message back when it holds none.
    fn into_frames(self) -> Result<(Option<u32>, pb::Frames), Self>;
}

impl CarriesFrames for pb::UploadRequest {
    fn into_frames(self) -> Result<(Option<u32>, pb::Frames), Self> {
        match self.step {
            Some(pb::upload_request::Step::Frames(frames)) => Ok((Some(3), frames)),
            step => Err(Self { step }),
        }
    }
}

impl CarriesFrames for pb::DownloadResponse {
    fn into_frames(self) -> Result<(Option<u32>, pb::Frames), Self> {
        match self.step {
            Some(pb::download_response::Step::Frames(frames)) => Ok((Some(2), frames)),
            step => Err(Self { step }),
        }
    }
}

impl CarriesFrames for pb::Frames {
    fn into_frames(self) -> Result<(Option<u32>, pb::Frames), Self> {
        Ok((None, self))
    }
}

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
    let requests = tokio_stream::wrappers::ReceiverStream::new(requests).map(Ok);
    let body = EncodedBody::new(requests, max_message, Role::Client);
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

/// Which end sends the body: an agent ends its answer with the call's status as trailers; a
/// client ends its request with the body, or fails it (resetting the stream) on an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Client,
    Agent,
}

/// An HTTP body of gRPC messages, each encoded as it is polled from `messages`.
struct EncodedBody<S> {
    messages: S,
    pending: VecDeque<Bytes>,
    max_message: usize,
    role: Role,
    ended: bool,
}

impl<S> EncodedBody<S> {
    fn new(messages: S, max_message: usize, role: Role) -> Self {
        Self {
            messages,
            pending: VecDeque::new(),
            max_message,
            role,
            ended: false,
        }
    }

    /// The body's last frame, for a call that ended with `status`.
    fn end(&mut self, status: Status) -> Option<Result<BodyFrame<Bytes>, Status>> {
        self.ended = true;
        self.pending.clear();
        match self.role {
            Role::Agent => {
                let mut trailers = http::HeaderMap::new();
                if let Err(unsendable) = status.add_header(&mut trailers) {
                    trailers.clear();
                    // The status's own message cannot be a header; say so rather than nothing.
                    let _ =
                        Status::internal(format!("an error that could not be sent: {unsendable}"))
                            .add_header(&mut trailers);
                }
                Some(Ok(BodyFrame::trailers(trailers)))
            }
            Role::Client if status.code() == tonic::Code::Ok => None,
            Role::Client => Some(Err(status)),
        }
    }
}

impl<S, M> http_body::Body for EncodedBody<S>
where
    S: Stream<Item = Result<M, Status>> + Unpin,
    M: CarriesFrames,
{
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
            if self.ended {
                return Poll::Ready(None);
            }
            let ended = match ready!(self.messages.poll_next_unpin(cx)) {
                Some(Ok(message)) => {
                    let max = self.max_message;
                    match encode(message, max, &mut self.pending) {
                        Ok(()) => continue,
                        Err(status) => status,
                    }
                }
                Some(Err(status)) => status,
                None => Status::ok(""),
            };
            return Poll::Ready(self.end(ended));
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended && self.pending.is_empty()
    }
}

/// Appends `message` to `out` as one length-prefixed gRPC message, exactly as prost and tonic
/// would encode it, with each long chunk payload in `out` as its own `Bytes`.
fn encode<M: CarriesFrames>(
    message: M,
    max: usize,
    out: &mut VecDeque<Bytes>,
) -> Result<(), Status> {
    let len = message.encoded_len();
    if len > max {
        return Err(Status::out_of_range(format!(
            "a message of {len} bytes exceeds the limit of {max}"
        )));
    }
    let mut small = BytesMut::with_capacity(256);
    small.put_u8(0); // not compressed
    small.put_u32(len as u32); // len <= max, which is far below 4 GiB
    let (tag, frames) = match message.into_frames() {
        Ok(found) => found,
        Err(message) => {
            message
                .encode(&mut small)
                .map_err(|e| Status::internal(format!("encoding a message: {e}")))?;
            out.push_back(small.freeze());
            return Ok(());
        }
    };
    // [oneof field tag:] Frames { repeated frames = 1: Frame { id = 1, data = 2, header = 3 } };
    // prost writes fields in tag order and leaves empty ones out.
    if let Some(tag) = tag {
        encode_key(tag, WireType::LengthDelimited, &mut small);
        encode_varint(frames.encoded_len() as u64, &mut small);
    }
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

/// A handler's messages, waiting in its response's extensions for [`SendUnencoded`] (which
/// needs the extension to be `Clone + Sync`, hence the shared slot).
struct Unencoded<M>(Arc<Mutex<Option<ResponseStream<M>>>>);

type ResponseStream<M> = Pin<Box<dyn Stream<Item = Result<M, Status>> + Send>>;

impl<M> Clone for Unencoded<M> {
    fn clone(&self) -> Self {
        Self(Arc::clone(&self.0))
    }
}

/// A handler's answer whose messages [`SendUnencoded`] sends: tonic is handed an empty stream,
/// and `messages` go in the response's extensions.
pub(crate) fn unencoded<M: CarriesFrames + Send>(
    messages: impl Stream<Item = Result<M, Status>> + Send + 'static,
) -> tonic::Response<ResponseStream<M>> {
    let mut response =
        tonic::Response::new(Box::pin(futures::stream::empty()) as ResponseStream<M>);
    response
        .extensions_mut()
        .insert(Unencoded(Arc::new(Mutex::new(Some(
            Box::pin(messages) as ResponseStream<M>
        )))));
    response
}

/// Wraps the artifacts service: answers whose messages a handler left as [`unencoded`] (those
/// of `Download` and `GetChunks`) are sent with [`EncodedBody`] instead of tonic's encoder.
#[derive(Debug, Clone)]
pub(crate) struct SendUnencoded<S> {
    inner: S,
    max_message: usize,
}

impl<S> SendUnencoded<S> {
    pub(crate) fn new(inner: S, max_message: usize) -> Self {
        Self { inner, max_message }
    }
}

impl<S: tonic::server::NamedService> tonic::server::NamedService for SendUnencoded<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> Service<http::Request<B>> for SendUnencoded<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let answer = self.inner.call(request);
        let max = self.max_message;
        Box::pin(async move {
            let mut response = answer.await?;
            let extensions = response.extensions_mut();
            let body = if let Some(Unencoded(slot)) =
                extensions.remove::<Unencoded<pb::DownloadResponse>>()
            {
                take(&slot).map(|m| tonic::body::Body::new(EncodedBody::new(m, max, Role::Agent)))
            } else if let Some(Unencoded(slot)) = extensions.remove::<Unencoded<pb::Frames>>() {
                take(&slot).map(|m| tonic::body::Body::new(EncodedBody::new(m, max, Role::Agent)))
            } else {
                None
            };
            if let Some(body) = body {
                *response.body_mut() = body;
            }
            Ok(response)
        })
    }
}

fn take<M>(slot: &Mutex<Option<ResponseStream<M>>>) -> Option<ResponseStream<M>> {
    slot.lock().unwrap_or_else(|e| e.into_inner()).take()
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

    fn framed<M: Message>(message: &M) -> Vec<u8> {
        let body = message.encode_to_vec();
        let mut framed = vec![0];
        framed.extend_from_slice(&(body.len() as u32).to_be_bytes());
        framed.extend_from_slice(&body);
        framed
    }

    fn a_frame(len: usize) -> pb::Frame {
        pb::Frame {
            id: vec![5; 32].into(),
            data: vec![6; len].into(),
            header: Bytes::new(),
        }
    }

    #[test]
    fn download_answers_encode_as_prost_does() {
        let frames = pb::Frames {
            frames: vec![a_frame(10), a_frame(CHAIN_AT * 3), a_frame(0)],
        };
        let answers = [
            pb::DownloadResponse {
                step: Some(pb::download_response::Step::Header(pb::DownloadHeader {
                    length: 7,
                    ..Default::default()
                })),
            },
            pb::DownloadResponse {
                step: Some(pb::download_response::Step::Frames(frames.clone())),
            },
        ];
        for answer in answers {
            let mut out = VecDeque::new();
            encode(answer.clone(), usize::MAX >> 1, &mut out).unwrap();
            assert_eq!(
                out.into_iter().flatten().collect::<Vec<_>>(),
                framed(&answer)
            );
        }
        let mut out = VecDeque::new();
        encode(frames.clone(), usize::MAX >> 1, &mut out).unwrap();
        assert_eq!(
            out.into_iter().flatten().collect::<Vec<_>>(),
            framed(&frames)
        );
    }

    /// Everything an agent's body sends: the data, then the trailers.
    async fn sent_by_agent(
        messages: Vec<Result<pb::Frames, Status>>,
        max: usize,
    ) -> (Vec<u8>, http::HeaderMap) {
        use http_body_util::BodyExt;
        let stream: ResponseStream<pb::Frames> = Box::pin(futures::stream::iter(messages));
        let collected = EncodedBody::new(stream, max, Role::Agent)
            .collect()
            .await
            .unwrap();
        let trailers = collected.trailers().cloned().unwrap();
        (collected.to_bytes().to_vec(), trailers)
    }

    #[tokio::test]
    async fn an_agent_ends_its_answer_with_the_status() {
        let frames = pb::Frames {
            frames: vec![a_frame(CHAIN_AT * 2)],
        };
        let (data, trailers) = sent_by_agent(vec![Ok(frames.clone())], usize::MAX >> 1).await;
        assert_eq!(data, framed(&frames));
        assert_eq!(trailers["grpc-status"], "0");

        // An error after a message: the message, then the error as the call's status.
        let (data, trailers) = sent_by_agent(
            vec![
                Ok(frames.clone()),
                Err(Status::data_loss("chunk 1f is missing")),
                Ok(frames.clone()),
            ],
            usize::MAX >> 1,
        )
        .await;
        assert_eq!(data, framed(&frames));
        let status = Status::from_header_map(&trailers).unwrap();
        assert_eq!(status.code(), tonic::Code::DataLoss);
        assert_eq!(status.message(), "chunk 1f is missing");

        // A message over the limit is not sent; the call fails saying why.
        let (data, trailers) = sent_by_agent(vec![Ok(frames)], 100).await;
        assert!(data.is_empty());
        let status = Status::from_header_map(&trailers).unwrap();
        assert_eq!(status.code(), tonic::Code::OutOfRange);
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
