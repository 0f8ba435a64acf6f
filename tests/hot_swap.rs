//! Versions rolled under load (v1 -> v2 -> v3, policy latest { 1 }) while several clients
//! call Predict without pause: no request fails, and every answer carries the values of the
//! version it names.

pub mod common;

use common::*;
use modelgate::proto::serving::model_version_status::State;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

const CLIENTS: usize = 4;

/// Copies a fixture version into the base path the way an upload tool would: model first,
/// the signature last (written aside and renamed, so it appears whole).
fn copy_version(base: &Path, version: i64) {
    let from = fixtures().join("scaled").join(version.to_string());
    let to = base.join(version.to_string());
    std::fs::create_dir_all(&to).unwrap();
    std::fs::copy(from.join("model.pt"), to.join("model.pt")).unwrap();
    std::fs::copy(from.join("signature.json"), to.join(".signature.json.part")).unwrap();
    std::fs::rename(to.join(".signature.json.part"), to.join("signature.json")).unwrap();
}

/// Puts the `corrupt` fixture (a model.pt that is not one) at `version` under `base`.
fn corrupt_version(base: &Path, version: i64) {
    let to = base.join(version.to_string());
    std::fs::create_dir_all(&to).unwrap();
    for file in ["model.pt", "signature.json"] {
        std::fs::copy(fixtures().join("corrupt/1").join(file), to.join(file)).unwrap();
    }
}

/// A server on the model config file `config`, re-read every second (and every base path
/// listed every second), once ready.
async fn serve_config(config: &Path) -> Server {
    let server = Server::start_rest(
        &[
            format!("--model_config_file={}", config.display()),
            "--model_config_file_poll_wait_seconds=1".into(),
            "--file_system_poll_wait_seconds=1".into(),
            "--device=cpu".into(),
        ],
        &[],
    );
    server.wait_readyz(200).await;
    server
}

#[derive(Default)]
struct Tally {
    /// Answers per version.
    answers: BTreeMap<i64, u64>,
    failures: Vec<String>,
    mismatches: Vec<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn versions_roll_under_load_without_failed_requests() {
    let base = scratch("hot-swap");
    copy_version(&base, 1);
    let server = Server::start_rest(
        &[
            "--model_name=scaled".into(),
            "--device=cpu".into(),
            format!("--model_base_path={}", base.display()),
            "--file_system_poll_wait_seconds=1".into(),
        ],
        &[],
    );
    server.wait_readyz(200).await;
    let models = server.models().await;

    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(std::sync::Mutex::new(Tally::default()));
    let mut clients = Vec::new();
    for client_id in 0..CLIENTS {
        let (stop, tally) = (Arc::clone(&stop), Arc::clone(&tally));
        // One connection per client, as separate processes would have.
        let mut client = server.prediction().await;
        clients.push(tokio::spawn(async move {
            let mut n = 0u32;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let x = [client_id as f32 + 1.0, n as f32];
                let result = predict(&mut client, spec("scaled"), &x).await;
                let mut tally = tally.lock().unwrap();
                match result {
                    Ok((version, y)) => {
                        *tally.answers.entry(version).or_default() += 1;
                        let expected: Vec<f32> = x.iter().map(|v| v * version as f32).collect();
                        if y != expected {
                            tally
                                .mismatches
                                .push(format!("version {version}: {x:?} -> {y:?}"));
                        }
                    }
                    Err(status) => tally.failures.push(format!("{status:?}")),
                }
            }
        }));
    }
    let answered = |version: i64, at_least: u64| {
        let tally = Arc::clone(&tally);
        move || {
            let enough = tally
                .lock()
                .unwrap()
                .answers
                .get(&version)
                .is_some_and(|&n| n >= at_least);
            async move { enough.then_some(()) }
        }
    };

