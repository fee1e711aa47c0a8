use std::fmt;

use serde::{Deserialize, Serialize};
use sloth_cas::ManifestId;

use crate::{ArtifactKey, Error, Result};

/// The id of one artifact version: 128 bits, shown as 32 hex digits (the spec's `id` column).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ArtifactId(#[serde(with = "hex_u128")] u128);

impl ArtifactId {
    /// A fresh id: time-ordered high bits (ms), unique low bits from a BLAKE3 of the key,
    /// version and the clock's nanoseconds.
    pub(crate) fn generate(key: &ArtifactKey, version: u32) -> Self {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let mut seed = key.version_key(version);
        seed.extend_from_slice(&now.as_nanos().to_le_bytes());
        seed.extend_from_slice(&std::process::id().to_le_bytes());
        let noise = sloth_cas::ChunkId::digest(&seed);
        let low = u64::from_le_bytes(noise.as_bytes()[..8].try_into().expect("8 bytes"));
        Self((u128::from(now.as_millis() as u64) << 64) | u128::from(low))
    }

    /// The raw value.
    pub fn as_u128(&self) -> u128 {
        self.0
    }

    /// An id from its raw value (as sent over the wire).
    pub fn from_u128(value: u128) -> Self {
        Self(value)
    }
}

impl fmt::Display for ArtifactId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl std::str::FromStr for ArtifactId {
    type Err = String;

    /// Exactly 32 hex digits, as [`fmt::Display`] writes them.
    fn from_str(text: &str) -> std::result::Result<Self, String> {
        if text.len() == 32 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
            u128::from_str_radix(text, 16)
                .map(Self)
                .map_err(|e| e.to_string())
        } else {
            Err(format!("an artifact id is 32 hex digits, not '{text}'"))
        }
    }
}

mod hex_u128 {
    use serde::{Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(v: &u128, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{v:032x}"))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u128, D::Error> {
        super::parse_str(d, "32 hex digits", |text| {
            text.parse::<super::ArtifactId>().map(|id| id.0)
        })
    }
}

/// Deserializes a string field through `parse` without allocating a `String` for it (records
/// are decoded by the hundred thousand when a policy reads the catalog).
fn parse_str<'de, D, T, E>(
    d: D,
    expecting: &'static str,
    parse: impl FnOnce(&str) -> Result<T, E>,
) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    E: std::fmt::Display,
{
    struct Visitor<F>(&'static str, F);
    impl<T, E: std::fmt::Display, F: FnOnce(&str) -> Result<T, E>> serde::de::Visitor<'_>
        for Visitor<F>
    {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.0)
        }
        fn visit_str<Er: serde::de::Error>(self, text: &str) -> Result<T, Er> {
            (self.1)(text).map_err(Er::custom)
        }
    }
    d.deserialize_str(Visitor(expecting, parse))
}

/// One version of an artifact: the spec's fields plus version, manifest and stored bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactRecord {
    /// Unique id of this version.
    pub id: ArtifactId,
    /// Artifact name.
    pub name: String,
    /// Stack it belongs to.
    pub stack: String,
    /// Task that produced it.
    pub task: String,
    /// Version, from 1; never reused for the same stack/task/name.
    pub version: u32,
    /// Content length in bytes.
    pub size: u64,
    /// `sha256:<hex>` of the content.
    pub checksum: String,
    /// The content's manifest in the chunk store.
    #[serde(with = "manifest_hex")]
    pub manifest: ManifestId,
    /// Bytes this version added to the store when it was uploaded (new chunks, compressed).
    pub stored_bytes: u64,
    /// Upload time, Unix seconds.
    pub created_at: i64,
    /// Last change of the record, Unix seconds.
    pub modified_at: i64,
    /// Successful downloads.
    pub download_count: u64,
    /// Last successful download, Unix seconds.
    #[serde(default)]
    pub last_download_at: Option<i64>,
    /// Set by `verify --repair` when the content can no longer be read back (a chunk or the
    /// manifest was lost or corrupted): why. Such a version stays listed; downloads of it are
    /// refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub damaged: Option<String>,
}

