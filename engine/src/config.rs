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
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfigFile {
    /// Keep the layout projection.
    pub layout: Option<bool>,
    /// Average chunk size in bytes.
    pub avg_chunk_size: Option<u32>,
    /// zstd level for new chunks.
    pub zstd_level: Option<i32>,
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
        ] {
            std::fs::write(config_path(dir.path()), bad).unwrap();
            let err = StoreConfigFile::load(dir.path()).unwrap_err().to_string();
            assert!(err.contains("config.toml"), "{bad}: {err}");
        }
    }
}
