//! The agent's Prometheus metrics: counters kept in atomics, served as text on
//! `--metrics-port` (`GET /metrics`).
//!
//! Bytes on the wire are counted on the TCP connections themselves (after TLS, when on), so
//! they are what the network carried: protocol framing included.

use std::fmt::Write as _;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// Upper bounds of the latency histogram's buckets, in seconds.
const BUCKETS: [f64; 12] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0, 300.0,
];

/// The calls whose latency is measured.
pub(crate) const METHODS: [&str; 7] = [
    "list",
    "show",
    "delete",
    "events",
    "upload",
    "download",
    "get_chunks",
];

#[derive(Debug, Default)]
struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

/// Counters of one agent.
#[derive(Debug, Default)]
pub struct Metrics {
    pub(crate) uploads: AtomicU64,
    pub(crate) upload_failures: AtomicU64,
    pub(crate) downloads: AtomicU64,
    pub(crate) deletes: AtomicU64,
    pub(crate) uploaded_bytes: AtomicU64,
    pub(crate) downloaded_bytes: AtomicU64,
    pub(crate) chunks_received: AtomicU64,
    pub(crate) frame_bytes_received: AtomicU64,
    pub(crate) frame_bytes_sent: AtomicU64,
    wire_bytes_received: AtomicU64,
    wire_bytes_sent: AtomicU64,
    connections: AtomicU64,
    latency: [Histogram; METHODS.len()],
}

impl Metrics {
    /// Records one call of `method` (one of [`METHODS`]) that took `elapsed`.
    pub(crate) fn observe(&self, method: &str, elapsed: Duration) {
        let Some(i) = METHODS.iter().position(|m| *m == method) else {
            return;
        };
        let h = &self.latency[i];
        let secs = elapsed.as_secs_f64();
        for (bound, bucket) in BUCKETS.iter().zip(&h.buckets) {
            if secs <= *bound {
                bucket.fetch_add(1, Relaxed);
            }
        }
        h.count.fetch_add(1, Relaxed);
        h.sum_micros.fetch_add(
            elapsed.as_micros().min(u128::from(u64::MAX)) as u64,
            Relaxed,
        );
    }

    /// Times a call until the returned value is dropped: `let _t = metrics.timer("list");`.
    pub(crate) fn timer(self: &Arc<Self>, method: &'static str) -> Timer {
        Timer {
            metrics: Arc::clone(self),
            method,
            start: Instant::now(),
        }
    }

    /// TCP bytes received and sent so far.
    pub fn wire_bytes(&self) -> (u64, u64) {
        (
            self.wire_bytes_received.load(Relaxed),
            self.wire_bytes_sent.load(Relaxed),
        )
    }

    /// The Prometheus text exposition, with the store's size.
    pub fn render(&self, stored_bytes: u64, logical_bytes: u64) -> String {
        let mut out = String::new();
        let mut counter = |name: &str, help: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
            );
        };
        counter(
            "sloth_uploads_total",
            "Committed uploads.",
            self.uploads.load(Relaxed),
        );
        counter(
            "sloth_upload_failures_total",
            "Uploads that ended without a commit.",
            self.upload_failures.load(Relaxed),
        );
        counter(
            "sloth_downloads_total",
            "Downloads confirmed by clients.",
            self.downloads.load(Relaxed),
        );
        counter(
            "sloth_deletes_total",
            "Delete calls that deleted something.",
            self.deletes.load(Relaxed),
        );
        counter(
            "sloth_uploaded_bytes_total",
            "Logical bytes of committed uploads.",
            self.uploaded_bytes.load(Relaxed),
        );
        counter(
            "sloth_downloaded_bytes_total",
            "Logical bytes of confirmed downloads.",
            self.downloaded_bytes.load(Relaxed),
        );
        counter(
            "sloth_chunks_received_total",
            "Chunks received from clients (the ones the store lacked).",
            self.chunks_received.load(Relaxed),
        );
        counter(
            "sloth_frame_bytes_received_total",
            "Chunk frame bytes received (compressed).",
            self.frame_bytes_received.load(Relaxed),
        );
        counter(
            "sloth_frame_bytes_sent_total",
            "Chunk frame bytes sent (compressed).",
            self.frame_bytes_sent.load(Relaxed),
        );
        counter(
            "sloth_wire_bytes_received_total",
            "Bytes read from client connections (TCP payload, after TLS).",
            self.wire_bytes_received.load(Relaxed),
        );
        counter(
            "sloth_wire_bytes_sent_total",
            "Bytes written to client connections (TCP payload, after TLS).",
            self.wire_bytes_sent.load(Relaxed),
        );
        counter(
            "sloth_connections_total",
            "Connections accepted.",
            self.connections.load(Relaxed),
        );
        let _ = writeln!(
            out,
            "# HELP sloth_stored_bytes Bytes of chunk frames in the store, after dedup and compression.\n\
             # TYPE sloth_stored_bytes gauge\nsloth_stored_bytes {stored_bytes}\n\
             # HELP sloth_logical_bytes Sum of the sizes of every stored artifact version.\n\
             # TYPE sloth_logical_bytes gauge\nsloth_logical_bytes {logical_bytes}"
        );
        let _ = writeln!(
            out,
            "# HELP sloth_request_duration_seconds Call latency (streams: until the last message).\n\
             # TYPE sloth_request_duration_seconds histogram"
        );
        for (method, h) in METHODS.iter().zip(&self.latency) {
            for (bound, bucket) in BUCKETS.iter().zip(&h.buckets) {
                let _ = writeln!(
                    out,
                    "sloth_request_duration_seconds_bucket{{method=\"{method}\",le=\"{bound}\"}} {}",
                    bucket.load(Relaxed)
                );
            }
            let count = h.count.load(Relaxed);
            let _ = writeln!(
                out,
                "sloth_request_duration_seconds_bucket{{method=\"{method}\",le=\"+Inf\"}} {count}\n\
                 sloth_request_duration_seconds_sum{{method=\"{method}\"}} {}\n\
                 sloth_request_duration_seconds_count{{method=\"{method}\"}} {count}",
                h.sum_micros.load(Relaxed) as f64 / 1e6
            );
        }
        out
    }
}

