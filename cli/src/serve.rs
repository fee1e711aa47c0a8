//! `sloth-runner agent start`, `master start`, `agent list|get` and `token new`.

use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use sloth_agent::auth::{Scope, Tokens};
use sloth_agent::client::Master;
use sloth_agent::master::MasterConfig;
use sloth_agent::server::{AgentConfig, Bound, check_exposure};
use sloth_agent::tls::ServerTls;
use sloth_engine::Name;

use crate::agent::{self, Context};
use crate::args::{AgentStartArgs, MasterStartArgs, ServeArgs};
use crate::format::{Table, human_size, utc_time};

/// Resolves on SIGINT or SIGTERM.
async fn stop_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                term.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}

fn tls_and_tokens(args: &ServeArgs) -> anyhow::Result<(Option<ServerTls>, Option<Tokens>)> {
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(ServerTls {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: args.client_ca.clone(),
        }),
        _ => None,
    };
    if let Some(tls) = &tls {
        tls.check()?;
    }
    let tokens = args.tokens.as_deref().map(Tokens::load).transpose()?;
    Ok((tls, tokens))
}

pub(crate) async fn agent_start(
    ctx: &Context,
    args: AgentStartArgs,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    Name::parse("agent name", &args.name)?;
    if args.name == agent::LOCAL {
        anyhow::bail!(
            "'{}' names the embedded store; choose another agent name",
            agent::LOCAL
        );
    }
    let (tls, tokens) = tls_and_tokens(&args.serve)?;
    check_exposure(
        SocketAddr::new(args.serve.bind, args.port),
        tls.is_some(),
        tokens.is_some(),
        args.serve.insecure,
    )?;
    let mut config = AgentConfig::new(&args.name, SocketAddr::new(args.serve.bind, args.port));
    config.advertise = args.advertise;
    config.master = ctx.net.master.as_deref().map(|addr| ctx.link(addr));
    config.heartbeat = Duration::from_secs(args.heartbeat);

    config.insecure = args.serve.insecure;
    config.tls = tls;
    config.tokens = tokens;
    // Ports and the name first: a start that cannot serve leaves no data directory behind.
    let bound = Bound::bind(config.bind).await?;
    let metrics = match args.metrics_port {
        Some(port) => Some(Bound::bind(SocketAddr::new(args.serve.bind, port)).await?),
        None => None,
    };
    sloth_agent::server::check_name_free(&config, bound.local_addr()).await?;
    let engine = agent::open_local(&ctx.data_dir, args.config.as_deref(), &args.name).await?;
    let config_file = args
        .config
        .clone()
        .unwrap_or_else(|| sloth_engine::config_path(&ctx.data_dir));
    let store_config = match &args.config {
        Some(path) => sloth_engine::StoreConfigFile::load_from(path)?,
        None => sloth_engine::StoreConfigFile::load(&ctx.data_dir)?,
    };
    config.verify = store_config.verify_every.as_deref().map(|every| {
        let secs = sloth_policies::parse_duration(every)
            .unwrap_or(86_400)
            .max(60);
        (
            std::time::Duration::from_secs(secs as u64),
            store_config.verify_repair.unwrap_or(false),
        )
    });
    let store_config_every = store_config.verify_every.clone();
    config.retention = store_config.retention;
    config.policy_dir = config_file
        .parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or_default();
    writeln!(
        out,
        "✓ Agent '{}' listening on {} (data directory {}{}{})",
        args.name,
        bound.local_addr(),
        ctx.data_dir.display(),
        if config.tls.is_some() { ", TLS" } else { "" },
        if config.tokens.is_some() {
            ", tokens required"
        } else {
            ""
        },
    )?;
    if let Some(metrics) = &metrics {
        writeln!(out, "ℹ Metrics on http://{}/metrics", metrics.local_addr())?;
    }
    for rule in &config.retention {
        writeln!(
            out,
            "ℹ Retention: {} every {}",
            rule.fingerprint(),
            rule.every
        )?;
    }
    if let (Some((_, repair)), Some(every)) = (config.verify, &store_config_every) {
        writeln!(
            out,
            "ℹ Verify: the whole store every {every}{}",
            if repair { ", repairing" } else { "" }
        )?;
    }
    if let Some(master) = &config.master {
        writeln!(out, "ℹ Registering with the master at {}", master.addr)?;
    }
    out.flush()?;
    sloth_agent::server::serve(engine, config, bound, metrics, stop_signal()).await?;
    writeln!(out, "✓ Agent '{}' stopped", args.name)?;
    Ok(())
}

