//! `metadata.db`: the catalog as a real SQLite file, for people and their scripts.
//!
//! A projection: the sled catalog is the truth, this file is kept current after every change
//! and rebuilt when it is missing or behind (its `projection_meta.generation` differs from the
//! catalog's). WAL mode lets the stock `sqlite3` read it while the store writes.
//!
//! It is also how a one-shot `list`, `show` or `events list` on the embedded store answers
//! without opening sled (whose open alone costs ~100 ms with 100,000 versions):
//! [`ProjectedCatalog`]. That is sound only if a reader can tell that the file is current,
//! which the *pending mark* gives:
//!
//! 1. Before every catalog transaction, under the engine's write lock, `projection_meta.pending`
//!    is set and that SQLite commit is made durable (`synchronous = FULL`).
//! 2. The catalog transaction commits and sled is flushed.
//! 3. The projection update of that change (or a rebuild) deletes `pending` in the same SQLite
//!    transaction that applies the change.
//!
//! So in any SQLite snapshot without `pending`, every catalog commit so far is applied. A
//! crash between 1 and 3 leaves the mark set: readers fall back to the catalog, and the next
//! open rebuilds the file (the generations differ) or, when the catalog never committed the
//! change (the generations agree), just clears the mark.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use rusqlite::{Connection, ErrorCode, OptionalExtension, params};

use crate::error::at;
use crate::record::Event;
use crate::{ArtifactRecord, Error, Result};

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

