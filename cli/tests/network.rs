//! The CLI against real `sloth-runner master` and `agent` processes on loopback: the spec's
//! commands by agent name, transfers that move only missing chunks, tokens and TLS.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

mod common;

use common::{BIN, sloth};

/// A server process, stopped with SIGTERM when dropped.
struct Server {
    child: Child,
    addr: String,
    metrics: Option<String>,
    log: PathBuf,
}

impl Server {
    /// Starts `sloth-runner ARGS` and waits for its "listening on" line.
    fn start(dir: &Path, log_name: &str, args: &[&str]) -> Server {
        let log = dir.join(log_name);
        let mut child = sloth()
            .args(args)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let (mut addr, mut metrics) = (None, None);
        while addr.is_none() {
            let mut line = String::new();
            if stdout.read_line(&mut line).unwrap() == 0 {
                let _ = child.wait();
                panic!(
                    "{args:?} exited before listening: {}",
                    std::fs::read_to_string(&log).unwrap()
                );
            }
            if let Some(rest) = line.split("Metrics on http://").nth(1) {
                metrics = Some(rest.trim().trim_end_matches("/metrics").to_owned());
            }
            if let Some(rest) = line.split("listening on ").nth(1) {
                addr = Some(rest.split([' ', '\n']).next().unwrap().to_owned());
            }
        }
        // Later lines (metrics, registration) are read in the background so the pipe never
        // fills; the metrics line comes right after the listening line.
        let mut rest = String::new();
        if metrics.is_none() && args.contains(&"--metrics-port") {
            stdout.read_line(&mut rest).unwrap();
            metrics = rest
                .split("Metrics on http://")
                .nth(1)
                .map(|r| r.trim().trim_end_matches("/metrics").to_owned());
        }
        std::thread::spawn(move || {
            let mut sink = Vec::new();
            let _ = stdout.read_to_end(&mut sink);
        });
        Server {
            child,
            addr: addr.unwrap(),
            metrics,
            log,
        }
    }

    /// One counter from the agent's metrics endpoint.
    fn metric(&self, name: &str) -> u64 {
        let addr = self.metrics.as_ref().expect("started with --metrics-port");
        let mut conn = std::net::TcpStream::connect(addr).unwrap();
        write!(conn, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
        let mut text = String::new();
        conn.read_to_string(&mut text).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} in {text}"))
            .parse()
            .unwrap()
    }

    fn stop(mut self) -> String {
        self.terminate();
        std::fs::read_to_string(&self.log).unwrap()
    }

    fn terminate(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.terminate();
    }
}

/// A scratch directory with a master and helpers to run the CLI against it.
struct Net {
    dir: tempfile::TempDir,
}

impl Net {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn master(&self, extra: &[&str]) -> Server {
        let mut args = vec!["master", "start", "--port", "0"];
        args.extend_from_slice(extra);
        Server::start(self.dir.path(), "master.log", &args)
    }

    fn agent(&self, name: &str, master: Option<&Server>, extra: &[&str]) -> Server {
        let data = self.path(&format!("{name}-data"));
        let mut args = vec![
            "--data-dir",
            data.to_str().unwrap(),
            "agent",
            "start",
            "--name",
            name,
            "--port",
            "0",
            "--heartbeat",
            "1",
        ];
        if let Some(master) = master {
            args.extend(["--master", master.addr.as_str()]);
        }
        args.extend_from_slice(extra);
        Server::start(self.dir.path(), &format!("{name}.log"), &args)
    }

    /// An agent that requires tokens: each grant is (token, scopes, principal).
    fn agent_with_tokens(&self, name: &str, grants: &[(&str, &str, &str)]) -> Server {
        let tokens = self.path("tokens");
        let lines: String = grants
            .iter()
            .map(|(token, scopes, principal)| token_line(token, scopes, principal))
            .collect();
        std::fs::write(&tokens, lines).unwrap();
        self.agent(name, None, &["--tokens", tokens.to_str().unwrap()])
    }

