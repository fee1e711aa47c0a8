//! The messages that carry chunk frames, encoded and decoded here rather than by tonic, so that
//! chunk payloads are not copied on their way through: `Upload` requests, and `Download` and
//! `GetChunks` answers, at both ends.
//!
//! tonic encodes every outgoing message into a buffer of its own, and copies every received
//! DATA frame into another before decoding: one copy of each chunk at each end, about 5% of a
//! loopback transfer's CPU (`docs/benchmarks.md`). [`EncodedBody`] writes the same bytes prost
//! would — the gRPC message prefix, then the protobuf encoding — but hands each chunk's payload
//! on as the `Bytes` it already is, between small buffers holding the fields around it; h2 sends
//! payloads that large from where they are (vectored writes), each as its own DATA frame.
//! [`Decoded`] keeps what arrives as the `Bytes` h2 hands over ([`Segments`]), and prost takes
//! each payload as a slice of the frame it lies in. The only copies left are the kernel's.
//!
//! Everything else stays tonic's. The client sends the headers tonic's client would (the path,
//! `te`, `content-type`, the deadline, the credentials) and reads statuses as it does. On the
//! agent, [`SendUnencoded`] wraps the generated service: it takes an `Upload` request's body
//! before tonic sees it and hands the handler its decoded messages ([`undecoded`]); tonic runs
//! the handlers as ever, and a `Download` or `GetChunks` handler leaves its messages in its
//! answer's extensions ([`unencoded`]) for the wrapper to send.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use futures::{Stream, StreamExt};
use http_body::Frame as BodyFrame;
use prost::Message;
use prost::encoding::{WireType, encode_key, encode_varint};
use sloth_proto::artifacts as pb;
use tokio::sync::mpsc;
use tonic::Status;
use tonic::transport::Channel;
use tower::Service;

/// Payloads at least this long travel as their own `Bytes`; shorter ones are copied in with
/// the fields around them (h2 itself copies anything under 256 bytes into its write buffer).
const CHAIN_AT: usize = 4 << 10;

const UPLOAD_PATH: &str = "/sloth.artifacts.v1.Artifacts/Upload";
/// The method paths of the server-streaming calls the client makes here.
pub(crate) const DOWNLOAD_PATH: &str = "/sloth.artifacts.v1.Artifacts/Download";
pub(crate) const GET_CHUNKS_PATH: &str = "/sloth.artifacts.v1.Artifacts/GetChunks";

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

/// The headers every call carries besides gRPC's own: what the client's credentials
/// interceptor adds (the bearer token and the user name).
pub(crate) type CallHeaders = http::HeaderMap;

/// Opens an `Upload` call on `channel` sending what `requests` yields, each message at most
/// `max_message` bytes encoded (and so each answer).
pub(crate) async fn upload(
    channel: &Channel,
    headers: CallHeaders,
    timeout: Duration,
    max_message: usize,
    requests: mpsc::Receiver<pb::UploadRequest>,
) -> Result<Decoded<pb::UploadResponse>, Status> {
    let requests = tokio_stream::wrappers::ReceiverStream::new(requests).map(Ok);
    let body = EncodedBody::new(requests, max_message, Role::Client);
    call(channel, UPLOAD_PATH, headers, timeout, max_message, body).await
}

/// Calls the server-streaming method at `path` with `request`; its answers are decoded by
/// [`Decoded`], each at most `max_message` bytes.
pub(crate) async fn server_streaming<M: Message + Default>(
    channel: &Channel,
    path: &'static str,
    headers: CallHeaders,
    timeout: Duration,
    max_message: usize,
    request: &impl Message,
) -> Result<Decoded<M>, Status> {
    let len = request.encoded_len();
    let mut framed = BytesMut::with_capacity(5 + len);
    framed.put_u8(0);
    framed.put_u32(len as u32);
    request
        .encode(&mut framed)
        .map_err(|e| Status::internal(format!("encoding a request: {e}")))?;
    let body = http_body_util::Full::new(framed.freeze());
    call(channel, path, headers, timeout, max_message, body).await
}

