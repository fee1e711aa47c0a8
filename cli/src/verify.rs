//! `sloth-runner agent artifacts verify AGENT [--stack] [--repair]`.

use std::io::Write;

use sloth_engine::{ArtifactRecord, Name, VerifyReport};

use crate::agent::{self, Context, Store};
use crate::args::VerifyArgs;
use crate::format::human_size;

pub(crate) async fn verify(
    ctx: &Context,
    args: VerifyArgs,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    if let Some(stack) = &args.stack {
        Name::parse("stack", stack)?;
    }
    writeln!(out, "🔍 Verifying agent {}...", args.agent)?;
    out.flush()?;
    let report = match agent::open(&args.agent, ctx).await? {
        Store::Local(engine) => {
            engine
                .verify(args.stack.as_deref(), args.repair, &agent::principal())
                .await?
        }
        Store::Remote(remote) => remote.verify(args.stack.clone(), args.repair).await?,
    };
    print_report(out, &report, args.repair)?;
    let lost = !report.bad_chunks.is_empty()
        || !report.bad_manifests.is_empty()
        || !report.damaged.is_empty();
    let unrepaired = !args.repair && !report.is_clean();
    if lost || unrepaired {
        anyhow::bail!(
            "verify found problems on agent {}{}",
            args.agent,
            if lost {
                ": artifact content is lost"
            } else {
                ""
            }
        );
    }
    Ok(())
}

fn version(r: &ArtifactRecord) -> String {
    format!(
        "{} v{} (stack {}, task {})",
        r.name, r.version, r.stack, r.task
    )
}

fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

fn print_report(out: &mut dyn Write, r: &VerifyReport, repair: bool) -> std::io::Result<()> {
    for bad in &r.bad_chunks {
        writeln!(out, "✗ Bad chunk {} ({})", bad.chunk, bad.reason)?;
        if bad.versions.is_empty() {
            writeln!(out, "    used by no artifact version")?;
        }
        for v in &bad.versions {
            writeln!(out, "    used by {}", version(v))?;
        }
    }
    for (manifest, reason) in &r.bad_manifests {
        writeln!(out, "✗ Bad manifest {manifest}: {reason}")?;
    }
    for (record, reason) in &r.damaged {
        let marked = if record.damaged.is_some() {
            " [marked]"
        } else {
            ""
        };
        writeln!(out, "✗ Damaged: {}: {reason}{marked}", version(record))?;
    }
    for record in &r.healed {
        writeln!(
            out,
            "ℹ Restored: {} reads back whole again (its lost chunks were uploaded again){}",
            version(record),
            if repair {
                ""
            } else {
                "; --repair clears its damaged mark"
            }
        )?;
    }
    for problem in &r.projection_problems {
        writeln!(out, "⚠ Projection: {problem}")?;
    }
    if r.ref_mismatches > 0 {
        writeln!(
            out,
            "⚠ {} with a reference count that disagrees with the manifests",
            plural(r.ref_mismatches as usize, "chunk", "chunks")
        )?;
    }
    let checked = format!(
        "Checked {} ({}), {}, {}",
        plural(r.chunks_checked as usize, "chunk", "chunks"),
        human_size(r.bytes_checked),
        plural(r.manifests_checked as usize, "manifest", "manifests"),
        plural(
            r.versions_checked as usize,
            "artifact version",
            "artifact versions"
        ),
    );
    if r.is_clean() {
        return writeln!(out, "✓ {checked}: no problems");
    }
    writeln!(
        out,
        "ℹ {checked}: {}, {}, {}",
        plural(r.bad_chunks.len(), "bad chunk", "bad chunks"),
        plural(r.damaged.len(), "damaged version", "damaged versions"),
        plural(
            r.projection_problems.len(),
            "projection problem",
            "projection problems"
        ),
    )?;
    if repair {
        let mut done = Vec::new();
        if r.newly_marked > 0 {
            done.push(format!(
                "marked {} damaged (listed, never served)",
                plural(r.newly_marked, "version", "versions")
            ));
        }
        if r.chunks_removed > 0 {
            done.push(format!(
                "removed {} (uploading the same content again restores them)",
                plural(r.chunks_removed as usize, "corrupt chunk", "corrupt chunks")
            ));
        }
        if !r.healed.is_empty() {
            done.push(format!(
                "cleared the damaged mark of {}",
                plural(r.healed.len(), "restored version", "restored versions")
            ));
        }
        if r.projections_rebuilt {
            done.push("rebuilt metadata.db and the artifacts/ layout".to_owned());
        }
        if done.is_empty() {
            done.push("nothing left to repair".to_owned());
        }
        writeln!(out, "✓ Repaired: {}", done.join("; "))?;
        if !r.damaged.is_empty() {
            writeln!(
                out,
                "ℹ Damaged versions stay until deleted; uploading their content again restores them (then run verify --repair again)"
            )?;
        }
    } else {
        writeln!(
            out,
            "ℹ Run again with --repair to mark damaged versions (listed, never served) and rebuild the projections."
        )?;
    }
    Ok(())
}
