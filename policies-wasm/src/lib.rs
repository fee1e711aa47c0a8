//! `sloth-policies`: retention rules as sandboxed WebAssembly modules.
//!
//! A policy is a core wasm32 module that imports nothing but `sloth.log` and exports `memory`,
//! `policy_alloc(len) -> ptr` and `policy_evaluate(ptr, len) -> i64`. The host writes the JSON
//! input (`{abi, now, params, artifacts}`) into memory the module allocated, calls
//! `policy_evaluate`, and reads the JSON answer from `(result >> 32, result & 0xffff_ffff)`
//! (0 means failure). The module's name, version, description and parameter schema are JSON in
//! a custom section `sloth.policy`, read without running anything. The ABI is written down in
//! `docs/policies.md`; [`sloth_policy_sdk`] hides it from Rust authors.
//!
//! The host fails closed. Every evaluation runs in a fresh store with fuel, a wall-clock
//! deadline (epoch interruption) and limits on memory, tables and instances; imports are
//! checked against the allow-list before instantiation. A trap, running out of fuel or time,
//! too much memory, an answer that is not valid JSON, that misses an artifact of the batch,
//! names one twice or names one not in it, or has an unknown action, is an [`Error`] naming
//! the policy and the reason — and no decision at all.
//!
//! ```
//! use sloth_policies::{Artifact, PolicyHost, builtin};
//!
//! let host = PolicyHost::new(Default::default()).unwrap();
//! let policy = host.load(builtin("older-than").unwrap(), "older-than").unwrap();
//! let old = Artifact {
//!     id: "a1".into(), name: "app.bin".into(), stack: "prod".into(), task: "build".into(),
//!     version: 1, size: 10, created_at: 0, modified_at: 0, download_count: 0,
//!     last_download_at: None, checksum: "sha256:00".into(),
//! };
//! let params = [("older_than".to_string(), "30d".to_string())].into();
//! let decisions = host.evaluate(&policy, 100 * 86_400, &params, &[old]).unwrap();
//! assert!(decisions[0].action == sloth_policies::Action::Delete);
//! ```

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Deserialize;
pub use sloth_policy_sdk::{ABI, Action, Artifact, Decision, parse_duration};
use wasmtime::{Caller, Config, Engine, Linker, Module, Store, StoreLimits, StoreLimitsBuilder};

/// The built-in policies, by name, compiled from `builtins/` by the build script.
const BUILTINS: [(&str, &[u8]); 4] = [
    (
        "older-than",
        include_bytes!(concat!(env!("OUT_DIR"), "/older_than.wasm")),
    ),
    (
        "keep-last",
        include_bytes!(concat!(env!("OUT_DIR"), "/keep_last.wasm")),
    ),
    (
        "max-total-size",
        include_bytes!(concat!(env!("OUT_DIR"), "/max_total_size.wasm")),
    ),
    (
        "unused-for",
        include_bytes!(concat!(env!("OUT_DIR"), "/unused_for.wasm")),
    ),
];

/// The module of a built-in policy (`older-than`, `keep-last`, `max-total-size`,
/// `unused-for`).
pub fn builtin(name: &str) -> Option<&'static [u8]> {
    BUILTINS.iter().find(|(n, _)| *n == name).map(|(_, m)| *m)
}

/// The built-in policies' names.
pub fn builtin_names() -> impl Iterator<Item = &'static str> {
    BUILTINS.iter().map(|(n, _)| *n)
}

/// The one import a policy may have.
const LOG_IMPORT: (&str, &str) = ("sloth", "log");
/// The custom section holding a policy's metadata.
pub const METADATA_SECTION: &str = "sloth.policy";

/// Why a policy could not be loaded or gave no usable answer.
#[derive(Debug, thiserror::Error)]
#[error("policy '{policy}' failed: {reason}")]
pub struct Error {
    /// The policy's name (from its metadata, else where it came from).
    pub policy: String,
    /// What happened.
    pub reason: Reason,
}

