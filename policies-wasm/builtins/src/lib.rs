//! Helpers shared by the built-in policies (`examples/*.rs`, one module each).

use sloth_policy_sdk::Artifact;

/// How long ago, in words: `45d`, `6h`, `12m`, `30s`.
pub fn ago(seconds: i64) -> String {
    let s = seconds.max(0);
    if s >= 86_400 {
        format!("{}d", s / 86_400)
    } else if s >= 3_600 {
        format!("{}h", s / 3_600)
    } else if s >= 60 {
        format!("{}m", s / 60)
    } else {
        format!("{s}s")
    }
}

/// Newest first: by upload time, then version, then id (a total order, so that every run
/// decides the same way).
pub fn newest_first(a: &&Artifact, b: &&Artifact) -> std::cmp::Ordering {
    (b.created_at, b.version, &b.id).cmp(&(a.created_at, a.version, &a.id))
}
