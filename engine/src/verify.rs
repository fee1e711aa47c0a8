//! `verify`: rehash the whole store, map every problem to the artifact versions it hurts,
//! check the projections, and (with `repair`) mark damaged versions and rebuild projections.

use std::collections::{BTreeMap, HashMap};

use sloth_cas::{ChunkStore as _, ManifestId};

use crate::{ArtifactRecord, Engine, ListQuery, Result};

/// A corrupt or missing chunk and the versions that need it.
#[derive(Debug, Clone)]
pub struct BadChunkUse {
    /// The chunk id (hex).
    pub chunk: String,
    /// What is wrong with it.
    pub reason: String,
    /// The versions (within the verified stack) whose content includes it.
    pub versions: Vec<ArtifactRecord>,
}

/// What [`Engine::verify`] found, and what it repaired.
#[derive(Debug, Clone, Default)]
pub struct VerifyReport {
    /// Chunks read and rehashed (the whole store: chunks are shared across stacks).
    pub chunks_checked: u64,
    /// Frame bytes read.
    pub bytes_checked: u64,
    /// Manifests checked.
    pub manifests_checked: u64,
    /// Artifact versions checked (within the stack, when one was given).
    pub versions_checked: u64,
    /// Corrupt or missing chunks.
    pub bad_chunks: Vec<BadChunkUse>,
    /// Manifests that are unreadable, with why.
    pub bad_manifests: Vec<(String, String)>,
    /// Versions whose content cannot be read back, with why (including those already marked).
    pub damaged: Vec<(ArtifactRecord, String)>,
    /// Of those, how many this run marked (with `repair`).
    pub newly_marked: usize,
    /// Versions marked damaged earlier whose content reads back whole again (its lost chunks
    /// were stored again by a later upload of the same content).
    pub healed: Vec<ArtifactRecord>,
    /// Corrupt chunks removed from the store (with `repair`), so that uploading the same
    /// content again stores them afresh.
    pub chunks_removed: u64,
    /// Problems of the `artifacts/` layout and `metadata.db`, one line each.
    pub projection_problems: Vec<String>,
    /// Whether the projections were rebuilt (with `repair`).
    pub projections_rebuilt: bool,
    /// Chunks whose reference count disagrees with the manifests (GC bookkeeping).
    pub ref_mismatches: u64,
}

impl VerifyReport {
    /// Nothing wrong.
    pub fn is_clean(&self) -> bool {
        self.bad_chunks.is_empty()
            && self.bad_manifests.is_empty()
            && self.damaged.is_empty()
            && self.healed.is_empty()
            && self.projection_problems.is_empty()
            && self.ref_mismatches == 0
    }
}

impl Engine {
    /// Rehashes every chunk and manifest, finds every version that can no longer be read back
    /// (within `stack`, when given), and checks `metadata.db` and the layout against the
    /// catalog. With `repair`: marks the damaged versions (they stay listed, downloads of them
    /// are refused, an `artifact.damaged` event records each) and rebuilds both projections.
    pub async fn verify(
        &self,
        stack: Option<&str>,
        repair: bool,
        principal: &str,
    ) -> Result<VerifyReport> {
        let scrub = self.cas().scrub().await?;
        let versions = self.all_versions(stack)?;
        let mut report = VerifyReport {
            chunks_checked: scrub.chunks_checked,
            bytes_checked: scrub.bytes_checked,
            manifests_checked: scrub.manifests_checked,
            versions_checked: versions.len() as u64,
            ref_mismatches: scrub.ref_mismatches,
            ..VerifyReport::default()
        };
        // The versions of each manifest, by their position in `versions`.
        let mut by_manifest: HashMap<ManifestId, Vec<usize>> = HashMap::new();
        for (i, record) in versions.iter().enumerate() {
            by_manifest.entry(record.manifest).or_default().push(i);
        }
        // Why each version is damaged, by its position in `versions`.
        let mut reasons: BTreeMap<usize, String> = BTreeMap::new();
        for bad in &scrub.bad_chunks {
            let users: Vec<usize> = bad
                .manifests
                .iter()
                .flat_map(|m| by_manifest.get(m).into_iter().flatten().copied())
                .collect();
            for &user in &users {
                reasons
                    .entry(user)
                    .or_insert_with(|| format!("chunk {} {}", short(&bad.id.to_hex()), bad.reason));
            }
            if stack.is_none() || !users.is_empty() {
                report.bad_chunks.push(BadChunkUse {
                    chunk: bad.id.to_hex(),
                    reason: bad.reason.clone(),
                    versions: users.iter().map(|&i| versions[i].clone()).collect(),
                });
            }
        }
        for (manifest, reason) in &scrub.bad_manifests {
            for &user in by_manifest.get(manifest).into_iter().flatten() {
                reasons
                    .entry(user)
                    .or_insert_with(|| format!("manifest {} {reason}", short(&manifest.to_hex())));
            }
            report
                .bad_manifests
                .push((manifest.to_hex(), reason.clone()));
        }
        for (i, record) in versions.iter().enumerate() {
            if !self.cas().contains_manifest(record.manifest)? {
                reasons.entry(i).or_insert_with(|| {
                    format!("manifest {} is missing", short(&record.manifest.to_hex()))
                });
            }
            if record.damaged.is_some() && !reasons.contains_key(&i) {
                report.healed.push(record.clone());
            }
        }
        report.damaged = reasons
            .into_iter()
            .map(|(i, reason)| (versions[i].clone(), reason))
            .collect();
        // metadata.db holds every version, not only the stack's.
        let catalog_versions = match stack {
            None => versions.len() as u64,
            Some(_) => self.all_versions(None)?.len() as u64,
        };
        let (problems, bad_objects) = self.check_projections(stack, catalog_versions).await?;
        report.projection_problems = problems;

        if repair {
            for (record, reason) in &report.damaged {
                if record.damaged.is_none() {
                    self.set_damaged(record, Some(reason), principal).await?;
                    report.newly_marked += 1;
                }
            }
            for record in &report.healed {
                self.set_damaged(record, None, principal).await?;
            }
            // A corrupt frame only stands in the way: the chunk is lost either way, and once
            // it is gone an upload of the same content stores it again.
            let corrupt: Vec<sloth_cas::ChunkId> = scrub
                .bad_chunks
                .iter()
                .filter(|b| b.reason != "missing")
                .map(|b| b.id)
                .collect();
            if !corrupt.is_empty() {
                report.chunks_removed = corrupt.len() as u64;
                self.cas().chunk_store().delete_many(corrupt).await?;
            }
            // A layout file with the wrong content is the shared object itself: drop it so
            // the rebuild materializes it again from the store.
            for record in &bad_objects {
                self.discard_layout_object(record)?;
            }
            if !report.projection_problems.is_empty()
                || report.newly_marked > 0
                || !report.healed.is_empty()
            {
                self.rebuild_projections().await?;
                report.projections_rebuilt = true;
            }
        }
        Ok(report)
    }

