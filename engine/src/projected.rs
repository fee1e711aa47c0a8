//! Read-only answers from `metadata.db` when it provably holds the whole catalog: `list`,
//! `show` and `events list` on the embedded store.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags, OptionalExtension, Row, params};

use crate::engine::resolve_with;
use crate::layout::Layout;
use crate::sqlite::{SCHEMA_VERSION, meta_value};
use crate::{ArtifactKey, ArtifactRecord, Error, Event, ListQuery, Result, Selector, glob_match};

/// The columns [`record_of`] reads, in its order.
const RECORD_COLUMNS: &str = "a.id, a.name, a.stack, a.task, v.version, a.size, a.checksum, \
     v.manifest, v.stored_bytes, a.created_at, a.modified_at, a.download_count, \
     v.last_download_at, v.damaged";

/// The catalog as `metadata.db` shows it, in one SQLite snapshot taken when no change was
/// pending (see the pending-mark protocol in `sqlite.rs`): then it holds exactly what the
/// catalog held at that moment, and `list`, `show` and `events list` can answer from it
/// without opening the store. It reads the same records and events [`crate::Engine::list`],
/// [`crate::Engine::resolve`] and [`crate::Engine::events`] return, in the same order.
#[derive(Debug)]
pub struct ProjectedCatalog {
    conn: Connection,
    layout: Option<Layout>,
}

impl ProjectedCatalog {
    /// The projection in `data_dir`, when it is current for a store whose layout setting is
    /// `layout`; `None` when it cannot answer for the catalog — missing, from another schema
    /// or layout setting, or with a change pending — and the catalog itself must be opened.
    pub fn open(data_dir: &Path, layout: bool) -> Option<Self> {
        match Self::try_open(data_dir, layout) {
            Ok(found) => found,
            Err(e) => {
                tracing::debug!("metadata.db cannot answer, opening the store: {e}");
                None
            }
        }
    }

    /// Whether `e`, from one of this type's queries, means the file could not answer (SQLite
    /// failed, on a full disk say, or a value in it is corrupt) and the catalog must be asked
    /// instead; any other error is the answer (not found, ambiguous).
    pub fn cannot_answer(e: &Error) -> bool {
        matches!(e, Error::Sqlite(_) | Error::CorruptRecord(_))
    }

    fn try_open(data_dir: &Path, layout: bool) -> Result<Option<Self>> {
        let path = data_dir.join("metadata.db");
        if !path.is_file() {
            return Ok(None);
        }
        let layout = layout.then(|| Layout::new(data_dir));
        // Paths into a layout whose objects may have lost bytes (left unsynced before a
        // restart) may show damaged copies, until an open of the store repairs it.
        if layout.as_ref().is_some_and(Layout::may_show_damage) {
            return Ok(None);
        }
        let conn = Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        // Every read from here on sees the snapshot the checks below see.
        conn.execute_batch("BEGIN")?;
        let meta = |key: &str| meta_value(&conn, key);
        let generation = meta("generation")?;
        // The paths printed are the layout's: it must show the same generation.
        let layout_current = match &layout {
            Some(layout) => layout.generation()?.map(|g| g as i64) == generation,
            None => true,
        };
        let current = meta("schema")? == Some(SCHEMA_VERSION)
            && generation.is_some()
            && meta("pending")?.is_none()
            && meta("layout")? == Some(i64::from(layout.is_some()))
            && layout_current;
        Ok(current.then_some(Self { conn, layout }))
    }

    /// What [`crate::Engine::list`] returns for `query`.
    pub fn list(&self, query: &ListQuery) -> Result<Vec<ArtifactRecord>> {
        let from = if query.all_versions {
            "artifacts a JOIN artifact_versions v ON v.id = a.id"
        } else {
            "artifact_latest l JOIN artifacts a ON a.id = l.id JOIN artifact_versions v ON v.id = l.id"
        };
        // `l.created_at` walks the index of the newest versions from its newest end, as the
        // catalog walks its time index.
        let order = if query.all_versions { "a" } else { "l" };
        let sql = format!(
            "SELECT {RECORD_COLUMNS} FROM {from}
             WHERE (?1 IS NULL OR a.stack = ?1) AND (?2 IS NULL OR a.task = ?2)
             ORDER BY {order}.created_at DESC, {order}.id DESC LIMIT ?3"
        );
        let limit = query
            .limit
            .map_or(-1, |l| i64::try_from(l).unwrap_or(i64::MAX));
        let mut statement = self.conn.prepare(&sql)?;
        let mut records = statement
            .query_map(params![query.stack, query.task, limit], record_of)?
            .map(|r| r.map_err(Error::from).and_then(|r| r))
            .collect::<Result<Vec<_>>>()?;
        records.reverse();
        Ok(records)
    }

