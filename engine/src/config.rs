//! `<data-dir>/config.toml`: the settings of one store, for the embedded `local` agent now and
//! a network agent (`agent start --config FILE`).

use std::path::{Path, PathBuf};

use serde::Deserialize;
use sloth_cas::ChunkerParams;

use crate::{EngineConfig, Error, Result};

/// The file's name inside the data directory.
pub const CONFIG_FILE: &str = "config.toml";

/// What `config.toml` may say. Every field is optional; unknown fields are an error, so a
/// misspelt setting is never silently ignored.
///
/// ```toml
/// layout = false          # keep artifacts/<stack>/<task>/<name> (default true)
/// avg_chunk_size = 524288 # bytes, power of two, 1 KiB–4 MiB (default 262144); fixed when
///                         # the store is created: a different value later is refused
/// zstd_level = 3          # zstd level for new chunks (default 3)
///
/// # Retention rules, run on schedule by `sloth-runner agent start` (not by `local` commands)
/// [[retention]]
/// policy = "keep-last"    # a built-in or a path to a policy module (.wasm)
/// params = { count = "5" }
/// stack = "production"    # only this stack (default: all)
/// every = "1h"            # how often (at least 1m)
/// max_share = 0.5         # never delete more than this share of the versions in one run
/// dry_run_first = true    # the first run of a rule new to this store only reports (default)
///
/// # Whole-store verification by `sloth-runner agent start` (default: never)
/// verify_every = "1d"
/// verify_repair = false   # also mark damaged versions and rebuild projections
/// ```
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfigFile {
    /// Keep the layout projection.
    pub layout: Option<bool>,
    /// Average chunk size in bytes.
    pub avg_chunk_size: Option<u32>,
    /// zstd level for new chunks.
    pub zstd_level: Option<i32>,
    /// Retention rules an agent runs on schedule.
    #[serde(default)]
    pub retention: Vec<RetentionRule>,
    /// How often an agent verifies its whole store (`1d`; at least `1m`; default never).
    pub verify_every: Option<String>,
    /// Whether a scheduled verify also repairs (marks damaged versions, rebuilds the
    /// projections); default false: it only reports.
    pub verify_repair: Option<bool>,
}

/// One scheduled retention rule (see [`StoreConfigFile`]).
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionRule {
    /// A built-in policy's name or a policy module's path.
    pub policy: String,
    /// The policy's parameters.
    #[serde(default)]
    pub params: std::collections::BTreeMap<String, String>,
    /// Only this stack.
    pub stack: Option<String>,
    /// How often, as a duration (`1h`, `30m`, `1d`).
    pub every: String,
    /// Largest share of the versions one run may delete (default 0.5).
    pub max_share: Option<f64>,
    /// Whether the first run of a rule new to this store only reports (default true).
    pub dry_run_first: Option<bool>,
}

impl RetentionRule {
    /// The rule a workflow's `artifact_retention = "30d"` means: the built-in `older-than` on
    /// the workflow's stack, hourly, within the usual share cap; the workflow asked for it, so
    /// its first run deletes rather than only reporting.
    pub fn workflow(stack: &str, older_than: &str) -> Result<Self> {
        if sloth_policies::parse_duration(older_than).is_none() {
            return Err(Error::InvalidDuration {
                what: "artifact_retention",
                value: older_than.to_owned(),
            });
        }
        Ok(Self {
            policy: "older-than".into(),
            params: [("older_than".to_owned(), older_than.to_owned())].into(),
            stack: Some(stack.to_owned()),
            every: "1h".into(),
            max_share: None,
            dry_run_first: Some(false),
        })
    }

    /// The interval in seconds.
    pub fn every_secs(&self) -> u64 {
        sloth_policies::parse_duration(&self.every).map_or(3600, |s| s.max(60) as u64)
    }

    /// A name for this rule in events and logs: policy, parameters and stack.
    pub fn fingerprint(&self) -> String {
        let params: Vec<String> = self
            .params
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        format!(
            "{}({}){}",
            self.policy,
            params.join(","),
            self.stack
                .as_deref()
                .map(|s| format!(" on stack {s}"))
                .unwrap_or_default()
        )
    }
}