/// Records the time from its creation to its drop.
#[derive(Debug)]
pub(crate) struct Timer {
    metrics: Arc<Metrics>,
    method: &'static str,
    start: Instant,
}

impl Drop for Timer {
    fn drop(&mut self) {
        self.metrics.observe(self.method, self.start.elapsed());
    }
}

/// A TCP connection that counts the bytes through it.
#[derive(Debug)]
pub(crate) struct CountingIo {
    inner: TcpStream,
    metrics: Arc<Metrics>,
}

impl CountingIo {
    pub(crate) fn new(inner: TcpStream, metrics: Arc<Metrics>) -> Self {
        metrics.connections.fetch_add(1, Relaxed);
        Self { inner, metrics }
    }
}

impl Connected for CountingIo {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

impl AsyncRead for CountingIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.metrics
            .wire_bytes_received
            .fetch_add(n as u64, Relaxed);
        result
    }
}

impl AsyncWrite for CountingIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &result {
            self.metrics.wire_bytes_sent.fetch_add(*n as u64, Relaxed);
        }
        result
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = &result {
            self.metrics.wire_bytes_sent.fetch_add(*n as u64, Relaxed);
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Serves `GET /metrics` on `listener` until `shutdown` completes.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    engine: Arc<sloth_engine::Engine>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::http::{StatusCode, header};
    use axum::response::IntoResponse;

    let handler = move || {
        let (metrics, engine) = (Arc::clone(&metrics), Arc::clone(&engine));
        async move {
            let stored = engine.cas().stats().await.map(|s| s.stored_bytes);
            let logical = engine
                .stack_usage()
                .map(|u| u.iter().map(|s| s.logical_bytes).sum::<u64>());
            match (stored, logical) {
                (Ok(stored), Ok(logical)) => (
                    [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                    metrics.render(stored, logical),
                )
                    .into_response(),
                _ => (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "store figures unavailable\n",
                )
                    .into_response(),
            }
        }
    };
    let app = axum::Router::new().route("/metrics", axum::routing::get(handler));
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_histograms() {
        let m = Metrics::default();
        m.uploads.fetch_add(2, Relaxed);
        m.observe("upload", Duration::from_millis(30));
        m.observe("upload", Duration::from_secs(2));
        let text = m.render(100, 250);
        assert!(text.contains("\nsloth_uploads_total 2\n"), "{text}");
        assert!(text.contains("sloth_stored_bytes 100\n"));
        assert!(
            text.contains(
                "sloth_request_duration_seconds_bucket{method=\"upload\",le=\"0.05\"} 1\n"
            )
        );
        assert!(
            text.contains("sloth_request_duration_seconds_bucket{method=\"upload\",le=\"5\"} 2\n")
        );
        assert!(text.contains("sloth_request_duration_seconds_count{method=\"upload\"} 2\n"));
    }
}