/// What went wrong with a policy.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Reason {
    /// Not a usable module (not wasm, missing exports or metadata).
    #[error("not a policy module: {0}")]
    BadModule(String),
    /// It imports something other than `sloth.log`.
    #[error("imports '{0}.{1}', but a policy may import only sloth.log")]
    ForbiddenImport(String, String),
    /// It ran out of fuel.
    #[error("ran out of fuel ({0} units)")]
    OutOfFuel(u64),
    /// It ran past the deadline.
    #[error("ran longer than {0:?}")]
    Timeout(Duration),
    /// It trapped (a panic, an unreachable, a bad memory access, a memory limit).
    #[error("trapped: {0}")]
    Trap(String),
    /// It returned failure (0) or an answer outside its memory or over the size limit.
    #[error("{0}")]
    NoAnswer(String),
    /// The answer is not the JSON the ABI defines.
    #[error("its answer is not valid: {0}")]
    InvalidAnswer(String),
    /// A parameter the policy does not declare.
    #[error("unknown parameter '{0}' (it takes: {1})")]
    UnknownParam(String, String),
}

/// Bounds on one evaluation.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Fuel (roughly, wasm instructions) per evaluation.
    pub fuel: u64,
    /// Wall-clock time per evaluation.
    pub deadline: Duration,
    /// Largest linear memory, in bytes (a Rust module starts at 1 MiB).
    pub memory: usize,
    /// Largest table, in elements.
    pub table_elements: usize,
    /// Largest answer, in bytes.
    pub answer: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            fuel: 20_000_000_000,
            deadline: Duration::from_secs(10),
            memory: 512 << 20,
            table_elements: 100_000,
            answer: 128 << 20,
        }
    }
}

/// A policy's description, from its `sloth.policy` section.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
pub struct Metadata {
    /// Name (what `--policy` and reports call it).
    pub name: String,
    /// Version.
    pub version: String,
    /// What it does.
    pub description: String,
    /// Its parameters: a JSON object of name → schema.
    #[serde(default)]
    pub params: serde_json::Value,
}

/// A loaded, compiled policy.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Its metadata.
    pub metadata: Metadata,
    /// BLAKE3 of the module's bytes (the compile cache's key).
    pub hash: [u8; 32],
    /// Its imports, `module.name`.
    pub imports: Vec<String>,
    /// Its exports.
    pub exports: Vec<String>,
    module: Module,
}

impl Policy {
    /// Refuses parameters the policy does not declare (a typo would otherwise be ignored and
    /// the policy run with its defaults). A module whose metadata declares no parameter
    /// object takes any.
    pub fn check_params(&self, params: &BTreeMap<String, String>) -> Result<(), Error> {
        let Some(declared) = self.metadata.params.as_object() else {
            return Ok(());
        };
        match params.keys().find(|k| !declared.contains_key(*k)) {
            None => Ok(()),
            Some(unknown) => Err(Error {
                policy: self.metadata.name.clone(),
                reason: Reason::UnknownParam(
                    unknown.clone(),
                    if declared.is_empty() {
                        "none".into()
                    } else {
                        declared.keys().cloned().collect::<Vec<_>>().join(", ")
                    },
                ),
            }),
        }
    }
}

/// Per-evaluation state of a store.
struct State {
    limits: StoreLimits,
    logs: Vec<String>,
}

/// Runs policies. Compiled modules are cached by content hash; each evaluation gets a fresh
/// store. A background thread ticks the engine's epoch for the deadlines.
pub struct PolicyHost {
    engine: Engine,
    limits: Limits,
    cache: Mutex<HashMap<[u8; 32], Module>>,
    ticker_stop: Arc<AtomicBool>,
}

impl std::fmt::Debug for PolicyHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyHost")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

/// How often the epoch advances: the deadline's resolution.
const TICK: Duration = Duration::from_millis(10);