/// Sends a call with the headers tonic's client would send; returns its answers once the agent
/// answered the call's headers.
async fn call<M, B>(
    channel: &Channel,
    path: &'static str,
    headers: CallHeaders,
    timeout: Duration,
    max_message: usize,
    body: B,
) -> Result<Decoded<M>, Status>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<tonic::codegen::StdError>,
{
    let mut request = http::Request::builder()
        .method(http::Method::POST)
        .version(http::Version::HTTP_2)
        .uri(path)
        .header(http::header::TE, "trailers")
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header("grpc-timeout", format!("{}S", timeout.as_secs().max(1)))
        .body(tonic::body::Body::new(body))
        .map_err(|e| Status::internal(format!("building a request: {e}")))?;
    request.headers_mut().extend(headers);
    let mut channel = channel.clone();
    std::future::poll_fn(|cx| channel.poll_ready(cx))
        .await
        .map_err(|e| Status::from_error(e.into()))?;
    let response = channel
        .call(request)
        .await
        .map_err(|e| Status::from_error(e.into()))?;
    let (parts, body) = response.into_parts();
    // As tonic's client: a `grpc-status` among the headers is a trailers-only answer, an error
    // unless it says OK (and then there are no messages).
    match Status::from_header_map(&parts.headers) {
        Some(s) if s.code() != tonic::Code::Ok => return Err(s),
        Some(_) => return Ok(Decoded::empty()),
        None => {}
    }
    if parts.status != http::StatusCode::OK {
        // As tonic maps an answer that is not gRPC (a proxy's, say).
        use http::StatusCode as H;
        let code = match parts.status {
            H::BAD_REQUEST => tonic::Code::Internal,
            H::UNAUTHORIZED => tonic::Code::Unauthenticated,
            H::FORBIDDEN => tonic::Code::PermissionDenied,
            H::NOT_FOUND => tonic::Code::Unimplemented,
            H::TOO_MANY_REQUESTS | H::BAD_GATEWAY | H::SERVICE_UNAVAILABLE | H::GATEWAY_TIMEOUT => {
                tonic::Code::Unavailable
            }
            _ => tonic::Code::Unknown,
        };
        return Err(Status::new(
            code,
            format!(
                "the agent answered HTTP {} where gRPC was expected",
                parts.status
            ),
        ));
    }
    Ok(Decoded::new(body, max_message))
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
    encode_key(tag, WireType::LengthDelimited, small);
    encode_varint(value.len() as u64, small);
    if value.len() < CHAIN_AT {
        small.put_slice(&value);
    } else {
        out.push_back(small.split().freeze());
        out.push_back(value);
    }
}

/// A slot a value waits in for whoever takes it first (`Clone + Sync`, as extensions must be).
struct Slot<T>(Arc<Mutex<Option<T>>>);

impl<T> Slot<T> {
    fn new(value: T) -> Self {
        Self(Arc::new(Mutex::new(Some(value))))
    }

