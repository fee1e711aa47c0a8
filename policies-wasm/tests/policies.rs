//! The built-in policies against fixtures with known answers, hostile modules written in WAT,
//! and the property that no answer can reach outside the evaluated batch.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use sloth_policies::{Action, Artifact, Limits, PolicyHost, Reason, builtin, builtin_names};

const DAY: i64 = 86_400;

fn artifact(
    id: &str,
    name: &str,
    task: &str,
    version: u32,
    size: u64,
    created_days_ago: i64,
) -> Artifact {
    Artifact {
        id: id.into(),
        name: name.into(),
        stack: "prod".into(),
        task: task.into(),
        version,
        size,
        created_at: 1000 * DAY - created_days_ago * DAY,
        modified_at: 1000 * DAY - created_days_ago * DAY,
        download_count: 0,
        last_download_at: None,
        checksum: "sha256:00".into(),
    }
}

fn params(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn deleted(host: &PolicyHost, name: &str, p: &[(&str, &str)], batch: &[Artifact]) -> Vec<String> {
    let policy = host.load(builtin(name).unwrap(), name).unwrap();
    host.evaluate(&policy, 1000 * DAY, &params(p), batch)
        .unwrap()
        .into_iter()
        .filter(|d| d.action == Action::Delete)
        .map(|d| d.id)
        .collect()
}

fn fixture() -> Vec<Artifact> {
    vec![
        artifact("a1", "app.bin", "build", 1, 100, 60),
        artifact("a2", "app.bin", "build", 2, 100, 40),
        artifact("a3", "app.bin", "build", 3, 100, 10),
        artifact("a4", "app.bin", "build", 4, 100, 1),
        artifact("l1", "lib.so", "build", 1, 1000, 45),
        artifact("t1", "report.xml", "test", 1, 10, 31),
        artifact("t2", "report.xml", "test", 2, 10, 29),
    ]
}

#[test]
fn builtins_decide_the_known_answers() {
    let host = PolicyHost::new(Limits::default()).unwrap();
    let batch = fixture();
    assert_eq!(
        deleted(&host, "older-than", &[("older_than", "30d")], &batch),
        ["a1", "a2", "l1", "t1"]
    );
    assert!(deleted(&host, "older-than", &[("older_than", "90d")], &batch).is_empty());
    assert_eq!(
        deleted(&host, "older-than", &[("older_than", "0d")], &batch).len(),
        7
    );
    // 0d means everything uploaded until now, this second's uploads too.
    let just_now = [artifact("n1", "app.bin", "build", 5, 100, 0)];
    assert_eq!(
        deleted(&host, "older-than", &[("older_than", "0d")], &just_now),
        ["n1"]
    );
    assert!(deleted(&host, "older-than", &[("older_than", "1s")], &just_now).is_empty());
    assert_eq!(
        deleted(&host, "keep-last", &[("count", "2")], &batch),
        ["a1", "a2"]
    );
    assert_eq!(
        deleted(
            &host,
            "keep-last",
            &[("count", "1"), ("per", "task")],
            &batch
        ),
        ["a1", "a2", "a3", "l1", "t1"]
    );
    assert_eq!(
        deleted(&host, "max-total-size", &[("max_bytes", "300")], &batch),
        ["a1", "a2", "l1"],
        "oldest first (a1, l1, a2) until 1420 bytes are at most 300"
    );
    let mut used = batch.clone();
    used[0].last_download_at = Some(1000 * DAY - DAY); // a1 downloaded yesterday
    assert_eq!(
        deleted(&host, "unused-for", &[("unused_for", "30d")], &used),
        ["a2", "l1", "t1"]
    );
    assert_eq!(
        deleted(
            &host,
            "max-total-size",
            &[("max_bytes", "400"), ("evict", "least-recently-downloaded")],
            &used
        ),
        ["a2", "l1"],
        "l1 (unused 45d) then a2 (40d) bring 1420 bytes to 320 ≤ 400; a1 was downloaded yesterday"
    );
}

#[test]
fn builtins_describe_themselves_and_refuse_bad_parameters() {
    let host = PolicyHost::new(Limits::default()).unwrap();
    for name in builtin_names() {
        let policy = host.load(builtin(name).unwrap(), name).unwrap();
        assert_eq!(policy.metadata.name, name);
        assert!(!policy.metadata.description.is_empty());
        assert!(policy.metadata.params.is_object(), "{name}");
        assert!(
            policy.imports.iter().all(|i| i == "sloth.log"),
            "{name} imports {:?}",
            policy.imports
        );
        // Missing parameters: the policy answers nothing, and the host says so.
        let err = host
            .evaluate(&policy, 0, &BTreeMap::new(), &fixture())
            .unwrap_err();
        assert!(matches!(err.reason, Reason::NoAnswer(_)), "{name}: {err}");
        assert!(
            err.to_string().contains("missing parameter"),
            "{name}: {err}"
        );
    }
    let older = host
        .load(builtin("older-than").unwrap(), "older-than")
        .unwrap();
    let err = host
        .evaluate(
            &older,
            0,
            &params(&[("older_than", "thirty days")]),
            &fixture(),
        )
        .unwrap_err();
    assert!(
        err.to_string().starts_with("policy 'older-than' failed"),
        "{err}"
    );
    // An empty batch is fine.
    assert!(
        host.evaluate(&older, 0, &params(&[("older_than", "1d")]), &[])
            .unwrap()
            .is_empty()
    );
}

/// A module in WAT with the metadata section a policy needs.
fn module(body: &str) -> Vec<u8> {
    let text = format!(
        r#"(module
            (@custom "sloth.policy" "{{\"name\":\"hostile\",\"version\":\"0\",\"description\":\"test\",\"params\":{{}}}}")
            {body})"#
    );
    wat::parse_str(text).unwrap()
}