impl ArtifactRecord {
    /// The record's stack/task/name key.
    pub fn key(&self) -> Result<ArtifactKey> {
        ArtifactKey::new(&self.name, Some(&self.stack), Some(&self.task))
    }

    /// The stored encoding (JSON).
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("records always serialize")
    }

    /// Parses a stored record, untrusted: malformed JSON and names that break the rules are
    /// errors.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let record: Self =
            serde_json::from_slice(bytes).map_err(|e| Error::CorruptRecord(e.to_string()))?;
        // Names are validated on the way in; a record that breaks the rules was tampered with.
        record
            .key()
            .map_err(|e| Error::CorruptRecord(e.to_string()))?;
        Ok(record)
    }
}

mod manifest_hex {
    use serde::{Deserializer, Serializer};
    use sloth_cas::ManifestId;

    pub(super) fn serialize<S: Serializer>(v: &ManifestId, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&v.to_hex())
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<ManifestId, D::Error> {
        super::parse_str(d, "a manifest id", str::parse::<ManifestId>)
    }
}

/// What happened to an artifact (the audit trail).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Position in the trail; increasing.
    pub seq: u64,
    /// When, Unix seconds.
    pub time: i64,
    /// `artifact.upload`, `artifact.download` or `artifact.delete`.
    pub kind: String,
    /// The agent whose store it happened in.
    pub agent: String,
    /// Who did it.
    pub principal: String,
    /// The artifact version.
    pub artifact_id: ArtifactId,
    /// Its stack.
    pub stack: String,
    /// Its task.
    pub task: String,
    /// Its name.
    pub name: String,
    /// Its version.
    pub version: u32,
    /// Its size in bytes.
    pub size: u64,
}

impl Event {
    /// The stored encoding (JSON).
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("events always serialize")
    }

    /// Parses a stored event, untrusted.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        serde_json::from_slice(bytes).map_err(|e| Error::CorruptRecord(e.to_string()))
    }
}

/// Unix seconds now.
pub(crate) fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Matches `text` against a glob with `*` (any run) and `?` (one character).
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

#[cfg(test)]
impl ArtifactRecord {
    /// A record with every field set (none left at a default), for tests.
    pub(crate) fn sample() -> Self {
        let key =
            ArtifactKey::new("app.bin", Some("production"), Some("build")).expect("valid names");
        Self {
            id: ArtifactId::generate(&key, 3),
            name: "app.bin".into(),
            stack: "production".into(),
            task: "build".into(),
            version: 3,
            size: 12_345,
            checksum: format!("sha256:{}", "ab".repeat(32)),
            manifest: ManifestId::digest(b"m"),
            stored_bytes: 99,
            created_at: 1_700_000_000,
            modified_at: 1_700_000_100,
            download_count: 7,
            last_download_at: Some(1_700_000_200),
            damaged: Some("chunk lost".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match("artifact.*", "artifact.upload"));
        assert!(glob_match("*", "x"));
        assert!(glob_match("artifact.?pload", "artifact.upload"));
        assert!(!glob_match("artifact.*", "policy.failed"));
        assert!(glob_match("*.delete", "artifact.delete"));
        assert!(!glob_match("artifact.upload", "artifact.uploads"));
    }

    #[test]
    fn record_round_trip_and_tamper_check() {
        let rec = ArtifactRecord::sample();
        assert_eq!(ArtifactRecord::decode(&rec.encode()).unwrap(), rec);
        let evil = String::from_utf8(rec.encode())
            .unwrap()
            .replace("app.bin", "../../etc/passwd");
        assert!(ArtifactRecord::decode(evil.as_bytes()).is_err());
        let text = String::from_utf8(rec.encode()).unwrap();
        let (id, manifest) = (rec.id.to_string(), rec.manifest.to_hex());
        for (from, to) in [
            (id.as_str(), "not hex"),
            (id.as_str(), "00"),
            (manifest.as_str(), "zz"),
            (manifest.as_str(), &manifest[..62]),
        ] {
            let bad = text.replacen(from, to, 1);
            let err = ArtifactRecord::decode(bad.as_bytes()).unwrap_err();
            assert!(matches!(err, Error::CorruptRecord(_)), "{to}: {err}");
        }
    }
}
