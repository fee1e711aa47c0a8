//! `sloth-runner events list`: the audit trail.

use std::io::Write;

use crate::agent::{self, Context};
use crate::args::{EventsListArgs, Output};
use crate::artifacts::print_json;
use crate::format::{Table, human_size, utc_time};

const COLUMNS: [(&str, usize); 8] = [
    ("Time", 20),
    ("Kind", 17),
    ("Principal", 20),
    ("Stack", 15),
    ("Task", 20),
    ("Name", 40),
    ("Version", 7),
    ("Size", 12),
];

pub(crate) async fn list(
    ctx: &Context,
    args: EventsListArgs,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let store = agent::open_catalog(&args.agent, ctx).await?;
    let events = store.events(args.kind.as_deref(), Some(args.limit)).await?;

    if args.output == Output::Json {
        return print_json(out, &events);
    }

    writeln!(out, "📜 Events on agent: {} 📜", args.agent)?;
    writeln!(out)?;
    let mut table = Table::new(&COLUMNS);
    for e in &events {
        table.row(&[
            utc_time(e.time),
            e.kind.clone(),
            e.principal.clone(),
            e.stack.clone(),
            e.task.clone(),
            e.name.clone(),
            e.version.to_string(),
            human_size(e.size),
        ]);
    }
    for line in table.lines() {
        writeln!(out, "{line}")?;
    }
    writeln!(out)?;
    let noun = if events.len() == 1 { "event" } else { "events" };
    writeln!(out, "ℹ Total: {} {noun}", events.len())?;
    Ok(())
}
