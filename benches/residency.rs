//! Table 7 of the serving benchmark: many models in one memory budget
//! (`cargo bench --bench serving -- residency`, `make bench-residency`).
//!
//! Twelve copies of the demo `mlp` (784-512-512-10, 2.6 MB of weights each); 16 clients,
//! each choosing a model per request Zipf-distributed (s = 1.1) and sending it a one-row
//! Predict, for a minute per row:
//! - a server holding all twelve (the baseline);
//! - the twelve on demand, with a CPU budget that holds three (`--min_residency_seconds`
//!   0 and its default, 5).
//!
//! Resident bytes are sampled from /metrics every 100 ms and must never pass the budget;
//! no request may fail. Printed: requests/s, p50 / p99 over all requests, the hit rate
//! (requests that found their version resident), on-demand loads, evictions, and the
//! cold-start p50 / p99 (from `modelgate_model_cold_start_seconds`, interpolated in its
//! buckets as Prometheus' histogram_quantile does).
//!
//! Then an unload-first swap (`--unload_first_models`) of a model whose two versions do not
//! fit the budget together, under load from 8 clients: failed requests (none expected) and
//! the longest a request waited through the gap.

use crate::common::{demo_models, free_port, model_status, spec, write_config, Server, TempDir};
use modelgate::proto::serving::model_version_status::State;
use modelgate::proto::serving::prediction_service_client::PredictionServiceClient;
use modelgate::proto::serving::PredictRequest;
use modelgate::proto::tensor::tensor_to_proto;
use modelgate::tensor::Tensor;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic::transport::Channel;

const MODELS: usize = 12;
const RESIDENT: u64 = 3;
const CLIENTS: usize = 16;
const ZIPF_S: f64 = 1.1;
const RUN: Duration = Duration::from_secs(60);

fn copy_mlp(to: &Path) {
    let from = demo_models().join("mlp/2");
    std::fs::create_dir_all(to).expect("version dir");
    for file in ["model.pt", "signature.json"] {
        std::fs::copy(from.join(file), to.join(file)).expect("copy mlp");
    }
}

fn one_row(model: &str) -> PredictRequest {
    let row = Tensor::from_values(vec![1, 784], &super::loadgen::pattern(784)).expect("row");
    PredictRequest {
        model_spec: Some(spec(model)),
        inputs: [("images".to_string(), tensor_to_proto(&row, true))].into(),
        ..Default::default()
    }
}

/// Zipf(s) over `n` ranks: the cumulative weights, and a draw from a uniform in [0, 1).
struct Zipf(Vec<f64>);

impl Zipf {
    fn new(n: usize, s: f64) -> Zipf {
        let weights: Vec<f64> = (1..=n).map(|k| 1.0 / (k as f64).powf(s)).collect();
        let total: f64 = weights.iter().sum();
        let mut sum = 0.0;
        Zipf(
            weights
                .iter()
                .map(|w| {
                    sum += w / total;
                    sum
                })
                .collect(),
        )
    }

    fn rank(&self, uniform: f64) -> usize {
        self.0
            .iter()
            .position(|&c| uniform < c)
            .unwrap_or(self.0.len() - 1)
    }
}

/// xorshift64*: a deterministic uniform per client, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The sum of the samples of `name` on a /metrics page (labels ignored).
fn total(text: &str, name: &str) -> f64 {
    text.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(name)?;
            (rest.starts_with('{') || rest.starts_with(' ')).then_some(rest)
        })
        .filter_map(|rest| rest.rsplit(' ').next()?.parse::<f64>().ok())
        .fold(0.0, |sum, value| sum + value)
}

