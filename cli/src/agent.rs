//! Which store an agent name means (the embedded one or an agent on the network), where the
//! data directory is, and who is asking.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use std::collections::HashMap;

use sloth_agent::client::{Link, Listed, Progress, Remote, Shown};
use sloth_agent::tls::ClientTls;
use sloth_engine::{
    ArtifactKey, ArtifactRecord, Engine, EngineConfig, Event, ListQuery, Name, ProjectedCatalog,
    Selector, StoreConfigFile,
};

use crate::args::NetArgs;

/// How long a command waits for another `sloth-runner` process to release the store.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(120);

/// The embedded store in the data directory.
pub(crate) const LOCAL: &str = "local";

/// Where commands find agents: the local data directory and the network settings.
#[derive(Debug, Clone)]
pub(crate) struct Context {
    pub(crate) data_dir: PathBuf,
    pub(crate) net: NetArgs,
}

impl Context {
    /// The link to a server at `addr` with the command line's TLS settings and token.
    pub(crate) fn link(&self, addr: &str) -> Link {
        Link {
            addr: addr.to_owned(),
            tls: ClientTls {
                ca: self.net.ca.clone(),
                identity: self
                    .net
                    .client_cert
                    .clone()
                    .zip(self.net.client_key.clone()),
            },
            token: self.net.token.clone(),
            user: Some(principal()),
        }
    }

    /// The master's link, or an error saying how to give one.
    pub(crate) fn master(&self, why: &str) -> anyhow::Result<Link> {
        match &self.net.master {
            Some(addr) => Ok(self.link(addr)),
            None => bail!(
                "{why}: no master given; pass --master HOST:PORT or set SLOTH_RUNNER_MASTER_ADDR \
                 (or name the agent by host:port, or use '{LOCAL}' for the embedded store in {})",
                self.data_dir.display()
            ),
        }
    }
}

/// The store an agent name means: the embedded one (`local`) or an agent on the network.
#[derive(Debug)]
pub(crate) enum Store {
    Local(Engine),
    Remote(Remote),
}

/// Connects to `agent`: `local` opens the embedded store; `host:port` is dialed directly;
/// any other name is looked up with the master.
pub(crate) async fn open(agent: &str, ctx: &Context) -> anyhow::Result<Store> {
    if agent == LOCAL {
        return Ok(Store::Local(open_local(&ctx.data_dir, None, LOCAL).await?));
    }
    if agent.contains(':') {
        crate::args::host_port(agent).map_err(anyhow::Error::msg)?;
        return Ok(Store::Remote(
            Remote::connect(agent, &ctx.link(agent)).await?,
        ));
    }
    Name::parse("agent name", agent)?;
    let master = ctx.master(&format!("cannot find agent '{agent}'"))?;
    Ok(Store::Remote(Remote::find(agent, &master).await?))
}

/// Opens the embedded store in `data_dir`, with its settings from `config` (default:
/// `config.toml` in the data directory); `agent` is the name its events record.
pub(crate) async fn open_local(
    data_dir: &Path,
    config: Option<&Path>,
    agent: &str,
) -> anyhow::Result<Engine> {
    open_engine(data_dir, local_config(data_dir, config, agent)?).await
}

/// Opens the embedded store in `data_dir` with `config` (see [`local_config`]).
async fn open_engine(data_dir: &Path, mut config: EngineConfig) -> anyhow::Result<Engine> {
    // The embedded store serves one process at a time (sled's lock): commands started
    // together on `local` take turns instead of failing, up to this long.
    config.cas.lock_wait = LOCK_WAIT;
    Ok(Engine::open(data_dir, config).await?)
}

/// The embedded store's settings: `config` (default: `config.toml` in the data directory)
/// applied to the defaults, `agent` the name its events record.
fn local_config(
    data_dir: &Path,
    config: Option<&Path>,
    agent: &str,
) -> anyhow::Result<EngineConfig> {
    if data_dir.exists() && !data_dir.is_dir() {
        bail!(
            "data directory '{}' is not usable: it is not a directory",
            data_dir.display()
        );
    }
    let file = match config {
        Some(path) => StoreConfigFile::load_from(path)?,
        None => StoreConfigFile::load(data_dir)?,
    };
    Ok(file.apply(EngineConfig {
        agent: agent.into(),
        ..EngineConfig::default()
    })?)
}

/// What `list`, `show` and `events list` read: on `local`, `metadata.db` when it provably
/// holds the whole catalog (then neither opening the store nor waiting for another process's
/// lock on it is needed), else the store `open` gives.
#[derive(Debug)]
pub(crate) enum Catalog {
    /// With what opening the embedded store needs, should the file fail to answer.
    Projected {
        catalog: ProjectedCatalog,
        data_dir: PathBuf,
        config: EngineConfig,
    },
    Store(Store),
}

