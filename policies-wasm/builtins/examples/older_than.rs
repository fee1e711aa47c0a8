//! `older-than`: deletes every version uploaded `older_than` ago or earlier (at the
//! catalog's resolution of one second, so `0d` means every version up to now).

use sloth_builtin_policies::ago;
use sloth_policy_sdk::{Decision, Input, policy};

fn evaluate(input: &Input) -> Result<Vec<Decision>, String> {
    let limit = input.param_duration("older_than")?;
    let limit_text = input.param("older_than")?;
    Ok(input
        .artifacts
        .iter()
        .map(|a| {
            let age = input.now - a.created_at;
            if age >= limit {
                Decision::delete(a, format!("uploaded {} ago, older than {limit_text}", ago(age)))
            } else {
                Decision::keep(a, format!("uploaded {} ago", ago(age)))
            }
        })
        .collect())
}

policy! {
    name: "older-than",
    version: "1.0.0",
    description: "Deletes artifact versions uploaded older_than ago or earlier (7d, 30d, 6h, 45m; 0d: all).",
    params: r#"{"older_than": {"type": "duration", "required": true}}"#,
    evaluate: evaluate,
}
