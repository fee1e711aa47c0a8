//! `unused-for`: deletes versions not downloaded for `unused_for` (never-downloaded versions
//! count from their upload).

use sloth_builtin_policies::ago;
use sloth_policy_sdk::{Decision, Input, policy};

fn evaluate(input: &Input) -> Result<Vec<Decision>, String> {
    let limit = input.param_duration("unused_for")?;
    let limit_text = input.param("unused_for")?;
    Ok(input
        .artifacts
        .iter()
        .map(|a| {
            let (last, what) = match a.last_download_at {
                Some(t) => (t, "last downloaded"),
                None => (a.created_at, "never downloaded, uploaded"),
            };
            let idle = input.now - last;
            if idle > limit {
                Decision::delete(a, format!("{what} {} ago, unused for more than {limit_text}", ago(idle)))
            } else {
                Decision::keep(a, format!("{what} {} ago", ago(idle)))
            }
        })
        .collect())
}

policy! {
    name: "unused-for",
    version: "1.0.0",
    description: "Deletes versions not downloaded for unused_for (never-downloaded ones count from their upload).",
    params: r#"{"unused_for": {"type": "duration", "required": true}}"#,
    evaluate: evaluate,
}
