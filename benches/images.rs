//! Tables 4 and 5 of the serving benchmark: image requests (one 3x224x224 float image,
//! 602,112 bytes, per request) on this machine's device, CUDA when libtorch sees one.
//!
//! 4. ResNet-50, 1-row requests, batching: served images/s next to the raw libtorch forward
//!    at the largest batch on the same device in this run, p50/p99, the server's mean
//!    batch and (on a GPU) the GPU memory it holds.
//! 5. Host CPU per image: the same requests to `imageprobe`, which has ResNet-50's signature
//!    and next to no forward, so the server's CPU per image is everything but the model,
//!    next to one memcpy of the image and one receive of it from a loopback socket, both
//!    measured here (the receive is the floor of a server that takes images over TCP).
//!
//! The requests are built from each model's GetModelMetadata, as `loadgen` builds them.

use super::loadgen::{connect, request_from_metadata, Call};
use super::{closed, header, raw_forward, row, PREDICT};
use crate::common::{write_config, Server, TempDir};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// One image, as the requests carry it.
const IMAGE_BYTES: usize = 3 * 224 * 224 * 4;

/// How hard to push this machine's device.
struct Plan {
    device: tch::Device,
    /// max_batch_size, and the raw forward's batch.
    batch: usize,
    concurrency: usize,
    measure: Duration,
}

impl Plan {
    /// An H100/H200 takes 1-row requests from 128 clients into batches of 64; two CPU
    /// cores need about a second for a ResNet-50 batch of 4.
    fn for_this_machine() -> Plan {
        if tch::Cuda::is_available() {
            Plan {
                device: tch::Device::Cuda(0),
                batch: 64,
                concurrency: 128,
                measure: Duration::from_secs(10),
            }
        } else {
            Plan {
                device: tch::Device::Cpu,
                batch: 4,
                concurrency: 8,
                measure: Duration::from_secs(10),
            }
        }
    }
}

/// `make bench` writes these (`python models/generate.py bench target/bench-models`).
fn bench_models() -> PathBuf {
    let dir = crate::common::repo_root().join("target/bench-models");
    assert!(
        dir.join("resnet50/1/model.pt").is_file(),
        "bench models missing: run `make bench` (or `python models/generate.py bench target/bench-models`)"
    );
    dir
}

fn start(plan: &Plan, dir: &TempDir) -> Server {
    let models = bench_models();
    let config = write_config(
        &dir.0,
        &[
            ("resnet50", models.join("resnet50"), ""),
            ("imageprobe", models.join("imageprobe"), ""),
        ],
    );
    let params = dir.0.join("batching.config");
    std::fs::write(
        &params,
        format!(
            "max_batch_size {{ value: {} }}\nbatch_timeout_micros {{ value: 0 }}\nmax_enqueued_batches {{ value: 100 }}\n",
            plan.batch
        ),
    )
    .expect("write batching config");
    Server::start_with_env(
        &[
            // REST for the server's own histograms (/metrics).
            &format!("--rest_api_port={}", crate::common::free_port()),
            &format!("--model_config_file={}", config.display()),
            "--enable_batching",
            &format!("--batching_parameters_file={}", params.display()),
        ],
        &[("MODELGATE_LOG", "warn,modelgate::app=info")],
    )
}

/// The mean executed batch of `model`, from the server's own histogram.
async fn mean_batch(server: &Server, model: &str) -> f64 {
    let (_, text) = crate::common::http::request("GET", &server.url("/metrics"), None)
        .await
        .unwrap_or_default();
    let series = |name: &str| -> f64 {
        text.lines()
            .filter(|line| line.starts_with(name) && line.contains(&format!("model=\"{model}\"")))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    series("modelgate_batch_size_sum") / series("modelgate_batch_size_count")
}

/// GPU memory process `pid` holds, in MiB, as nvidia-smi reports it.
fn gpu_memory_mib(pid: u32) -> Option<f64> {
    let out = std::process::Command::new("nvidia-smi")
        .args([
            "--query-compute-apps=pid,used_memory",
            "--format=csv,noheader,nounits",
        ])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|line| {
            let (p, mib) = line.split_once(',')?;
            (p.trim().parse::<u32>().ok()? == pid)
                .then(|| mib.trim().parse().ok())
                .flatten()
        })
}

