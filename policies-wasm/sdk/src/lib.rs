//! `sloth-policy-sdk`: retention policies for sloth-runner agents, written in Rust and compiled
//! to `wasm32-unknown-unknown`.
//!
//! A policy is a function from an [`Input`] (the artifacts of one batch, the parameters, the
//! time) to one [`Decision`] per artifact. [`policy!`] turns such a function into a module with
//! the exports and the metadata section the host expects (the ABI in `docs/policies.md`):
//!
//! ```
//! use sloth_policy_sdk::{Decision, Input, policy};
//!
//! fn evaluate(input: &Input) -> Result<Vec<Decision>, String> {
//!     let max = input.param_u64("max_size")?;
//!     Ok(input
//!         .artifacts
//!         .iter()
//!         .map(|a| {
//!             if a.size > max {
//!                 Decision::delete(a, format!("{} bytes is more than {max}", a.size))
//!             } else {
//!                 Decision::keep(a, "small enough")
//!             }
//!         })
//!         .collect())
//! }
//!
//! policy! {
//!     name: "no-giants",
//!     version: "1.0.0",
//!     description: "Deletes artifacts larger than max_size bytes.",
//!     params: r#"{"max_size": {"type": "integer", "required": true}}"#,
//!     evaluate: evaluate,
//! }
//! # fn main() {}
//! ```

use serde::{Deserialize, Serialize};

/// The ABI version this SDK speaks.
pub const ABI: u32 = 1;

/// One artifact version, as the host describes it. Times are Unix seconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Artifact {
    /// Unique id of the version.
    pub id: String,
    /// Artifact name.
    pub name: String,
    /// Stack.
    pub stack: String,
    /// Task.
    pub task: String,
    /// Version number, from 1.
    #[serde(default)]
    pub version: u32,
    /// Size in bytes.
    pub size: u64,
    /// Upload time.
    pub created_at: i64,
    /// Last change of the record.
    pub modified_at: i64,
    /// Successful downloads.
    pub download_count: u64,
    /// Last successful download, if any.
    #[serde(default)]
    pub last_download_at: Option<i64>,
    /// `sha256:<hex>`.
    pub checksum: String,
}

/// What a policy is asked about.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Input {
    /// ABI version of the host.
    pub abi: u32,
    /// The time to judge by (Unix seconds).
    pub now: i64,
    /// The parameters given with the policy (`--param key=value`), as strings.
    #[serde(default)]
    pub params: std::collections::BTreeMap<String, String>,
    /// The batch: every artifact version under consideration.
    pub artifacts: Vec<Artifact>,
}

impl Input {
    /// A required parameter as text.
    pub fn param(&self, key: &str) -> Result<&str, String> {
        self.params
            .get(key)
            .map(String::as_str)
            .ok_or_else(|| format!("missing parameter '{key}'"))
    }

    /// A required parameter as a whole number.
    pub fn param_u64(&self, key: &str) -> Result<u64, String> {
        let text = self.param(key)?;
        text.parse()
            .map_err(|_| format!("parameter '{key}' must be a whole number, got '{text}'"))
    }

    /// A required parameter as a duration in seconds (`30d`, `6h`, `45m`, `90s`).
    pub fn param_duration(&self, key: &str) -> Result<i64, String> {
        let text = self.param(key)?;
        parse_duration(text).ok_or_else(|| {
            format!(
                "parameter '{key}' must be a duration like 7d, 30d, 6h, 45m or 0d, got '{text}'"
            )
        })
    }
}

/// `7d`, `30d`, `6h`, `45m`, `90s`, `0d` → seconds.
pub fn parse_duration(text: &str) -> Option<i64> {
    let split = text.len().checked_sub(1)?;
    // The unit is one ASCII letter; a multi-byte last character (found by fuzzing: `7д`) is
    // no unit, and splitting inside it would panic.
    if !text.is_char_boundary(split) {
        return None;
    }
    let (number, unit) = text.split_at(split);
    if number.is_empty() || !number.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: i64 = number.parse().ok()?;
    let unit = match unit {
        "d" => 86_400,
        "h" => 3_600,
        "m" => 60,
        "s" => 1,
        _ => return None,
    };
    n.checked_mul(unit)
}

/// Keep or delete.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Leave the artifact alone.
    Keep,
    /// Delete this version.
    Delete,
}

/// The answer about one artifact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    /// The artifact's id, as given.
    pub id: String,
    /// What to do.
    pub action: Action,
    /// Why, for people (`--dry-run` prints it).
    pub reason: String,
}

impl Decision {
    /// Keep `artifact`.
    pub fn keep(artifact: &Artifact, reason: impl Into<String>) -> Self {
        Self {
            id: artifact.id.clone(),
            action: Action::Keep,
            reason: reason.into(),
        }
    }

    /// Delete `artifact`.
    pub fn delete(artifact: &Artifact, reason: impl Into<String>) -> Self {
        Self {
            id: artifact.id.clone(),
            action: Action::Delete,
            reason: reason.into(),
        }
    }
}

/// The answer as the host reads it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Output {
    /// One per artifact of the batch.
    pub decisions: Vec<Decision>,
}