    fn take(&self) -> Option<T> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

impl<T> Clone for Slot<T> {
    fn clone(&self) -> Self {
        Self(Arc::clone(&self.0))
    }
}

type ResponseStream<M> = Pin<Box<dyn Stream<Item = Result<M, Status>> + Send>>;

/// A handler's answer whose messages [`SendUnencoded`] sends: they wait in the response's
/// extensions. The stream tonic is handed takes them from there too, so that without the
/// wrapper tonic sends them (encoded its own way); with it, tonic's stream is never polled.
pub(crate) fn unencoded<M: CarriesFrames + Send>(
    messages: impl Stream<Item = Result<M, Status>> + Send + 'static,
) -> tonic::Response<ResponseStream<M>> {
    let slot = Slot::new(Box::pin(messages) as ResponseStream<M>);
    let fallback = futures::stream::once({
        let slot = slot.clone();
        async move {
            slot.take()
                .unwrap_or_else(|| Box::pin(futures::stream::empty()))
        }
    })
    .flatten();
    let mut response = tonic::Response::new(Box::pin(fallback) as ResponseStream<M>);
    response.extensions_mut().insert(slot);
    response
}

/// The `Upload` request's messages, when [`SendUnencoded`] decoded them; tonic was handed an
/// empty body.
pub(crate) fn undecoded<T>(request: &mut tonic::Request<T>) -> Option<Decoded<pb::UploadRequest>> {
    request
        .extensions_mut()
        .remove::<Slot<Decoded<pb::UploadRequest>>>()?
        .take()
}

/// The encoded body of the messages `response` holds for [`SendUnencoded`], if it holds `M`s.
fn encoded_body<M: CarriesFrames + Send>(
    response: &mut http::Response<tonic::body::Body>,
    max: usize,
) -> Option<tonic::body::Body> {
    let messages = response
        .extensions_mut()
        .remove::<Slot<ResponseStream<M>>>()?
        .take()?;
    Some(tonic::body::Body::new(EncodedBody::new(
        messages,
        max,
        Role::Agent,
    )))
}

/// Wraps the artifacts service. `Upload` requests are decoded by [`Decoded`] instead of
/// tonic's decoder, which copies every received frame once more (see [`undecoded`]); answers
/// whose messages a handler left as [`unencoded`] (those of `Download` and `GetChunks`) are
/// sent with [`EncodedBody`] instead of tonic's encoder.
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

impl<S> Service<http::Request<tonic::body::Body>> for SendUnencoded<S>
where
    S: Service<http::Request<tonic::body::Body>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<tonic::body::Body>) -> Self::Future {
        let max = self.max_message;
        if request.uri().path() == UPLOAD_PATH {
            let body = std::mem::take(request.body_mut());
            let decoded = Decoded::<pb::UploadRequest>::request(body, max);
            request.extensions_mut().insert(Slot::new(decoded));
        }
        let answer = self.inner.call(request);
        Box::pin(async move {
            let mut response = answer.await?;
            let body = match encoded_body::<pb::DownloadResponse>(&mut response, max) {
                Some(body) => Some(body),
                None => encoded_body::<pb::Frames>(&mut response, max),
            };
            if let Some(body) = body {
                *response.body_mut() = body;
            }
            Ok(response)
        })
    }
}

/// Bytes received but not yet decoded, as the `Bytes` they arrived in (h2 hands over each DATA
/// frame as a slice of its read buffer). Pieces shorter than [`CHAIN_AT`] are copied together,
/// so that a peer sending tiny frames costs no more than tonic's buffer would: at most one
/// entry per 4 KiB held, and no read buffer kept alive for a few bytes of it.
#[derive(Debug, Default)]
pub(crate) struct Segments {
    parts: VecDeque<Bytes>,
    len: usize,
}

impl Segments {
    /// Appends `bytes`.
    pub(crate) fn push(&mut self, bytes: Bytes) {
        if bytes.is_empty() {
            return;
        }
        self.len += bytes.len();
        if bytes.len() >= CHAIN_AT {
            self.parts.push_back(bytes);
            return;
        }
        // Joined to a short last piece (one this copied, as nothing else is that short
        // and unique), or started as a new one.
        let joined = match self.parts.pop_back() {
            Some(last) if last.len() < CHAIN_AT => match last.try_into_mut() {
                Ok(mut last) => {
                    last.extend_from_slice(&bytes);
                    Some(last.freeze())
                }
                Err(last) => {
                    self.parts.push_back(last);
                    None
                }
            },
            Some(last) => {
                self.parts.push_back(last);
                None
            }
            None => None,
        };
        let piece = joined.unwrap_or_else(|| {
            let mut copy = BytesMut::with_capacity(CHAIN_AT);
            copy.extend_from_slice(&bytes);
            copy.freeze()
        });
        self.parts.push_back(piece);
    }

