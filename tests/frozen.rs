//! `--freeze_models`: TorchScript modules frozen and optimized for inference at load answer
//! as the modules do, through every signature (other methods than forward, tuples, dicts,
//! two inputs), and a package or an unlisted model is left as it is.

pub mod common;

use common::*;
use modelgate::proto::serving::PredictRequest;
use modelgate::proto::tensorflow::TensorProto;
use std::collections::BTreeMap;

/// Every output of one Predict, as floats by name.
async fn outputs(
    server: &Server,
    model: modelgate::proto::serving::ModelSpec,
    inputs: &[(&str, TensorProto)],
) -> BTreeMap<String, Vec<f32>> {
    let mut client = server.prediction().await;
    let response = client
        .predict(PredictRequest {
            model_spec: Some(model),
            inputs: inputs
                .iter()
                .map(|(name, t)| (name.to_string(), t.clone()))
                .collect(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", server.log()))
        .into_inner();
    response
        .outputs
        .iter()
        .map(|(name, proto)| {
            let t = decode_tensor(name, proto).unwrap();
            (name.clone(), t.to_values::<f32>().unwrap())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn frozen_modules_answer_as_the_modules_do() {
    let fixtures = fixtures();
    let config = model_config(&[
        ("mlp", &demo_models().join("mlp"), ""),
        ("multi", &fixtures.join("multi"), ""),
        ("pair", &pt2_fixtures().join("pair"), ""),
    ]);
    let plain = Server::with_config(&config, &[]);
    let frozen = Server::with_config(&config, &["--freeze_models=mlp,multi,pair"]);
    for server in [&plain, &frozen] {
        server.wait_available(&["mlp", "multi", "pair"]).await;
    }
    for model in ["mlp", "multi"] {
        let line = format!("model=\"{model}\"");
        assert!(
            frozen.log.count(&["freezing and optimizing", &line]) > 0,
            "{model} was not frozen:\n{}",
            frozen.log()
        );
    }
    assert_eq!(frozen.log.count(&["freezing", "model=\"pair\""]), 0);
    assert!(!plain.log.contains("freezing"));
    let images: Vec<f32> = (0..3 * 784)
        .map(|i| ((i * 37 % 101) as f32) / 101.0)
        .collect();
    let a = floats(&[2, 3], &[1.0, 2.0, 3.0, -4.0, 0.5, 6.0]);
    let b = floats(&[2, 3], &[0.5, -1.0, 2.0, 3.0, 3.0, -3.0]);
    let calls = [
        (spec("mlp"), vec![("images", floats(&[3, 784], &images))]),
        (
            spec_signature("mlp", "classify"),
            vec![("images", floats(&[3, 784], &images))],
        ),
        (spec("multi"), vec![("a", a.clone()), ("b", b.clone())]),
        (
            spec("pair"),
            vec![
                ("a", floats(&[1, 3], &[1.0, 2.0, 3.0])),
                ("b", floats(&[1, 1], &[2.0])),
            ],
        ),
    ];
    for (model, inputs) in calls {
        let want = outputs(&plain, model.clone(), &inputs).await;
        let got = outputs(&frozen, model.clone(), &inputs).await;
        assert_eq!(
            want.keys().collect::<Vec<_>>(),
            got.keys().collect::<Vec<_>>()
        );
        for (name, values) in &want {
            for (w, g) in values.iter().zip(&got[name]) {
                assert!(
                    (w - g).abs() <= 1e-5 * w.abs().max(1.0),
                    "{model:?} {name}: {values:?} vs {:?}",
                    got[name]
                );
            }
        }
    }
}