#[cfg(target_arch = "wasm32")]
#[link(wasm_import_module = "sloth")]
unsafe extern "C" {
    #[link_name = "log"]
    fn host_log(ptr: i32, len: i32);
}

/// Writes a line to the agent's log (and, when the policy then fails, into the error the host
/// reports).
pub fn log(line: &str) {
    #[cfg(target_arch = "wasm32")]
    // SAFETY: the host reads `len` bytes at `ptr` from this module's memory, which `line` is.
    unsafe {
        host_log(line.as_ptr() as usize as i32, line.len() as i32)
    };
    #[cfg(not(target_arch = "wasm32"))]
    let _ = line;
}

/// Runs `evaluate` on the JSON input and encodes its answer: what the generated
/// `policy_evaluate` export calls. An error becomes no answer (the host fails closed), with
/// the reason logged for the host to report.
#[doc(hidden)]
pub fn run(input: &[u8], evaluate: fn(&Input) -> Result<Vec<Decision>, String>) -> Option<Vec<u8>> {
    let failed = |reason: String| {
        log(&reason);
        None
    };
    let input: Input = match serde_json::from_slice(input) {
        Ok(input) => input,
        Err(e) => return failed(format!("cannot read the input: {e}")),
    };
    if input.abi != ABI {
        return failed(format!(
            "written for ABI {ABI}, the host speaks {}",
            input.abi
        ));
    }
    match evaluate(&input) {
        Ok(decisions) => serde_json::to_vec(&Output { decisions }).ok(),
        Err(reason) => failed(reason),
    }
}

/// Memory for the host to write the input into: what `policy_alloc` calls. The allocation
/// is never freed; each evaluation runs in a fresh instance.
#[doc(hidden)]
pub fn alloc(len: i32) -> i32 {
    let mut buf: Vec<u8> = Vec::with_capacity(len.max(0) as usize);
    let ptr = buf.as_mut_ptr() as usize as i32;
    std::mem::forget(buf);
    ptr
}

/// Packs an answer for the host: `(ptr << 32) | len`, 0 for none.
#[doc(hidden)]
pub fn pack(answer: Option<Vec<u8>>) -> i64 {
    match answer {
        Some(bytes) => {
            let bytes = bytes.into_boxed_slice();
            let len = bytes.len() as i64;
            let ptr = Box::leak(bytes).as_ptr() as usize as i64;
            (ptr << 32) | len
        }
        None => 0,
    }
}

/// The bytes of a string, as an array for a custom section (`policy!` uses it).
#[doc(hidden)]
pub const fn section<const N: usize>(text: &str) -> [u8; N] {
    let bytes = text.as_bytes();
    let mut out = [0u8; N];
    let mut i = 0;
    while i < N {
        out[i] = bytes[i];
        i += 1;
    }
    out
}

/// Defines a policy module: its metadata section and the `policy_alloc` / `policy_evaluate`
/// exports around an `evaluate` function (`fn(&Input) -> Result<Vec<Decision>, String>`).
#[macro_export]
macro_rules! policy {
    (
        name: $name:literal,
        version: $version:literal,
        description: $description:literal,
        params: $params:literal,
        evaluate: $evaluate:path $(,)?
    ) => {
        const __SLOTH_POLICY_META: &str = concat!(
            "{\"name\":\"",
            $name,
            "\",\"version\":\"",
            $version,
            "\",\"description\":\"",
            $description,
            "\",\"params\":",
            $params,
            "}"
        );

        #[cfg(target_arch = "wasm32")]
        #[unsafe(link_section = "sloth.policy")]
        #[used]
        static __SLOTH_POLICY_SECTION: [u8; __SLOTH_POLICY_META.len()] =
            $crate::section(__SLOTH_POLICY_META);

        #[cfg(target_arch = "wasm32")]
        #[unsafe(no_mangle)]
        pub extern "C" fn policy_alloc(len: i32) -> i32 {
            $crate::alloc(len)
        }

        /// # Safety
        /// The host passes memory it got from `policy_alloc`, holding `len` bytes.
        #[cfg(target_arch = "wasm32")]
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn policy_evaluate(ptr: i32, len: i32) -> i64 {
            let input = unsafe {
                ::std::slice::from_raw_parts(ptr as usize as *const u8, len.max(0) as usize)
            };
            $crate::pack($crate::run(input, $evaluate))
        }
    };
}

#[cfg(test)]
mod tests {
    use super::parse_duration;

    #[test]
    fn durations_are_a_number_and_one_unit() {
        assert_eq!(parse_duration("7d"), Some(604_800));
        assert_eq!(parse_duration("6h"), Some(21_600));
        assert_eq!(parse_duration("45m"), Some(2_700));
        assert_eq!(parse_duration("90s"), Some(90));
        assert_eq!(parse_duration("0d"), Some(0));
        // The last two came from the fuzzer: a multi-byte last character used to panic.
        for bad in [
            "",
            "d",
            "7",
            "7w",
            "-1d",
            "1.5h",
            "7д",
            "д",
            "99999999999999999999d",
        ] {
            assert_eq!(parse_duration(bad), None, "{bad:?}");
        }
    }
}
