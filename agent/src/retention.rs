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
                    run_once(&engine, &host, &rule, &base).await;
                }
            })
        })
        .collect()
}

/// One run of one rule, recorded as an event whatever happens.
pub(crate) async fn run_once(
    engine: &Engine,
    host: &Arc<PolicyHost>,
    rule: &RetentionRule,
    base: &Path,
) {
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
    let recorded = match outcome {
        Ok((name, dry_run, report)) => {
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
                    &name,
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
}
