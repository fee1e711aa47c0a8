//! Every message an agent or a client decodes from the network (requests, upload steps,
//! download headers, events, workflow events, verify reports, heartbeats): the first byte
//! picks the message kind, the rest is decoded with prost and passed through the checks the
//! services and the client apply. Nothing may panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some((&kind, bytes)) = data.split_first() {
        sloth_agent::fuzzing::decode(kind, bytes);
    }
});
