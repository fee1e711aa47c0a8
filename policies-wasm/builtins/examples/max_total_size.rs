//! `max-total-size`: deletes versions until the batch's total size is at most `max_bytes`,
//! evicting the oldest first (`evict=oldest`, default) or the least recently downloaded
//! (`evict=least-recently-downloaded`; never-downloaded versions count from their upload).

use sloth_policy_sdk::{Artifact, Decision, Input, policy};

fn evaluate(input: &Input) -> Result<Vec<Decision>, String> {
    let budget = input.param_u64("max_bytes")?;
    let evict = input.params.get("evict").map_or("oldest", String::as_str);
    let key: fn(&Artifact) -> i64 = match evict {
        "oldest" => |a| a.created_at,
        "least-recently-downloaded" => |a| a.last_download_at.unwrap_or(a.created_at),
        other => {
            return Err(format!(
                "evict must be oldest or least-recently-downloaded, got '{other}'"
            ));
        }
    };
    let mut order: Vec<&Artifact> = input.artifacts.iter().collect();
    order.sort_by(|a, b| (key(a), a.version, &a.id).cmp(&(key(b), b.version, &b.id)));
    let mut total: u64 = input.artifacts.iter().map(|a| a.size).sum();
    let mut doomed = std::collections::BTreeSet::new();
    for a in order {
        if total <= budget {
            break;
        }
        total -= a.size;
        doomed.insert(a.id.as_str());
    }
    Ok(input
        .artifacts
        .iter()
        .map(|a| {
            if doomed.contains(a.id.as_str()) {
                Decision::delete(a, format!("evicted ({evict}) to bring the total under {budget} bytes"))
            } else {
                Decision::keep(a, format!("within the {budget}-byte budget"))
            }
        })
        .collect())
}

policy! {
    name: "max-total-size",
    version: "1.0.0",
    description: "Deletes versions, oldest (or least recently downloaded) first, until the total is at most max_bytes.",
    params: r#"{"max_bytes": {"type": "integer", "required": true}, "evict": {"type": "string", "enum": ["oldest", "least-recently-downloaded"], "default": "oldest"}}"#,
    evaluate: evaluate,
}