    /// The first `n` bytes (`n <= len`), taken off the front.
    fn split_to(&mut self, n: usize) -> Segments {
        let mut taken = Segments::default();
        while taken.len < n {
            let want = n - taken.len;
            let Some(front) = self.parts.front_mut() else {
                break;
            };
            let part = if front.len() <= want {
                self.parts.pop_front().unwrap_or_default()
            } else {
                front.split_to(want)
            };
            self.len -= part.len();
            taken.push(part);
        }
        taken
    }

    /// The first five bytes: a gRPC message's prefix.
    fn prefix(&self) -> Option<[u8; 5]> {
        let mut prefix = [0u8; 5];
        let mut at = 0;
        for part in &self.parts {
            let n = (5 - at).min(part.len());
            prefix[at..at + n].copy_from_slice(&part[..n]);
            at += n;
            if at == 5 {
                return Some(prefix);
            }
        }
        None
    }
}

impl bytes::Buf for Segments {
    fn remaining(&self) -> usize {
        self.len
    }

    fn chunk(&self) -> &[u8] {
        self.parts.front().map_or(&[], |b| &b[..])
    }

    fn advance(&mut self, mut n: usize) {
        assert!(n <= self.len, "advance past the end");
        self.len -= n;
        while n > 0 {
            let Some(front) = self.parts.front_mut() else {
                break;
            };
            if front.len() <= n {
                n -= front.len();
                self.parts.pop_front();
            } else {
                bytes::Buf::advance(front, n);
                n = 0;
            }
        }
    }

    /// Without a copy when the `len` bytes lie in one segment: how chunk payloads are decoded.
    fn copy_to_bytes(&mut self, len: usize) -> Bytes {
        assert!(len <= self.len, "copy_to_bytes past the end");
        match self.parts.front_mut() {
            Some(front) if front.len() >= len => {
                let bytes = front.split_to(len);
                if front.is_empty() {
                    self.parts.pop_front();
                }
                self.len -= len;
                bytes
            }
            _ => {
                let mut copy = BytesMut::with_capacity(len);
                copy.put(self.split_to(len));
                copy.freeze()
            }
        }
    }
}

/// Takes the next whole gRPC message off `received`, if it holds one: `Ok(None)` until then.
/// A message longer than `max`, or compressed (no compression is ever negotiated), is an error.
pub(crate) fn next_decoded<M: Message + Default>(
    received: &mut Segments,
    max: usize,
) -> Result<Option<M>, Status> {
    let Some(prefix) = received.prefix() else {
        return Ok(None);
    };
    if prefix[0] != 0 {
        return Err(Status::internal(format!(
            "a message with compression flag {} (none was agreed)",
            prefix[0]
        )));
    }
    let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
    if len > max {
        return Err(Status::out_of_range(format!(
            "a message of {len} bytes exceeds the limit of {max}"
        )));
    }
    if received.len < 5 + len {
        return Ok(None);
    }
    bytes::Buf::advance(received, 5);
    M::decode(received.split_to(len))
        .map(Some)
        .map_err(|e| Status::internal(format!("a malformed message: {e}")))
}

/// The messages of an agent's answer, decoded as they arrive, with chunk payloads as slices of
/// the received buffers where they lie within one (see [`Segments::copy_to_bytes`]).
pub(crate) struct Decoded<M> {
    /// (Wrapped, as tonic wraps it, so that a `&Decoded` held across an await stays `Send`.)
    body: sync_wrapper::SyncWrapper<tonic::body::Body>,
    received: Segments,
    max_message: usize,
    /// The call's status once the body ended (`Some(Ok)` for OK).
    ended: Option<Result<(), Status>>,
    /// An answer ends with the call's status as trailers; a request simply ends.
    ends_with_status: bool,
    _message: std::marker::PhantomData<fn() -> M>,
}

impl<M> Decoded<M> {
    fn new(body: tonic::body::Body, max_message: usize) -> Self {
        Self {
            body: sync_wrapper::SyncWrapper::new(body),
            received: Segments::default(),
            max_message,
            ended: None,
            ends_with_status: true,
            _message: std::marker::PhantomData,
        }
    }

