//! `metadata.db`: the catalog as a real SQLite file, for people and their scripts.
//!
//! A projection: the sled catalog is the truth, this file is kept current after every change
//! and rebuilt when it is missing or behind (its `projection_meta.generation` differs from the
//! catalog's). WAL mode lets the stock `sqlite3` read it while the store writes.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::{Connection, OptionalExtension, params};

use crate::record::Event;
use crate::{ArtifactRecord, Result};

/// The spec's schema, exactly, then what the projection adds beside it.
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS artifacts (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    checksum TEXT NOT NULL,
    stack TEXT,
    task TEXT,
    created_at INTEGER NOT NULL,
    modified_at INTEGER NOT NULL,
    download_count INTEGER DEFAULT 0
);

CREATE INDEX IF NOT EXISTS idx_artifacts_stack ON artifacts(stack);
CREATE INDEX IF NOT EXISTS idx_artifacts_task ON artifacts(task);
CREATE INDEX IF NOT EXISTS idx_artifacts_created ON artifacts(created_at);

-- One row per artifacts row: what the spec's table has no column for.
CREATE TABLE IF NOT EXISTS artifact_versions (
    id TEXT PRIMARY KEY REFERENCES artifacts(id) ON DELETE CASCADE,
    version INTEGER NOT NULL,
    manifest TEXT NOT NULL,
    stored_bytes INTEGER NOT NULL
);

CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY,
    time INTEGER NOT NULL,
    kind TEXT NOT NULL,
    agent TEXT NOT NULL,
    principal TEXT NOT NULL,
    artifact_id TEXT NOT NULL,
    stack TEXT,
    task TEXT,
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    size INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS idx_events_kind ON events(kind);

CREATE TABLE IF NOT EXISTS projection_meta (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);

CREATE VIEW IF NOT EXISTS latest_artifacts AS
    SELECT a.*, v.version, v.manifest, v.stored_bytes
    FROM artifacts a JOIN artifact_versions v ON v.id = a.id
    WHERE v.version = (
        SELECT MAX(v2.version) FROM artifacts a2 JOIN artifact_versions v2 ON v2.id = a2.id
        WHERE a2.stack IS a.stack AND a2.task IS a.task AND a2.name = a.name
    );

CREATE VIEW IF NOT EXISTS stack_usage AS
    SELECT a.stack AS stack,
           COUNT(DISTINCT a.task || char(0) || a.name) AS artifacts,
           COUNT(*) AS versions,
           SUM(a.size) AS logical_bytes,
           SUM(v.stored_bytes) AS stored_bytes
    FROM artifacts a JOIN artifact_versions v ON v.id = a.id
    GROUP BY a.stack;
";

#[derive(Debug)]
pub(crate) struct SqliteProjection {
    conn: Mutex<Connection>,
    data_dir: PathBuf,
    layout: bool,
}