impl StoreConfigFile {
    /// Reads `<data_dir>/config.toml`; a missing file means every default.
    pub fn load(data_dir: &Path) -> Result<Self> {
        if !data_dir.is_dir() {
            // A new store, or an unusable path that opening the engine reports by name.
            return Ok(Self::default());
        }
        let path = data_dir.join(CONFIG_FILE);
        let bad = |reason: String| Error::Config {
            path: path.clone(),
            reason,
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(e) => return Err(bad(e.to_string())),
        };
        Self::parse(&text).map_err(bad)
    }

    /// Reads a config file given by path (an agent's `--config`); it must exist.
    pub fn load_from(path: &Path) -> Result<Self> {
        let bad = |reason: String| Error::Config {
            path: path.to_path_buf(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        Self::parse(&text).map_err(bad)
    }

    /// Parses and checks the text of a config file; the error says what is wrong.
    pub fn parse(text: &str) -> std::result::Result<Self, String> {
        let parsed: Self = toml::from_str(text).map_err(|e| e.to_string())?;
        if let Some(avg) = parsed.avg_chunk_size {
            ChunkerParams::new(avg).map_err(|e| e.to_string())?;
        }
        if let Some(level) = parsed.zstd_level
            && !(1..=22).contains(&level)
        {
            return Err(format!("zstd_level must be 1 to 22, got {level}"));
        }
        if let Some(every) = &parsed.verify_every
            && sloth_policies::parse_duration(every).is_none_or(|s| s < 60)
        {
            return Err(format!(
                "verify_every = \"{every}\" must be a duration of at least 1m, like 6h or 1d"
            ));
        }
        for (i, rule) in parsed.retention.iter().enumerate() {
            let at = |what: String| format!("retention rule {}: {what}", i + 1);
            match sloth_policies::parse_duration(&rule.every) {
                Some(secs) if secs >= 60 => {}
                _ => {
                    return Err(at(format!(
                        "every = \"{}\" must be a duration of at least 1m, like 30m, 6h or 1d",
                        rule.every
                    )));
                }
            }
            if let Some(share) = rule.max_share
                && !(share > 0.0 && share <= 1.0)
            {
                return Err(at(format!(
                    "max_share must be above 0 and at most 1, got {share}"
                )));
            }
            if let Some(stack) = &rule.stack {
                crate::Name::parse("stack", stack).map_err(|e| at(e.to_string()))?;
            }
        }
        Ok(parsed)
    }

    /// Applies the file's settings over `config`.
    pub fn apply(&self, mut config: EngineConfig) -> Result<EngineConfig> {
        if let Some(layout) = self.layout {
            config.layout = layout;
        }
        if let Some(avg) = self.avg_chunk_size {
            config.cas.chunker = Some(ChunkerParams::new(avg)?);
        }
        if let Some(level) = self.zstd_level {
            config.cas.zstd_level = level;
        }
        Ok(config)
    }
}

/// Where a data directory's config file is.
pub fn config_path(data_dir: &Path) -> PathBuf {
    data_dir.join(CONFIG_FILE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_applies_and_rejects() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            StoreConfigFile::load(dir.path()).unwrap(),
            StoreConfigFile::default()
        );
        std::fs::write(
            config_path(dir.path()),
            "layout = false\navg_chunk_size = 524288\n",
        )
        .unwrap();
        let cfg = StoreConfigFile::load(dir.path())
            .unwrap()
            .apply(EngineConfig::default())
            .unwrap();
        assert!(!cfg.layout);
        assert_eq!(cfg.cas.chunker.unwrap().avg(), 524288);
        for bad in [
            "layuot = false",
            "avg_chunk_size = 1000",
            "zstd_level = 99",
            "layout = \"no\"",
            "[[retention]]\npolicy = \"keep-last\"\nevery = \"10s\"",
            "verify_every = \"30s\"",
            "verify_every = \"daily\"",
            "[[retention]]\npolicy = \"keep-last\"\nevery = \"1h\"\nmax_share = 2.0",
            "[[retention]]\npolicy = \"keep-last\"\nevery = \"1h\"\nstak = \"x\"",
        ] {
            std::fs::write(config_path(dir.path()), bad).unwrap();
            let err = StoreConfigFile::load(dir.path()).unwrap_err().to_string();
            assert!(err.contains("config.toml"), "{bad}: {err}");
        }
    }
}