/// Quantile `q` of a histogram on a /metrics page, its buckets summed over every label set.
fn histogram_quantile(text: &str, name: &str, q: f64) -> f64 {
    let mut buckets: Vec<(f64, f64)> = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(&format!("{name}_bucket{{")) else {
            continue;
        };
        let Some(le) = rest.split("le=\"").nth(1).and_then(|s| s.split('"').next()) else {
            continue;
        };
        let bound = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse().unwrap_or(f64::NAN)
        };
        let count: f64 = rest
            .rsplit(' ')
            .next()
            .and_then(|c| c.parse().ok())
            .unwrap_or(0.0);
        match buckets.iter_mut().find(|(b, _)| *b == bound) {
            Some((_, c)) => *c += count,
            None => buckets.push((bound, count)),
        }
    }
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let Some(&(_, all)) = buckets.last() else {
        return f64::NAN;
    };
    if all == 0.0 {
        return f64::NAN;
    }
    let rank = q * all;
    let (mut lower, mut below) = (0.0, 0.0);
    for (bound, count) in buckets {
        if count >= rank {
            if bound.is_infinite() {
                return lower;
            }
            return lower + (bound - lower) * (rank - below) / (count - below).max(1.0);
        }
        (lower, below) = (bound, count);
    }
    f64::NAN
}

struct Outcome {
    requests: u64,
    failed: u64,
    seconds: f64,
    latencies_ms: Vec<f64>,
    peak_resident: u64,
    samples: u64,
    metrics: String,
}

impl Outcome {
    fn quantile(&self, q: f64) -> f64 {
        let mut sorted = self.latencies_ms.clone();
        sorted.sort_by(f64::total_cmp);
        let i = ((sorted.len() as f64 * q) as usize).min(sorted.len().saturating_sub(1));
        sorted.get(i).copied().unwrap_or(f64::NAN)
    }
}

/// 16 clients sending one-row Predicts to models chosen Zipf-distributed, until `finish`.
struct ZipfLoad {
    stop: Arc<AtomicBool>,
    answered: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    latencies: Arc<Mutex<Vec<f64>>>,
    clients: Vec<tokio::task::JoinHandle<()>>,
    started: Instant,
}

impl ZipfLoad {
    async fn start(server: &Server) -> ZipfLoad {
        let channel = Channel::from_shared(server.grpc_url())
            .expect("uri")
            .connect()
            .await
            .expect("connect");
        let zipf = Arc::new(Zipf::new(MODELS, ZIPF_S));
        let stop = Arc::new(AtomicBool::new(false));
        let (answered, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let latencies = Arc::new(Mutex::new(Vec::new()));
        let mut clients = Vec::new();
        for id in 0..CLIENTS {
            let mut client = PredictionServiceClient::new(channel.clone());
            let (zipf, stop, answered, failed, latencies) = (
                Arc::clone(&zipf),
                Arc::clone(&stop),
                Arc::clone(&answered),
                Arc::clone(&failed),
                Arc::clone(&latencies),
            );
            let requests: Vec<PredictRequest> =
                (0..MODELS).map(|m| one_row(&format!("m{m}"))).collect();
            clients.push(tokio::spawn(async move {
                let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (id as u64 + 1));
                let mut mine = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let request = requests[zipf.rank(rng.next())].clone();
                    let sent = Instant::now();
                    match client.predict(request).await {
                        Ok(_) => {
                            mine.push(sent.elapsed().as_secs_f64() * 1e3);
                            answered.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(status) => {
                            if failed.fetch_add(1, Ordering::Relaxed) == 0 {
                                eprintln!("first failure: {status:?}");
                            }
                        }
                    }
                }
                latencies.lock().expect("latencies").extend(mine);
            }));
        }
        ZipfLoad {
            stop,
            answered,
            failed,
            latencies,
            clients,
            started: Instant::now(),
        }
    }

    /// Stops the clients: every answered request's latency (ms), failures, seconds run.
    async fn finish(self) -> (Vec<f64>, u64, f64) {
        self.stop.store(true, Ordering::Relaxed);
        for client in self.clients {
            client.await.expect("client");
        }
        let latencies = std::mem::take(&mut *self.latencies.lock().expect("latencies"));
        (
            latencies,
            self.failed.load(Ordering::Relaxed),
            self.started.elapsed().as_secs_f64(),
        )
    }
}

