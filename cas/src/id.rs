use std::fmt;
use std::str::FromStr;

/// Defines a 32-byte digest newtype with hex `Display`/`FromStr`.
macro_rules! digest_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name([u8; 32]);

        impl $name {
            /// Length of the id in bytes.
            pub const LEN: usize = 32;

            /// Wraps raw digest bytes.
            pub const fn from_bytes(bytes: [u8; 32]) -> Self {
                Self(bytes)
            }

            /// The raw digest bytes.
            pub const fn as_bytes(&self) -> &[u8; 32] {
                &self.0
            }

            /// Parses raw bytes of exactly [`Self::LEN`] bytes.
            pub fn from_slice(bytes: &[u8]) -> Option<Self> {
                <[u8; 32]>::try_from(bytes).ok().map(Self)
            }

            /// The BLAKE3 digest of `data`.
            pub fn digest(data: &[u8]) -> Self {
                Self(*blake3::hash(data).as_bytes())
            }

            /// The lowercase hex form (64 characters).
            pub fn to_hex(&self) -> String {
                hex::encode(self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.to_hex())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                // The first 12 hex digits identify a digest in logs and test failures.
                write!(f, concat!(stringify!($name), "({})"), &self.to_hex()[..12])
            }
        }

        impl FromStr for $name {
            type Err = ParseIdError;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                let mut out = [0u8; 32];
                hex::decode_to_slice(s, &mut out).map_err(|_| ParseIdError {
                    kind: stringify!($name),
                    input: s.chars().take(80).collect(),
                })?;
                Ok(Self(out))
            }
        }
    };
}

digest_id!(
    /// The id of a chunk: BLAKE3 of its uncompressed bytes.
    ChunkId
);

digest_id!(
    /// The id of a manifest: BLAKE3 of its canonical encoding.
    ManifestId
);

/// A string that is not 64 hex digits was given as an id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{input:?} is not a valid {kind} (expected 64 hex digits)")]
pub struct ParseIdError {
    kind: &'static str,
    input: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let id = ChunkId::digest(b"hello");
        let text = id.to_string();
        assert_eq!(text.len(), 64);
        assert_eq!(text.parse::<ChunkId>().unwrap(), id);
        assert_eq!(text, blake3::hash(b"hello").to_hex().as_str());
    }

    #[test]
    fn rejects_bad_hex() {
        assert!("abc".parse::<ChunkId>().is_err());
        assert!("zz".repeat(32).parse::<ManifestId>().is_err());
        let err = "nope".parse::<ManifestId>().unwrap_err().to_string();
        assert!(err.contains("ManifestId"), "{err}");
    }
}