    /// The messages of a client's request.
    fn request(body: tonic::body::Body, max_message: usize) -> Self {
        Self {
            ends_with_status: false,
            ..Self::new(body, max_message)
        }
    }

    /// An answer with no messages (the status came with the headers).
    fn empty() -> Self {
        let mut empty = Self::new(tonic::body::Body::empty(), 0);
        empty.ended = Some(Ok(()));
        empty
    }
}

impl<M: Message + Default> Stream for Decoded<M> {
    type Item = Result<M, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            match next_decoded(&mut this.received, this.max_message) {
                Ok(Some(message)) => return Poll::Ready(Some(Ok(message))),
                Ok(None) => {}
                Err(status) => {
                    this.ended = Some(Ok(()));
                    this.received = Segments::default();
                    return Poll::Ready(Some(Err(status)));
                }
            }
            if let Some(ended) = this.ended.take() {
                this.ended = Some(Ok(()));
                let ended = ended.and_then(|()| match this.received.len {
                    0 => Ok(()),
                    n => Err(Status::internal(format!(
                        "the stream ended inside a message ({n} bytes of it)"
                    ))),
                });
                this.received = Segments::default();
                return Poll::Ready(ended.err().map(Err));
            }
            match ready!(http_body::Body::poll_frame(
                Pin::new(this.body.get_mut()),
                cx
            )) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => this.received.push(data),
                    // A request's trailers (if a client sends any) carry no status.
                    Err(frame) if this.ends_with_status => {
                        if let Ok(trailers) = frame.into_trailers() {
                            this.ended = Some(status_of(&trailers));
                        }
                    }
                    Err(_) => {}
                },
                Some(Err(e)) => this.ended = Some(Err(e)),
                // (`ended` was taken above: nothing said how the call ended.) Unlike tonic's,
                // an answer without trailers is an error: the agent always sends them.
                None => {
                    this.ended = Some(match this.ends_with_status {
                        true => Err(Status::internal("the answer ended without a status")),
                        false => Ok(()),
                    });
                }
            }
        }
    }
}

