//! Workflow runs on the agent: the `Workflows` service, and the conversions between the
//! runner's events and their wire form that both sides use.
//!
//! A run executes on a thread of its own (Lua code and the script's blocking file work must
//! not hold up the agent's async workers) and sends its events into a bounded channel that
//! the response stream drains. A client that goes away cancels the run: the run's future is
//! dropped, which kills its commands' process groups.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sloth_engine::Engine;
use sloth_lua::{
    Level, Outcome, RunEvent, RunOptions, RunReport, Script, ScriptEnv, StoredArtifact, Stream,
    TaskReport,
};
use sloth_proto::workflows::{self as wf, run_event::Event as WireEvent, workflows_server};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::auth::principal;
use crate::retention::WorkflowRules;

/// Largest script the agent accepts.
pub const MAX_SCRIPT: usize = 1 << 20;
/// Largest `values` document.
pub const MAX_VALUES: usize = 1 << 20;
/// Workflow runs at once on one agent; more are refused with `RESOURCE_EXHAUSTED`.
pub const MAX_RUNS: usize = 4;
/// Events buffered for a slow client before the run waits for it.
const EVENT_BUFFER: usize = 1024;

pub(crate) struct WorkflowsService {
    pub(crate) engine: Arc<Engine>,
    pub(crate) runs: Arc<Semaphore>,
    pub(crate) work_root: PathBuf,
    pub(crate) retention: Arc<WorkflowRules>,
}

impl WorkflowsService {
    pub(crate) fn new(engine: Arc<Engine>, retention: Arc<WorkflowRules>) -> Self {
        Self {
            work_root: engine.data_dir().join("runs"),
            engine,
            runs: Arc::new(Semaphore::new(MAX_RUNS)),
            retention,
        }
    }
}

type EventStream = ReceiverStream<Result<wf::RunEvent, Status>>;

#[tonic::async_trait]
impl workflows_server::Workflows for WorkflowsService {
    type RunStream = EventStream;

    async fn run(
        &self,
        request: Request<wf::RunRequest>,
    ) -> Result<Response<Self::RunStream>, Status> {
        let principal = principal(&request);
        let r = request.into_inner();
        if r.script.len() > MAX_SCRIPT {
            return Err(Status::invalid_argument(format!(
                "the script is {} bytes; at most {MAX_SCRIPT} are accepted",
                r.script.len()
            )));
        }
        if r.values_json.len() > MAX_VALUES {
            return Err(Status::invalid_argument(format!(
                "the values are {} bytes; at most {MAX_VALUES} are accepted",
                r.values_json.len()
            )));
        }
        let values = if r.values_json.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_str(&r.values_json)
                .map_err(|e| Status::invalid_argument(format!("values are not valid JSON: {e}")))?
        };
        let permit = Arc::clone(&self.runs).try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "this agent already runs {MAX_RUNS} workflows; try again when one has finished"
            ))
        })?;
        let (tx, rx) = mpsc::channel(EVENT_BUFFER);
        let (ready_tx, ready_rx) = oneshot::channel::<Result<(), Status>>();
        let engine = Arc::clone(&self.engine);
        let retention = Arc::clone(&self.retention);
        let work_root = self.work_root.clone();
        let handle = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let events = tx.clone();
            // What the script logs while it loads is held back until the stream exists (the
            // channel could fill before anyone reads it).
            let early = Arc::new(std::sync::Mutex::new(Some(Vec::new())));
            let held = Arc::clone(&early);
            let sink: sloth_lua::Sink = Arc::new(move |event| {
                let wire = event_to_wire(event);
                if let Some(held) = held.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
                    held.push(wire);
                    return;
                }
                // A client gone away closes the channel; the run notices below and stops.
                // (The run's thread waits here while the client is slow: backpressure. It is
                // inside the runtime's `block_on`, where tokio's `blocking_send` may not be
                // used, so the send is driven by a plain executor.)
                let _ = futures::executor::block_on(events.send(Ok(wire)));
            });
            let env = ScriptEnv {
                base_dir: work_root.clone(),
                values,
                sink,
            };
            let loaded = Script::load(&r.script, &r.file_name, env)
                .and_then(|script| script.plan(&r.workflow).map(|plan| (script, plan)));
            let (script, plan) = match loaded {
                Ok(loaded) => {
                    let _ = ready_tx.send(Ok(()));
                    let held = early.lock().unwrap_or_else(|e| e.into_inner()).take();
                    for wire in held.unwrap_or_default() {
                        let _ = futures::executor::block_on(tx.send(Ok(wire)));
                    }
                    loaded
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(Status::invalid_argument(e.to_string())));
                    return;
                }
            };
            let options = RunOptions {
                stack: r.stack,
                work_root,
                principal: format!("{principal} via workflow {}", plan.workflow()),
                keep_workdirs: r.keep_workdirs,
                max_parallel: match r.max_parallel {
                    0 => 4,
                    n => n.min(256) as usize,
                },
            };
            handle.block_on(async {
                let report = tokio::select! {
                    report = script.run(&plan, engine.as_ref(), &options) => report,
                    () = tx.closed() => {
                        tracing::info!("workflow {} cancelled: the client went away", plan.workflow());
                        return;
                    }
                };
                let report = match report {
                    Ok(report) => report,
                    Err(e) => {
                        let _ = tx.send(Err(Status::failed_precondition(e.to_string()))).await;
                        return;
                    }
                };
                if report.succeeded()
                    && let Some(older_than) = &plan.config().artifact_retention
                {
                    let message = retention.apply(&report.stack, older_than).await;
                    let _ = tx
                        .send(Ok(event_to_wire(RunEvent::Log {
                            task: None,
                            level: if message.is_ok() { Level::Info } else { Level::Warn },
                            message: message.unwrap_or_else(|e| e),
                        })))
                        .await;
                }
                let _ = tx
                    .send(Ok(wf::RunEvent {
                        event: Some(WireEvent::Finished(report_to_wire(&report))),
                    }))
                    .await;
            });
        });
        match ready_rx.await {
            Ok(Ok(())) => Ok(Response::new(ReceiverStream::new(rx))),
            Ok(Err(status)) => Err(status),
            Err(_) => Err(Status::internal("the workflow run ended before it started")),
        }
    }
}

