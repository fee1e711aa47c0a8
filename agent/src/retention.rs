//! Retention rules from the agent's config, run on schedule.
//!
//! Each rule runs once shortly after the agent starts and then every `every`. A rule this store
//! has never run before only reports on its first run (unless `dry_run_first = false`), and no
//! run deletes more than `max_share` (default half) of the versions it looked at. Every run is
//! an event: `artifact.cleanup` (name: the policy; version column: versions deleted, or that
//! would be in a dry run; size: bytes freed) or `policy.failed`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sloth_engine::{CleanupRequest, Engine, RetentionRule};
use sloth_policies::PolicyHost;

/// Default cap on the share of versions one scheduled run may delete.
pub(crate) const DEFAULT_MAX_SHARE: f64 = 0.5;

/// How long after start the first run of each rule waits.
const FIRST_RUN_DELAY: Duration = Duration::from_secs(2);

/// Starts one task per rule; relative module paths are resolved against `base`.
pub(crate) fn spawn(
    engine: Arc<Engine>,
    host: Arc<PolicyHost>,
    rules: Vec<RetentionRule>,
    base: PathBuf,
) -> Vec<tokio::task::JoinHandle<()>> {
    rules
        .into_iter()
        .map(|rule| {
            let (engine, host, base) = (Arc::clone(&engine), Arc::clone(&host), base.clone());
            tokio::spawn(async move {
                tokio::time::sleep(FIRST_RUN_DELAY).await;
                let mut ticker = tokio::time::interval(Duration::from_secs(rule.every_secs()));
                loop {
                    ticker.tick().await;
                    // Each run records its outcome as an event; a failure is retried next tick.
                    let _ = run_once(&engine, &host, &rule, &base).await;
                }
            })
        })
        .collect()
}

/// What one run of a rule did.
#[derive(Debug)]
pub struct Applied {
    /// The policy's name (from its metadata).
    pub policy: String,
    /// Whether it only reported (the first run of a rule new to this store).
    pub dry_run: bool,
    /// What it deleted, or would have.
    pub report: sloth_engine::CleanupReport,
}

/// One run of one rule, recorded as an event whatever happens (`artifact.cleanup` or
/// `policy.failed`). On failure nothing was deleted; the reason is returned.
pub async fn run_once(
    engine: &Engine,
    host: &Arc<PolicyHost>,
    rule: &RetentionRule,
    base: &Path,
) -> Result<Applied, String> {
    let fingerprint = rule.fingerprint();
    let stack = rule.stack.clone().unwrap_or_else(|| "*".into());
    let outcome = async {
        let bytes = match sloth_policies::builtin(&rule.policy) {
            Some(bytes) => bytes.to_vec(),
            None => std::fs::read(base.join(&rule.policy))
                .map_err(|e| format!("cannot read the policy module '{}': {e}", rule.policy))?,
        };
        let policy = host.load(&bytes, &rule.policy).map_err(|e| e.to_string())?;
        let name = policy.metadata.name.clone();
        let seen = engine
            .retention_rule_seen(&fingerprint)
            .map_err(|e| e.to_string())?;
        let dry_run = rule.dry_run_first.unwrap_or(true) && !seen;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let report = engine
            .cleanup(
                host,
                CleanupRequest {
                    policy,
                    params: rule.params.clone(),
                    stack: rule.stack.clone(),
                    now,
                    dry_run,
                    max_share: Some(rule.max_share.unwrap_or(DEFAULT_MAX_SHARE)),
                },
                "retention",
            )
            .await
            .map_err(|e| e.to_string())?;
        engine
            .mark_retention_rule_seen(&fingerprint)
            .map_err(|e| e.to_string())?;
        Ok::<_, String>((name, dry_run, report))
    }
    .await;
    let recorded = match &outcome {
        Ok((name, dry_run, report)) => {
            let dry_run = *dry_run;
            let (count, principal) = if dry_run {
                (
                    report.doomed.len(),
                    format!("retention {fingerprint} (first run: dry run)"),
                )
            } else {
                (report.deleted, format!("retention {fingerprint}"))
            };
            tracing::info!(
                "retention {fingerprint}: {} {count} of {} versions, freed {} bytes",
                if dry_run { "would delete" } else { "deleted" },
                report.evaluated,
                report.freed_bytes
            );
            engine
                .record_event(
                    "artifact.cleanup",
                    &principal,
                    &stack,
                    name,
                    count as u32,
                    report.freed_bytes,
                )
                .await
        }
        Err(reason) => {
            tracing::warn!("retention {fingerprint} failed; nothing was deleted: {reason}");
            engine
                .record_event(
                    "policy.failed",
                    &format!("retention {fingerprint}: {reason}"),
                    &stack,
                    &rule.policy,
                    0,
                    0,
                )
                .await
        }
    };
    if let Err(e) = recorded {
        tracing::warn!("recording the retention run failed: {e}");
    }
    outcome.map(|(policy, dry_run, report)| Applied {
        policy,
        dry_run,
        report,
    })
}