/// The call's status from its trailers.
fn status_of(trailers: &http::HeaderMap) -> Result<(), Status> {
    match Status::from_header_map(trailers) {
        Some(s) if s.code() == tonic::Code::Ok => Ok(()),
        Some(s) => Err(s),
        None => Err(Status::internal("the answer's trailers hold no status")),
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
            prop_assert_eq!(joined(request.clone()).0, framed(&request));
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
            assert_eq!(joined(request.clone()), (framed(&request), 1));
        }
        let empty = pb::UploadRequest { step: None };
        assert_eq!(joined(empty.clone()).0, framed(&empty));
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

    proptest! {
        /// What an agent's body sends, received in any pieces, decodes to what was sent.
        #[test]
        fn answers_received_in_pieces_decode_as_sent(
            lens in prop::collection::vec(0usize..3 * CHAIN_AT, 0..6),
            cuts in prop::collection::vec(1usize..5000, 1..20),
        ) {
            let answers: Vec<pb::DownloadResponse> = lens
                .iter()
                .map(|&len| pb::DownloadResponse {
                    step: Some(pb::download_response::Step::Frames(pb::Frames {
                        frames: vec![a_frame(len), a_frame(len / 2)],
                    })),
                })
                .collect();
            let mut sent = VecDeque::new();
            for answer in &answers {
                encode(answer.clone(), usize::MAX >> 1, &mut sent).unwrap();
            }
            let bytes: Vec<u8> = sent.into_iter().flatten().collect();
            let mut received = Segments::default();
            let mut decoded = Vec::new();
            let (mut at, mut cut) = (0, cuts.iter().cycle());
            while at < bytes.len() {
                let n = (*cut.next().unwrap()).min(bytes.len() - at);
                received.push(Bytes::copy_from_slice(&bytes[at..at + n]));
                at += n;
                while let Some(m) = next_decoded::<pb::DownloadResponse>(&mut received, 1 << 24).unwrap() {
                    decoded.push(m);
                }
            }
            prop_assert_eq!(decoded, answers);
            prop_assert_eq!(received.len, 0);
        }
    }

    #[test]
    fn payloads_within_one_received_piece_are_not_copied() {
        let frames = pb::Frames {
            frames: vec![a_frame(CHAIN_AT * 2)],
        };
        let mut sent = VecDeque::new();
        encode(frames.clone(), usize::MAX >> 1, &mut sent).unwrap();
        // As the agent sends it: fields, then the payload as its own piece.
        let pieces: Vec<Bytes> = sent.into_iter().collect();
        assert_eq!(pieces.len(), 2);
        let mut received = Segments::default();
        for piece in &pieces {
            received.push(piece.clone());
        }
        let decoded = next_decoded::<pb::Frames>(&mut received, 1 << 24)
            .unwrap()
            .unwrap();
        assert_eq!(decoded, frames);
        assert_eq!(decoded.frames[0].data.as_ptr(), pieces[1].as_ptr());

        // Cut through the payload: decoded all the same (copied).
        let whole: Vec<u8> = pieces.concat();
        let mut received = Segments::default();
        received.push(Bytes::copy_from_slice(&whole[..100]));
        assert!(
            next_decoded::<pb::Frames>(&mut received, 1 << 24)
                .unwrap()
                .is_none()
        );
        received.push(Bytes::copy_from_slice(&whole[100..]));
        assert_eq!(
            next_decoded::<pb::Frames>(&mut received, 1 << 24)
                .unwrap()
                .unwrap(),
            frames
        );
    }

    #[test]
    fn tiny_pieces_are_held_together() {
        let frames = pb::Frames {
            frames: vec![a_frame(CHAIN_AT * 3)],
        };
        let bytes = framed(&frames);
        let mut received = Segments::default();
        for byte in &bytes {
            received.push(Bytes::copy_from_slice(&[*byte]));
        }
        assert!(
            received.parts.len() <= bytes.len() / CHAIN_AT + 1,
            "{}",
            received.parts.len()
        );
        assert_eq!(
            next_decoded::<pb::Frames>(&mut received, 1 << 24)
                .unwrap()
                .unwrap(),
            frames
        );
    }

    #[tokio::test]
    async fn without_the_wrapper_tonic_is_handed_the_messages() {
        let frames = || {
            Ok(pb::Frames {
                frames: vec![a_frame(10)],
            })
        };
        let response = unencoded(futures::stream::iter([frames(), frames()]));
        assert_eq!(response.into_inner().collect::<Vec<_>>().await.len(), 2);

        // Taken by the wrapper: tonic's stream is empty (and is dropped unpolled anyway).
        let mut response = unencoded(futures::stream::iter([frames()]));
        let slot = response
            .extensions_mut()
            .remove::<Slot<ResponseStream<pb::Frames>>>()
            .unwrap();
        assert!(slot.take().is_some());
        assert!(response.into_inner().collect::<Vec<_>>().await.is_empty());
    }

    #[test]
    fn bad_prefixes_and_bodies_are_errors() {
        let mut received = Segments::default();
        received.push(Bytes::from_static(&[1, 0, 0, 0, 0]));
        let err = next_decoded::<pb::Frames>(&mut received, 100).unwrap_err();
        assert!(err.message().contains("compression flag 1"), "{err}");

        let mut received = Segments::default();
        received.push(Bytes::from_static(&[0, 0, 0, 1, 0]));
        let err = next_decoded::<pb::Frames>(&mut received, 100).unwrap_err();
        assert_eq!(err.code(), tonic::Code::OutOfRange);

        let mut received = Segments::default();
        received.push(Bytes::from_static(&[0, 0, 0, 0, 2, 0x0a, 0x05]));
        let err = next_decoded::<pb::Frames>(&mut received, 100).unwrap_err();
        assert!(err.message().contains("malformed"), "{err}");
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