-- One row per artifacts row: what the spec's table has no column for, and the version's key.
CREATE TABLE IF NOT EXISTS artifact_versions (
    id TEXT PRIMARY KEY REFERENCES artifacts(id) ON DELETE CASCADE,
    stack TEXT NOT NULL,
    task TEXT NOT NULL,
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    manifest TEXT NOT NULL,
    stored_bytes INTEGER NOT NULL,
    last_download_at INTEGER,
    damaged TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS idx_versions_key ON artifact_versions(stack, task, name, version);

-- The newest version of each artifact, by upload time: what `list` shows.
CREATE TABLE IF NOT EXISTS artifact_latest (
    stack TEXT NOT NULL,
    task TEXT NOT NULL,
    name TEXT NOT NULL,
    id TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (stack, task, name)
);
CREATE INDEX IF NOT EXISTS idx_latest_created ON artifact_latest(created_at, id);
-- Covers `show`'s question of where a name exists.
CREATE INDEX IF NOT EXISTS idx_latest_places ON artifact_latest(name, stack, task);

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
    FROM artifact_latest l
    JOIN artifacts a ON a.id = l.id
    JOIN artifact_versions v ON v.id = l.id;

CREATE VIEW IF NOT EXISTS stack_usage AS
    SELECT a.stack AS stack,
           COUNT(DISTINCT a.task || char(0) || a.name) AS artifacts,
           COUNT(*) AS versions,
           SUM(a.size) AS logical_bytes,
           SUM(v.stored_bytes) AS stored_bytes
    FROM artifacts a JOIN artifact_versions v ON v.id = a.id
    GROUP BY a.stack;
";

/// The layout of the tables above; a file with another is rebuilt.
pub(crate) const SCHEMA_VERSION: i64 = 2;

/// Removes what an older layout of this file had, so that [`SCHEMA`] can create it anew (the
/// generation goes with `projection_meta`, so the engine refills the file on open).
const DROP_OLD_SCHEMA: &str = "
DROP VIEW IF EXISTS latest_artifacts;
DROP VIEW IF EXISTS stack_usage;
DROP TABLE IF EXISTS artifact_latest;
DROP TABLE IF EXISTS artifact_versions;
DROP TABLE IF EXISTS events;
DROP TABLE IF EXISTS projection_meta;
DROP TABLE IF EXISTS artifacts;
";

/// One `projection_meta` value of the file `conn` has open.
pub(crate) fn meta_value(conn: &Connection, key: &str) -> Result<Option<i64>> {
    Ok(conn
        .query_row(
            "SELECT value FROM projection_meta WHERE key = ?1",
            params![key],
            |r| r.get(0),
        )
        .optional()?)
}

#[derive(Debug)]
pub(crate) struct SqliteProjection {
    /// `None` until the file could be opened: a disk too full for SQLite's shared-memory
    /// index keeps it from opening, and must not keep the store from opening. Every use tries
    /// again.
    conn: Mutex<Option<Connection>>,
    data_dir: PathBuf,
    layout: bool,
    /// The file may lack a change: an update failed since the last rebuild, or the engine has
    /// not yet confirmed on open that the file is current. The next change then rebuilds the
    /// file instead of updating it (see `Engine::project_sqlite`).
    behind: AtomicBool,
}

impl SqliteProjection {
    /// `metadata.db` in `data_dir`, opened now if it can be (see [`Self::connect`]); a file
    /// that cannot is reported and tried again at its next use.
    pub(crate) fn open(data_dir: &Path, layout: bool) -> Self {
        let conn = Self::connect(data_dir)
            .inspect_err(|e| {
                // The engine's check on open reports it (a warning that the file is stale).
                tracing::debug!("metadata.db cannot be opened now, will retry at its next use: {e}")
            })
            .ok();
        Self {
            conn: Mutex::new(conn),
            data_dir: data_dir.to_path_buf(),
            layout,
            behind: AtomicBool::new(true),
        }
    }

    /// Opens `metadata.db`, creating it or bringing its schema up to date. A file SQLite
    /// calls damaged is moved aside to `metadata.db.damaged` and started anew: it is a
    /// projection, rebuilt from the catalog, and must never keep the store from opening.
    fn connect(data_dir: &Path) -> Result<Connection> {
        let path = data_dir.join("metadata.db");
        match Self::connect_to(&path) {
            Err(Error::Sqlite(e))
                if matches!(
                    e.sqlite_error_code(),
                    Some(ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt)
                ) =>
            {
                let aside = data_dir.join("metadata.db.damaged");
                tracing::warn!(
                    "metadata.db is damaged ({e}): moved to {} and rebuilt from the catalog",
                    aside.display()
                );
                std::fs::rename(&path, &aside).map_err(at(&path))?;
                for stale in ["metadata.db-wal", "metadata.db-shm"] {
                    let stale = data_dir.join(stale);
                    if stale.exists() {
                        std::fs::remove_file(&stale).map_err(at(&stale))?;
                    }
                }
                Self::connect_to(&path)
            }
            other => other,
        }
    }

    fn connect_to(path: &Path) -> Result<Connection> {
        let mut conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let schema = conn
            .query_row(
                "SELECT value FROM projection_meta WHERE key = 'schema'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .optional()
            // No such table: a new file (or one from before the schema was recorded).
            .unwrap_or(None);
        if schema != Some(SCHEMA_VERSION) {
            let tx = conn.transaction()?;
            tx.execute_batch(DROP_OLD_SCHEMA)?;
            tx.execute_batch(SCHEMA)?;
            tx.execute(
                "INSERT INTO projection_meta (key, value) VALUES ('schema', ?1)",
                params![SCHEMA_VERSION],
            )?;
            tx.commit()?;
        }
        Ok(conn)
    }

    /// Runs `f` on the connection, opening the file first when it is not open yet.
    fn with<T>(&self, f: impl FnOnce(&mut Connection) -> Result<T>) -> Result<T> {
        let mut slot = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        let conn = match slot.take() {
            Some(conn) => conn,
            None => Self::connect(&self.data_dir)?,
        };
        f(slot.insert(conn))
    }

    /// Reads one `projection_meta` value.
    fn meta(&self, key: &str) -> Result<Option<i64>> {
        self.with(|conn| meta_value(conn, key))
    }

    /// The catalog generation this file reflects.
    pub(crate) fn generation(&self) -> Result<Option<u64>> {
        Ok(self.meta("generation")?.map(|v| v as u64))
    }

    /// Rows in the `artifacts` table.
    pub(crate) fn rows(&self) -> Result<u64> {
        self.with(|conn| {
            Ok(
                conn.query_row("SELECT COUNT(*) FROM artifacts", [], |r| r.get::<_, i64>(0))?
                    as u64,
            )
        })
    }

    /// Whether the layout was on when this file was last rebuilt (its `path` column depends
    /// on it), or `None` for a file from before this was recorded.
    pub(crate) fn layout_flag(&self) -> Result<Option<bool>> {
        Ok(self.meta("layout")?.map(|v| v != 0))
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
            "INSERT OR REPLACE INTO artifact_versions
             (id, stack, task, name, version, manifest, stored_bytes, last_download_at, damaged)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![
                r.id.to_string(),
                r.stack,
                r.task,
                r.name,
                r.version,
                r.manifest.to_hex(),
                r.stored_bytes as i64,
                r.last_download_at,
                r.damaged
            ],
        )?;
        Ok(())
    }

    /// Points `artifact_latest` at the newest remaining version of `r`'s artifact (or drops
    /// the artifact from it when no version remains).
    fn refresh_latest(tx: &rusqlite::Transaction<'_>, r: &ArtifactRecord) -> Result<()> {
        let key = params![r.stack, r.task, r.name];
        tx.execute(
            "DELETE FROM artifact_latest WHERE stack = ?1 AND task = ?2 AND name = ?3",
            key,
        )?;
        tx.execute(
            "INSERT INTO artifact_latest (stack, task, name, id, created_at)
             SELECT v.stack, v.task, v.name, v.id, a.created_at
             FROM artifact_versions v JOIN artifacts a ON a.id = v.id
             WHERE v.stack = ?1 AND v.task = ?2 AND v.name = ?3
             ORDER BY v.version DESC LIMIT 1",
            key,
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

    /// Records the generation this file now reflects, all of it: no change is pending.
    fn set_generation(tx: &rusqlite::Transaction<'_>, generation: u64) -> Result<()> {
        tx.execute(
            "INSERT OR REPLACE INTO projection_meta (key, value) VALUES ('generation', ?1)",
            params![generation as i64],
        )?;
        tx.execute("DELETE FROM projection_meta WHERE key = 'pending'", [])?;
        Ok(())
    }

    /// A new or changed version, with the event that changed it.
    pub(crate) fn upsert(
        &self,
        record: &ArtifactRecord,
        event: &Event,
        generation: u64,
    ) -> Result<()> {
        self.change(event, generation, |tx| {
            self.put_record(tx, record)?;
            Self::refresh_latest(tx, record)
        })
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
            Self::refresh_latest(tx, record)
        })
    }

    /// An event that changed no record (a cleanup run, a failed policy).
    pub(crate) fn event_only(&self, event: &Event, generation: u64) -> Result<()> {
        self.change(event, generation, |_| Ok(()))
    }

    /// Step 1 of the pending-mark protocol (module docs): called before every catalog
    /// transaction; durable when it returns.
    pub(crate) fn mark_pending(&self) -> Result<()> {
        self.with(|conn| {
            conn.pragma_update(None, "synchronous", "FULL")?;
            let marked = conn.execute(
                "INSERT OR REPLACE INTO projection_meta (key, value) VALUES ('pending', 1)",
                [],
            );
            conn.pragma_update(None, "synchronous", "NORMAL")?;
            marked?;
            Ok(())
        })
    }

    /// Confirms, on open, that the file holds the catalog at its generation: then a pending
    /// mark is of a change the catalog never committed, and is cleared.
    pub(crate) fn confirm_current(&self) -> Result<()> {
        if self.meta("pending")?.is_some() {
            self.with(|conn| {
                conn.execute("DELETE FROM projection_meta WHERE key = 'pending'", [])?;
                Ok(())
            })?;
        }
        self.behind.store(false, Ordering::Release);
        Ok(())
    }

    /// One catalog change in one SQLite transaction: `apply` it, record its event, advance
    /// the generation this file reflects and clear the pending mark.
    fn change(
        &self,
        event: &Event,
        generation: u64,
        apply: impl FnOnce(&rusqlite::Transaction<'_>) -> Result<()>,
    ) -> Result<()> {
        let result = self.with(|conn| {
            let tx = conn.transaction()?;
            apply(&tx)?;
            Self::put_event(&tx, event)?;
            Self::set_generation(&tx, generation)?;
            tx.commit()?;
            Ok(())
        });
        if result.is_err() {
            self.behind.store(true, Ordering::Release);
        }
        result
    }

    /// Whether an update failed since the last rebuild.
    pub(crate) fn is_behind(&self) -> bool {
        self.behind.load(Ordering::Acquire)
    }

    /// Replaces the whole content with the catalog's.
    pub(crate) fn rebuild(
        &self,
        records: &[ArtifactRecord],
        events: &[Event],
        generation: u64,
    ) -> Result<()> {
        let rebuilt = self.with(|conn| self.rebuild_in(conn, records, events, generation));
        self.behind.store(rebuilt.is_err(), Ordering::Release);
        rebuilt
    }

    fn rebuild_in(
        &self,
        conn: &mut Connection,
        records: &[ArtifactRecord],
        events: &[Event],
        generation: u64,
    ) -> Result<()> {
        let tx = conn.transaction()?;
        tx.execute_batch(
            "DELETE FROM artifact_latest; DELETE FROM artifact_versions; DELETE FROM artifacts;
             DELETE FROM events;",
        )?;
        for r in records {
            self.put_record(&tx, r)?;
        }
        tx.execute_batch(
            "INSERT INTO artifact_latest (stack, task, name, id, created_at)
             SELECT v.stack, v.task, v.name, v.id, a.created_at
             FROM artifact_versions v JOIN artifacts a ON a.id = v.id
             WHERE v.version = (
                 SELECT MAX(v2.version) FROM artifact_versions v2
                 WHERE v2.stack = v.stack AND v2.task = v.task AND v2.name = v.name
             );",
        )?;
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
