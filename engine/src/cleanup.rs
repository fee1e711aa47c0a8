//! Cleanup: a retention policy decides, the catalog deletes.

use std::collections::BTreeMap;
use std::sync::Arc;

use sloth_policies::{Action, Artifact, Policy, PolicyHost};

use crate::{ArtifactRecord, Engine, Error, Result, Selector};

/// What to clean up and how.
#[derive(Debug, Clone)]
pub struct CleanupRequest {
    /// The policy that decides.
    pub policy: Policy,
    /// Its parameters.
    pub params: BTreeMap<String, String>,
    /// Only artifacts of this stack are shown to the policy (all when `None`).
    pub stack: Option<String>,
    /// The time the policy judges by (Unix seconds).
    pub now: i64,
    /// Decide only; delete nothing.
    pub dry_run: bool,
    /// Refuse to delete more than this share of the evaluated versions (a safety rail for
    /// scheduled runs); `None` for no cap.
    pub max_share: Option<f64>,
}

/// A version the policy chose to delete, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Doomed {
    /// The version.
    pub record: ArtifactRecord,
    /// The policy's reason.
    pub reason: String,
}

/// What a cleanup did (or, dry, would do).
#[derive(Debug, Clone, Default)]
pub struct CleanupReport {
    /// Versions shown to the policy.
    pub evaluated: usize,
    /// Versions the policy chose to delete.
    pub doomed: Vec<Doomed>,
    /// Versions actually deleted (fewer than `doomed` when some went away meanwhile; 0 when dry).
    pub deleted: usize,
    /// Sum of the deleted versions' sizes.
    pub logical_bytes: u64,
    /// Disk space the store gave back: its frame bytes before minus after, so shared chunks
    /// still used elsewhere do not count.
    pub freed_bytes: u64,
}

impl Engine {
    /// Shows every version (of `request.stack`, or all) to the policy and deletes the ones it
    /// decides to delete. A failing policy deletes nothing.
    pub async fn cleanup(
        &self,
        host: &Arc<PolicyHost>,
        request: CleanupRequest,
        principal: &str,
    ) -> Result<CleanupReport> {
        let stored = self.stored_versions(request.stack.as_deref())?;
        // The policy's view is read straight from the stored JSON (a record has every field of
        // an `Artifact`, by the same names); whole records, checked, are decoded only for the
        // versions the policy chooses to delete.
        let batch: Vec<Artifact> = crate::engine::parallel_map(&stored, |v| {
            serde_json::from_slice(v).map_err(|e| Error::CorruptRecord(e.to_string()))
        })
        .into_iter()
        .collect::<Result<_>>()?;
        let evaluated = batch.len();
        let host = Arc::clone(host);
        let (policy, params, now) = (request.policy.clone(), request.params.clone(), request.now);
        let decisions =
            tokio::task::spawn_blocking(move || host.evaluate(&policy, now, &params, &batch))
                .await
                .map_err(|e| Error::Io(std::io::Error::other(e)))??;
        let doomed: Vec<Doomed> = stored
            .iter()
            .zip(decisions)
            .filter(|(_, d)| d.action == Action::Delete)
            .map(|(stored, d)| {
                Ok(Doomed {
                    record: ArtifactRecord::decode(stored)?,
                    reason: d.reason,
                })
            })
            .collect::<Result<_>>()?;
        let mut report = CleanupReport {
            evaluated,
            ..CleanupReport::default()
        };
        if let Some(cap) = request.max_share
            && !request.dry_run
            && doomed.len() as f64 > cap * evaluated as f64
        {
            return Err(Error::CleanupCapped {
                policy: request.policy.metadata.name.clone(),
                would: doomed.len(),
                of: evaluated,
                cap,
            });
        }
        if request.dry_run {
            report.logical_bytes = doomed.iter().map(|d| d.record.size).sum();
            report.doomed = doomed;
            return Ok(report);
        }
        let who = format!("{principal} via policy {}", request.policy.metadata.name);
        let before = self.cas().stats().await?.stored_bytes;
        for d in &doomed {
            let exact = Selector {
                name: d.record.name.clone(),
                stack: Some(d.record.stack.clone()),
                task: Some(d.record.task.clone()),
                version: Some(d.record.version),
            };
            match self.delete(&exact, &who).await {
                Ok(_) => {
                    report.deleted += 1;
                    report.logical_bytes += d.record.size;
                }
                // Deleted by someone else meanwhile: nothing left to do for it.
                Err(Error::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        let after = self.cas().stats().await?.stored_bytes;
        report.freed_bytes = before.saturating_sub(after);
        report.doomed = doomed;
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Cleanup reads a policy's view straight from a stored record: it must be exactly the
    /// record's fields.
    #[test]
    fn a_stored_record_reads_as_the_policy_view_of_it() {
        let record = ArtifactRecord::sample();
        let view: Artifact = serde_json::from_slice(&record.encode()).unwrap();
        assert_eq!(
            view,
            Artifact {
                id: record.id.to_string(),
                name: record.name.clone(),
                stack: record.stack.clone(),
                task: record.task.clone(),
                version: record.version,
                size: record.size,
                created_at: record.created_at,
                modified_at: record.modified_at,
                download_count: record.download_count,
                last_download_at: record.last_download_at,
                checksum: record.checksum.clone(),
            }
        );
    }
}