impl PolicyHost {
    /// A host with these limits.
    pub fn new(limits: Limits) -> Result<Self, Error> {
        let mut config = Config::new();
        config.consume_fuel(true);
        config.epoch_interruption(true);
        let engine = Engine::new(&config).map_err(|e| Error {
            policy: "(host)".into(),
            reason: Reason::BadModule(format!("cannot start the wasm engine: {e}")),
        })?;
        let ticker_stop = Arc::new(AtomicBool::new(false));
        {
            let engine = engine.clone();
            let stop = Arc::clone(&ticker_stop);
            std::thread::Builder::new()
                .name("sloth-policy-epoch".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(TICK);
                        engine.increment_epoch();
                    }
                })
                .map_err(|e| Error {
                    policy: "(host)".into(),
                    reason: Reason::BadModule(format!("cannot start the epoch thread: {e}")),
                })?;
        }
        Ok(Self {
            engine,
            limits,
            cache: Mutex::new(HashMap::new()),
            ticker_stop,
        })
    }

    /// The limits evaluations run under.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Reads a policy's metadata, checks its imports and exports and compiles it (or takes it
    /// from the cache). Nothing of the module runs. `origin` names it in errors until its
    /// metadata is known (a file name, a built-in's name).
    pub fn load(&self, bytes: &[u8], origin: &str) -> Result<Policy, Error> {
        let fail = |policy: &str, reason| Error {
            policy: policy.to_owned(),
            reason,
        };
        let metadata = read_metadata(bytes).map_err(|e| fail(origin, Reason::BadModule(e)))?;
        let name = metadata.name.clone();
        let hash = *blake3::hash(bytes).as_bytes();
        let cached = self.cache_lock().get(&hash).cloned();
        let module = match cached {
            Some(module) => module,
            None => {
                let module = Module::new(&self.engine, bytes)
                    .map_err(|e| fail(&name, Reason::BadModule(format!("{e:#}"))))?;
                self.cache_lock().insert(hash, module.clone());
                module
            }
        };
        let mut imports = Vec::new();
        for import in module.imports() {
            let (m, n) = (import.module(), import.name());
            let allowed = (m, n) == LOG_IMPORT
                && matches!(import.ty(), wasmtime::ExternType::Func(ref f)
                    if f.params().len() == 2 && f.results().len() == 0);
            if !allowed {
                return Err(fail(&name, Reason::ForbiddenImport(m.into(), n.into())));
            }
            imports.push(format!("{m}.{n}"));
        }
        let exports: Vec<String> = module.exports().map(|e| e.name().to_owned()).collect();
        for needed in ["memory", "policy_alloc", "policy_evaluate"] {
            if !exports.iter().any(|e| e == needed) {
                return Err(fail(
                    &name,
                    Reason::BadModule(format!("it does not export '{needed}'")),
                ));
            }
        }
        Ok(Policy {
            metadata,
            hash,
            imports,
            exports,
            module,
        })
    }

    /// Whether a module with this content hash is compiled already.
    pub fn is_cached(&self, hash: &[u8; 32]) -> bool {
        self.cache_lock().contains_key(hash)
    }

    fn cache_lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Module>> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Asks `policy` about `artifacts` at time `now` (Unix seconds). Returns exactly one
    /// decision per artifact, in the batch's order, or an error and no decision.
    pub fn evaluate(
        &self,
        policy: &Policy,
        now: i64,
        params: &BTreeMap<String, String>,
        artifacts: &[Artifact],
    ) -> Result<Vec<Decision>, Error> {
        policy.check_params(params)?;
        let fail = |reason| Error {
            policy: policy.metadata.name.clone(),
            reason,
        };
        let input = encode_input(now, params, artifacts).map_err(|e| {
            fail(Reason::InvalidAnswer(format!(
                "cannot encode the input: {e}"
            )))
        })?;
        let answer = self.run(policy, &input).map_err(fail)?;
        check_answer(&answer, artifacts).map_err(|reason| fail(Reason::InvalidAnswer(reason)))
    }

    /// Runs one evaluation in a fresh store and returns the answer's bytes.
    fn run(&self, policy: &Policy, input: &[u8]) -> Result<Vec<u8>, Reason> {
        let limits = StoreLimitsBuilder::new()
            .memory_size(self.limits.memory)
            .table_elements(self.limits.table_elements)
            .instances(1)
            .tables(4)
            .memories(1)
            .trap_on_grow_failure(true)
            .build();
        let mut store = Store::new(
            &self.engine,
            State {
                limits,
                logs: Vec::new(),
            },
        );
        store.limiter(|s| &mut s.limits);
        let fuel = self.limits.fuel;
        store
            .set_fuel(fuel)
            .map_err(|e| Reason::Trap(format!("cannot set fuel: {e}")))?;
        let ticks = (self.limits.deadline.as_millis() / TICK.as_millis()).max(1) as u64;
        store.set_epoch_deadline(ticks);
        let classify = |e: wasmtime::Error| -> Reason {
            match e.downcast_ref::<wasmtime::Trap>() {
                Some(wasmtime::Trap::OutOfFuel) => Reason::OutOfFuel(fuel),
                Some(wasmtime::Trap::Interrupt) => Reason::Timeout(self.limits.deadline),
                _ => Reason::Trap(format!("{e:#}")),
            }
        };

        let mut linker: Linker<State> = Linker::new(&self.engine);
        linker
            .func_wrap(
                LOG_IMPORT.0,
                LOG_IMPORT.1,
                |mut caller: Caller<'_, State>, ptr: i32, len: i32| {
                    let text = caller
                        .get_export("memory")
                        .and_then(|m| m.into_memory())
                        .and_then(|m| {
                            let data = m.data(&caller);
                            let start = ptr as u32 as usize;
                            let end = start.checked_add((len as u32 as usize).min(4096))?;
                            data.get(start..end)
                                .map(|b| String::from_utf8_lossy(b).into_owned())
                        });
                    let logs = &mut caller.data_mut().logs;
                    if let Some(text) = text
                        && logs.len() < 100
                    {
                        logs.push(text);
                    }
                },
            )
            .map_err(|e| Reason::Trap(format!("{e:#}")))?;
        let instance = linker
            .instantiate(&mut store, &policy.module)
            .map_err(classify)?;
        let memory = instance
            .get_memory(&mut store, "memory")
            .ok_or_else(|| Reason::BadModule("'memory' is not a memory".into()))?;
        let alloc = instance
            .get_typed_func::<i32, i32>(&mut store, "policy_alloc")
            .map_err(|e| Reason::BadModule(format!("policy_alloc: {e}")))?;
        let evaluate = instance
            .get_typed_func::<(i32, i32), i64>(&mut store, "policy_evaluate")
            .map_err(|e| Reason::BadModule(format!("policy_evaluate: {e}")))?;
        let len = i32::try_from(input.len())
            .map_err(|_| Reason::NoAnswer("the input is larger than 2 GiB".into()))?;
        let ptr = alloc.call(&mut store, len).map_err(classify)?;
        memory
            .write(&mut store, ptr as u32 as usize, input)
            .map_err(|_| {
                Reason::NoAnswer("policy_alloc returned memory outside its memory".into())
            })?;
        let packed = evaluate.call(&mut store, (ptr, len)).map_err(classify)?;
        let logs = &store.data().logs;
        for line in logs {
            tracing::info!(policy = %policy.metadata.name, "{line}");
        }
        if packed == 0 {
            return Err(Reason::NoAnswer(match logs.last() {
                Some(last) => format!("it returned no answer: {last}"),
                None => "it returned no answer (0)".into(),
            }));
        }
        let (out_ptr, out_len) = (
            (packed as u64 >> 32) as usize,
            (packed as u64 & 0xffff_ffff) as usize,
        );
        if out_len > self.limits.answer {
            return Err(Reason::NoAnswer(format!(
                "its answer declares {out_len} bytes, more than the {} allowed",
                self.limits.answer
            )));
        }
        let data = memory.data(&store);
        out_ptr
            .checked_add(out_len)
            .and_then(|end| data.get(out_ptr..end))
            .map(<[u8]>::to_vec)
            .ok_or_else(|| Reason::NoAnswer("its answer points outside its memory".into()))
    }
}