    fn cli(&self, args: &[&str], input: &str) -> Output {
        let mut child = sloth()
            .arg("--data-dir")
            .arg(self.path("client-data"))
            .args(args)
            .current_dir(self.dir.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args, "");
        assert!(
            out.status.success(),
            "{args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn fails(&self, args: &[&str]) -> String {
        let out = self.cli(args, "");
        assert!(!out.status.success(), "{args:?} succeeded");
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        String::from_utf8(out.stderr).unwrap()
    }

    fn write_random(&self, name: &str, len: usize, seed: u8) -> Vec<u8> {
        // xorshift: incompressible, deterministic, fast enough for hundreds of MiB.
        let mut state = 0x9E37_79B9_7F4A_7C15_u64 ^ u64::from(seed);
        let mut data = Vec::with_capacity(len + 8);
        while data.len() < len {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            data.extend_from_slice(&state.to_le_bytes());
        }
        data.truncate(len);
        std::fs::write(self.path(name), &data).unwrap();
        data
    }
}

#[test]
fn spec_commands_work_against_agents_found_through_the_master() {
    let net = Net::new();
    let master = net.master(&[]);
    let build = net.agent("build-agent", Some(&master), &[]);
    let deploy = net.agent("deploy-agent", Some(&master), &[]);
    let m = ["--master", master.addr.as_str()];
    let with =
        |args: &[&str]| -> Vec<String> { m.iter().chain(args).map(|s| s.to_string()).collect() };
    let ok = |args: &[&str]| {
        let args = with(args);
        net.ok(&args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let fails = |args: &[&str]| {
        let args = with(args);
        net.fails(&args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let data = net.write_random("app.bin", 3_000_000, 1);

    // Both agents register within a heartbeat or two.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let listed = ok(&["agent", "list"]);
        if listed.matches(" active ").count() == 2 {
            assert!(listed.contains("build-agent") && listed.contains("deploy-agent"));
            assert!(listed.ends_with("ℹ Total: 2 agents\n"), "{listed}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{listed}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }

    let up = ok(&[
        "agent",
        "artifacts",
        "upload",
        "build-agent",
        "app.bin",
        "--stack",
        "production",
        "--task",
        "build",
    ]);
    assert_eq!(
        up,
        "ℹ Uploading 'app.bin' to agent 'build-agent' as 'app.bin'...\n✓ Uploaded app.bin (3.0 MB)\n"
    );
    let list = ok(&[
        "agent",
        "artifacts",
        "list",
        "build-agent",
        "--stack",
        "production",
    ]);
    let lines: Vec<&str> = list.lines().collect();
    assert_eq!(lines[0], "📦 Artifacts on agent: build-agent 📦");
    assert!(
        lines[2].starts_with("Name  ") && lines[2].ends_with("Task"),
        "{list}"
    );
    assert!(lines[4].starts_with("app.bin ") && lines[4].contains(" production "));
    assert_eq!(*lines.last().unwrap(), "ℹ Total: 1 artifact");

    let show = ok(&["agent", "artifacts", "show", "build-agent", "app.bin"]);
    let expected_path = net.path("build-agent-data/artifacts/production/build/app.bin");
    assert!(
        show.contains(&format!("Path:       {}\n", expected_path.display())),
        "{show}"
    );
    assert!(show.contains("Downloads:  0\n"));
    assert_eq!(
        std::fs::read(&expected_path).unwrap(),
        data,
        "the agent's layout"
    );

    // Spec use case 5: download from the source agent, upload to the target, verify.
    let down = ok(&[
        "agent",
        "artifacts",
        "download",
        "build-agent",
        "app.bin",
        "--output",
        "tmp/app.bin",
    ]);
    assert!(
        down.ends_with("✓ Downloaded app.bin to 'tmp/app.bin' (3.0 MB)\n"),
        "{down}"
    );
    assert_eq!(std::fs::read(net.path("tmp/app.bin")).unwrap(), data);
    ok(&[
        "agent",
        "artifacts",
        "upload",
        "deploy-agent",
        "tmp/app.bin",
        "--stack",
        "production",
        "--task",
        "deploy",
    ]);
    let shown = ok(&["agent", "artifacts", "show", "deploy-agent", "app.bin"]);
    assert!(shown.contains("Task:       deploy\n"), "{shown}");
    assert!(
        show.contains(
            &shown
                .lines()
                .find(|l| l.starts_with("Checksum"))
                .unwrap()
                .to_string()
        )
    );

    // Copy: the content is already on deploy-agent (under another task), so nothing travels.
    let copied = ok(&[
        "agent",
        "artifacts",
        "copy",
        "build-agent",
        "deploy-agent",
        "app.bin",
    ]);
    assert!(copied.contains(": 0 of "), "{copied}");
    assert!(copied.contains("chunks sent, 0 B\n"), "{copied}");
    // The source counts the copy as a download (the one above, and this).
    let source = ok(&["agent", "artifacts", "show", "build-agent", "app.bin"]);
    assert!(source.contains("Downloads:  2\n"), "{source}");
    let ambiguous = fails(&["agent", "artifacts", "show", "deploy-agent", "app.bin"]);
    assert!(
        ambiguous.contains("--stack production --task build"),
        "{ambiguous}"
    );

    // Several downloads at once into one directory.
    net.write_random("lib.so", 500_000, 2);
    ok(&["agent", "artifacts", "upload", "build-agent", "lib.so"]);
    let both = ok(&[
        "agent",
        "artifacts",
        "download",
        "build-agent",
        "app.bin",
        "lib.so",
        "-o",
        "many",
    ]);
    assert_eq!(both.matches("✓ Downloaded").count(), 2, "{both}");
    assert_eq!(std::fs::read(net.path("many/app.bin")).unwrap(), data);

    let events = ok(&[
        "events",
        "list",
        "--agent",
        "build-agent",
        "--type",
        "artifact.*",
    ]);
    assert!(events.contains("artifact.upload") && events.contains("artifact.download"));
    assert!(events.contains("tester (unverified)"), "{events}");

    let deleted = net.cli(
        &with(&["agent", "artifacts", "delete", "build-agent", "lib.so"])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        "y\n",
    );
    assert!(
        String::from_utf8_lossy(&deleted.stdout)
            .ends_with("✓ Deleted artifact 'lib.so' from agent 'build-agent'\n")
    );
    let gone = fails(&["agent", "artifacts", "show", "build-agent", "lib.so"]);
    assert_eq!(gone, "error: artifact 'lib.so' not found\n");

    let details = ok(&["agent", "get", "build-agent"]);
    assert!(
        details.contains(&format!("Address:     {}\n", build.addr)),
        "{details}"
    );
    assert!(details.contains("Status:      active\n"));

    // Agents by address, and the ones that cannot be reached.
    let direct = net.ok(&["agent", "artifacts", "list", &deploy.addr]);
    assert!(direct.contains("ℹ Total: 2 artifacts"), "{direct}");
    let unknown = fails(&["agent", "artifacts", "list", "nope"]);
    assert!(
        unknown.contains("agent 'nope' is not registered with the master"),
        "{unknown}"
    );
    let closed = net.fails(&["agent", "artifacts", "list", "127.0.0.1:1"]);
    assert!(closed.contains("is not reachable"), "{closed}");

    // Cleanup runs on the agent: a dry run lists, then the built-in deletes.
    let dry = ok(&[
        "agent",
        "artifacts",
        "cleanup",
        "build-agent",
        "--older-than",
        "0d",
        "--dry-run",
    ]);
    assert!(
        dry.starts_with("ℹ Dry run: policy 'older-than' would delete 1 artifact of 1"),
        "{dry}"
    );
    let cleaned = ok(&[
        "agent",
        "artifacts",
        "cleanup",
        "build-agent",
        "--older-than",
        "0d",
    ]);
    assert!(
        cleaned.starts_with("✓ Deleted 1 artifact, freed "),
        "{cleaned}"
    );
    let empty = ok(&["agent", "artifacts", "list", "build-agent"]);
    assert!(empty.ends_with("ℹ Total: 0 artifacts\n"), "{empty}");

    // A policy that traps on the agent: an error naming it, nothing deleted, the agent serves on.
    let trap = wat::parse_str(
        r#"(module
            (@custom "sloth.policy" "{\"name\":\"trapper\",\"version\":\"0\",\"description\":\"t\",\"params\":{}}")
            (memory (export "memory") 1)
            (func (export "policy_alloc") (param i32) (result i32) (i32.const 1024))
            (func (export "policy_evaluate") (param i32 i32) (result i64) unreachable))"#,
    )
    .unwrap();
    std::fs::write(net.path("trap.wasm"), trap).unwrap();
    std::fs::write(net.path("again.bin"), b"kept").unwrap();
    ok(&["agent", "artifacts", "upload", "build-agent", "again.bin"]);
    let trapped = fails(&[
        "agent",
        "artifacts",
        "cleanup",
        "build-agent",
        "--policy",
        "trap.wasm",
    ]);
    assert!(
        trapped.contains("policy 'trapper' failed: trapped"),
        "{trapped}"
    );
    let still = ok(&["agent", "artifacts", "list", "build-agent"]);
    assert!(still.ends_with("ℹ Total: 1 artifact\n"), "{still}");

    // Graceful stop.
    let log = build.stop();
    assert!(log.contains("shutting down"), "{log}");
}

#[test]
fn reupload_and_resumed_upload_send_only_what_is_missing() {
    let net = Net::new();
    let agent = net.agent("store", None, &["--metrics-port", "0"]);
    let a = agent.addr.clone();
    const SIZE: usize = 256 << 20;
    net.write_random("big.bin", SIZE, 3);
    net.ok(&["agent", "artifacts", "upload", &a, "big.bin"]);
    let before = agent.metric("sloth_wire_bytes_received_total");
    assert!(before as usize > SIZE, "the first upload sent it all");
    net.ok(&["agent", "artifacts", "upload", &a, "big.bin"]);
    let again = agent.metric("sloth_wire_bytes_received_total") - before;
    assert!(
        (again as usize) < SIZE / 100,
        "re-upload sent {again} bytes of {SIZE}"
    );

    // Another file, its upload killed once about a third has arrived.
    let other = net.write_random("other.bin", SIZE, 4);
    let start = agent.metric("sloth_frame_bytes_received_total");
    let mut child = Command::new(BIN)
        .args(["--data-dir"])
        .arg(net.path("client-data"))
        .args(["agent", "artifacts", "upload", &a, "other.bin"])
        .current_dir(net.dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    loop {
        if agent.metric("sloth_frame_bytes_received_total") - start > (SIZE / 3) as u64 {
            break;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "finished before it could be killed"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let listed = net.ok(&["agent", "artifacts", "list", &a]);
    assert!(
        !listed.contains("other.bin"),
        "nothing half-uploaded is visible: {listed}"
    );
    let first = agent.metric("sloth_frame_bytes_received_total") - start;
    let wire_before = agent.metric("sloth_wire_bytes_received_total");
    net.ok(&["agent", "artifacts", "upload", &a, "other.bin"]);
    let resumed = agent.metric("sloth_wire_bytes_received_total") - wire_before;
    // Its layout object was named before its bytes were synced, and is listed until they are
    // (the agent's first periodic sync comes 30 s after its start).
    let listed = std::fs::read_to_string(net.path("store-data/objects/.unsynced")).unwrap();
    assert!(listed.lines().count() >= 2, "{listed}");
    let rest = SIZE as u64 - first.min(SIZE as u64);
    assert!(
        resumed < rest + (SIZE / 100) as u64,
        "the retry sent {resumed} bytes; {rest} were missing"
    );
    net.ok(&[
        "agent",
        "artifacts",
        "download",
        &a,
        "other.bin",
        "-o",
        "back/",
    ]);
    assert!(std::fs::read(net.path("back/other.bin")).unwrap() == other);

    // The layout's objects the uploads named before their bytes were synced are synced when
    // the agent stops (see engine/src/layout.rs).
    agent.stop();
    assert!(
        !net.path("store-data/objects/.unsynced").exists(),
        "a stopped agent left layout objects unsynced"
    );
}

fn token_line(token: &str, scopes: &str, principal: &str) -> String {
    use sha2::Digest as _;
    format!(
        "{}  {scopes}  {principal}\n",
        hex::encode(sha2::Sha256::digest(token))
    )
}

#[test]
fn tokens_are_checked_with_scopes_and_recorded_as_principals() {
    let net = Net::new();
    let agent = net.agent_with_tokens(
        "secure",
        &[
            ("r3ader", "read", "dashboard"),
            ("wr1ter", "read,write", "ci-bot"),
        ],
    );
    let a = agent.addr.as_str();
    net.write_random("app.bin", 10_000, 5);

    let none = net.fails(&["agent", "artifacts", "list", a]);
    assert!(
        none.starts_with("error: not authenticated: this agent requires a token"),
        "{none}"
    );
    let wrong = net.fails(&["--token", "guess", "agent", "artifacts", "list", a]);
    assert!(wrong.contains("the token is not valid"), "{wrong}");
    let under = net.fails(&[
        "--token",
        "r3ader",
        "agent",
        "artifacts",
        "upload",
        a,
        "app.bin",
    ]);
    assert!(
        under.contains("permission denied: this call needs the 'write' scope"),
        "{under}"
    );
    net.ok(&[
        "--token",
        "wr1ter",
        "agent",
        "artifacts",
        "upload",
        a,
        "app.bin",
    ]);
    let cannot_delete = net.fails(&[
        "--token",
        "wr1ter",
        "agent",
        "artifacts",
        "delete",
        a,
        "app.bin",
        "--force",
    ]);
    assert!(cannot_delete.contains("'delete' scope"), "{cannot_delete}");
    let cleanup = net.fails(&["--token", "r3ader", "agent", "artifacts", "cleanup", a]);
    assert!(cleanup.contains("'delete' scope"), "{cleanup}");
    let events = net.ok(&["--token", "r3ader", "events", "list", "--agent", a]);
    assert!(events.contains("ci-bot"), "{events}");
    assert!(!events.contains("unverified"));
}

#[test]
fn tls_with_and_without_client_certificates() {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let net = Net::new();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let leaf = |names: Vec<String>| {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (server_cert, server_key) = leaf(vec!["127.0.0.1".into(), "localhost".into()]);
    let (client_cert, client_key) = leaf(vec!["client".into()]);
    for (name, text) in [
        ("ca.pem", ca.pem()),
        ("server.pem", server_cert),
        ("server.key", server_key),
        ("client.pem", client_cert),
        ("client.key", client_key),
    ] {
        std::fs::write(net.path(name), text).unwrap();
    }
    let p = |name: &str| net.path(name).to_str().unwrap().to_owned();
    net.write_random("app.bin", 100_000, 6);

    let tls = net.agent(
        "tls",
        None,
        &[
            "--tls-cert",
            &p("server.pem"),
            "--tls-key",
            &p("server.key"),
        ],
    );
    let a = tls.addr.as_str();
    net.ok(&[
        "--ca",
        &p("ca.pem"),
        "agent",
        "artifacts",
        "upload",
        a,
        "app.bin",
    ]);
    let listed = net.ok(&["--ca", &p("ca.pem"), "agent", "artifacts", "list", a]);
    assert!(listed.contains("app.bin"));
    let plain = net.fails(&["agent", "artifacts", "list", a]);
    assert!(
        plain.contains("is not reachable") && plain.contains("pass --ca"),
        "{plain}"
    );

    let mtls = net.agent(
        "mtls",
        None,
        &[
            "--tls-cert",
            &p("server.pem"),
            "--tls-key",
            &p("server.key"),
            "--client-ca",
            &p("ca.pem"),
        ],
    );
    let m = mtls.addr.as_str();
    let no_cert = net.fails(&["--ca", &p("ca.pem"), "agent", "artifacts", "list", m]);
    assert!(
        no_cert.contains("is not reachable") && no_cert.contains("--client-cert"),
        "{no_cert}"
    );
    let with_cert = net.ok(&[
        "--ca",
        &p("ca.pem"),
        "--client-cert",
        &p("client.pem"),
        "--client-key",
        &p("client.key"),
        "agent",
        "artifacts",
        "list",
        m,
    ]);
    assert!(with_cert.contains("ℹ Total: 0 artifacts"), "{with_cert}");

    // A key that is not the certificate's, or a CA file without a certificate, is named at
    // once: before an agent reports listening, and before a client dials.
    let data = net.path("mismatch-data");
    let out = sloth()
        .arg("--data-dir")
        .arg(&data)
        .args(["agent", "start", "--name", "mismatch", "--port", "0"])
        .args([
            "--tls-cert",
            &p("server.pem"),
            "--tls-key",
            &p("client.key"),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty(), "no 'listening' line");
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(
        stderr,
        format!(
            "error: the TLS key '{}' is not the key of the certificate '{}'\n",
            p("client.key"),
            p("server.pem")
        )
    );
    assert!(!data.exists(), "no data directory for a start that failed");
    let wrong_key = net.fails(&[
        "--ca",
        &p("ca.pem"),
        "--client-cert",
        &p("client.pem"),
        "--client-key",
        &p("server.key"),
        "agent",
        "artifacts",
        "list",
        m,
    ]);
    assert!(
        wrong_key.contains("is not the key of the client certificate"),
        "{wrong_key}"
    );
    let plain = net.agent("plain", None, &[]);
    let tls_to_plain = net.fails(&[
        "--ca",
        &p("ca.pem"),
        "agent",
        "artifacts",
        "list",
        &plain.addr,
    ]);
    assert!(
        tls_to_plain.contains("(it does not seem to serve TLS: drop --ca"),
        "{tls_to_plain}"
    );
    let key_as_ca = net.fails(&["--ca", &p("client.key"), "agent", "artifacts", "list", a]);
    assert!(
        key_as_ca.contains(&format!(
            "the TLS CA '{}' holds no certificate",
            p("client.key")
        )),
        "{key_as_ca}"
    );
}

#[test]
fn a_name_is_one_live_agent() {
    let net = Net::new();
    let master = net.master(&[]);
    let first = net.agent("build-agent", Some(&master), &[]);
    // A second agent under the name, elsewhere, while the first heartbeats: refused before it
    // reports listening, and without creating its data directory.
    let data = net.path("second-data");
    let out = sloth()
        .arg("--data-dir")
        .arg(&data)
        .args(["--master", &master.addr, "agent", "start"])
        .args(["--name", "build-agent", "--port", "0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty(), "no 'listening' line");
    let taken = String::from_utf8(out.stderr).unwrap();
    assert!(
        taken.starts_with(&format!(
            "error: agent name 'build-agent' is taken by the agent at {}",
            first.addr
        )),
        "{taken}"
    );
    assert!(!data.exists(), "no data directory for a start that failed");
    let listed = net.ok(&["--master", &master.addr, "agent", "get", "build-agent"]);
    assert!(listed.contains(&first.addr), "{listed}");
    // An agent's address where the master's belongs, and the reverse, say so.
    for (wrong, args) in [
        (&first.addr, vec!["agent", "list"]),
        (
            &master.addr,
            vec!["agent", "artifacts", "list", master.addr.as_str()],
        ),
    ] {
        let mut with = vec!["--master", wrong.as_str()];
        with.extend(args);
        let err = net.fails(&with);
        assert!(
            err.contains("does not offer this service: is the address a master's"),
            "{err}"
        );
    }
    // Once the first agent has stopped heartbeating (three of its 1 s intervals), the name is
    // free for an agent elsewhere.
    drop(first);
    std::thread::sleep(std::time::Duration::from_millis(4500));
    let second = net.agent("build-agent", Some(&master), &[]);
    let listed = net.ok(&["--master", &master.addr, "agent", "get", "build-agent"]);
    assert!(listed.contains(&second.addr), "{listed}");
}

#[test]
fn unsafe_or_broken_server_settings_are_refused() {
    let net = Net::new();
    let exposed = net.fails(&[
        "agent", "start", "--name", "x", "--port", "0", "--bind", "0.0.0.0",
    ]);
    assert!(exposed.contains("neither TLS"), "{exposed}");
    let exposed = net.fails(&["master", "start", "--port", "0", "--bind", "0.0.0.0"]);
    assert!(exposed.contains("--insecure"), "{exposed}");
    std::fs::write(net.path("tokens"), "not a token file\n").unwrap();
    let bad = net.fails(&[
        "agent",
        "start",
        "--name",
        "x",
        "--port",
        "0",
        "--tokens",
        net.path("tokens").to_str().unwrap(),
    ]);
    assert!(bad.contains("line 1"), "{bad}");
    let local = net.fails(&["agent", "start", "--name", "local", "--port", "0"]);
    assert!(local.contains("embedded store"), "{local}");
    std::fs::write(net.path("cert.pem"), "junk").unwrap();
    let cert = net.path("cert.pem");
    let junk = net.fails(&[
        "agent",
        "start",
        "--name",
        "x",
        "--port",
        "0",
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        cert.to_str().unwrap(),
    ]);
    assert!(junk.contains("not a PEM file"), "{junk}");
}

#[test]
fn retention_rules_run_on_schedule_with_their_safety_rails() {
    let net = Net::new();
    let data = net.path("keeper-data");
    // Three versions of one artifact and one of another, stored before the agent starts.
    for (i, name) in ["app.bin", "app.bin", "app.bin", "other.bin"]
        .iter()
        .enumerate()
    {
        std::fs::write(net.path(name), format!("content {i}").repeat(1000)).unwrap();
        let out = Command::new(BIN)
            .arg("--data-dir")
            .arg(&data)
            .args(["agent", "artifacts", "upload", "local", name])
            .current_dir(net.dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let config = net.path("agent.toml");
    std::fs::write(
        &config,
        r#"
[[retention]]
policy = "keep-last"
params = { count = "1" }
every = "1h"
dry_run_first = false
max_share = 1.0

[[retention]]
policy = "keep-last"
params = { count = "0" }
every = "1h"
dry_run_first = false
max_share = 0.1

[[retention]]
policy = "unused-for"
params = { unused_for = "0d" }
every = "1h"

[[retention]]
policy = "missing.wasm"
every = "1h"
"#,
    )
    .unwrap();
    let agent = net.agent("keeper", None, &["--config", config.to_str().unwrap()]);
    let a = agent.addr.as_str();
    // The first runs come two seconds after start.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let events = loop {
        let events = net.ok(&["events", "list", "--agent", a, "--output", "json"]);
        if events.matches("\"artifact.cleanup\"").count() >= 2
            && events.matches("\"policy.failed\"").count() >= 2
        {
            break events;
        }
        assert!(std::time::Instant::now() < deadline, "{events}");
        std::thread::sleep(std::time::Duration::from_millis(300));
    };
    // keep-last count=1 deleted the two older versions of app.bin.
    let listed = net.ok(&["agent", "artifacts", "list", a, "--all-versions"]);
    assert!(
        listed.ends_with("ℹ Total: 2 artifact versions\n"),
        "{listed}"
    );
    assert!(events.contains("retention keep-last(count=1)"), "{events}");
    // count=0 would delete everything: over its 10% cap, so it deleted nothing.
    assert!(events.contains("more than the 10% cap"), "{events}");
    // A rule new to the store first only reports.
    assert!(events.contains("(first run: dry run)"), "{events}");
    assert!(
        events.contains("cannot read the policy module 'missing.wasm'"),
        "{events}"
    );
}

#[test]
fn workflows_run_on_agents_and_land_in_their_stores() {
    let net = Net::new();
    let master = net.master(&[]);
    let _build = net.agent("build-agent", Some(&master), &[]);
    let m = master.addr.as_str();
    let examples = common::examples();
    let ci = examples.join("ci_pipeline.sloth");
    let ci = ci.to_str().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !net
        .cli(&["--master", m, "agent", "get", "build-agent"], "")
        .status
        .success()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "build-agent never registered"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let empty = net.ok(&["--master", m, "agent", "get", "build-agent"]);
    assert!(
        empty.contains("Stored:      0 B\nDedup:       - (nothing stored)\n"),
        "{empty}"
    );

    // The spec's use case 1: run on the build agent, then find the artifacts there.
    let ran = net.ok(&[
        "--master",
        m,
        "run",
        "ci_pipeline",
        "--file",
        ci,
        "--agent",
        "build-agent",
    ]);
    assert!(ran.contains("  test │ 2 tests passed\n"), "{ran}");
    assert!(
        ran.contains(": 3 tasks, 2 artifacts stored in stack ci_pipeline on build-agent\n"),
        "{ran}"
    );
    let listed = net.ok(&["--master", m, "agent", "artifacts", "list", "build-agent"]);
    for (name, task) in [("app.bin", "build"), ("test-report.xml", "test")] {
        assert!(
            listed
                .lines()
                .any(|l| l.starts_with(name) && l.contains(" ci_pipeline ") && l.ends_with(task)),
            "{name} in {listed}"
        );
    }
    assert!(
        !net.path("client-data").join("store").exists(),
        "a run on an agent touched the local store"
    );
    // Bit-exact: the agent's app.bin is the one the same workflow builds locally.
    net.ok(&["run", "ci_pipeline", "--file", ci]);
    net.ok(&[
        "agent",
        "artifacts",
        "download",
        "local",
        "app.bin",
        "-o",
        "local-app.bin",
    ]);
    net.ok(&[
        "--master",
        m,
        "agent",
        "artifacts",
        "download",
        "build-agent",
        "app.bin",
        "-o",
        "agent-app.bin",
    ]);
    assert_eq!(
        std::fs::read(net.path("agent-app.bin")).unwrap(),
        std::fs::read(net.path("local-app.bin")).unwrap()
    );

    // A script the agent cannot load is refused before anything runs, with file and line.
    std::fs::write(net.path("broken.sloth"), "task(\"x\"):retries(-1)\n").unwrap();
    let broken = net.path("broken.sloth");
    let err = net.fails(&[
        "--master",
        m,
        "run",
        "w",
        "--file",
        broken.to_str().unwrap(),
        "--agent",
        "build-agent",
    ]);
    assert!(
        err.starts_with(&format!(
            "error: {}:1: retries must be a whole number from 0 to 100, got -1",
            broken.display()
        )),
        "{err}"
    );

    // A client that goes away stops the run: its commands are killed on the agent.
    let marker = net.path("survived");
    std::fs::write(
        net.path("slow.sloth"),
        format!(
            "local slow = task(\"slow\"):command(\"(sleep 2; touch '{}') & sleep 30\"):build()\n\
             workflow.define(\"slow\"):tasks({{slow}})\n",
            marker.display()
        ),
    )
    .unwrap();
    let mut client = sloth()
        .args(["--master", m, "run", "slow", "--file"])
        .arg(net.path("slow.sloth"))
        .args(["--agent", "build-agent"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(client.stdout.take().unwrap()).lines();
    assert!(lines.any(|l| l.unwrap() == "▶ slow"));
    client.kill().unwrap();
    let _ = client.wait();
    std::thread::sleep(std::time::Duration::from_secs(4));
    assert!(!marker.exists(), "the run went on after its client left");
}

#[test]
fn running_workflows_needs_the_run_scope() {
    let net = Net::new();
    let agent = net.agent_with_tokens(
        "secure",
        &[
            ("wr1ter", "read,write", "ci-bot"),
            ("runn3r", "read,run", "builder"),
        ],
    );
    let a = agent.addr.as_str();
    let ci = common::examples().join("ci_pipeline.sloth");
    let ci = ci.to_str().unwrap();
    let under = net.fails(&[
        "--token",
        "wr1ter",
        "run",
        "ci_pipeline",
        "--file",
        ci,
        "--agent",
        a,
    ]);
    assert!(
        under.contains("permission denied: this call needs the 'run' scope"),
        "{under}"
    );
    net.ok(&[
        "--token",
        "runn3r",
        "run",
        "ci_pipeline",
        "--file",
        ci,
        "--agent",
        a,
    ]);
    let events = net.ok(&[
        "--token",
        "runn3r",
        "events",
        "list",
        "--agent",
        a,
        "--type",
        "artifact.upload",
    ]);
    assert!(
        events.contains("builder via workflow ci_pipeline"),
        "{events}"
    );
}

#[test]
fn verify_and_repair_work_on_remote_agents_for_admins() {
    let net = Net::new();
    let agent = net.agent_with_tokens(
        "store",
        &[
            ("r3ader", "read,write", "dashboard"),
            ("4dmin", "admin", "ops"),
        ],
    );
    let a = agent.addr.as_str();
    net.write_random("good.bin", 500_000, 1);
    net.write_random("bad.bin", 500_000, 2);
    for name in ["good.bin", "bad.bin"] {
        net.ok(&["--token", "4dmin", "agent", "artifacts", "upload", a, name]);
    }
    let clean = net.ok(&["--token", "4dmin", "agent", "artifacts", "verify", a]);
    assert!(clean.contains(": no problems\n"), "{clean}");
    let denied = net.fails(&["--token", "r3ader", "agent", "artifacts", "verify", a]);
    assert!(denied.contains("needs the 'admin' scope"), "{denied}");

    // Flip a byte inside bad.bin's content where it sits in the agent's pack file.
    let bad = std::fs::read(net.path("bad.bin")).unwrap();
    let needle = &bad[200_000..200_064];
    let packs = net.path("store-data/store/packs");
    let mut flipped = false;
    for pack in std::fs::read_dir(&packs).unwrap() {
        let pack = pack.unwrap().path();
        let mut bytes = std::fs::read(&pack).unwrap();
        if let Some(at) = bytes.windows(needle.len()).position(|w| w == needle) {
            bytes[at] ^= 1;
            std::fs::write(&pack, bytes).unwrap();
            flipped = true;
        }
    }
    assert!(flipped, "bad.bin's bytes not found in the packs");

    let found = net.cli(&["--token", "4dmin", "agent", "artifacts", "verify", a], "");
    assert_eq!(found.status.code(), Some(1));
    let stdout = String::from_utf8(found.stdout).unwrap();
    assert!(
        stdout.contains("✗ Damaged: bad.bin v1 (stack default, task default): chunk "),
        "{stdout}"
    );
    assert!(!stdout.contains("good.bin"), "{stdout}");
    let repaired = net.cli(
        &[
            "--token",
            "4dmin",
            "agent",
            "artifacts",
            "verify",
            a,
            "--repair",
        ],
        "",
    );
    let stdout = String::from_utf8(repaired.stdout).unwrap();
    assert!(
        stdout.contains("✓ Repaired: marked 1 version damaged"),
        "{stdout}"
    );
    let listed = net.ok(&["--token", "r3ader", "agent", "artifacts", "list", a]);
    assert!(listed.contains("bad.bin ⚠ damaged"), "{listed}");
    let refused = net.fails(&[
        "--token",
        "r3ader",
        "agent",
        "artifacts",
        "download",
        a,
        "bad.bin",
    ]);
    assert!(
        refused.contains("is damaged and cannot be downloaded"),
        "{refused}"
    );
    net.ok(&[
        "--token",
        "r3ader",
        "agent",
        "artifacts",
        "download",
        a,
        "good.bin",
        "-o",
        "good.out",
    ]);
    assert!(
        std::fs::read(net.path("good.out")).unwrap()
            == std::fs::read(net.path("good.bin")).unwrap()
    );
    // The same content uploaded again heals the old version.
    net.ok(&[
        "--token",
        "4dmin",
        "agent",
        "artifacts",
        "upload",
        a,
        "bad.bin",
    ]);
    let healed = net.ok(&[
        "--token",
        "4dmin",
        "agent",
        "artifacts",
        "verify",
        a,
        "--repair",
    ]);
    assert!(
        healed.contains("cleared the damaged mark of 1 restored version"),
        "{healed}"
    );
    net.ok(&[
        "--token",
        "r3ader",
        "agent",
        "artifacts",
        "download",
        a,
        "bad.bin",
        "--version",
        "1",
        "-o",
        "bad.out",
    ]);
    assert!(std::fs::read(net.path("bad.out")).unwrap() == bad);
}
