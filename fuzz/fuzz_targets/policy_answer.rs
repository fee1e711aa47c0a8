//! What a retention policy hands back, and what a module claims about itself: both come from
//! untrusted wasm. `check_answer` must never panic, and whatever it accepts is exactly one
//! decision per artifact of the batch, in the batch's order; `read_metadata` must never panic
//! on any bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sloth_policies::{Artifact, check_answer, read_metadata};

fuzz_target!(|data: &[u8]| {
    let Some((&n, answer)) = data.split_first() else {
        return;
    };
    let batch: Vec<Artifact> = (0..n % 8)
        .map(|i| Artifact {
            id: format!("a{i}"),
            name: format!("n{i}"),
            stack: "s".into(),
            task: "t".into(),
            version: 1,
            size: 0,
            created_at: 0,
            modified_at: 0,
            download_count: 0,
            last_download_at: None,
            checksum: String::new(),
        })
        .collect();
    if let Ok(decisions) = check_answer(answer, &batch) {
        assert_eq!(decisions.len(), batch.len());
        for (d, a) in decisions.iter().zip(&batch) {
            assert_eq!(d.id, a.id);
        }
    }
    let _ = read_metadata(data);
});
