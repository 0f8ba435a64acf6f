//! Many models in one budget, against the real binary: on-demand versions load on their
//! first request (one load however many wait), the least recently used idle one is evicted
//! for room, never one with a request in flight nor a pinned one, resident bytes stay
//! within `--model_memory_budget` (sampled from /metrics throughout), a model larger than
//! the whole budget fails with a clear error while the others serve, an unload-first
//! swap under load fails no request, and one whose new version fails answers the requests
//! waiting in its gap at once.
//!
//! The models are copies of the `counter` fixture: its forward is busy for `x[:, 1]`
//! rounds (so a test can hold a request in flight), and its tensors are two buffers, a
//! 128x128 float identity and an int64 counter: 65544 bytes, which is what the server
//! must measure.

pub mod common;

use common::*;
use modelgate::proto::serving::model_version_status::State;
use modelgate::proto::serving::PredictRequest;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use tonic::Code;

/// The counter's buffers: a 128x128 float32 identity and one int64.
const COUNTER_BYTES: u64 = 128 * 128 * 4 + 8;

/// A repository of `names`, each a copy of the counter fixture as version 1.
fn repository(tag: &str, names: &[&str]) -> (PathBuf, u64) {
    let root = scratch(tag);
    let from = fixtures().join("counter/1");
    for name in names {
        copy_version(&from, &root.join(name).join("1"));
    }
    let file = std::fs::metadata(from.join("model.pt")).unwrap().len();
    (root, file)
}

fn copy_version(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for file in ["model.pt", "signature.json"] {
        std::fs::copy(from.join(file), to.join(file)).unwrap();
    }
}

fn config(root: &Path, names: &[&str]) -> String {
    let paths: Vec<PathBuf> = names.iter().map(|name| root.join(name)).collect();
    let entries: Vec<(&str, &Path, &str)> = names
        .iter()
        .zip(&paths)
        .map(|(name, path)| (*name, path.as_path(), ""))
        .collect();
    model_config(&entries)
}

/// The counter's Predict: `y = 2 * x[:, :1]`, busy for `rounds` rounds.
fn counter_request(model: &str, value: f32, rounds: f32) -> PredictRequest {
    PredictRequest {
        model_spec: Some(spec(model)),
        inputs: [("x".to_string(), floats(&[1, 2], &[value, rounds]))].into(),
        ..Default::default()
    }
}

async fn call(server: &Server, model: &str, value: f32) -> Result<Vec<f32>, tonic::Status> {
    let mut client = server.prediction().await;
    let response = client
        .predict(counter_request(model, value, 0.0))
        .await?
        .into_inner();
    let y = response.outputs.get("y").expect("output y");
    Ok(decode_tensor("y", y).unwrap().to_values::<f32>().unwrap())
}

async fn resident(server: &Server, model: &str) -> f64 {
    server
        .metric(
            "modelgate_model_resident_bytes",
            &[&format!("model=\"{model}\""), "device=\"cpu\""],
        )
        .await
}

async fn on_demand_loads(server: &Server, model: &str) -> f64 {
    server
        .metric(
            "modelgate_model_loads_total",
            &[&format!("model=\"{model}\""), "reason=\"on_demand\""],
        )
        .await
}

/// A CPU budget with room for `copies` resident counters plus one more's load: a load
/// reserves its file's size until it is measured.
fn room_for(copies: u64, file: u64) -> u64 {
    (copies - 1) * COUNTER_BYTES + file + COUNTER_BYTES / 2
}

/// The models `names` under `root`, all on demand in a CPU budget of `budget` bytes, young
/// versions spared for `min_residency` seconds; `extra` flags too. Waits until ready.
async fn on_demand_server(
    root: &Path,
    names: &[&str],
    budget: u64,
    min_residency: u64,
    extra: &[&str],
) -> Server {
    let budget = format!("--model_memory_budget=cpu={budget}");
    let min_residency = format!("--min_residency_seconds={min_residency}");
    let mut flags = vec![
        "--device=cpu",
        "--on_demand_models=*",
        &min_residency,
        &budget,
    ];
    flags.extend_from_slice(extra);
    let server = Server::with_config(&config(root, names), &flags);
    server.wait_readyz(200).await;
    server
}