/// Applies a workflow's `artifact_retention` to its stack now and registers it with the store
/// (so that agents serving the store keep applying it); returns the line to show the user.
pub async fn apply_workflow_rule(
    engine: &Engine,
    host: &Arc<PolicyHost>,
    stack: &str,
    older_than: &str,
) -> Result<(RetentionRule, bool, String), String> {
    let (rule, changed) = engine
        .register_workflow_retention(stack, older_than)
        .map_err(|e| sloth_engine::error_chain(&e))?;
    let applied = run_once(engine, host, &rule, Path::new("."))
        .await
        .map_err(|reason| {
            format!("artifact_retention = {older_than} on stack {stack}: {reason}")
        })?;
    let n = applied.report.deleted;
    let line = format!(
        "🧹 artifact_retention = {older_than} on stack {stack}: deleted {n} {}, freed {}",
        if n == 1 { "artifact" } else { "artifacts" },
        sloth_engine::human_size(applied.report.freed_bytes)
    );
    Ok((rule, changed, line))
}

/// The retention rules workflows registered on this agent's store, each on its schedule: one
/// per stack, a workflow that changes its stack's rule replacing the running one.
pub struct WorkflowRules {
    engine: Arc<Engine>,
    host: Arc<PolicyHost>,
    base: PathBuf,
    running: std::sync::Mutex<std::collections::HashMap<String, tokio::task::JoinHandle<()>>>,
}

impl std::fmt::Debug for WorkflowRules {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkflowRules").finish_non_exhaustive()
    }
}

impl WorkflowRules {
    /// Schedules every rule the store holds.
    pub fn start(
        engine: Arc<Engine>,
        host: Arc<PolicyHost>,
        base: PathBuf,
    ) -> sloth_engine::Result<Arc<Self>> {
        let rules = engine.workflow_retention_rules()?;
        let this = Arc::new(Self {
            engine,
            host,
            base,
            running: Default::default(),
        });
        for rule in rules {
            this.schedule(rule);
        }
        Ok(this)
    }

    fn schedule(&self, rule: RetentionRule) {
        let stack = rule.stack.clone().unwrap_or_default();
        let task = spawn(
            Arc::clone(&self.engine),
            Arc::clone(&self.host),
            vec![rule],
            self.base.clone(),
        )
        .pop();
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(previous) = task.and_then(|task| running.insert(stack, task)) {
            previous.abort();
        }
    }

    /// [`apply_workflow_rule`], then (for a new or changed rule) its schedule.
    pub async fn apply(&self, stack: &str, older_than: &str) -> Result<String, String> {
        let (rule, changed, line) =
            apply_workflow_rule(&self.engine, &self.host, stack, older_than).await?;
        if changed {
            self.schedule(rule);
        }
        Ok(line)
    }

    /// Stops every schedule.
    pub fn stop(&self) {
        for (_, task) in self
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
        {
            task.abort();
        }
    }
}

/// Verifies the whole store every `every` (the first time one interval after start: a
/// rehash of everything is not what a restart should begin with), recording each run as a
/// `store.verify` event (version column: damaged versions found; size: bytes checked).
pub(crate) async fn verify_on_schedule(engine: Arc<Engine>, every: Duration, repair: bool) {
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    loop {
        ticker.tick().await;
        let (principal, damaged, bytes) = match engine
            .verify(None, repair, "scheduled verify")
            .await
        {
            Ok(report) => {
                if report.is_clean() {
                    tracing::info!(
                        "scheduled verify: {} chunks, {} versions: no problems",
                        report.chunks_checked,
                        report.versions_checked
                    );
                } else {
                    tracing::warn!(
                        "scheduled verify: {} bad chunks, {} damaged versions, {} projection problems{}",
                        report.bad_chunks.len(),
                        report.damaged.len(),
                        report.projection_problems.len(),
                        if repair {
                            " (repaired)"
                        } else {
                            "; run verify --repair"
                        }
                    );
                }
                (
                    format!(
                        "scheduled verify: {}",
                        if report.is_clean() {
                            "clean"
                        } else {
                            "problems found"
                        }
                    ),
                    report.damaged.len() as u32,
                    report.bytes_checked,
                )
            }
            Err(e) => {
                tracing::warn!("scheduled verify failed: {e}");
                (format!("scheduled verify failed: {e}"), 0, 0)
            }
        };
        if let Err(e) = engine
            .record_event("store.verify", &principal, "*", "verify", damaged, bytes)
            .await
        {
            tracing::warn!("recording the verify run failed: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn scheduled_verify_records_each_run() {
        let dir = tempfile::tempdir().expect("tempdir");
        let engine = Arc::new(
            Engine::open(dir.path(), sloth_engine::EngineConfig::default())
                .await
                .expect("open"),
        );
        let task = tokio::spawn(verify_on_schedule(
            Arc::clone(&engine),
            Duration::from_millis(200),
            false,
        ));
        tokio::time::sleep(Duration::from_millis(700)).await;
        task.abort();
        let runs = engine.events(Some("store.verify"), None).expect("events");
        assert!(runs.len() >= 2, "{runs:?}");
        assert_eq!(runs[0].principal, "scheduled verify: clean");
    }
}