fn level_to_wire(level: Level) -> wf::Level {
    match level {
        Level::Debug => wf::Level::Debug,
        Level::Info => wf::Level::Info,
        Level::Warn => wf::Level::Warn,
        Level::Error => wf::Level::Error,
    }
}

fn outcome_to_wire(outcome: Outcome) -> wf::Outcome {
    match outcome {
        Outcome::Succeeded => wf::Outcome::Succeeded,
        Outcome::Failed => wf::Outcome::Failed,
        Outcome::Skipped => wf::Outcome::Skipped,
    }
}

fn outcome_from_wire(value: i32) -> Outcome {
    match wf::Outcome::try_from(value) {
        Ok(wf::Outcome::Succeeded) => Outcome::Succeeded,
        Ok(wf::Outcome::Skipped) => Outcome::Skipped,
        // An unknown outcome is not a success.
        _ => Outcome::Failed,
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn stored_to_wire(a: &StoredArtifact) -> wf::Stored {
    wf::Stored {
        name: a.name.clone(),
        stack: a.stack.clone(),
        task: a.task.clone(),
        version: a.version,
        size: a.size,
        checksum: a.checksum.clone(),
    }
}

fn stored_from_wire(s: wf::Stored) -> StoredArtifact {
    StoredArtifact {
        name: s.name,
        stack: s.stack,
        task: s.task,
        version: s.version,
        size: s.size,
        checksum: s.checksum,
    }
}

pub(crate) fn event_to_wire(event: RunEvent) -> wf::RunEvent {
    let event = match event {
        RunEvent::RunStarted {
            workflow,
            stack,
            run_id,
            tasks,
        } => WireEvent::Started(wf::RunStarted {
            workflow,
            stack,
            run_id,
            tasks,
        }),
        RunEvent::TaskStarted {
            task,
            attempt,
            attempts,
        } => WireEvent::TaskStarted(wf::TaskStarted {
            task,
            attempt,
            attempts,
        }),
        RunEvent::Log {
            task,
            level,
            message,
        } => WireEvent::Log(wf::Log {
            task,
            level: level_to_wire(level).into(),
            message,
        }),
        RunEvent::Output { task, stream, line } => WireEvent::Output(wf::Output {
            task,
            stderr: stream == Stream::Stderr,
            line,
        }),
        RunEvent::ArtifactConsumed {
            task,
            name,
            version,
            size,
            from_task,
        } => WireEvent::Consumed(wf::Consumed {
            task,
            name,
            version,
            size,
            from_task,
        }),
        RunEvent::ArtifactStored(a) => WireEvent::Stored(stored_to_wire(&a)),
        RunEvent::TaskFinished {
            task,
            outcome,
            message,
            elapsed,
        } => WireEvent::TaskFinished(wf::TaskFinished {
            task,
            outcome: outcome_to_wire(outcome).into(),
            message,
            elapsed_ms: millis(elapsed),
        }),
    };
    wf::RunEvent { event: Some(event) }
}

/// A streamed event back as the runner's, or the final report.
pub(crate) enum Received {
    Event(RunEvent),
    Finished(RunReport),
}

pub(crate) fn event_from_wire(event: wf::RunEvent) -> Option<Received> {
    let event = match event.event? {
        WireEvent::Started(s) => RunEvent::RunStarted {
            workflow: s.workflow,
            stack: s.stack,
            run_id: s.run_id,
            tasks: s.tasks,
        },
        WireEvent::TaskStarted(t) => RunEvent::TaskStarted {
            task: t.task,
            attempt: t.attempt,
            attempts: t.attempts,
        },
        WireEvent::Log(l) => RunEvent::Log {
            task: l.task,
            level: match wf::Level::try_from(l.level) {
                Ok(wf::Level::Debug) => Level::Debug,
                Ok(wf::Level::Warn) => Level::Warn,
                Ok(wf::Level::Error) => Level::Error,
                _ => Level::Info,
            },
            message: l.message,
        },
        WireEvent::Output(o) => RunEvent::Output {
            task: o.task,
            stream: if o.stderr {
                Stream::Stderr
            } else {
                Stream::Stdout
            },
            line: o.line,
        },
        WireEvent::Consumed(c) => RunEvent::ArtifactConsumed {
            task: c.task,
            name: c.name,
            version: c.version,
            size: c.size,
            from_task: c.from_task,
        },
        WireEvent::Stored(s) => RunEvent::ArtifactStored(stored_from_wire(s)),
        WireEvent::TaskFinished(t) => RunEvent::TaskFinished {
            task: t.task,
            outcome: outcome_from_wire(t.outcome),
            message: t.message,
            elapsed: Duration::from_millis(t.elapsed_ms),
        },
        WireEvent::Finished(f) => return Some(Received::Finished(report_from_wire(f))),
    };
    Some(Received::Event(event))
}

fn report_to_wire(report: &RunReport) -> wf::Finished {
    wf::Finished {
        workflow: report.workflow.clone(),
        stack: report.stack.clone(),
        run_id: report.run_id.clone(),
        tasks: report
            .tasks
            .iter()
            .map(|t| wf::TaskReport {
                name: t.name.clone(),
                outcome: outcome_to_wire(t.outcome).into(),
                message: t.message.clone(),
                elapsed_ms: millis(t.elapsed),
                artifacts: t.artifacts.iter().map(stored_to_wire).collect(),
            })
            .collect(),
        elapsed_ms: millis(report.elapsed),
        kept_workdirs: report
            .kept_workdirs
            .as_ref()
            .map(|p| p.display().to_string()),
    }
}

fn report_from_wire(f: wf::Finished) -> RunReport {
    RunReport {
        workflow: f.workflow,
        stack: f.stack,
        run_id: f.run_id,
        tasks: f
            .tasks
            .into_iter()
            .map(|t| TaskReport {
                name: t.name,
                outcome: outcome_from_wire(t.outcome),
                message: t.message,
                elapsed: Duration::from_millis(t.elapsed_ms),
                artifacts: t.artifacts.into_iter().map(stored_from_wire).collect(),
            })
            .collect(),
        elapsed: Duration::from_millis(f.elapsed_ms),
        kept_workdirs: f.kept_workdirs.map(PathBuf::from),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_survive_the_wire() {
        let events = [
            RunEvent::RunStarted {
                workflow: "ci".into(),
                stack: "s".into(),
                run_id: "1-a".into(),
                tasks: vec!["a".into(), "b".into()],
            },
            RunEvent::Log {
                task: None,
                level: Level::Warn,
                message: "m".into(),
            },
            RunEvent::Output {
                task: Some("a".into()),
                stream: Stream::Stderr,
                line: "l".into(),
            },
            RunEvent::TaskFinished {
                task: "a".into(),
                outcome: Outcome::Skipped,
                message: "x".into(),
                elapsed: Duration::from_millis(1500),
            },
        ];
        for event in events {
            match event_from_wire(event_to_wire(event.clone())) {
                Some(Received::Event(back)) => assert_eq!(back, event),
                _ => panic!("event lost"),
            }
        }
    }
}