    wait_for("answers from version 1", answered(1, 20)).await;
    copy_version(&base, 2);
    wait_for_state(&models, "scaled", 1, State::End).await;
    wait_for("answers from version 2", answered(2, 20)).await;
    copy_version(&base, 3);
    wait_for_state(&models, "scaled", 2, State::End).await;
    wait_for("answers from version 3", answered(3, 20)).await;
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.await.unwrap();
    }

    let tally = tally.lock().unwrap();
    let total: u64 = tally.answers.values().sum();
    assert!(
        tally.failures.is_empty(),
        "{} of {total} requests failed: {:?}",
        tally.failures.len(),
        &tally.failures[..tally.failures.len().min(5)]
    );
    assert!(tally.mismatches.is_empty(), "{:?}", tally.mismatches);
    assert_eq!(
        tally.answers.keys().copied().collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    eprintln!(
        "hot swap: {total} requests, 0 failed, by version {:?}",
        tally.answers
    );
    let _ = std::fs::remove_dir_all(&base);
}

/// Moving a model to another base path (a config change) keeps it serving: its version from
/// the old path answers until one from the new path does, even while the new path's first
/// version fails to load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_moved_to_another_base_path_serves_until_the_new_one_does() {
    let root = scratch("moved");
    let (old, new) = (root.join("old"), root.join("new"));
    copy_version(&old, 1);
    corrupt_version(&new, 1);
    let config = write_config(&root, &[("scaled", old.clone(), "")]);
    let server = serve_config(&config).await;
    let models = server.models().await;
    let mut client = server.prediction().await;

    write_config(&root, &[("scaled", new.clone(), "")]);
    let error = wait_for_state(&models, "scaled", 1, State::End).await;
    assert!(error.contains("model.pt"), "{error}");
    let answer = predict(&mut client, spec("scaled"), &[1.0, 2.0]).await;
    assert_eq!(answer.unwrap(), (1, vec![1.0, 2.0]), "{}", server.log());
    assert_eq!(server.http_get("/readyz").await.0, 200);

    // A version that loads lands on the new path: it takes over, the old path's goes.
    copy_version(&new, 3);
    wait_for_state(&models, "scaled", 3, State::Available).await;
    let answer = predict(&mut client, spec("scaled"), &[1.0, 2.0]).await;
    assert_eq!(answer.unwrap(), (3, vec![3.0, 6.0]));
    server
        .log
        .wait_for(&["unloaded", "model=scaled", "version=1"])
        .await;
    let _ = std::fs::remove_dir_all(&root);
}

/// A label moved to a version that is not available yet (loading, or failing) keeps
/// answering from the version it pointed at, as TF Serving never points a label at a
/// version that is not AVAILABLE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_label_moves_only_once_its_new_version_serves() {
    let root = scratch("label-moves");
    let base = root.join("scaled");
    copy_version(&base, 1);
    corrupt_version(&base, 3);
    let canary = |versions: &str, label: i64| {
        format!(
            "model_version_policy {{ specific {{ {versions} }} }} \
             version_labels {{ key: \"canary\" value: {label} }}"
        )
    };
    let config = write_config(
        &root,
        &[("scaled", base.clone(), &canary("versions: 1", 1))],
    );
    let server = serve_config(&config).await;
    let models = server.models().await;
    let mut client = server.prediction().await;
    let by_label = spec_label("scaled", "canary");
    let answer = predict(&mut client, by_label.clone(), &[1.0]).await;
    assert_eq!(answer.unwrap(), (1, vec![1.0]));

    // canary moves to version 3, which fails to load: it stays on version 1.
    let moved = canary("versions: 1 versions: 3", 3);
    write_config(&root, &[("scaled", base.clone(), &moved)]);
    let error = wait_for_state(&models, "scaled", 3, State::End).await;
    assert!(error.contains("model.pt"), "{error}");
    let answer = predict(&mut client, by_label.clone(), &[1.0]).await;
    assert_eq!(answer.unwrap(), (1, vec![1.0]), "{}", server.log());

    // Version 3 is fixed: it loads, and canary follows.
    std::fs::remove_dir_all(base.join("3")).unwrap();
    copy_version(&base, 3);
    wait_for_state(&models, "scaled", 3, State::Available).await;
    let answer = predict(&mut client, by_label, &[1.0]).await;
    assert_eq!(answer.unwrap(), (3, vec![3.0]));
    let _ = std::fs::remove_dir_all(&root);
}
