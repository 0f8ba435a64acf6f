//! A version that fails to load is tried again, `--load_retry_interval_micros` apart, up to
//! `--max_num_load_retries` times, without its files changing; once the retries are spent it
//! stays failed with its error.
//!
//! The transient failure: the version's `model.pt` is a symlink to a file that is not there
//! yet, as when the volume it lives on is not mounted yet. The version directory itself (the
//! names, sizes and times the server fingerprints) never changes.

pub mod common;

use common::*;
use modelgate::proto::serving::model_version_status::State;
use std::path::{Path, PathBuf};

/// A version directory of the `scaled` fixture whose `model.pt` links to `target`, which
/// the caller creates (or not) later.
fn version_linked_to(base: &Path, version: i64, target: &Path) {
    let dir = base.join(version.to_string());
    std::fs::create_dir_all(&dir).unwrap();
    let fixture = fixtures().join("scaled").join(version.to_string());
    std::fs::copy(fixture.join("signature.json"), dir.join("signature.json")).unwrap();
    std::os::unix::fs::symlink(target, dir.join("model.pt")).unwrap();
}

/// Puts the fixture's module at `target` whole (written aside, then renamed).
fn mount(target: &Path, version: i64) {
    let fixture = fixtures().join("scaled").join(version.to_string());
    let part = target.with_extension("part");
    std::fs::copy(fixture.join("model.pt"), &part).unwrap();
    std::fs::rename(&part, target).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_load_is_retried_without_its_files_changing() {
    let base = scratch("load-retry");
    let volume = scratch("load-retry-volume");
    let target: PathBuf = volume.join("model.pt");
    version_linked_to(&base, 1, &target);
    // Polling off: the retry alone must bring the version in.
    let server = Server::start_rest(
        &[
            "--model_name=scaled".into(),
            "--device=cpu".into(),
            format!("--model_base_path={}", base.display()),
            "--file_system_poll_wait_seconds=0".into(),
            "--max_num_load_retries=1000".into(),
            "--load_retry_interval_micros=50000".into(),
        ],
        &[],
    );
    let models = server.models().await;
    let error = wait_for_state(&models, "scaled", 1, State::End).await;
    assert!(error.contains("no model.pt"), "{error}");
    assert!(error.contains("of 1000 in 50ms"), "{error}");

    mount(&target, 1);
    wait_for_state(&models, "scaled", 1, State::Available).await;
    let mut predictions = server.prediction().await;
    let (version, y) = predict(&mut predictions, spec("scaled"), &[1.0, 2.0])
        .await
        .unwrap();
    assert_eq!((version, y), (1, vec![1.0, 2.0]));
    let _ = std::fs::remove_dir_all(&base);
    let _ = std::fs::remove_dir_all(&volume);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_stays_failed_once_its_retries_are_spent() {
    let root = scratch("load-retry-spent");
    let (broken, later) = (root.join("broken"), root.join("later"));
    std::fs::create_dir_all(&later).unwrap();
    version_linked_to(&broken, 1, &root.join("never-mounted.pt"));
    let config = model_config(&[("broken", &broken, ""), ("later", &later, "")]);
    let server = Server::with_config(
        &config,
        &[
            "--device=cpu",
            "--file_system_poll_wait_seconds=1",
            "--max_num_load_retries=2",
            "--load_retry_interval_micros=1000",
        ],
    );
    let models = server.models().await;
    let given_up = |error: &str| error.contains("failed 3 times");
    let error = wait_for("broken version 1 to give up", || {
        let mut models = models.clone();
        async move {
            let statuses = model_status(&mut models, "broken").await.ok()?;
            statuses
                .into_iter()
                .find(|(v, s, e)| *v == 1 && *s == State::End && given_up(e))
                .map(|(_, _, e)| e)
        }
    })
    .await;
    assert!(error.contains("no model.pt"), "{error}");
    assert!(
        error.contains("tried again when its files change"),
        "{error}"
    );
    let attempts = |server: &Server| server.log.count(&["failed to load", "model=broken"]);
    assert_eq!(attempts(&server), 3, "{}", server.log());

    // A version of another model appears and loads: the manager has polled every model
    // since, and tried the spent version no more.
    let fixture = fixtures().join("scaled").join("1");
    std::fs::create_dir_all(later.join("1")).unwrap();
    for file in ["model.pt", "signature.json"] {
        std::fs::copy(fixture.join(file), later.join("1").join(file)).unwrap();
    }
    server.wait_available(&["later"]).await;
    assert_eq!(attempts(&server), 3, "{}", server.log());
    let mut client = models.clone();
    let statuses = model_status(&mut client, "broken").await.unwrap();
    assert!(
        matches!(&statuses[..], [(1, State::End, e)] if given_up(e)),
        "{statuses:?}"
    );
    let (_, metrics) = server.http_get("/metrics").await;
    // The first load, then its two retries.
    assert!(
        metrics.contains(
            r#"modelgate_model_loads_total{model="broken",outcome="failure",reason="config"} 1"#
        ) && metrics.contains(
            r#"modelgate_model_loads_total{model="broken",outcome="failure",reason="retry"} 2"#
        ),
        "{metrics}"
    );
    let _ = std::fs::remove_dir_all(&root);
}

/// With polling off, a base path that cannot be listed at start (not there yet, as a volume
/// not mounted yet) is listed again with backoff until it can be, not left unlisted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_trouble_is_retried_even_without_polling() {
    let root = scratch("storage-retry");
    let base = root.join("scaled");
    let server = Server::start_rest(
        &[
            "--model_name=scaled".into(),
            "--device=cpu".into(),
            format!("--model_base_path={}", base.display()),
            "--file_system_poll_wait_seconds=0".into(),
        ],
        &[],
    );
    wait_for("a failed listing of the missing base path", || async {
        let errors = server
            .metric("modelgate_storage_errors_total", &["model=\"scaled\""])
            .await;
        (errors >= 1.0).then_some(())
    })
    .await;
    let ready = root.join("ready");
    std::fs::create_dir_all(ready.join("1")).unwrap();
    let fixture = fixtures().join("scaled").join("1");
    for file in ["model.pt", "signature.json"] {
        std::fs::copy(fixture.join(file), ready.join("1").join(file)).unwrap();
    }
    std::fs::rename(&ready, &base).unwrap();
    server.wait_available(&["scaled"]).await;
    let _ = std::fs::remove_dir_all(&root);
}