pub(crate) async fn master_start(args: MasterStartArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let (tls, tokens) = tls_and_tokens(&args.serve)?;
    check_exposure(
        SocketAddr::new(args.serve.bind, args.port),
        tls.is_some(),
        tokens.is_some(),
        args.serve.insecure,
    )?;
    let bound = Bound::bind(SocketAddr::new(args.serve.bind, args.port)).await?;
    writeln!(out, "✓ Master listening on {}", bound.local_addr())?;
    out.flush()?;
    let config = MasterConfig {
        tls,
        tokens,
        insecure: args.serve.insecure,
    };
    sloth_agent::master::serve(config, bound, stop_signal()).await?;
    writeln!(out, "✓ Master stopped")?;
    Ok(())
}

pub(crate) async fn agent_list(ctx: &Context, out: &mut dyn Write) -> anyhow::Result<()> {
    let master = Master::connect(&ctx.master("cannot list agents")?).await?;
    let agents = master.list().await?;
    writeln!(out, "🤖 Agents")?;
    writeln!(out)?;
    let mut table = Table::new(&[
        ("Name", 20),
        ("Address", 24),
        ("Status", 9),
        ("Last Heartbeat", 20),
        ("Version", 8),
        ("Artifacts", 9),
        ("Stored", 10),
    ]);
    for a in &agents {
        table.row(&[
            a.name.clone(),
            a.address.clone(),
            a.status.clone(),
            utc_time(a.last_heartbeat),
            a.version.clone(),
            a.figures.artifacts.to_string(),
            human_size(a.figures.stored_bytes),
        ]);
    }
    for line in table.lines() {
        writeln!(out, "{line}")?;
    }
    writeln!(out)?;
    let noun = if agents.len() == 1 { "agent" } else { "agents" };
    writeln!(out, "ℹ Total: {} {noun}", agents.len())?;
    Ok(())
}

pub(crate) async fn agent_get(
    ctx: &Context,
    name: &str,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let master = Master::connect(&ctx.master(&format!("cannot find agent '{name}'"))?).await?;
    let a = master.get(name).await?;
    // The master's figures are as of the last heartbeat; the agent itself knows them now.
    let live = async {
        let remote = sloth_agent::client::Remote::connect(name, &ctx.link(&a.address)).await?;
        remote.info().await
    };
    let (f, as_of) = match tokio::time::timeout(Duration::from_secs(3), live).await {
        Ok(Ok((_, figures))) => (figures, "now"),
        _ => (a.figures, "last heartbeat"),
    };
    writeln!(out, "🤖 Agent Details")?;
    writeln!(out)?;
    let fields = [
        ("Name:", a.name.clone()),
        ("Address:", a.address.clone()),
        ("Status:", a.status.clone()),
        ("TLS:", if a.tls { "yes" } else { "no" }.to_owned()),
        ("Version:", a.version.clone()),
        ("Registered:", utc_time(a.registered_at)),
        ("Heartbeat:", utc_time(a.last_heartbeat)),
        (
            "Artifacts:",
            format!("{} ({} versions, as of {as_of})", f.artifacts, f.versions),
        ),
        ("Logical:", human_size(f.logical_bytes)),
        ("Stored:", human_size(f.stored_bytes)),
        (
            "Dedup:",
            if f.stored_bytes == 0 {
                "- (nothing stored)".to_owned()
            } else {
                format!("{:.2}x", f.dedup_ratio())
            },
        ),
    ];
    for (label, value) in fields {
        writeln!(out, "{label:<13}{value}")?;
    }
    Ok(())
}

pub(crate) fn token_new(scopes: &str, principal: &str, out: &mut dyn Write) -> anyhow::Result<()> {
    let scopes = scopes
        .split(',')
        .map(|s| {
            Scope::parse(s.trim()).ok_or_else(|| {
                anyhow::anyhow!("unknown scope '{}' (scopes: {})", s.trim(), Scope::NAMES)
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Name::parse("principal", principal)?;
    if principal.chars().any(char::is_whitespace) {
        anyhow::bail!("the principal must not contain spaces");
    }
    let mut secret = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut secret))
        .context("reading random bytes from /dev/urandom")?;
    let token = hex::encode(secret);
    writeln!(
        out,
        "Token (give it to the client; it is not stored anywhere):"
    )?;
    writeln!(out, "  {token}")?;
    writeln!(out, "Line for the agent's --tokens file:")?;
    writeln!(out, "  {}", Tokens::line_for(&token, &scopes, principal))?;
    Ok(())
}