/// A Predict on `model` whose client sends `grpc-timeout: timeout` and expects a refusal.
async fn refused_within(server: &Server, model: &str, timeout: &str) -> tonic::Status {
    let mut request = tonic::Request::new(counter_request(model, 1.0, 0.0));
    request
        .metadata_mut()
        .insert("grpc-timeout", timeout.parse().unwrap());
    server.raw_prediction().predict(request).await.unwrap_err()
}

/// Samples the total resident bytes every 50 ms until stopped; answers the largest seen.
struct Sampler {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<u64>,
}

impl Sampler {
    fn start(server: &Server) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let url = server.url("/metrics");
        let flag = Arc::clone(&stop);
        let task = tokio::spawn(async move {
            let mut peak = 0u64;
            while !flag.load(Ordering::Relaxed) {
                if let Ok((_, text)) = http::request("GET", &url, None).await {
                    let total: f64 = text
                        .lines()
                        .filter(|l| l.starts_with("modelgate_model_resident_bytes{"))
                        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                        .sum();
                    peak = peak.max(total as u64);
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            peak
        });
        Sampler { stop, task }
    }

    async fn peak(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_demand_versions_load_on_first_use_and_the_least_recently_used_is_evicted() {
    let names = ["m0", "m1", "m2", "m3"];
    let (root, file) = repository("residency-lru", &names);
    // Room for two resident copies and a third one loading, not for three resident.
    let budget = room_for(2, file);
    // Listed and ready before anything is loaded; metadata comes from the files.
    let server = on_demand_server(&root, &names, budget, 0, &[]).await;
    server.wait_available(&names).await;
    let budget_metric = server
        .metric("modelgate_model_memory_budget_bytes", &["device=\"cpu\""])
        .await;
    assert_eq!(budget_metric as u64, budget);
    let (code, metadata) = server.http_get("/v1/models/m3/metadata").await;
    assert_eq!(code, 200, "{metadata}");
    assert!(metadata.contains("serving_default"), "{metadata}");
    for name in names {
        assert_eq!(resident(&server, name).await, 0.0, "{name} loaded early");
    }
    let sampler = Sampler::start(&server);

    assert_eq!(call(&server, "m0", 1.0).await.unwrap(), vec![2.0]);
    assert_eq!(call(&server, "m1", 2.0).await.unwrap(), vec![4.0]);
    // Measured, not guessed from the file: the module's two buffers.
    assert_eq!(resident(&server, "m0").await as u64, COUNTER_BYTES);
    assert_eq!(resident(&server, "m1").await as u64, COUNTER_BYTES);
    // m0 is used again, so m1 is now the least recently used: m2's load evicts it.
    call(&server, "m0", 1.0).await.unwrap();
    assert_eq!(call(&server, "m2", 3.0).await.unwrap(), vec![6.0]);
    let evicted = |model: &'static str| {
        let server = &server;
        async move {
            server
                .metric(
                    "modelgate_model_evictions_total",
                    &[&format!("model=\"{model}\"")],
                )
                .await
        }
    };
    wait_for(server.awaiting("m1 to be evicted"), || async {
        (resident(&server, "m1").await == 0.0).then_some(())
    })
    .await;
    assert_eq!(evicted("m1").await, 1.0);
    assert_eq!(evicted("m0").await, 0.0);
    assert!(resident(&server, "m0").await > 0.0);
    assert!(resident(&server, "m2").await > 0.0);

    // The V2 protocol drives them as well: m3 comes in over REST and m0 (now the least
    // recently used) makes room.
    let body = r#"{"inputs":[{"name":"x","datatype":"FP32","shape":[1,2],"data":[5,0]}]}"#;
    let (code, answer) = http::post(&server.url("/v2/models/m3/infer"), body)
        .await
        .unwrap();
    assert_eq!(code, 200, "{answer}");
    assert!(answer.contains("10"), "{answer}");
    wait_for(server.awaiting("m0 to be evicted"), || async {
        (evicted("m0").await == 1.0).then_some(())
    })
    .await;
    // An evicted version comes back on its next request: a second on-demand load.
    assert_eq!(call(&server, "m1", 4.0).await.unwrap(), vec![8.0]);
    assert_eq!(on_demand_loads(&server, "m1").await, 2.0);
    for name in ["m0", "m2", "m3"] {
        assert_eq!(on_demand_loads(&server, name).await, 1.0, "{name}");
    }
    let cold_starts = server
        .metric("modelgate_model_cold_start_seconds_count", &[])
        .await;
    assert_eq!(cold_starts, 5.0);
    let peak = sampler.peak().await;
    assert!(peak <= budget, "resident {peak} > budget {budget}");
    // Two copies were resident at once (m0 and m1, asserted above); the sampler, every
    // 50 ms over a test of under a second, may miss that window but not every copy.
    assert!(
        peak >= COUNTER_BYTES,
        "the sampler saw no resident copy: {peak}"
    );
    let _ = std::fs::remove_dir_all(&root);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_first_requests_make_one_load() {
    let (root, _) = repository("residency-single-flight", &["m0"]);
    let server = Server::with_config(
        &config(&root, &["m0"]),
        &["--device=cpu", "--on_demand_models=m0"],
    );
    server.wait_readyz(200).await;
    let mut calls = Vec::new();
    for i in 0..16 {
        let client = server.prediction().await;
        calls.push(tokio::spawn(async move {
            let mut client = client;
            client.predict(counter_request("m0", i as f32, 0.0)).await
        }));
    }
    for call in calls {
        call.await.unwrap().unwrap();
    }
    assert_eq!(on_demand_loads(&server, "m0").await, 1.0);
    let _ = std::fs::remove_dir_all(&root);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_version_with_a_request_in_flight_is_not_evicted_and_deadlines_hold() {
    let (root, file) = repository("residency-lease", &["m0", "m1"]);
    // Room for one copy and not two.
    let server = on_demand_server(&root, &["m0", "m1"], room_for(1, file), 0, &[]).await;
    call(&server, "m0", 1.0).await.unwrap();
    // A slow request holds m0 (seconds of work on two cores, far longer than the deadline
    // below even on a loaded machine).
    let mut slow_client = server.prediction().await;
    let slow = tokio::spawn(async move {
        slow_client
            .predict(counter_request("m0", 1.0, 150000.0))
            .await
    });
    let what = server.awaiting("the slow request to start");
    wait_for(what, || async {
        let forwards = server
            .metric("modelgate_batch_size_count", &["model=\"m0\""])
            .await;
        let running = server
            .metric("modelgate_queue_depth", &["model=\"m0\""])
            .await;
        (forwards >= 1.0 && running == 0.0).then_some(())
    })
    .await;
    // m1 needs m0's room, and m0 is in use: with a short deadline, RESOURCE_EXHAUSTED.
    // A request with time to wait, arriving while that load waits for room, is not failed
    // with it: m1 loads for it once the slow request has answered and m0 is idle.
    let short = refused_within(&server, "m1", "1S");
    let patient = async {
        server
            .log
            .wait_for(&["loading on demand", "model=m1"])
            .await;
        call(&server, "m1", 7.0).await
    };
    let (status, waited) = tokio::join!(short, patient);
    assert_eq!(
        status.code(),
        Code::ResourceExhausted,
        "{}",
        status.message()
    );
    assert!(status.message().contains("in use"), "{}", status.message());
    assert_eq!(waited.unwrap(), vec![14.0]);
    let answered = slow.await.unwrap().expect("the slow request was answered");
    assert!(answered.into_inner().outputs.contains_key("y"));
    assert_eq!(resident(&server, "m0").await, 0.0);
    let _ = std::fs::remove_dir_all(&root);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pinned_models_stay_and_a_model_over_the_whole_budget_fails_alone() {
    let names = ["pinned", "m1", "m2"];
    let (root, file) = repository("residency-pinned", &names);
    // A smaller model beside them: the tiny fixture.
    copy_dir(&fixtures().join("tiny"), &root.join("tiny"));
    let mut all = names.to_vec();
    all.push("tiny");
    // Room for two copies; the pinned one holds one of them for good.
    let pinned = ["--pinned_models=pinned"];
    let server = on_demand_server(&root, &all, room_for(2, file), 0, &pinned).await;
    // Loaded at start, as a config load.
    assert_eq!(resident(&server, "pinned").await as u64, COUNTER_BYTES);
    for round in 0..3 {
        for model in ["m1", "m2"] {
            call(&server, model, round as f32).await.unwrap();
        }
    }
    assert_eq!(resident(&server, "pinned").await as u64, COUNTER_BYTES);
    let pinned_evictions = server
        .metric("modelgate_model_evictions_total", &["model=\"pinned\""])
        .await;
    assert_eq!(pinned_evictions, 0.0);
    assert!(on_demand_loads(&server, "m1").await >= 3.0);
    drop(server);

    // A budget smaller than one copy: that model fails with the reason, tiny serves.
    let small = file / 2;
    let server = Server::with_config(
        &config(&root, &["m1", "tiny"]),
        &[
            "--device=cpu",
            "--on_demand_models=m1",
            &format!("--model_memory_budget=cpu={small}"),
        ],
    );
    server.wait_readyz(200).await;
    let status = call(&server, "m1", 1.0).await.unwrap_err();
    assert_eq!(
        status.code(),
        Code::ResourceExhausted,
        "{}",
        status.message()
    );
    assert!(
        status.message().contains("more than the whole budget"),
        "{}",
        status.message()
    );
    let (code, body) = http::post(
        &server.url("/v1/models/tiny:predict"),
        r#"{"instances": [[1.0]]}"#,
    )
    .await
    .unwrap();
    assert_eq!(code, 200, "{body}");
    let _ = std::fs::remove_dir_all(&root);
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// A server of the model `big` under `root`, unload-first, polling its files every second.
async fn unload_first_server(root: &Path, extra: &[&str]) -> Server {
    let mut flags = vec![
        "--device=cpu",
        "--unload_first_models=big",
        "--file_system_poll_wait_seconds=1",
    ];
    flags.extend_from_slice(extra);
    let server = Server::with_config(&config(root, &["big"]), &flags);
    server.wait_readyz(200).await;
    server
}

/// `count` clients sending `big` one Predict after another (each with a 20 s deadline)
/// until `stop`, telling `seen` each outcome and how long it took.
fn clients_of_big(
    server: &Server,
    count: usize,
    stop: &Arc<AtomicBool>,
    seen: Arc<dyn Fn(Result<(), tonic::Status>, std::time::Duration) + Send + Sync>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..count)
        .map(|_| {
            let mut client = server.raw_prediction();
            let (stop, seen) = (Arc::clone(stop), Arc::clone(&seen));
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let mut request = tonic::Request::new(counter_request("big", 1.0, 0.0));
                    request
                        .metadata_mut()
                        .insert("grpc-timeout", "20S".parse().unwrap());
                    let started = std::time::Instant::now();
                    let outcome = client.predict(request).await.map(|_| ());
                    seen(outcome, started.elapsed());
                }
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unload_first_swap_under_load_fails_no_request() {
    let (root, _) = repository("residency-unload-first", &["big"]);
    let server = unload_first_server(&root, &[]).await;
    let stop = Arc::new(AtomicBool::new(false));
    let (answered, failures) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(std::sync::Mutex::new(Vec::new())),
    );
    let longest = Arc::new(AtomicU64::new(0));
    let clients = clients_of_big(&server, 4, &stop, {
        let (answered, failures, longest) = (
            Arc::clone(&answered),
            Arc::clone(&failures),
            Arc::clone(&longest),
        );
        Arc::new(move |outcome, took| {
            match outcome {
                Ok(()) => {
                    answered.fetch_add(1, Ordering::Relaxed);
                }
                Err(status) => failures.lock().unwrap().push(format!("{status:?}")),
            }
            longest.fetch_max(took.as_micros() as u64, Ordering::Relaxed);
        })
    });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    copy_version(&fixtures().join("counter/1"), &root.join("big/2"));
    let models = server.models().await;
    wait_for_state(&models, "big", 2, State::Available).await;
    wait_for_state(&models, "big", 1, State::End).await;
    let before = answered.load(Ordering::Relaxed);
    wait_for(
        server.awaiting("requests answered by version 2"),
        || async { (answered.load(Ordering::Relaxed) > before + 20).then_some(()) },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.await.unwrap();
    }
    let failures = failures.lock().unwrap();
    assert!(failures.is_empty(), "{failures:?}");
    // The old version was gone before the new one started loading.
    let log = server.log();
    let line_of = |words: &[&str]| {
        log.lines()
            .position(|line| words.iter().all(|w| line.contains(w)))
            .unwrap_or_else(|| panic!("no line with {words:?}:\n{log}"))
    };
    assert!(
        line_of(&[" unloaded", "version=1"]) < line_of(&[" loading", "version=2"]),
        "{log}"
    );
    eprintln!(
        "unload-first swap: {} requests answered, none failed; the longest took {:.1} ms \
         (it waited through the gap between the versions)",
        answered.load(Ordering::Relaxed),
        longest.load(Ordering::Relaxed) as f64 / 1000.0
    );
    let _ = std::fs::remove_dir_all(&root);
}

/// A version that measures more than its estimate once loaded makes room for the
/// difference: the `unpacks` fixture is 2 KiB on disk and 4 MiB loaded (its
/// `__setstate__` builds a table), so its reservation fits beside two resident counters
/// but its measured bytes do not, and the least recently used counter is evicted for them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_version_larger_than_its_estimate_evicts_for_the_difference() {
    const UNPACKS_BYTES: u64 = 4 << 20;
    let (root, _) = repository("residency-larger-than-estimate", &["c0", "c1"]);
    copy_version(&fixtures().join("unpacks/1"), &root.join("unpacks/1"));
    let budget = UNPACKS_BYTES + COUNTER_BYTES + COUNTER_BYTES / 2;
    let server = on_demand_server(&root, &["c0", "c1", "unpacks"], budget, 0, &[]).await;
    call(&server, "c0", 1.0).await.unwrap();
    call(&server, "c1", 1.0).await.unwrap();
    let request = PredictRequest {
        model_spec: Some(spec("unpacks")),
        inputs: [("x".to_string(), floats(&[1, 1], &[3.0]))].into(),
        ..Default::default()
    };
    let response = server
        .prediction()
        .await
        .predict(request)
        .await
        .unwrap_or_else(|status| panic!("{status:?}\n{}", server.log()))
        .into_inner();
    let y = decode_tensor("y", &response.outputs["y"]).unwrap();
    assert_eq!(y.to_values::<f32>().unwrap(), vec![6.0]);
    assert_eq!(resident(&server, "unpacks").await as u64, UNPACKS_BYTES);
    wait_for(server.awaiting("c0 to be evicted"), || async {
        (resident(&server, "c0").await == 0.0).then_some(())
    })
    .await;
    assert_eq!(resident(&server, "c1").await as u64, COUNTER_BYTES);
    let _ = std::fs::remove_dir_all(&root);
}

/// A request that arrives while an on-demand load is failing gets that load's error, not a
/// second load, and so does one that arrives within the retry interval after: the
/// version's warm-up runs seconds of work, then a record the model refuses, so the load
/// fails long after it started.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_arriving_during_a_failing_load_gets_its_error_not_another_load() {
    let (root, _) = repository("residency-failing-load", &["flaky"]);
    let warm_up = tfrecord(&[counter_record("x", 30_000.0), counter_record("nope", 0.0)]);
    let assets = root.join("flaky/1/assets.extra");
    std::fs::create_dir_all(&assets).unwrap();
    std::fs::write(assets.join("tf_serving_warmup_requests"), warm_up).unwrap();
    let server = Arc::new(
        on_demand_server(
            &root,
            &["flaky"],
            10 * COUNTER_BYTES,
            0,
            &["--enable_model_warmup"],
        )
        .await,
    );
    let first = {
        let server = Arc::clone(&server);
        tokio::spawn(async move { call(&server, "flaky", 1.0).await })
    };
    server
        .log
        .wait_for(&["loading on demand", "model=flaky"])
        .await;
    let second = call(&server, "flaky", 2.0).await.unwrap_err();
    let first = first.await.unwrap().unwrap_err();
    assert_eq!(first.code(), Code::Unavailable, "{first:?}");
    assert_eq!(
        (second.code(), second.message()),
        (first.code(), first.message()),
        "the second request gets the failed load's error"
    );
    assert!(first.message().contains("warm-up"), "{first:?}");
    // Nor does one that arrives after it, within the retry interval: a broken version is
    // not loaded again for every request.
    let third = call(&server, "flaky", 3.0).await.unwrap_err();
    assert_eq!(third.code(), Code::Unavailable, "{third:?}");
    assert!(third.message().contains("tried again"), "{third:?}");
    assert_eq!(
        on_demand_loads(&server, "flaky").await,
        1.0,
        "{}",
        server.log()
    );
    let _ = std::fs::remove_dir_all(&root);
}

/// An unload-first swap whose new version fails to load (its warm-up file is garbage, read
/// once its workers have started, so the gap lasts a whole load): the requests that were
/// waiting in the gap are told at once that no version serves (NOT_FOUND), rather than
/// waiting out their deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_unload_first_swap_answers_the_waiting_requests_at_once() {
    let (root, _) = repository("residency-unload-first-fails", &["big"]);
    let server = unload_first_server(
        &root,
        &["--enable_model_warmup", "--max_num_load_retries=0"],
    )
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let codes = Arc::new(std::sync::Mutex::new(Vec::new()));
    let clients = clients_of_big(&server, 8, &stop, {
        let codes = Arc::clone(&codes);
        Arc::new(move |outcome, _| {
            let code = outcome.map_or_else(|status| status.code(), |()| Code::Ok);
            codes.lock().unwrap().push(code);
        })
    });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let staged = root.join("big/.2");
    copy_version(&fixtures().join("counter/1"), &staged);
    std::fs::create_dir_all(staged.join("assets.extra")).unwrap();
    std::fs::write(
        staged.join("assets.extra/tf_serving_warmup_requests"),
        b"not a TFRecord file",
    )
    .unwrap();
    std::fs::rename(&staged, root.join("big/2")).unwrap();
    let models = server.models().await;
    wait_for_state(&models, "big", 2, State::End).await;
    wait_for(
        server.awaiting("requests refused after the failed swap"),
        || async {
            codes
                .lock()
                .unwrap()
                .iter()
                .filter(|code| **code == Code::NotFound)
                .nth(20)
                .map(|_| ())
        },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.await.unwrap();
    }
    let codes = codes.lock().unwrap();
    let count = |wanted: Code| codes.iter().filter(|code| **code == wanted).count();
    assert_eq!(count(Code::DeadlineExceeded), 0, "{codes:?}");
    assert_eq!(
        count(Code::Ok) + count(Code::NotFound),
        codes.len(),
        "{codes:?}"
    );
    let log = server.log();
    assert!(log.contains("failed to load"), "{log}");
    eprintln!(
        "failed unload-first swap: {} answered by version 1, then {} NOT_FOUND, none waited \
         out its deadline",
        count(Code::Ok),
        count(Code::NotFound)
    );
    let _ = std::fs::remove_dir_all(&root);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_comes_back_over_200_evictions() {
    let (root, file) = repository("residency-rss", &["m0", "m1"]);
    // Room for one copy: every request for the other evicts it.
    let server = on_demand_server(&root, &["m0", "m1"], room_for(1, file), 0, &[]).await;
    let mut after_20 = 0;
    for cycle in 1..=200 {
        for (i, model) in ["m0", "m1"].into_iter().enumerate() {
            let value = (cycle * 2 + i) as f32;
            assert_eq!(
                call(&server, model, value).await.unwrap(),
                vec![2.0 * value]
            );
        }
        if cycle == 20 {
            after_20 = server.memory().resident;
        }
    }
    let after_200 = server.memory().resident;
    let evictions = server.metric("modelgate_model_evictions_total", &[]).await;
    assert!(evictions >= 399.0, "{evictions} evictions");
    eprintln!(
        "RSS after 20 cycles {:.1} MiB, after 200 {:.1} MiB ({evictions} evictions)",
        after_20 as f64 / 1048576.0,
        after_200 as f64 / 1048576.0
    );
    assert!(
        after_200 < after_20 + (50 << 20),
        "RSS grew from {after_20} to {after_200} bytes over 180 eviction/load cycles"
    );
    let _ = std::fs::remove_dir_all(&root);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_version_younger_than_the_minimum_residency_is_not_evicted() {
    let (root, file) = repository("residency-young", &["m0", "m1"]);
    let server = on_demand_server(&root, &["m0", "m1"], room_for(1, file), 600, &[]).await;
    call(&server, "m0", 1.0).await.unwrap();
    // m0 is idle but young: m1 waits for room until its deadline, and gets none.
    let status = refused_within(&server, "m1", "500m").await;
    assert_eq!(
        status.code(),
        Code::ResourceExhausted,
        "{}",
        status.message()
    );
    assert_eq!(resident(&server, "m0").await as u64, COUNTER_BYTES);
    let _ = std::fs::remove_dir_all(&root);
}

/// An on-demand version is read when it is listed and loaded when first asked for: a model
/// file rewritten in place between the two is refused (its checks and signature are about
/// the old file), naming why, rather than run unchecked.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_model_rewritten_in_place_after_it_was_read_is_not_loaded() {
    let (root, _) = repository("residency-rewritten", &["rewritten"]);
    let server = on_demand_server(&root, &["rewritten"], 10 * COUNTER_BYTES, 0, &[]).await;
    let model = root.join("rewritten/1/model.pt");
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&model)
        .unwrap();
    file.set_modified(std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1))
        .unwrap();
    drop(file);
    let refused = call(&server, "rewritten", 1.0).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(
        refused
            .message()
            .contains("the file changed after the version was read"),
        "{refused:?}"
    );
    let _ = std::fs::remove_dir_all(&root);
}

/// A version of a model loaded from the config that finds no room (the on-demand version
/// holding it is too young to evict) is not failed for good: it is tried again, its load
/// retries untouched, and loads once room comes, with no change to its files.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_configured_version_waits_for_room_without_spending_its_retries() {
    let (root, file) = repository("residency-no-room-yet", &["m0", "m1"]);
    // Room for two copies: m0 (on demand, young for 40 s) and m1's version 1.
    let budget = format!("--model_memory_budget=cpu={}", room_for(2, file));
    let server = Server::with_config(
        &config(&root, &["m0", "m1"]),
        &[
            "--device=cpu",
            "--on_demand_models=m0",
            "--min_residency_seconds=40",
            &budget,
            "--max_num_load_retries=0",
            "--load_retry_interval_micros=1000000",
            "--file_system_poll_wait_seconds=1",
        ],
    );
    server.wait_readyz(200).await;
    call(&server, "m0", 1.0).await.unwrap();
    // Version 2 of m1 needs a third copy's room while version 1 serves.
    copy_version(&root.join("m1/1"), &root.join("m1/2"));
    let models = server.models().await;
    let error = wait_for_state(&models, "m1", 2, State::End).await;
    assert!(error.contains("tried again in"), "{error}");
    wait_for_state(&models, "m1", 2, State::Available).await;
    let _ = std::fs::remove_dir_all(&root);
}