/// CPU microseconds of one copy of an image, the median of many.
fn memcpy_image_us() -> f64 {
    let source = vec![7u8; IMAGE_BYTES];
    let mut target = vec![0u8; IMAGE_BYTES];
    let mut samples: Vec<f64> = (0..200)
        .map(|_| {
            let started = Instant::now();
            target.copy_from_slice(std::hint::black_box(&source));
            std::hint::black_box(&target);
            started.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

/// Nanoseconds the calling thread has run on a CPU (user + system), exact to the call
/// (/proc's schedstat of a running thread lags by up to a scheduler tick).
fn thread_cpu_ns() -> f64 {
    use std::os::raw::{c_int, c_long};
    #[repr(C)]
    struct Timespec {
        seconds: c_long,
        nanos: c_long,
    }
    extern "C" {
        fn clock_gettime(clock: c_int, time: *mut Timespec) -> c_int;
    }
    const CLOCK_THREAD_CPUTIME_ID: c_int = 3; // Linux
    let mut time = Timespec {
        seconds: 0,
        nanos: 0,
    };
    // SAFETY: clock_gettime writes one timespec, which `time` is.
    if unsafe { clock_gettime(CLOCK_THREAD_CPUTIME_ID, &mut time) } != 0 {
        return f64::NAN;
    }
    time.seconds as f64 * 1e9 + time.nanos as f64
}

/// CPU microseconds one process spends receiving an image from a loopback TCP socket and
/// nothing else: the kernel's copy out of the socket and the read syscalls, into a buffer
/// it reuses. A thread of this process sends the images; only the receiving thread is
/// counted. This is the floor of any server that takes its images over TCP.
fn socket_receive_image_us() -> f64 {
    use std::io::{Read, Write};
    const IMAGES: usize = 2000;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let addr = listener.local_addr().expect("loopback address");
    let sender = std::thread::spawn(move || {
        let mut socket = std::net::TcpStream::connect(addr).expect("connect loopback");
        let image = vec![7u8; IMAGE_BYTES];
        for _ in 0..IMAGES {
            socket.write_all(&image).expect("send an image");
        }
    });
    let (mut socket, _) = listener.accept().expect("accept loopback");
    let mut image = vec![0u8; IMAGE_BYTES];
    // The first images warm the connection and the buffer up.
    for _ in 0..IMAGES / 10 {
        socket.read_exact(&mut image).expect("receive an image");
    }
    let started = thread_cpu_ns();
    for _ in IMAGES / 10..IMAGES {
        socket.read_exact(&mut image).expect("receive an image");
    }
    let spent = thread_cpu_ns() - started;
    sender.join().expect("sender thread");
    spent / 1e3 / (IMAGES - IMAGES / 10) as f64
}

pub async fn tables() {
    let plan = Plan::for_this_machine();
    modelgate::runtime::configure_executor();
    let dir = TempDir::new("bench-images");
    let server = start(&plan, &dir);
    server.wait_available(&["resnet50", "imageprobe"]).await;
    let clients = connect(server.grpc, 4).await;
    let request = |model: &'static str| {
        let addr = server.grpc;
        async move {
            let predict = request_from_metadata(addr, model, "serving_default", 1)
                .await
                .expect("request from metadata");
            Call::new(addr, PREDICT, &predict)
        }
    };

    let title = format!(
        "4. ResNet-50 on {:?}, 1-row requests, batching max {}, c={}",
        plan.device, plan.batch, plan.concurrency
    );
    header(&title);
    let resnet = request("resnet50").await;
    let served = closed(
        Some(server.pid()),
        &clients,
        &resnet,
        plan.concurrency,
        plan.measure,
    )
    .await;
    row(&format!("resnet50 c={}", plan.concurrency), &served);
    let batch = mean_batch(&server, "resnet50").await;
    let gpu_mib = gpu_memory_mib(server.pid());

    header(&format!(
        "5. host CPU per image: imageprobe (ResNet-50's signature, next to no forward), c={}",
        plan.concurrency
    ));
    let probe = request("imageprobe").await;
    let host = closed(
        Some(server.pid()),
        &clients,
        &probe,
        plan.concurrency,
        plan.measure,
    )
    .await;
    row(&format!("imageprobe c={}", plan.concurrency), &host);
    let probe_batch = mean_batch(&server, "imageprobe").await;
    drop(clients);
    drop(server);

    tch::set_num_threads(std::thread::available_parallelism().map_or(1, |n| n.get()) as i32);
    let (raw, _) = raw_forward(
        &bench_models().join("resnet50/1/model.pt"),
        &[plan.batch as i64, 3, 224, 224],
        plan.device,
        plan.measure.as_secs_f64() / 2.0,
    );
    let served_rate = served.report.throughput();
    println!("\n| ResNet-50 on {:?} | images/s |", plan.device);
    println!("|---|---|");
    println!("| served, 1-row requests (mean batch {batch:.1}) | {served_rate:.1} |");
    println!("| raw forward at batch {} | {raw:.1} |", plan.batch);
    println!("| served / raw | {:.2} |", served_rate / raw);
    match gpu_mib {
        Some(mib) => println!("| server's GPU memory | {mib:.0} MiB |"),
        None => println!("| server's GPU memory | n/a (no nvidia-smi or no GPU) |"),
    }
    // imageprobe's own forward at its served batch, on one thread like each of the
    // server's CPU workers: the part of the server's CPU that is the model after all.
    tch::set_num_threads(1);
    let probe_rows = probe_batch.round().max(1.0) as i64;
    let (probe_rate, _) = raw_forward(
        &bench_models().join("imageprobe/1/model.pt"),
        &[probe_rows, 3, 224, 224],
        plan.device,
        2.0,
    );
    let probe_forward = 1e6 / probe_rate;
    let memcpy = memcpy_image_us();
    let receive = socket_receive_image_us();
    println!(
        "\nserver's minor page faults per image (imageprobe): {:.1}",
        host.server_faults
    );
    println!(
        "imageprobe's own forward (raw, batch {probe_rows}, mean served batch {probe_batch:.1}): {probe_forward:.1} us per image"
    );
    println!(
        "host CPU per image (imageprobe, server): {:.1} us = {:.2} x one memcpy of the 602 KB image ({memcpy:.1} us) \
         = {:.2} x receiving it from a loopback socket ({receive:.1} us); receive + one copy = {:.2} x memcpy",
        host.server_us,
        host.server_us / memcpy,
        host.server_us / receive,
        (receive + memcpy) / memcpy,
    );
}