impl SqliteProjection {
    pub(crate) fn open(data_dir: &Path, layout: bool) -> Result<Self> {
        let conn = Connection::open(data_dir.join("metadata.db"))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        Ok(Self {
            conn: Mutex::new(conn),
            data_dir: data_dir.to_path_buf(),
            layout,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The catalog generation this file reflects.
    pub(crate) fn generation(&self) -> Result<Option<u64>> {
        Ok(self
            .lock()
            .query_row(
                "SELECT value FROM projection_meta WHERE key = 'generation'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .optional()?
            .map(|v| v as u64))
    }

    /// Rows in the `artifacts` table.
    pub(crate) fn rows(&self) -> Result<u64> {
        Ok(self
            .lock()
            .query_row("SELECT COUNT(*) FROM artifacts", [], |r| r.get::<_, i64>(0))?
            as u64)
    }

    /// Whether the layout was on when this file was last rebuilt (its `path` column depends
    /// on it), or `None` for a file from before this was recorded.
    pub(crate) fn layout_flag(&self) -> Result<Option<bool>> {
        Ok(self
            .lock()
            .query_row(
                "SELECT value FROM projection_meta WHERE key = 'layout'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .optional()?
            .map(|v| v != 0))
    }

    fn path_of(&self, r: &ArtifactRecord) -> String {
        if self.layout {
            self.data_dir
                .join("artifacts")
                .join(&r.stack)
                .join(&r.task)
                .join(&r.name)
                .display()
                .to_string()
        } else {
            String::new()
        }
    }

    fn put_record(&self, tx: &rusqlite::Transaction<'_>, r: &ArtifactRecord) -> Result<()> {
        tx.execute(
            "INSERT OR REPLACE INTO artifacts
             (id, name, path, size, checksum, stack, task, created_at, modified_at, download_count)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            params![
                r.id.to_string(),
                r.name,
                self.path_of(r),
                r.size as i64,
                r.checksum,
                r.stack,
                r.task,
                r.created_at,
                r.modified_at,
                r.download_count as i64
            ],
        )?;
        tx.execute(
            "INSERT OR REPLACE INTO artifact_versions (id, version, manifest, stored_bytes) VALUES (?1, ?2, ?3, ?4)",
            params![r.id.to_string(), r.version, r.manifest.to_hex(), r.stored_bytes as i64],
        )?;
        Ok(())
    }

    fn put_event(tx: &rusqlite::Transaction<'_>, e: &Event) -> Result<()> {
        tx.execute(
            "INSERT OR IGNORE INTO events
             (seq, time, kind, agent, principal, artifact_id, stack, task, name, version, size)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            params![
                e.seq as i64,
                e.time,
                e.kind,
                e.agent,
                e.principal,
                e.artifact_id.to_string(),
                e.stack,
                e.task,
                e.name,
                e.version,
                e.size as i64
            ],
        )?;
        Ok(())
    }

    fn set_generation(tx: &rusqlite::Transaction<'_>, generation: u64) -> Result<()> {
        tx.execute(
            "INSERT OR REPLACE INTO projection_meta (key, value) VALUES ('generation', ?1)",
            params![generation as i64],
        )?;
        Ok(())
    }

    /// A new or changed version, with the event that changed it.
    pub(crate) fn upsert(
        &self,
        record: &ArtifactRecord,
        event: &Event,
        generation: u64,
    ) -> Result<()> {
        self.change(event, generation, |tx| self.put_record(tx, record))
    }

    /// A deleted version, with its delete event.
    pub(crate) fn delete(
        &self,
        record: &ArtifactRecord,
        event: &Event,
        generation: u64,
    ) -> Result<()> {
        self.change(event, generation, |tx| {
            tx.execute(
                "DELETE FROM artifacts WHERE id = ?1",
                params![record.id.to_string()],
            )?;
            Ok(())
        })
    }

    /// An event that changed no record (a cleanup run, a failed policy).
    pub(crate) fn event_only(&self, event: &Event, generation: u64) -> Result<()> {
        self.change(event, generation, |_| Ok(()))
    }

    /// One catalog change in one SQLite transaction: `apply` it, record its event, and
    /// advance the generation this file reflects.
    fn change(
        &self,
        event: &Event,
        generation: u64,
        apply: impl FnOnce(&rusqlite::Transaction<'_>) -> Result<()>,
    ) -> Result<()> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        apply(&tx)?;
        Self::put_event(&tx, event)?;
        Self::set_generation(&tx, generation)?;
        tx.commit()?;
        Ok(())
    }

    /// Replaces the whole content with the catalog's.
    pub(crate) fn rebuild(
        &self,
        records: &[ArtifactRecord],
        events: &[Event],
        generation: u64,
    ) -> Result<()> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        tx.execute_batch(
            "DELETE FROM artifact_versions; DELETE FROM artifacts; DELETE FROM events;",
        )?;
        for r in records {
            self.put_record(&tx, r)?;
        }
        for e in events {
            Self::put_event(&tx, e)?;
        }
        Self::set_generation(&tx, generation)?;
        tx.execute(
            "INSERT OR REPLACE INTO projection_meta (key, value) VALUES ('layout', ?1)",
            params![i64::from(self.layout)],
        )?;
        tx.commit()?;
        Ok(())
    }
}
