//! `keep-last`: keeps the newest `count` in each group and deletes the rest. Groups (`per`):
//! `artifact` (default: the versions of one stack/task/name), `task` (everything in one
//! stack/task) or `name` (one name across stacks and tasks).

use std::collections::BTreeMap;

use sloth_builtin_policies::newest_first;
use sloth_policy_sdk::{Artifact, Decision, Input, policy};

fn evaluate(input: &Input) -> Result<Vec<Decision>, String> {
    let count = input.param_u64("count")? as usize;
    let per = input.params.get("per").map_or("artifact", String::as_str);
    let group = |a: &Artifact| -> (String, String, String) {
        match per {
            "task" => (a.stack.clone(), a.task.clone(), String::new()),
            "name" => (String::new(), String::new(), a.name.clone()),
            _ => (a.stack.clone(), a.task.clone(), a.name.clone()),
        }
    };
    if !matches!(per, "artifact" | "task" | "name") {
        return Err(format!("per must be artifact, task or name, got '{per}'"));
    }
    let mut groups: BTreeMap<(String, String, String), Vec<&Artifact>> = BTreeMap::new();
    for a in &input.artifacts {
        groups.entry(group(a)).or_default().push(a);
    }
    let mut rank = BTreeMap::new();
    for members in groups.values_mut() {
        members.sort_by(newest_first);
        for (i, a) in members.iter().enumerate() {
            rank.insert(a.id.as_str(), i + 1);
        }
    }
    Ok(input
        .artifacts
        .iter()
        .map(|a| {
            let r = rank[a.id.as_str()];
            if r > count {
                Decision::delete(a, format!("#{r} newest per {per}, keeping {count}"))
            } else {
                Decision::keep(a, format!("#{r} newest per {per}"))
            }
        })
        .collect())
}

policy! {
    name: "keep-last",
    version: "1.0.0",
    description: "Keeps the newest count versions per artifact (per=artifact), per stack/task (per=task) or per name (per=name).",
    params: r#"{"count": {"type": "integer", "required": true}, "per": {"type": "string", "enum": ["artifact", "task", "name"], "default": "artifact"}}"#,
    evaluate: evaluate,
}