/// The catalog of `agent` for reading (see [`Catalog`]).
pub(crate) async fn open_catalog(agent: &str, ctx: &Context) -> anyhow::Result<Catalog> {
    if agent == LOCAL {
        // The settings are read once: the layout setting decides whether the file can answer,
        // and the store is opened with them when it cannot.
        let config = local_config(&ctx.data_dir, None, LOCAL)?;
        return Ok(match ProjectedCatalog::open(&ctx.data_dir, config.layout) {
            Some(catalog) => Catalog::Projected {
                catalog,
                data_dir: ctx.data_dir.clone(),
                config,
            },
            None => Catalog::Store(Store::Local(open_engine(&ctx.data_dir, config).await?)),
        });
    }
    Ok(Catalog::Store(open(agent, ctx).await?))
}

impl Catalog {
    /// `answer` from the file, or, when the file cannot answer, `ask` the embedded store.
    async fn answer<T>(
        &self,
        answer: impl FnOnce(&ProjectedCatalog) -> sloth_engine::Result<T>,
        ask: impl AsyncFnOnce(&Store) -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        let (catalog, data_dir, config) = match self {
            Catalog::Projected {
                catalog,
                data_dir,
                config,
            } => (catalog, data_dir, config),
            Catalog::Store(store) => return ask(store).await,
        };
        match answer(catalog) {
            Err(e) if ProjectedCatalog::cannot_answer(&e) => {
                tracing::debug!("metadata.db cannot answer, opening the store: {e}");
                let store = Store::Local(open_engine(data_dir, config.clone()).await?);
                ask(&store).await
            }
            answered => Ok(answered?),
        }
    }

    /// See [`Store::events`].
    pub(crate) async fn events(
        &self,
        kind: Option<&str>,
        limit: Option<usize>,
    ) -> anyhow::Result<Vec<Event>> {
        self.answer(
            |catalog| catalog.events(kind, limit),
            async |store| store.events(kind, limit).await,
        )
        .await
    }

    /// See [`Store::list`].
    pub(crate) async fn list(&self, query: &ListQuery) -> anyhow::Result<Vec<Listed>> {
        self.answer(
            |catalog| Ok(listed(catalog.list(query)?, |r| catalog.layout_path(r))),
            async |store| store.list(query).await,
        )
        .await
    }

    /// See [`Store::show`].
    pub(crate) async fn show(&self, selector: &Selector) -> anyhow::Result<Shown> {
        self.answer(
            |catalog| {
                let record = catalog.resolve(selector)?;
                let (count, newest) = catalog.version_figures(&record.key()?)?;
                Ok(shown(record, count, newest, |r| catalog.layout_path(r)))
            },
            async |store| store.show(selector).await,
        )
        .await
    }
}

/// Records as `list` shows them: each with its layout path (from `layout_path`) when it is in
/// the layout.
fn listed(
    records: Vec<ArtifactRecord>,
    layout_path: impl Fn(&ArtifactRecord) -> Option<PathBuf>,
) -> Vec<Listed> {
    // Only the newest version of each artifact is in the layout; with every version listed, a
    // newer version of a listed record is more recent, so listed too.
    let mut newest: HashMap<(&str, &str, &str), u32> = HashMap::new();
    for r in &records {
        let v = newest.entry((&r.stack, &r.task, &r.name)).or_default();
        *v = (*v).max(r.version);
    }
    let paths: Vec<Option<String>> = records
        .iter()
        .map(|r| {
            layout_path(r)
                .filter(|_| newest.get(&(&*r.stack, &*r.task, &*r.name)) == Some(&r.version))
                .map(|p| p.display().to_string())
        })
        .collect();
    records
        .into_iter()
        .zip(paths)
        .map(|(record, layout_path)| Listed {
            record,
            layout_path,
        })
        .collect()
}

/// What `show` prints about `record`, one of `count` versions of which `newest` is the newest.
fn shown(
    record: ArtifactRecord,
    count: u32,
    newest: u32,
    layout_path: impl Fn(&ArtifactRecord) -> Option<PathBuf>,
) -> Shown {
    let path = layout_path(&record);
    Shown {
        layout_enabled: path.is_some(),
        artifact: Listed {
            layout_path: path
                .filter(|_| record.version == newest)
                .map(|p| p.display().to_string()),
            record,
        },
        newest_version: newest,
        version_count: count,
    }
}