impl Drop for PolicyHost {
    fn drop(&mut self) {
        self.ticker_stop.store(true, Ordering::Relaxed);
    }
}

/// The input document, `{abi, now, params, artifacts}`, as the SDK's `Input` serializes it.
///
/// A large batch is serialized in parts on several threads and the parts joined: the JSON of
/// 100,000 artifacts is 30 MB, and serializing it is a tenth of a whole cleanup's time.
fn encode_input(
    now: i64,
    params: &BTreeMap<String, String>,
    artifacts: &[Artifact],
) -> serde_json::Result<Vec<u8>> {
    /// Smaller batches are serialized on the calling thread.
    const SPLIT_FROM: usize = 32_768;
    let encode_part = |part: &[Artifact]| -> serde_json::Result<Vec<u8>> {
        // ~300 bytes per artifact with a SHA-256 checksum; sized once instead of doubling.
        let mut out = Vec::with_capacity(part.len() * 320);
        for (i, artifact) in part.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            serde_json::to_writer(&mut out, artifact)?;
        }
        Ok(out)
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
    let parts: Vec<Vec<u8>> = if artifacts.len() < SPLIT_FROM || threads == 1 {
        vec![encode_part(artifacts)?]
    } else {
        let size = artifacts.len().div_ceil(threads);
        std::thread::scope(|scope| {
            let workers: Vec<_> = artifacts
                .chunks(size)
                .map(|part| scope.spawn(move || encode_part(part)))
                .collect();
            workers
                .into_iter()
                .map(|w| w.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
                .collect::<serde_json::Result<Vec<_>>>()
        })?
    };
    let mut out = Vec::with_capacity(parts.iter().map(Vec::len).sum::<usize>() + 256);
    out.extend_from_slice(format!("{{\"abi\":{ABI},\"now\":{now},\"params\":").as_bytes());
    serde_json::to_writer(&mut out, params)?;
    out.extend_from_slice(b",\"artifacts\":[");
    for (i, part) in parts.iter().filter(|p| !p.is_empty()).enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(part);
    }
    out.extend_from_slice(b"]}");
    Ok(out)
}

