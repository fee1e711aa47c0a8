//! `sloth-engine`: the artifact catalog of one agent, over the `sloth-cas` chunk store.
//!
//! [`Engine`] keeps [`ArtifactRecord`]s — the spec's fields (id, name, path, size, checksum,
//! stack, task, created and modified times, download count) plus version, manifest and stored
//! bytes — in the same sled database as the chunks, so that committing an upload's manifest,
//! its record and its [`Event`] is one transaction. Uploading the same stack/task/name again
//! makes a new version; the newest is what [`Engine::resolve`] and the layout return. Names,
//! stacks and tasks are validated once, here ([`Name`]). Two projections follow every change:
//! `metadata.db` (SQLite, the spec's schema plus views) and `artifacts/<stack>/<task>/<name>`
//! (read-only hardlinks into `objects/`); both are rebuilt when missing or stale.
//!
//! ```
//! # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
//! # async fn main() -> sloth_engine::Result<()> {
//! use sloth_engine::{ArtifactKey, Engine, EngineConfig, Selector};
//!
//! let dir = tempfile::tempdir()?;
//! let engine = Engine::open(dir.path(), EngineConfig::default()).await?;
//! let key = ArtifactKey::new("app.bin", Some("production"), Some("build"))?;
//! let record = engine.upload(&key, &b"binary"[..], "alice").await?;
//! assert_eq!(record.version, 1);
//! assert!(record.checksum.starts_with("sha256:"));
//!
//! let found = engine.resolve(&Selector { name: "app.bin".into(), ..Selector::default() })?;
//! assert_eq!(found.id, record.id);
//! # Ok(())
//! # }
//! ```

mod cleanup;
mod config;
mod engine;
mod error;
mod layout;
mod name;
mod projected;
mod record;
mod sqlite;
mod sync_behind;
mod verify;

pub use cleanup::{CleanupReport, CleanupRequest, Doomed};
pub use config::{CONFIG_FILE, RetentionRule, StoreConfigFile, config_path};
pub use engine::{
    Engine, EngineConfig, ListQuery, Receiving, Selector, StackUsage, error_chain, open_upload,
    refuse_damaged,
};
pub use error::{Error, Result};
pub use layout::SETTLE_EVERY;
pub use name::{ArtifactKey, MAX_NAME_LEN, Name};
pub use projected::ProjectedCatalog;
pub use record::{ArtifactId, ArtifactRecord, Event, glob_match};
pub use sloth_cas::IngestOptions;
pub use sync_behind::SyncBehind;
pub use verify::{BadChunkUse, VerifyReport, sha256_file};

/// Decimal (SI) units: 1 KB = 1000 B, 1 MB = 1000 KB, as disk vendors and `ls --si` count.
/// The spec prints `KB`, so that spelling stays even though SI writes `kB`.
const UNITS: [&str; 6] = ["KB", "MB", "GB", "TB", "PB", "EB"];

/// A byte count for people: `12 B`, `450 KB`, `2.5 MB`. Below 100 of a unit one decimal is
/// shown, from 100 on none, so that a value never takes more than four digits.
pub fn human_size(bytes: u64) -> String {
    if bytes < 1000 {
        return format!("{bytes} B");
    }
    let mut scale = 1000_f64;
    for unit in UNITS {
        let value = bytes as f64 / scale;
        let tenths = (value * 10.0).round();
        if tenths < 1000.0 {
            return format!("{:.1} {unit}", tenths / 10.0);
        }
        // Rounding may carry into the next unit (999,999 B is 1.0 MB, not 1000 KB).
        let whole = value.round();
        if whole < 1000.0 {
            return format!("{whole:.0} {unit}");
        }
        scale *= 1000.0;
    }
    // u64::MAX is 18.4 EB, so the loop always returns.
    format!("{bytes} B")
}