async fn drive(server: &Server) -> Outcome {
    let load = ZipfLoad::start(server).await;
    let (peak, samples) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let sampler = {
        let (url, stop, peak, samples) = (
            server.url("/metrics"),
            Arc::clone(&load.stop),
            Arc::clone(&peak),
            Arc::clone(&samples),
        );
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if let Ok((_, text)) = crate::common::http::request("GET", &url, None).await {
                    let resident = total(&text, "modelgate_model_resident_bytes") as u64;
                    peak.fetch_max(resident, Ordering::Relaxed);
                    samples.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    tokio::time::sleep(RUN).await;
    let (latencies_ms, failed, seconds) = load.finish().await;
    sampler.await.expect("sampler");
    let (_, metrics) = server.http_get("/metrics").await;
    Outcome {
        requests: latencies_ms.len() as u64,
        failed,
        seconds,
        latencies_ms,
        peak_resident: peak.load(Ordering::Relaxed),
        samples: samples.load(Ordering::Relaxed),
        metrics,
    }
}

fn start(config: &Path, extra: &[String]) -> Server {
    let mut args = vec![
        format!("--model_config_file={}", config.display()),
        format!("--rest_api_port={}", free_port()),
        "--device=cpu".to_string(),
    ];
    args.extend_from_slice(extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Server::start_with_env(&args, &[("MODELGATE_LOG", "warn,modelgate::app=info")])
}

fn row(label: &str, budget: Option<u64>, outcome: &Outcome) {
    let m = &outcome.metrics;
    let cold = total(m, "modelgate_model_cold_start_seconds_count");
    let hit = 1.0 - cold / outcome.requests.max(1) as f64;
    let ms = |q| histogram_quantile(m, "modelgate_model_cold_start_seconds", q) * 1e3;
    let budget = budget.map_or("-".to_string(), |b| format!("{:.1}", b as f64 / 1048576.0));
    println!(
        "| {label} | {:.0} | {:.1} | {:.1} | {} | {:.1}% | {:.0} | {:.0} | {} | {} | {:.1} / {} | {} |",
        outcome.requests as f64 / outcome.seconds,
        outcome.quantile(0.5),
        outcome.quantile(0.99),
        outcome.failed,
        hit * 100.0,
        total(m, "modelgate_model_loads_total"),
        total(m, "modelgate_model_evictions_total"),
        if cold > 0.0 { format!("{:.0}", ms(0.5)) } else { "-".into() },
        if cold > 0.0 { format!("{:.0}", ms(0.99)) } else { "-".into() },
        outcome.peak_resident as f64 / 1048576.0,
        budget,
        outcome.samples,
    );
}

pub async fn tables() {
    let dir = TempDir::new("bench-residency");
    let names: Vec<String> = (0..MODELS).map(|m| format!("m{m}")).collect();
    for name in &names {
        copy_mlp(&dir.0.join(name).join("1"));
    }
    let entries: Vec<(&str, std::path::PathBuf, &str)> = names
        .iter()
        .map(|name| (name.as_str(), dir.0.join(name), ""))
        .collect();
    let config = write_config(&dir.0, &entries);

    println!(
        "\n## 7. Many models, one budget: {MODELS} copies of mlp, {CLIENTS} clients, Zipf s={ZIPF_S}, {}s per row\n",
        RUN.as_secs()
    );
    println!("| server | req/s | p50 ms | p99 ms | failed | hit rate | loads | evictions | cold p50 ms | cold p99 ms | peak resident / budget MiB | samples |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    let all = start(&config, &[]);
    all.wait_readyz(200).await;
    let footprint = all
        .metric("modelgate_model_resident_bytes", &["model=\"m0\""])
        .await as u64;
    let outcome = drive(&all).await;
    row("all 12 resident", None, &outcome);
    drop(all);

    let budget = RESIDENT * footprint + footprint / 2;
    for min_residency in ["0", "5"] {
        let server = start(
            &config,
            &[
                "--on_demand_models=*".into(),
                format!("--model_memory_budget=cpu={budget}"),
                format!("--min_residency_seconds={min_residency}"),
            ],
        );
        server.wait_readyz(200).await;
        let outcome = drive(&server).await;
        row(
            &format!("on demand, budget for {RESIDENT}, --min_residency_seconds={min_residency}"),
            Some(budget),
            &outcome,
        );
        assert!(
            outcome.peak_resident <= budget,
            "resident bytes passed the budget"
        );
    }
    println!("\n(each mlp holds {footprint} bytes, measured)");
    unload_first_swap(footprint).await;
}

/// An unload-first swap under load, of a model only one version of which fits.
async fn unload_first_swap(footprint: u64) {
    let dir = TempDir::new("bench-unload-first");
    copy_mlp(&dir.0.join("big/1"));
    let config = write_config(&dir.0, &[("big", dir.0.join("big"), "")]);
    let budget = footprint + footprint / 2;
    let server = start(
        &config,
        &[
            "--unload_first_models=big".into(),
            format!("--model_memory_budget=cpu={budget}"),
            "--file_system_poll_wait_seconds=1".into(),
        ],
    );
    server.wait_readyz(200).await;
    let channel = server.channel().await;
    let stop = Arc::new(AtomicBool::new(false));
    let (failed, answered, longest) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let mut clients = Vec::new();
    for _ in 0..8 {
        let mut client = PredictionServiceClient::new(channel.clone());
        let (stop, failed, answered, longest) = (
            Arc::clone(&stop),
            Arc::clone(&failed),
            Arc::clone(&answered),
            Arc::clone(&longest),
        );
        clients.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let sent = Instant::now();
                match client.predict(one_row("big")).await {
                    Ok(_) => answered.fetch_add(1, Ordering::Relaxed),
                    Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                };
                longest.fetch_max(sent.elapsed().as_micros() as u64, Ordering::Relaxed);
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    copy_mlp(&dir.0.join("big/2"));
    let swapped = Instant::now();
    let mut models = server.models().await;
    loop {
        let statuses = model_status(&mut models, "big").await.unwrap_or_default();
        let state = |version| {
            statuses
                .iter()
                .find(|(v, _, _)| *v == version)
                .map(|(_, state, _)| *state)
        };
        if state(2) == Some(State::Available) && state(1) == Some(State::End) {
            break;
        }
        assert!(
            swapped.elapsed() < Duration::from_secs(60),
            "no swap: {statuses:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.await.expect("client");
    }
    println!(
        "\nUnload-first swap of a model one version of which fits the budget, 8 clients: \
         {} requests answered, {} failed; the longest request took {:.1} ms (the gap it \
         waited through)",
        answered.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
        longest.load(Ordering::Relaxed) as f64 / 1000.0
    );
}

/// `cargo bench --bench serving -- soak [MINUTES [ROW]]` (`make bench-soak`): memory over a
/// long run under load; ROW runs one row alone (`"glibc defaults"`). The twelve on-demand `mlp` copies of table 7 in a budget for three (about
/// 150 loads and evictions a second) with 16 Zipf clients, while a config model `hot` swaps
/// to a new version every 5 s; the server's RSS (and its anonymous part) every minute. Run
/// once with glibc's defaults and once with `MALLOC_ARENA_MAX=2`, to tell growth held by
/// malloc's per-thread arenas from growth in what the server keeps.
pub async fn soak(minutes: u64, only: Option<&str>) {
    const SWAP_EVERY: Duration = Duration::from_secs(5);
    let dir = TempDir::new("bench-soak");
    let names: Vec<String> = (0..MODELS).map(|m| format!("m{m}")).collect();
    for name in &names {
        copy_mlp(&dir.0.join(name).join("1"));
    }
    copy_mlp(&dir.0.join("hot/1"));
    let mut entries: Vec<(&str, std::path::PathBuf, &str)> = names
        .iter()
        .map(|name| (name.as_str(), dir.0.join(name), ""))
        .collect();
    entries.push(("hot", dir.0.join("hot"), ""));
    let config = write_config(&dir.0, &entries);
    let footprint = {
        let probe = start(&config, &[]);
        probe.wait_readyz(200).await;
        probe
            .metric("modelgate_model_resident_bytes", &["model=\"hot\""])
            .await as u64
    };
    // Three on-demand versions, and room for both versions of `hot` during a swap.
    let budget = (RESIDENT + 2) * footprint + footprint / 2;
    println!(
        "\n## Soak: {MODELS} mlp on demand in a budget for {RESIDENT}, {CLIENTS} Zipf clients, \
         `hot` swapping every {}s; {minutes} min per row\n",
        SWAP_EVERY.as_secs()
    );
    println!(
        "| malloc | minute | loads | evictions | swaps | answered | failed | RSS MiB | anon MiB |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    let mut summaries = Vec::new();
    let rows = [
        ("glibc defaults", None),
        ("MALLOC_ARENA_MAX=2", Some(("MALLOC_ARENA_MAX", "2"))),
    ];
    for (label, env) in rows
        .into_iter()
        .filter(|(label, _)| only.is_none_or(|o| o == *label))
    {
        let mut vars = vec![("MODELGATE_LOG", "warn,modelgate::app=info")];
        vars.extend(env);
        let args = [
            format!("--model_config_file={}", config.display()),
            format!("--rest_api_port={}", free_port()),
            "--device=cpu".to_string(),
            format!("--on_demand_models={}", names.join(",")),
            format!("--model_memory_budget=cpu={budget}"),
            "--file_system_poll_wait_seconds=1".to_string(),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let server = Server::start_with_env(&args, &vars);
        server.wait_readyz(200).await;
        let idle = server.memory();
        println!(
            "| {label} | 0 (started, idle) | - | - | - | - | - | {:.1} | {:.1} |",
            idle.resident as f64 / 1048576.0,
            idle.anonymous as f64 / 1048576.0,
        );
        let load = ZipfLoad::start(&server).await;
        let started = Instant::now();
        let (mut swaps, mut next_swap, mut minute) = (0u64, SWAP_EVERY, 0u64);
        let mut at_minute_one = None;
        let mut last = idle;
        while minute < minutes {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let elapsed = started.elapsed();
            if elapsed >= next_swap {
                // The newest version is what serves: adding one swaps; the one before the
                // last is gone by now and leaves the disk too.
                swaps += 1;
                copy_mlp(&dir.0.join(format!("hot/{}", swaps + 1)));
                let _ = std::fs::remove_dir_all(dir.0.join(format!("hot/{}", swaps - 1)));
                next_swap += SWAP_EVERY;
            }
            if elapsed >= Duration::from_secs(60 * (minute + 1)) {
                minute += 1;
                last = server.memory();
                let (_, metrics) = server.http_get("/metrics").await;
                println!(
                    "| {label} | {minute} | {:.0} | {:.0} | {swaps} | {} | {} | {:.1} | {:.1} |",
                    total(&metrics, "modelgate_model_loads_total"),
                    total(&metrics, "modelgate_model_evictions_total"),
                    load.answered.load(Ordering::Relaxed),
                    load.failed.load(Ordering::Relaxed),
                    last.resident as f64 / 1048576.0,
                    last.anonymous as f64 / 1048576.0,
                );
                at_minute_one.get_or_insert(last);
            }
        }
        let (_, failed, _) = load.finish().await;
        let first = at_minute_one.unwrap_or(last);
        summaries.push(format!(
            "{label}: RSS {:.1} MiB after minute 1, {:.1} MiB after minute {minutes} \
             ({:+.1} MiB); {failed} failed requests",
            first.resident as f64 / 1048576.0,
            last.resident as f64 / 1048576.0,
            (last.resident as f64 - first.resident as f64) / 1048576.0,
        ));
    }
    println!();
    for summary in summaries {
        println!("{summary}");
    }
}