const ALLOC: &str = r#"(func (export "policy_alloc") (param i32) (result i32) (i32.const 1024))"#;

fn hostile(host: &PolicyHost, body: &str) -> sloth_policies::Error {
    let started = Instant::now();
    let result = host
        .load(&module(body), "hostile.wasm")
        .and_then(|p| host.evaluate(&p, 0, &BTreeMap::new(), &fixture()));
    assert!(
        started.elapsed() < host.limits().deadline + Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    result.unwrap_err()
}

/// What a hostile case must fail with.
type Expected = fn(&Reason) -> bool;

#[test]
fn hostile_modules_fail_closed_within_the_deadline() {
    let host = PolicyHost::new(Limits {
        deadline: Duration::from_millis(500),
        fuel: 50_000_000_000,
        memory: 16 << 20,
        ..Limits::default()
    })
    .unwrap();
    let cases: Vec<(&str, String, Expected)> = vec![
        (
            "infinite loop",
            format!(
                r#"(memory (export "memory") 1) {ALLOC}
               (func (export "policy_evaluate") (param i32 i32) (result i64) (loop (br 0)) (i64.const 0))"#
            ),
            |r| matches!(r, Reason::Timeout(_) | Reason::OutOfFuel(_)),
        ),
        (
            "memory grow bomb",
            format!(
                r#"(memory (export "memory") 1) {ALLOC}
               (func (export "policy_evaluate") (param i32 i32) (result i64)
                 (loop (drop (memory.grow (i32.const 100))) (br 0)) (i64.const 0))"#
            ),
            |r| matches!(r, Reason::Trap(_)),
        ),
        (
            "huge initial memory",
            format!(
                r#"(memory (export "memory") 30000) {ALLOC}
               (func (export "policy_evaluate") (param i32 i32) (result i64) (i64.const 0))"#
            ),
            |r| matches!(r, Reason::Trap(_)),
        ),
        (
            "imports WASI",
            format!(
                r#"(import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32)))
               (memory (export "memory") 1) {ALLOC}
               (func (export "policy_evaluate") (param i32 i32) (result i64) (i64.const 0))"#
            ),
            |r| matches!(r, Reason::ForbiddenImport(m, _) if m == "wasi_snapshot_preview1"),
        ),
        (
            "imports an unknown function",
            format!(
                r#"(import "env" "system" (func (param i32)))
               (memory (export "memory") 1) {ALLOC}
               (func (export "policy_evaluate") (param i32 i32) (result i64) (i64.const 0))"#
            ),
            |r| matches!(r, Reason::ForbiddenImport(..)),
        ),
        (
            "answer outside memory",
            format!(
                r#"(memory (export "memory") 1) {ALLOC}
               (func (export "policy_evaluate") (param i32 i32) (result i64) (i64.const 0x00100000_00000010))"#
            ),
            |r| matches!(r, Reason::NoAnswer(m) if m.contains("outside")),
        ),
        (
            "a 1 GiB answer",
            format!(
                r#"(memory (export "memory") 1) {ALLOC}
               (func (export "policy_evaluate") (param i32 i32) (result i64) (i64.const 0x00000000_40000000))"#
            ),
            |r| matches!(r, Reason::NoAnswer(m) if m.contains("more than")),
        ),
        (
            "invalid UTF-8 / JSON",
            format!(
                r#"(memory (export "memory") 1) (data (i32.const 16) "\ff\fe{{not json")
               {ALLOC}
               (func (export "policy_evaluate") (param i32 i32) (result i64) (i64.const 0x00000010_0000000b))"#
            ),
            |r| matches!(r, Reason::InvalidAnswer(_)),
        ),
        (
            "a trap (panic)",
            format!(
                r#"(memory (export "memory") 1) {ALLOC}
               (func (export "policy_evaluate") (param i32 i32) (result i64) unreachable)"#
            ),
            |r| matches!(r, Reason::Trap(_)),
        ),
        (
            "no exports",
            r#"(memory (export "memory") 1)"#.to_string(),
            |r| matches!(r, Reason::BadModule(m) if m.contains("policy_alloc")),
        ),
    ];
    for (what, body, expected) in cases {
        let err = hostile(&host, &body);
        assert!(expected(&err.reason), "{what}: {err}");
        assert_eq!(err.policy, "hostile", "{what}");
    }
    // Not a module at all, and a module without metadata.
    let err = host.load(b"\0asm junk", "junk.wasm").unwrap_err();
    assert_eq!(err.policy, "junk.wasm");
    let bare = wat::parse_str(r#"(module (memory (export "memory") 1))"#).unwrap();
    let err = host.load(&bare, "bare.wasm").unwrap_err();
    assert!(
        err.to_string().contains("no 'sloth.policy' custom section"),
        "{err}"
    );
    // The host still works after all that.
    assert_eq!(
        deleted(&host, "keep-last", &[("count", "3")], &fixture()),
        ["a1"]
    );
}

#[test]
fn compiled_modules_are_cached_by_content() {
    let host = PolicyHost::new(Limits::default()).unwrap();
    let bytes = builtin("keep-last").unwrap();
    let first = host.load(bytes, "keep-last").unwrap();
    assert!(host.is_cached(&first.hash));
    let again = host.load(bytes, "keep-last").unwrap();
    assert_eq!(first.hash, again.hash);
}

/// A WAT policy that answers with whatever decisions the test wrote into its data segment.
fn answering(answer: &str) -> Vec<u8> {
    let escaped: String = answer.bytes().map(|b| format!("\\{b:02x}")).collect();
    module(&format!(
        r#"(memory (export "memory") 1) (data (i32.const 4096) "{escaped}") {ALLOC}
           (func (export "policy_evaluate") (param i32 i32) (result i64) (i64.const {}))"#,
        (4096i64 << 32) | answer.len() as i64
    ))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Whatever a policy answers, the host returns decisions only about the batch — each
    /// artifact exactly once — or an error; never a deletion outside the batch.
    #[test]
    fn no_answer_reaches_outside_the_batch(
        ids in proptest::collection::vec("[a-e]", 0..8),
        actions in proptest::collection::vec(prop_oneof!["keep", "delete", "burn"], 0..8),
        batch_size in 0usize..5,
    ) {
        let host = PolicyHost::new(Limits::default()).unwrap();
        let batch: Vec<Artifact> = ["a", "b", "c", "d", "e"][..batch_size]
            .iter()
            .map(|id| artifact(id, "n", "t", 1, 1, 0))
            .collect();
        let decisions: Vec<String> = ids
            .iter()
            .zip(actions.iter().cycle())
            .map(|(id, action)| format!(r#"{{"id":"{id}","action":"{action}","reason":"r"}}"#))
            .collect();
        let answer = format!(r#"{{"decisions":[{}]}}"#, decisions.join(","));
        let policy = host.load(&answering(&answer), "answering").unwrap();
        if let Ok(decided) = host.evaluate(&policy, 0, &BTreeMap::new(), &batch) {
            prop_assert_eq!(decided.len(), batch.len());
            for (d, a) in decided.iter().zip(&batch) {
                prop_assert_eq!(&d.id, &a.id);
            }
        }
    }
}