/// The data directory: `--data-dir` / `SLOTH_RUNNER_DATA_DIR` when given, else
/// `/var/lib/sloth-runner` for root, else `$XDG_DATA_HOME/sloth-runner`, else
/// `~/.local/share/sloth-runner`.
pub(crate) fn data_dir(given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(dir) = given {
        if dir.as_os_str().is_empty() {
            bail!("--data-dir must not be empty");
        }
        return Ok(dir);
    }
    if effective_uid() == Some(0) {
        return Ok(PathBuf::from("/var/lib/sloth-runner"));
    }
    // The XDG spec says a relative $XDG_DATA_HOME is invalid and must be ignored.
    if let Some(xdg) = std::env::var_os("XDG_DATA_HOME").map(PathBuf::from)
        && xdg.is_absolute()
    {
        return Ok(xdg.join("sloth-runner"));
    }
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .context("cannot choose a data directory: HOME is not set; pass --data-dir or set SLOTH_RUNNER_DATA_DIR")?;
    Ok(PathBuf::from(home).join(".local/share/sloth-runner"))
}

/// Who is recorded in events: `$USER`, else `$LOGNAME`, else `uid <n>`.
pub(crate) fn principal() -> String {
    ["USER", "LOGNAME"]
        .into_iter()
        .filter_map(|var| std::env::var(var).ok())
        .find(|name| !name.is_empty())
        .or_else(|| effective_uid().map(|uid| format!("uid {uid}")))
        .unwrap_or_else(|| "unknown".into())
}

/// The effective uid, read from the owner of `/proc/self` (Linux) to stay free of `unsafe`
/// and of libc bindings.
fn effective_uid() -> Option<u32> {
    std::fs::metadata("/proc/self").ok().map(|m| m.uid())
}

impl Store {
    /// Artifacts as `list` shows them, each with its layout path when it has one.
    pub(crate) async fn list(&self, query: &ListQuery) -> anyhow::Result<Vec<Listed>> {
        match self {
            Store::Local(engine) => Ok(listed(engine.list(query)?, |r| engine.layout_path(r))),
            Store::Remote(remote) => Ok(remote.list(query).await?),
        }
    }

    /// The version `selector` means, its newest sibling and its layout path.
    pub(crate) async fn show(&self, selector: &Selector) -> anyhow::Result<Shown> {
        match self {
            Store::Local(engine) => {
                let record = engine.resolve(selector)?;
                let versions = engine.versions(&record.key()?)?;
                let newest = versions.last().map_or(record.version, |r| r.version);
                Ok(shown(record, versions.len() as u32, newest, |r| {
                    engine.layout_path(r)
                }))
            }
            Store::Remote(remote) => Ok(remote.show(selector).await?),
        }
    }

    pub(crate) async fn delete(&self, selector: &Selector) -> anyhow::Result<Vec<ArtifactRecord>> {
        match self {
            Store::Local(engine) => Ok(engine.delete(selector, &principal()).await?),
            Store::Remote(remote) => Ok(remote.delete(selector).await?),
        }
    }

    pub(crate) async fn events(
        &self,
        kind: Option<&str>,
        limit: Option<usize>,
    ) -> anyhow::Result<Vec<Event>> {
        match self {
            Store::Local(engine) => Ok(engine.events(kind, limit)?),
            Store::Remote(remote) => Ok(remote.events(kind, limit).await?),
        }
    }

    /// Uploads what `reader` yields as a new version of `key`; `file`, another handle to the
    /// file `reader` reads, lets a remote upload hash the content only when the agent lacks
    /// some of it (see `Remote::upload_rereadable`).
    pub(crate) async fn upload<R: std::io::Read + Send + 'static>(
        &self,
        key: &ArtifactKey,
        reader: R,
        file: std::fs::File,
    ) -> anyhow::Result<ArtifactRecord> {
        match self {
            Store::Local(engine) => Ok(engine.upload(key, reader, &principal()).await?),
            Store::Remote(remote) => Ok(remote
                .upload_rereadable(key, reader, Some(file), None)
                .await?
                .record),
        }
    }

    /// Downloads `record` to `target`, verified; returns the path written.
    pub(crate) async fn download(
        &self,
        record: &ArtifactRecord,
        target: &Path,
        progress: Option<Progress>,
    ) -> anyhow::Result<PathBuf> {
        match self {
            Store::Local(engine) => Ok(engine.download_to(record, target, &principal()).await?),
            Store::Remote(remote) => {
                let exact = Selector {
                    name: record.name.clone(),
                    stack: Some(record.stack.clone()),
                    task: Some(record.task.clone()),
                    version: Some(record.version),
                };
                Ok(remote.download(&exact, target, progress).await?.path)
            }
        }
    }
}
