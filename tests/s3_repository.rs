//! A model repository on a real S3 server (moto, over HTTP on 127.0.0.1): config and models
//! on S3, new versions picked up and old ones unloaded, config changes, a corrupt version,
//! incomplete uploads, ReloadConfig, readiness, S3 stopped and restarted while serving, the
//! cache keeping only what serves or is wanted, PyTorch 2 packages, and secrets kept out of
//! the logs.

pub mod common;

use common::s3::*;
use common::*;
use modelgate::proto::serving::model_version_status::State;
use modelgate::proto::serving::ReloadConfigRequest;

const BUCKET: &str = "models";
const CONFIG_KEY: &str = "config/models.config";

fn scaled_config(extra: &str) -> String {
    format!(
        r#"name: "scaled" base_path: "s3://{BUCKET}/repo/scaled" model_platform: "pytorch" {extra}"#
    )
}

fn tiny_config() -> String {
    format!(r#"name: "tiny" base_path: "s3://{BUCKET}/repo/tiny" model_platform: "pytorch""#)
}

/// Uploads `scaled` version `version` (y = version * x) from the fixtures, model first.
async fn upload_scaled(s3: &S3, version: i64) {
    let dir = fixtures().join("scaled").join(version.to_string());
    s3.put_files(
        BUCKET,
        &format!("repo/scaled/{version}"),
        &dir,
        &["model.pt", "signature.json"],
    )
    .await;
}

/// Everything the bucket should hold at the start (and again after moto restarts empty).
async fn seed(s3: &S3, config: &str) {
    s3.create_bucket(BUCKET).await;
    s3.put(BUCKET, CONFIG_KEY, config.as_bytes().to_vec()).await;
    upload_scaled(s3, 1).await;
}

/// The factor of each `scaled` version uploaded here: 1 to 3 are the fixtures of the same
/// number, 4 and 5 are copies of fixture 3.
fn factor(version: i64) -> f32 {
    version.min(3) as f32
}

/// Predict on `scaled` (latest) until it answers from `version`, checking every answer.
async fn wait_for_served_version(server: &Server, version: i64) {
    let client = server.prediction().await;
    let what = format!("scaled to serve version {version}");
    wait_for(&what, || {
        let mut client = client.clone();
        async move {
            let (served, y) = predict(&mut client, spec("scaled"), &[1.0, 2.0, 3.0])
                .await
                .expect("scaled keeps answering");
            let expected: Vec<f32> = [1.0, 2.0, 3.0].iter().map(|x| x * factor(served)).collect();
            assert_eq!(
                y, expected,
                "version {served} answered with another version's values"
            );
            (served == version).then_some(())
        }
    })
    .await;
}

/// The listings of `scaled`'s versions moto has answered so far (its request log).
fn listings(moto: &Moto) -> usize {
    moto.log.count(&["list-type=2", "prefix=repo/scaled/"])
}

/// Waits until `n` polls of `scaled`'s versions have started after this call and run to
/// their end (loads and downloads included): `n + 2` more listings, since the first may
/// have been under way already and a poll's next listing comes only once it is done.
async fn polls(moto: &Moto, n: usize) {
    let target = listings(moto) + n + 2;
    let what = WithLog(
        format!("{n} more polls of scaled, in moto's log"),
        &moto.log,
    );
    wait_for(what, || async { (listings(moto) >= target).then_some(()) }).await;
}

/// The failed storage listings and downloads of `scaled` so far.
async fn storage_errors(server: &Server) -> f64 {
    server
        .metric("modelgate_storage_errors_total", &["model=\"scaled\""])
        .await
}

fn server_args(cache: &std::path::Path) -> Vec<String> {
    vec![
        format!("--model_config_file=s3://{BUCKET}/{CONFIG_KEY}"),
        "--model_config_file_poll_wait_seconds=1".into(),
        "--file_system_poll_wait_seconds=1".into(),
        format!("--model_cache_dir={}", cache.display()),
        "--device=cpu".into(),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_repository_lifecycle() {
    let mut moto = Moto::start();
    let s3 = moto.client();
    let first_config = config_text(&[scaled_config("")]);
    seed(&s3, &first_config).await;
    let cache = scratch("s3-cache");
    let server = Server::start_rest(&server_args(&cache), &moto.server_env("test-secret"));
    server.wait_readyz(200).await;
    let mut models = server.models().await;
    let mut predictions = server.prediction().await;

    // Config and model read from S3.
    let (version, y) = predict(&mut predictions, spec("scaled"), &[1.0, 2.0])
        .await
        .unwrap();
    assert_eq!((version, y), (1, vec![1.0, 2.0]));

    // A new version is picked up; the one it replaces is unloaded, and its copy leaves
    // the cache while the serving one stays.
    let cached = |version: i64| {
        cache
            .join(BUCKET)
            .join("repo/scaled")
            .join(version.to_string())
    };
    assert!(cached(1).is_dir());
    upload_scaled(&s3, 2).await;
    wait_for_served_version(&server, 2).await;
    wait_for_state(&models, "scaled", 1, State::End).await;
    wait_for("version 1 to leave the cache", || {
        let gone = !cached(1).exists();
        async move { gone.then_some(()) }
    })
    .await;
    assert!(cached(2).is_dir(), "the serving version left the cache");

    // A corrupt version fails with its reason, the serving version keeps serving, and the
    // failure is retried only a minute later (the default --load_retry_interval_micros),
    // not on every poll.
    s3.put_files(
        BUCKET,
        "repo/scaled/3",
        &fixtures().join("corrupt/1"),
        &["model.pt", "signature.json"],
    )
    .await;
    let error = wait_for_state(&models, "scaled", 3, State::End).await;
    assert!(error.contains("model.pt"), "error names the file: {error}");
    let fetched_before = server.log.count(&["fetched s3://models/repo/scaled"]);
    polls(&moto, 2).await;
    assert_eq!(
        server.log.count(&["failed to load", "version=3"]),
        1,
        "{}",
        server.log.text()
    );
    assert_eq!(
        server.log.count(&["fetched s3://models/repo/scaled"]),
        fetched_before
    );
    wait_for_served_version(&server, 2).await;

    // A version still being uploaded (signature.json before model.pt) is not loaded until
    // complete.
    let v4 = fixtures().join("scaled/3");
    s3.put_files(BUCKET, "repo/scaled/4", &v4, &["signature.json"])
        .await;
    polls(&moto, 1).await;
    let statuses = model_status(&mut models, "scaled").await.unwrap();
    assert!(statuses.iter().all(|(v, _, _)| *v != 4), "{statuses:?}");
    s3.put_files(BUCKET, "repo/scaled/4", &v4, &["model.pt"])
        .await;
    // Its model and signature are there, but `aws s3 sync` is still adding files: it loads
    // once a poll finds its files unchanged, with all of them, and version 2 serves meanwhile.
    // The next file lands right after the first listing that sees the model (a poll
    // interval before the one after it).
    let seen = listings(&moto) + 1;
    wait_for("a listing after model.pt's upload", || async {
        (listings(&moto) >= seen).then_some(())
    })
    .await;
    s3.put(
        BUCKET,
        "repo/scaled/4/assets.extra/notes.txt",
        b"uploaded last".to_vec(),
    )
    .await;
    wait_for_state(&models, "scaled", 4, State::Available).await;
    assert_eq!(
        server
            .log
            .count(&["fetched s3://models/repo/scaled/4 (3 files"]),
        1,
        "{}",
        server.log.text()
    );
    wait_for_state(&models, "scaled", 2, State::End).await;

    // A config change on S3 is picked up: a model with its signature embedded in model.pt
    // is added, and a label is added to the unchanged model without reloading it.
    let tiny = fixtures().join("tiny/1");
    s3.put_files(BUCKET, "repo/tiny/1", &tiny, &["model.pt"])
        .await;
    let second_config = config_text(&[
        scaled_config(r#"version_labels { key: "stable" value: 4 }"#),
        tiny_config(),
    ]);
    s3.put(BUCKET, CONFIG_KEY, second_config.as_bytes().to_vec())
        .await;
    wait_for_state(&models, "tiny", 1, State::Available).await;
    let (version, y) = predict(&mut predictions, spec("tiny"), &[3.0])
        .await
        .unwrap();
    assert_eq!((version, y), (1, vec![7.0]));
    let stable = spec_label("scaled", "stable");
    wait_for("label stable to bind", || {
        let (mut client, stable) = (predictions.clone(), stable.clone());
        async move { predict(&mut client, stable, &[1.0]).await.ok() }
    })
    .await;
    assert_eq!(
        server.log.count(&["loading", "model=scaled", "version=4"]),
        1
    );

    // Bad config text: the old config stays in force and the error is logged.
    s3.put(
        BUCKET,
        CONFIG_KEY,
        b"model_config_list { config { name: ".to_vec(),
    )
    .await;
    server.log.wait_for(&["model config refused"]).await;
    predict(&mut predictions, spec("tiny"), &[1.0])
        .await
        .expect("tiny still served");
    s3.put(BUCKET, CONFIG_KEY, second_config.as_bytes().to_vec())
        .await;

    // ReloadConfig: a bad config is refused whole, a good one answers once applied.
    let reload = |models: Vec<String>| ReloadConfigRequest {
        config: Some(
            modelgate::config::parse_model_server_config("test", &config_text(&models)).unwrap(),
        ),
        ..Default::default()
    };
    let refused = models
        .handle_reload_config_request(reload(vec![
            scaled_config(""),
            r#"name: "bad" base_path: "/x" model_platform: "onnx""#.into(),
        ]))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(model_status(&mut models, "tiny").await.is_ok());
    let empty = format!(r#"name: "empty" base_path: "s3://{BUCKET}/repo/empty""#);
    models
        .handle_reload_config_request(reload(vec![scaled_config(""), empty.clone()]))
        .await
        .expect("reload applied");
    let gone = model_status(&mut models, "tiny").await.unwrap_err();
    assert_eq!(gone.code(), tonic::Code::NotFound);
    let (code, body) = server.http_get("/readyz").await;
    assert_eq!(code, 503, "a model without an available version: {body}");
    assert!(body.contains("empty"), "{body}");
    models
        .handle_reload_config_request(reload(vec![scaled_config("")]))
        .await
        .expect("reload applied");
    assert_eq!(server.http_get("/readyz").await.0, 200);
    // What was downloaded from S3 is counted per model.
    let (_, metrics) = server.http_get("/metrics").await;
    let fetched: f64 = metrics
        .lines()
        .find(|l| l.starts_with("modelgate_storage_fetch_bytes_total{model=\"scaled\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no fetch bytes for scaled:\n{metrics}"));
    assert!(fetched > 0.0, "{fetched}");

    // S3 stops: everything loaded keeps serving, the outage is logged once, not per poll.
    moto.stop();
    for _ in 0..5 {
        let (version, _) = predict(&mut predictions, spec("scaled"), &[1.0])
            .await
            .expect("served while S3 is down");
        assert_eq!(version, 4);
    }
    server
        .log
        .wait_for(&["storage unavailable", "model=scaled"])
        .await;
    // Two more failed listings (retried 1 s, then 2 s later), each a chance to report the
    // outage again; the config, re-read every second, fails meanwhile too.
    let errors = storage_errors(&server).await;
    let what = server.awaiting("two more failed listings of scaled");
    wait_for(what, || async {
        (storage_errors(&server).await >= errors + 2.0).then_some(())
    })
    .await;
    server
        .log
        .wait_for(&["cannot re-read the model config"])
        .await;
    assert_eq!(
        server.log.count(&["storage unavailable", "model=scaled"]),
        1,
        "{}",
        server.log.text()
    );
    assert_eq!(server.log.count(&["cannot re-read the model config"]), 1);
    assert_eq!(server.http_get("/readyz").await.0, 200);

    // S3 comes back (empty: moto keeps nothing); once refilled, polling resumes and a new
    // version is picked up.
    moto.restart();
    let s3 = moto.client();
    seed(&s3, &config_text(&[scaled_config("")])).await;
    upload_scaled(&s3, 2).await;
    s3.put_files(
        BUCKET,
        "repo/scaled/5",
        &fixtures().join("scaled/3"),
        &["model.pt", "signature.json"],
    )
    .await;
    server
        .log
        .wait_for(&["storage is reachable again", "model=scaled"])
        .await;
    wait_for_served_version(&server, 5).await;
    assert_eq!(
        server.log.count(&["storage unavailable", "model=scaled"]),
        1
    );
    // Version 2 came back unchanged: it was never fetched twice.
    assert_eq!(server.log.count(&["fetched s3://models/repo/scaled/2 "]), 1);
    let _ = std::fs::remove_dir_all(&cache);
}

/// Credentials given to the server never show in its logs, even at the most verbose level.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_appear_in_logs() {
    let moto = Moto::start();
    let s3 = moto.client();
    seed(&s3, &config_text(&[scaled_config("")])).await;
    let secret = format!("Secret{}Key{}", std::process::id(), "zQx9");
    let token = format!("Token{}Session{}", std::process::id(), "pW3r");
    let mut env = moto.server_env(&secret);
    env.push(("MODELGATE_LOG".into(), "trace".into()));
    let cache = scratch("s3-secrets-cache");
    env.push(("AWS_SESSION_TOKEN".into(), token.clone()));
    let server = Server::start_rest(&server_args(&cache), &env);
    server.wait_readyz(200).await;
    let mut predictions = server.prediction().await;
    predict(&mut predictions, spec("scaled"), &[1.0])
        .await
        .unwrap();
    upload_scaled(&s3, 2).await;
    wait_for_served_version(&server, 2).await;
    let log = server.log.text();
    assert!(log.contains("S3 client ready"), "S3 was used");
    assert!(!log.contains(&secret), "the secret key leaked into the log");
    assert!(
        !log.contains(&token),
        "the session token leaked into the log"
    );
    let _ = std::fs::remove_dir_all(&cache);
}

/// `S3_VERIFY_SSL=0` reaches an HTTPS endpoint whose certificate cannot be verified (a
/// self-signed MinIO, typically); without it the certificate is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_verify_ssl_off_accepts_a_self_signed_endpoint() {
    let moto = Moto::start_tls();
    let s3 = moto.client();
    s3.create_bucket(BUCKET).await;
    upload_scaled(&s3, 1).await;
    let args = |cache: &std::path::Path| {
        vec![
            "--model_name=scaled".to_string(),
            "--device=cpu".to_string(),
            format!("--model_base_path=s3://{BUCKET}/repo/scaled"),
            format!("--model_cache_dir={}", cache.display()),
        ]
    };

    let cache = scratch("s3-tls-verified");
    let verified = Server::start_rest(&args(&cache), &moto.server_env("test-secret"));
    verified
        .log
        .wait_for(&["storage unavailable", "model=scaled"])
        .await;
    assert_eq!(verified.http_get("/readyz").await.0, 503);
    let log = verified.log.text();
    assert!(
        log.contains("certificate"),
        "refused for its certificate: {log}"
    );
    drop(verified);

    let mut env = moto.server_env("test-secret");
    env.push(("S3_VERIFY_SSL".into(), "0".into()));
    let unverified = Server::start_rest(&args(&cache), &env);
    unverified.wait_readyz(200).await;
    let mut predictions = unverified.prediction().await;
    let (version, y) = predict(&mut predictions, spec("scaled"), &[2.0])
        .await
        .unwrap();
    assert_eq!((version, y), (1, vec![2.0]));
    let _ = std::fs::remove_dir_all(&cache);
}

/// PyTorch 2 packages from S3: `small` with its signature.json beside the package, `pair`
/// as a lone model.pt2 whose signature is in its metadata (counted once it stays unchanged
/// across two listings, as a lone model.pt is).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pytorch2_packages_are_served_from_s3() {
    let moto = Moto::start();
    let s3 = moto.client();
    let pt2 = pt2_fixtures();
    s3.create_bucket(BUCKET).await;
    let config = config_text(&[
        format!(r#"name: "small" base_path: "s3://{BUCKET}/repo/small" model_platform: "pytorch""#),
        format!(r#"name: "pair" base_path: "s3://{BUCKET}/repo/pair" model_platform: "pytorch""#),
    ]);
    s3.put(BUCKET, CONFIG_KEY, config.into_bytes()).await;
    s3.put_files(
        BUCKET,
        "repo/small/1",
        &pt2.join("small/2"),
        &["model.pt2", "signature.json"],
    )
    .await;
    s3.put_files(BUCKET, "repo/pair/1", &pt2.join("pair/1"), &["model.pt2"])
        .await;
    let cache = scratch("s3-pt2-cache");
    let args = server_args(&cache);
    let server = Server::start_rest(&args, &moto.server_env("pt2-secret"));
    server.wait_available(&["small", "pair"]).await;
    let mut client = server.prediction().await;
    for (model, inputs, output, shape) in [
        (
            "small",
            vec![("x", float_row(&[1.0, 2.0, 3.0, 4.0]))],
            "scores",
            vec![1, 3],
        ),
        (
            "pair",
            vec![("a", float_row(&[1.0, 2.0, 3.0])), ("b", float_row(&[2.0]))],
            "offset",
            vec![1, 1],
        ),
    ] {
        let response = client
            .predict(modelgate::proto::serving::PredictRequest {
                model_spec: Some(spec(model)),
                inputs: inputs
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v))
                    .collect(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("{model}: {e:?}"))
            .into_inner();
        let answer = decode_tensor(output, &response.outputs[output]).unwrap();
        assert_eq!(answer.shape, shape, "{model}");
        if model == "pair" {
            // offset = sum(a) - b, whatever the weights.
            assert_eq!(answer.to_values::<f32>(), Some(vec![4.0]));
        }
    }
    drop(server);
    let _ = std::fs::remove_dir_all(&cache);
}

/// An object S3 refuses for good (here archived to Glacier: InvalidObjectState) fails that
/// version's load, retried as a failed load is; it is no outage: the model's polling does
/// not back off, the version is not fetched again on every poll, and the serving version
/// keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_refused_for_good_fails_its_version_not_the_storage() {
    let moto = Moto::start();
    let s3 = moto.client();
    seed(&s3, &config_text(&[scaled_config("")])).await;
    let cache = scratch("s3-refused-cache");
    let server = Server::start_rest(&server_args(&cache), &moto.server_env("refused-secret"));
    server.wait_available(&["scaled"]).await;
    let models = server.models().await;

    let fixture = fixtures().join("scaled/2");
    s3.put_files(BUCKET, "repo/scaled/2", &fixture, &["signature.json"])
        .await;
    s3.0.put_object()
        .bucket(BUCKET)
        .key("repo/scaled/2/model.pt")
        .storage_class(aws_sdk_s3::types::StorageClass::Glacier)
        .body(std::fs::read(fixture.join("model.pt")).unwrap().into())
        .send()
        .await
        .unwrap();
    let error = wait_for_state(&models, "scaled", 2, State::End).await;
    assert!(error.contains("InvalidObjectState"), "{error}");
    assert!(error.contains("retry 1 of"), "{error}");
    polls(&moto, 2).await;
    let fetches = moto.log.count(&["GET /models/repo/scaled/2/model.pt"]);
    assert_eq!(fetches, 1, "fetched again on a poll");
    assert_eq!(
        server.log.count(&["storage unavailable", "model=scaled"]),
        0,
        "{}",
        server.log.text()
    );
    wait_for_served_version(&server, 1).await;
    let _ = std::fs::remove_dir_all(&cache);
}

/// Serves `scaled` (version 1, from S3, with `extra` flags) once, so that the cache holds
/// it; the S3 server, the cache and the flags for a second run.
async fn scaled_cached_once(tag: &str, extra: &[&str]) -> (Moto, std::path::PathBuf, Vec<String>) {
    let moto = Moto::start();
    let s3 = moto.client();
    s3.create_bucket(BUCKET).await;
    upload_scaled(&s3, 1).await;
    let cache = scratch(tag);
    let mut args = vec![
        "--model_name=scaled".to_string(),
        "--device=cpu".to_string(),
        format!("--model_base_path=s3://{BUCKET}/repo/scaled"),
        format!("--model_cache_dir={}", cache.display()),
    ];
    args.extend(extra.iter().map(|flag| flag.to_string()));
    let first = Server::start_rest(&args, &moto.server_env("test-secret"));
    first.wait_readyz(200).await;
    drop(first);
    (moto, cache, args)
}

/// A version the cache cannot keep (here a file stands where its directory goes) fails to
/// load, retried as failed loads are: this machine's trouble is no storage outage, and the
/// version is not fetched again on every poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_the_cache_cannot_keep_fails_its_load_not_the_storage() {
    let (moto, cache, args) = scaled_cached_once(
        "s3-cache-blocked",
        &[
            "--file_system_poll_wait_seconds=1",
            "--load_retry_interval_micros=60000000",
        ],
    )
    .await;
    let version_dir = cache.join(BUCKET).join("repo/scaled/1");
    let cached: Vec<_> = std::fs::read_dir(&version_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    let [cached] = cached.as_slice() else {
        panic!("one cached copy: {cached:?}");
    };
    std::fs::remove_dir_all(cached).unwrap();
    std::fs::write(cached, b"in the way").unwrap();

    let fetches_before = moto.log.count(&["GET /models/repo/scaled/1/model.pt"]);
    let second = Server::start_rest(&args, &moto.server_env("test-secret"));
    let models = second.models().await;
    let error = wait_for_state(&models, "scaled", 1, State::End).await;
    assert!(error.contains("model cache"), "{error}");
    assert!(error.contains("retry 1 of"), "{error}");
    polls(&moto, 3).await;
    let fetches = moto.log.count(&["GET /models/repo/scaled/1/model.pt"]) - fetches_before;
    assert_eq!(fetches, 1, "fetched again on a poll");
    assert_eq!(
        second.log.count(&["storage unavailable", "model=scaled"]),
        0,
        "{}",
        second.log.text()
    );
    let _ = std::fs::remove_dir_all(&cache);
}

/// What an earlier run cached for models the config no longer names is removed at start,
/// before any download; what a configured model reads stays (and is not fetched again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_keeps_only_what_configured_models_read() {
    let (moto, cache, args) = scaled_cached_once("s3-cache-prune", &[]).await;
    // Left by a run whose config had other models.
    let stale = [
        cache.join(BUCKET).join("repo/retired/1/0123abcd"),
        cache.join("another-bucket/m/3/0123abcd"),
    ];
    for dir in &stale {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("model.pt"), b"old").unwrap();
    }

    let second = Server::start_rest(&args, &moto.server_env("test-secret"));
    second.wait_readyz(200).await;
    for dir in &stale {
        assert!(!dir.exists(), "{} is still cached", dir.display());
    }
    assert!(!cache.join("another-bucket").exists());
    assert!(cache.join(BUCKET).join("repo/scaled/1").is_dir());
    assert!(
        !second.log.text().contains("fetched"),
        "scaled came from the cache: {}",
        second.log.text()
    );
    let _ = std::fs::remove_dir_all(&cache);
}
