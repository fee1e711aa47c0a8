use std::fmt;

use crate::{Error, Result};

/// Longest name, stack or task, in bytes.
pub const MAX_NAME_LEN: usize = 255;

/// An artifact name, stack or task that passed the naming rules: non-empty, at most 255 bytes,
/// no `/`, `\`, `..`, NUL or control characters. These end up as path components of the
/// layout projection, so the rules keep every one of them a single, harmless component.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Name(String);

impl Name {
    /// Validates `value` as the given kind of name (`artifact name`, `stack`, `task`).
    pub fn parse(what: &'static str, value: &str) -> Result<Self> {
        let reason = if value.is_empty() {
            Some("must not be empty")
        } else if value.len() > MAX_NAME_LEN {
            Some("is longer than 255 bytes")
        } else if value.contains('/') || value.contains('\\') {
            Some("must not contain '/' or '\\'")
        } else if value.contains("..") {
            Some("must not contain '..'")
        } else if value == "." {
            Some("must not be '.'")
        } else if value.chars().any(char::is_control) {
            Some("must not contain NUL or control characters")
        } else {
            None
        };
        match reason {
            Some(reason) => Err(Error::InvalidName {
                what,
                value: value.chars().take(80).collect(),
                reason,
            }),
            None => Ok(Self(value.to_owned())),
        }
    }

    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where an artifact lives: stack, task and name. No stack or task means `default`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ArtifactKey {
    /// The stack.
    pub stack: Name,
    /// The task.
    pub task: Name,
    /// The artifact's name.
    pub name: Name,
}

impl ArtifactKey {
    /// The stack and task used when none is given.
    pub const DEFAULT_SCOPE: &'static str = "default";

    /// Validates a key; `None` stack or task means `default`.
    pub fn new(name: &str, stack: Option<&str>, task: Option<&str>) -> Result<Self> {
        Ok(Self {
            stack: Name::parse("stack", stack.unwrap_or(Self::DEFAULT_SCOPE))?,
            task: Name::parse("task", task.unwrap_or(Self::DEFAULT_SCOPE))?,
            name: Name::parse("artifact name", name)?,
        })
    }

    /// The catalog key prefix shared by every version: `stack\0task\0name\0`.
    pub(crate) fn prefix(&self) -> Vec<u8> {
        let mut k =
            Vec::with_capacity(self.stack.0.len() + self.task.0.len() + self.name.0.len() + 3);
        for part in [&self.stack, &self.task, &self.name] {
            k.extend_from_slice(part.0.as_bytes());
            k.push(0);
        }
        k
    }

    /// The catalog key of one version.
    pub(crate) fn version_key(&self, version: u32) -> Vec<u8> {
        let mut k = self.prefix();
        k.extend_from_slice(&version.to_be_bytes());
        k
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_names() {
        for ok in [
            "app-v1.2.3.bin",
            "test-results.xml",
            "a",
            "résumé.pdf",
            "x.y",
            ".hidden",
            &"n".repeat(255),
        ] {
            Name::parse("artifact name", ok).unwrap();
        }
    }

    #[test]
    fn rejects_each_rule() {
        for bad in [
            "",
            "a/b",
            "a\\b",
            "..",
            "a..b",
            ".",
            "a\0b",
            "tab\there",
            "new\nline",
            &"n".repeat(256),
        ] {
            let err = Name::parse("artifact name", bad).unwrap_err().to_string();
            assert!(err.starts_with("invalid artifact name"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn default_scope() {
        let k = ArtifactKey::new("app.bin", None, None).unwrap();
        assert_eq!((k.stack.as_str(), k.task.as_str()), ("default", "default"));
        assert!(ArtifactKey::new("app.bin", Some("../etc"), None).is_err());
    }
}
