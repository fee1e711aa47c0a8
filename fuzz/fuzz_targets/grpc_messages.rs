//! The gRPC message decoder of `agent/src/wire.rs` (a client's answers, an agent's Upload
//! requests), which takes chunk payloads out of the received buffers without copying: bytes
//! received in arbitrary pieces decode to the same messages, and fail at the same message, as
//! the whole bytes decoded from a slice. The first byte says how many of the following bytes
//! say where the pieces are cut.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some((&n, rest)) = data.split_first() {
        let (cuts, bytes) = rest.split_at((n as usize % 16).min(rest.len()));
        sloth_agent::fuzzing::grpc_messages(cuts, bytes);
    }
});