/// Parses and checks an answer against the batch: one decision per artifact, no more.
pub fn check_answer(answer: &[u8], batch: &[Artifact]) -> Result<Vec<Decision>, String> {
    let output: sloth_policy_sdk::Output =
        serde_json::from_slice(answer).map_err(|e| format!("{e}"))?;
    // The usual answer decides in the batch's order: checked by position, without maps.
    if output.decisions.len() == batch.len()
        && output
            .decisions
            .iter()
            .zip(batch)
            .all(|(d, a)| d.id == a.id)
    {
        return Ok(output.decisions);
    }
    let wanted: HashSet<&str> = batch.iter().map(|a| a.id.as_str()).collect();
    let mut by_id: HashMap<String, Decision> = HashMap::with_capacity(output.decisions.len());
    for decision in output.decisions {
        if !wanted.contains(decision.id.as_str()) {
            return Err(format!(
                "it decided about '{}', which is not in the batch",
                decision.id
            ));
        }
        if let Some(twice) = by_id.insert(decision.id.clone(), decision) {
            return Err(format!("it decided about '{}' twice", twice.id));
        }
    }
    batch
        .iter()
        .map(|a| {
            by_id
                .remove(a.id.as_str())
                .ok_or_else(|| format!("it gave no decision for '{}'", a.id))
        })
        .collect()
}