    /// `metadata.db` must be at the catalog's generation with one row per version; each
    /// layout entry (newest undamaged version of each artifact) must exist and hold exactly
    /// the version's content.
    async fn check_projections(
        &self,
        stack: Option<&str>,
        all: u64,
    ) -> Result<(Vec<String>, Vec<ArtifactRecord>)> {
        let mut problems = Vec::new();
        let mut bad_objects = Vec::new();
        match self.projection_figures()? {
            // The error names the file: "metadata.db: disk I/O error".
            (_, Err(e)) => problems.push(e.to_string()),
            (generation, Ok((sqlite_generation, _))) if sqlite_generation != Some(generation) => {
                problems.push(format!(
                    "metadata.db is at generation {}, the catalog at {generation}",
                    sqlite_generation.map_or_else(|| "none".into(), |g| g.to_string())
                ));
            }
            (_, Ok((_, rows))) if rows != all => problems.push(format!(
                "metadata.db has {rows} artifact rows, the catalog {all} versions"
            )),
            _ => {}
        }
        let newest = self.list(&ListQuery {
            stack: stack.map(str::to_owned),
            ..ListQuery::default()
        })?;
        for record in newest {
            let Some(path) = self.layout_path(&record) else {
                break; // the layout is off
            };
            let shown = path.display();
            match (&record.damaged, std::fs::metadata(&path)) {
                (Some(_), Ok(_)) => problems.push(format!("{shown}: shows a damaged version")),
                (Some(_), Err(_)) => {}
                (None, Err(e)) => problems.push(format!("{shown}: {e}")),
                (None, Ok(m)) if m.len() != record.size => {
                    problems.push(format!(
                        "{shown}: {} bytes, the artifact has {}",
                        m.len(),
                        record.size
                    ));
                    bad_objects.push(record.clone());
                }
                (None, Ok(_)) => {
                    let file = path.clone();
                    let digest = tokio::task::spawn_blocking(move || sha256_file(&file))
                        .await
                        .map_err(|e| crate::Error::Io(std::io::Error::other(e)))?;
                    match digest {
                        Ok(d) if d == record.checksum => {}
                        Ok(_) => {
                            problems.push(format!(
                                "{shown}: content does not match the artifact's checksum"
                            ));
                            bad_objects.push(record.clone());
                        }
                        Err(e) => problems.push(format!("{shown}: {e}")),
                    }
                }
            }
        }
        Ok((problems, bad_objects))
    }
}

fn short(hex: &str) -> String {
    format!("{}…", &hex[..hex.len().min(12)])
}

/// `sha256:<hex>` of a file's content, as artifact checksums are written.
pub fn sha256_file(path: &std::path::Path) -> std::io::Result<String> {
    use sha2::Digest as _;
    use std::io::Read as _;
    let mut file = std::fs::File::open(path)?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0; 1 << 20];
    loop {
        match file.read(&mut buf)? {
            0 => break,
            n => hasher.update(&buf[..n]),
        }
    }
    Ok(format!("sha256:{}", hex::encode(hasher.finalize())))
}
