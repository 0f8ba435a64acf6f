//! Build script: compiles the TF Serving protos, the runtime's C++ shims (CUDA streams,
//! AOTInductor packages), and embeds an rpath to libtorch.

use std::env;
use std::path::PathBuf;

/// The protos that define what modelgate serves and parses; their imports come along.
const PROTOS: &[&str] = &[
    "tensorflow_serving/apis/prediction_service.proto",
    "tensorflow_serving/apis/model_service.proto",
    "tensorflow_serving/config/model_server_config.proto",
    "tensorflow_serving/config/monitoring_config.proto",
    "tensorflow_serving/config/ssl_config.proto",
    "tensorflow_serving/servables/tensorflow/session_bundle_config.proto",
    "tensorflow_serving/apis/prediction_log.proto",
    // The Open Inference Protocol (KServe V2) as Triton defines it.
    "inference/grpc_service.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    compile_protos()?;
    embed_libtorch_rpath();
    compile_shims();
    Ok(())
}

fn compile_protos() -> Result<(), Box<dyn std::error::Error>> {
    // A vendored protoc, so that building needs no system protobuf compiler.
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    env::set_var("PROTOC", protoc);
    let include = protoc_bin_vendored::include_path()?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("descriptor.bin"))
        // One file that nests the generated packages as modules (see src/proto.rs).
        .include_file("protos.rs")
        // Tensor payloads stay `Bytes` so they are sliced, not copied.
        .bytes(".tensorflow.TensorProto")
        .bytes(".inference.ModelInferRequest.raw_input_contents")
        .bytes(".inference.ModelInferResponse.raw_output_contents")
        .compile_protos(
            &PROTOS.iter().map(PathBuf::from).collect::<Vec<_>>(),
            &[PathBuf::from("proto"), include],
        )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}

/// Lets the binary (and the test binaries) find libtorch at run time without
/// LD_LIBRARY_PATH: torch-sys reports the directory it linked against (its `links = "tch"`
/// metadata, so whichever of LIBTORCH / LIBTORCH_USE_PYTORCH chose it) and we record it
/// as an rpath.
fn embed_libtorch_rpath() {
    match env::var("DEP_TCH_LIBTORCH_LIB") {
        Ok(dir) => {
            println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
            // rustc links with --as-needed, which drops libtorch_cuda.so (nothing calls
            // into it by name): its CUDA kernels then never register and CUDA is never
            // found. libtorch.so needs libtorch_cuda.so in a CUDA build (and only
            // libtorch_cpu.so in a CPU one), so keeping it keeps both.
            println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
            println!("cargo:rustc-link-arg=-ltorch");
        }
        Err(_) => println!(
            "cargo:warning=torch-sys did not report its libtorch directory; \
             run modelgate with LD_LIBRARY_PATH pointing at libtorch's lib folder"
        ),
    }
}

/// The libtorch calls tch does not expose (a worker thread's CUDA device and stream, see
/// src/runtime/cuda.rs; AOTInductor packages, src/runtime/aoti.rs; TorchScript modules,
/// src/runtime/script.rs), compiled against
/// the headers of the libtorch torch-sys links: its `lib` folder's sibling `include`, in a
/// libtorch download and a PyTorch wheel alike. Device-generic c10 interfaces only, so no
/// CUDA toolkit is needed to build them.
fn compile_shims() {
    const SHIMS: &[&str] = &[
        "src/runtime/cuda_shim.cpp",
        "src/runtime/aoti_shim.cpp",
        "src/runtime/script_shim.cpp",
    ];
    // What the shims share.
    println!("cargo:rerun-if-changed=src/runtime/shim.h");
    for shim in SHIMS {
        println!("cargo:rerun-if-changed={shim}");
    }
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    let Ok(lib) = env::var("DEP_TCH_LIBTORCH_LIB") else {
        panic!("torch-sys did not report its libtorch directory: cannot build the C++ shims");
    };
    let include = PathBuf::from(lib)
        .parent()
        .map(|root| root.join("include"))
        .filter(|dir| dir.join("c10").is_dir())
        .unwrap_or_else(|| {
            panic!("no libtorch headers (include/c10) next to torch-sys's lib folder")
        });
    // Every libtorch 2.x release build uses the C++11 string ABI; the shim must match it.
    let abi = env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".to_string());
    cc::Build::new()
        .cpp(true)
        .files(SHIMS)
        .include(include)
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .warnings(false)
        .compile("modelgate_shims");
    // AOTIModelPackageLoader lives in libtorch_cpu; c10 holds the device interfaces.
    println!("cargo:rustc-link-lib=torch_cpu");
    println!("cargo:rustc-link-lib=c10");
}