    /// What [`crate::Engine::resolve`] returns for `selector`.
    pub fn resolve(&self, selector: &Selector) -> Result<ArtifactRecord> {
        resolve_with(
            selector,
            |name| {
                let mut statement = self.conn.prepare(
                    "SELECT stack, task FROM artifact_latest
                     WHERE name = ?1 AND (?2 IS NULL OR stack = ?2) AND (?3 IS NULL OR task = ?3)",
                )?;
                let filters = params![name.as_str(), selector.stack, selector.task];
                let places = statement
                    .query_map(filters, |r| Ok((r.get(0)?, r.get(1)?)))?
                    .collect::<rusqlite::Result<BTreeSet<(String, String)>>>()?;
                Ok(places)
            },
            |key, version| {
                let sql = format!(
                    "SELECT {RECORD_COLUMNS} FROM artifact_versions v JOIN artifacts a ON a.id = v.id
                     WHERE v.stack = ?1 AND v.task = ?2 AND v.name = ?3 AND (?4 IS NULL OR v.version = ?4)
                     ORDER BY v.version DESC LIMIT 1"
                );
                self.conn
                    .query_row(
                        &sql,
                        params![
                            key.stack.as_str(),
                            key.task.as_str(),
                            key.name.as_str(),
                            version
                        ],
                        record_of,
                    )
                    .optional()?
                    .transpose()
            },
        )
    }

    /// How many versions `key` has and the newest one's number (0 and 0 when none).
    pub fn version_figures(&self, key: &ArtifactKey) -> Result<(u32, u32)> {
        Ok(self.conn.query_row(
            "SELECT COUNT(*), COALESCE(MAX(version), 0) FROM artifact_versions
             WHERE stack = ?1 AND task = ?2 AND name = ?3",
            params![key.stack.as_str(), key.task.as_str(), key.name.as_str()],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?)
    }

    /// What [`crate::Engine::events`] returns: the most recent `limit` events whose kind
    /// matches the glob `pattern` (all when `None`), oldest first.
    pub fn events(&self, pattern: Option<&str>, limit: Option<usize>) -> Result<Vec<Event>> {
        let mut statement = self.conn.prepare(
            "SELECT seq, time, kind, agent, principal, artifact_id, stack, task, name, version, size
             FROM events WHERE (?1 IS NULL OR kind GLOB ?1) ORDER BY seq DESC",
        )?;
        // SQLite's GLOB reads `*` and `?` as ours does (case-sensitively) but also `[...]`,
        // which ours takes literally: such a pattern is left to the check below alone.
        let prefilter = pattern.filter(|p| !p.contains(['[', ']']));
        let mut rows = statement.query(params![prefilter])?;
        let mut out = Vec::new();
        while limit.is_none_or(|l| out.len() < l)
            && let Some(row) = rows.next()?
        {
            let kind: String = row.get(2)?;
            if pattern.is_some_and(|p| !glob_match(p, &kind)) {
                continue;
            }
            let artifact_id: String = row.get(5)?;
            out.push(Event {
                seq: unsigned(row, 0)?,
                time: row.get(1)?,
                kind,
                agent: row.get(3)?,
                principal: row.get(4)?,
                artifact_id: artifact_id
                    .parse()
                    .map_err(|_| corrupt("artifact id", &artifact_id))?,
                stack: row.get::<_, Option<String>>(6)?.unwrap_or_default(),
                task: row.get::<_, Option<String>>(7)?.unwrap_or_default(),
                name: row.get(8)?,
                version: row.get(9)?,
                size: unsigned(row, 10)?,
            });
        }
        out.reverse();
        Ok(out)
    }

    /// Where the layout shows `record`'s artifact, as [`crate::Engine::layout_path`] says.
    pub fn layout_path(&self, record: &ArtifactRecord) -> Option<PathBuf> {
        self.layout.as_ref().map(|l| l.path_of(record))
    }
}

/// A record from one row of [`RECORD_COLUMNS`]; a value the catalog could not have written is
/// [`Error::CorruptRecord`].
fn record_of(row: &Row<'_>) -> rusqlite::Result<Result<ArtifactRecord>> {
    let (id, manifest): (String, String) = (row.get(0)?, row.get(7)?);
    let (id, manifest) = match (id.parse(), manifest.parse()) {
        (Ok(id), Ok(manifest)) => (id, manifest),
        (Err(_), _) => return Ok(Err(corrupt("artifact id", &id))),
        (_, Err(_)) => return Ok(Err(corrupt("manifest id", &manifest))),
    };
    let record = ArtifactRecord {
        id,
        name: row.get(1)?,
        stack: row.get(2)?,
        task: row.get(3)?,
        version: row.get(4)?,
        size: unsigned(row, 5)?,
        checksum: row.get(6)?,
        manifest,
        stored_bytes: unsigned(row, 8)?,
        created_at: row.get(9)?,
        modified_at: row.get(10)?,
        download_count: unsigned(row, 11)?,
        last_download_at: row.get(12)?,
        damaged: row.get(13)?,
    };
    // Names that break the rules were not written by the catalog.
    Ok(record
        .key()
        .map_err(|e| Error::CorruptRecord(e.to_string()))
        .map(|_| record))
}

/// A column SQLite stores as a signed integer that the catalog keeps unsigned.
fn unsigned(row: &Row<'_>, column: usize) -> rusqlite::Result<u64> {
    u64::try_from(row.get::<_, i64>(column)?).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(column, rusqlite::types::Type::Integer, e.into())
    })
}

/// A value in `metadata.db` the catalog could not have written.
fn corrupt(what: &str, value: &str) -> Error {
    Error::CorruptRecord(format!("metadata.db holds a bad {what}: '{value}'"))
}
