//! The bounds every call runs within. An agent applies them to what it receives; the client
//! keeps to them when it sends.

use std::time::Duration;

/// Largest gRPC message either side decodes. A Frames message carries at most
/// [`FRAMES_BYTES`] of frames, and one frame is at most a maximal chunk (16 MiB) plus header.
pub const MAX_MESSAGE: usize = 24 << 20;

/// Frame bytes the sender packs into one Frames message (a larger single frame goes alone).
pub const FRAMES_BYTES: usize = 4 << 20;

/// Chunks in one Offer, and chunk ids in one GetChunks request.
pub const MAX_BATCH: usize = 1024;

/// Offers a client keeps unanswered at once during an upload.
pub const OFFER_WINDOW: usize = 4;

/// Concurrent HTTP/2 streams (calls) per connection.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 64;

/// Calls an agent serves at once on one connection.
pub const MAX_CONCURRENT_CALLS: usize = 256;

/// A streaming call that receives nothing for this long fails with `DeadlineExceeded`.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(120);

/// Longest any single call (a whole upload or download) may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(6 * 3600);

/// Longest a unary call (list, show, delete, events) may take.
pub const UNARY_TIMEOUT: Duration = Duration::from_secs(300);

/// Longest a client waits to connect.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Most events or artifacts one List/Events call returns.
pub const MAX_LIST: u32 = 100_000;