/// The metadata in a module's `sloth.policy` section.
pub fn read_metadata(bytes: &[u8]) -> Result<Metadata, String> {
    let mut found = None;
    for payload in wasmparser::Parser::new(0).parse_all(bytes) {
        let payload = payload.map_err(|e| format!("not a wasm module: {e}"))?;
        if let wasmparser::Payload::CustomSection(section) = payload
            && section.name() == METADATA_SECTION
        {
            if found.is_some() {
                return Err(format!("two '{METADATA_SECTION}' sections"));
            }
            found = Some(section.data().to_vec());
        }
    }
    let data = found.ok_or_else(|| format!("no '{METADATA_SECTION}' custom section"))?;
    serde_json::from_slice(&data).map_err(|e| format!("its '{METADATA_SECTION}' section: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn artifact(id: &str) -> Artifact {
        Artifact {
            id: id.into(),
            name: "n".into(),
            stack: "s".into(),
            task: "t".into(),
            version: 1,
            size: 1,
            created_at: 0,
            modified_at: 0,
            download_count: 0,
            last_download_at: None,
            checksum: String::new(),
        }
    }

    #[test]
    fn the_input_is_what_the_sdk_reads_whatever_the_batch_size() {
        let params: BTreeMap<String, String> = [("count".into(), "5".into())].into();
        for n in [0, 1, 2, 40_000] {
            let batch: Vec<Artifact> = (0..n)
                .map(|i| artifact(&format!("id-{i}\"\\\u{1}")))
                .collect();
            let encoded = encode_input(7, &params, &batch).unwrap();
            let read: sloth_policy_sdk::Input = serde_json::from_slice(&encoded).unwrap();
            assert_eq!((read.abi, read.now, &read.params), (ABI, 7, &params));
            assert_eq!(read.artifacts, batch, "{n} artifacts");
        }
    }

    #[test]
    fn answers_must_cover_the_batch_exactly() {
        let a = artifact;
        let batch = [a("x"), a("y")];
        let ok = br#"{"decisions":[{"id":"y","action":"keep","reason":""},{"id":"x","action":"delete","reason":"old"}]}"#;
        let decided = check_answer(ok, &batch).unwrap();
        assert_eq!(decided[0].id, "x", "returned in the batch's order");
        let in_order = br#"{"decisions":[{"id":"x","action":"delete","reason":"old"},{"id":"y","action":"keep","reason":""}]}"#;
        let decided = check_answer(in_order, &batch).unwrap();
        assert_eq!(
            (decided[0].id.as_str(), decided[0].action),
            ("x", Action::Delete)
        );
        for (bad, says) in [
            (&br#"{"decisions":[{"id":"x","action":"keep","reason":""}]}"#[..], "no decision for 'y'"),
            (br#"{"decisions":[{"id":"x","action":"keep","reason":""},{"id":"x","action":"keep","reason":""},{"id":"y","action":"keep","reason":""}]}"#, "twice"),
            (br#"{"decisions":[{"id":"z","action":"delete","reason":""}]}"#, "not in the batch"),
            (br#"{"decisions":[{"id":"x","action":"keep","reason":""},{"id":"x","action":"keep","reason":""}]}"#, "twice"),
            (br#"{"decisions":[{"id":"x","action":"keep","reason":""},{"id":"z","action":"keep","reason":""}]}"#, "not in the batch"),
            (br#"{"decisions":[{"id":"x","action":"burn","reason":""},{"id":"y","action":"keep","reason":""}]}"#, "unknown variant"),
            (b"\xff\xfe", "expected"),
        ] {
            let err = check_answer(bad, &batch).unwrap_err();
            assert!(err.contains(says), "{err}");
        }
    }
}
