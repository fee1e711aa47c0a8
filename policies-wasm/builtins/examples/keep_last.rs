//! `keep-last`: keeps the newest `count` in each group and deletes the rest. Groups (`per`):
//! `artifact` (default: the versions of one stack/task/name), `task` (everything in one
//! stack/task) or `name` (one name across stacks and tasks).

use sloth_builtin_policies::newest_first;
use sloth_policy_sdk::{Artifact, Decision, Input, policy};

fn evaluate(input: &Input) -> Result<Vec<Decision>, String> {
    let count = input.param_u64("count")? as usize;
    let per = input.params.get("per").map_or("artifact", String::as_str);
    if !matches!(per, "artifact" | "task" | "name") {
        return Err(format!("per must be artifact, task or name, got '{per}'"));
    }
    // One sort by (group hash, group, newest first) instead of maps keyed by strings: string
    // comparisons in wasm are byte loops, and 100,000 artifacts make millions of them.
    let artifacts = &input.artifacts;
    let keys: Vec<(u64, (&str, &str, &str))> = artifacts
        .iter()
        .map(|a| {
            let key = group(per, a);
            (fnv1a(&[key.0, key.1, key.2]), key)
        })
        .collect();
    let mut order: Vec<usize> = (0..artifacts.len()).collect();
    order.sort_unstable_by(|&i, &j| {
        keys[i]
            .0
            .cmp(&keys[j].0)
            .then_with(|| keys[i].1.cmp(&keys[j].1))
            .then_with(|| newest_first(&&artifacts[i], &&artifacts[j]))
    });
    let mut rank = vec![0usize; artifacts.len()];
    let mut previous: Option<usize> = None;
    let mut r = 0;
    for &i in &order {
        r = match previous {
            Some(p) if keys[p] == keys[i] => r + 1,
            _ => 1,
        };
        rank[i] = r;
        previous = Some(i);
    }
    Ok(input
        .artifacts
        .iter()
        .zip(&rank)
        .map(|(a, &r)| {
            if r > count {
                Decision::delete(a, format!("#{r} newest per {per}, keeping {count}"))
            } else {
                Decision::keep(a, format!("#{r} newest per {per}"))
            }
        })
        .collect())
}

/// FNV-1a over the parts, with a separator so that ("ab", "c") and ("a", "bc") differ.
fn fnv1a(parts: &[&str]) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325_u64;
    for part in parts {
        for &b in part.as_bytes().iter().chain(&[0xff]) {
            hash ^= u64::from(b);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    hash
}

/// The group `a` belongs to under `per`.
fn group<'a>(per: &str, a: &'a Artifact) -> (&'a str, &'a str, &'a str) {
    match per {
        "task" => (&a.stack, &a.task, ""),
        "name" => ("", "", &a.name),
        _ => (&a.stack, &a.task, &a.name),
    }
}

policy! {
    name: "keep-last",
    version: "1.0.0",
    description: "Keeps the newest count versions per artifact (per=artifact), per stack/task (per=task) or per name (per=name).",
    params: r#"{"count": {"type": "integer", "required": true}, "per": {"type": "string", "enum": ["artifact", "task", "name"], "default": "artifact"}}"#,
    evaluate: evaluate,
}
