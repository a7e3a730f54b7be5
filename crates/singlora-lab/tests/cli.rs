//! The `singlora-lab` binary as a developer runs it: exit codes, messages and the files it
//! writes.

use std::process::{Command, Output};

use candle_core::DType;
use singlora::synthetic::{write_checkpoint, LlamaShape};

fn lab(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_singlora-lab"))
        .args(args)
        .output()
        .unwrap()
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// `example-adapters` writes one adapter of each method for the base's seven projections, in
/// PEFT's file layout: LoRA, rsLoRA and DoRA as PEFT LoRA adapters with its flags, SingLoRA
/// as its own type.
#[test]
fn example_adapters_for_a_base() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    let shape = LlamaShape::TINY;
    write_checkpoint(
        &base,
        &shape.config(),
        &shape.tensors(0, DType::F32).unwrap(),
        1,
    )
    .unwrap();
    let out = tmp.path().join("adapters");
    let o = lab(&[
        "example-adapters",
        "--base",
        base.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    let (stdout, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        stdout.contains("wrote lora, rslora, dora and singlora adapters"),
        "{stdout}"
    );
    for (name, peft_type, rslora, dora) in [
        ("lora", "LORA", false, Some(false)),
        ("rslora", "LORA", true, Some(false)),
        ("dora", "LORA", false, Some(true)),
        ("singlora", "SINGLORA", false, None),
    ] {
        let dir = out.join(name);
        assert!(dir.join("adapter_model.safetensors").is_file(), "{name}");
        let cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(cfg["peft_type"], peft_type, "{name}");
        assert_eq!(cfg["r"], 4, "{name}");
        assert_eq!(cfg["use_rslora"], rslora, "{name}");
        assert_eq!(
            cfg.get("use_dora").and_then(|v| v.as_bool()),
            dora,
            "{name}"
        );
        let modules = cfg["target_modules"].as_array().map_or(0, Vec::len);
        assert_eq!(modules, 7, "{name}: {}", cfg["target_modules"]);
    }
}

/// `bench-llama` at the test-sized shape on the CPU: one JSON line per method, with the
/// trainable parameters of a rank-8 adapter on all seven projections (none for the base).
#[test]
fn bench_llama_tiny_on_the_cpu() {
    let o = lab(&[
        "bench-llama",
        "--shape",
        "tiny",
        "--methods",
        "base,singlora",
        "--batch",
        "2",
        "--seq",
        "16",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--device",
        "cpu",
        "--json",
    ]);
    let (stdout, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let rows: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2, "{stdout}");
    assert_eq!(rows[0]["method"], "frozen base");
    assert_eq!(rows[0]["trainable_params"], 0);
    assert_eq!(rows[1]["method"], "singlora");
    // SingLoRA: r·max(d_in, d_out) per projection; hidden 64, KV 32, ff 176, 2 layers
    let per_layer = 8 * (64 + 64 + 64 + 64 + 176 + 176 + 176);
    assert_eq!(rows[1]["trainable_params"], 2 * per_layer);
    assert_eq!(rows[1]["timing"]["tokens_per_step"], 32);
}

/// The quantised random bases on the CPU: rows of whole Q4_K blocks (`tiny-k`), NF4 and Q4_K
/// (as `--base-dtype same` keeps a GGUF file's weights), a SingLoRA step each with a finite
/// time and the same trainable parameters as on a dense base.
#[test]
fn bench_llama_quantised_bases_on_the_cpu() {
    for (base, label) in [("nf4", "singlora (NF4)"), ("q4k", "singlora (Q4_K)")] {
        let o = lab(&[
            "bench-llama",
            "--shape",
            "tiny-k",
            "--methods",
            "singlora",
            "--base-dtype",
            base,
            "--batch",
            "1",
            "--seq",
            "8",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--device",
            "cpu",
            "--json",
        ]);
        let (stdout, err) = text(&o);
        assert!(o.status.success(), "{base}: {err}");
        let row: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
        assert_eq!(row["method"], label);
        // SingLoRA: r·max(d_in, d_out) per projection; hidden 256, KV 128, ff 512, 2 layers
        let per_layer = 8 * (256 + 256 + 256 + 256 + 512 + 512 + 512);
        assert_eq!(row["trainable_params"], 2 * per_layer, "{base}");
        let ms = row["timing"]["median_ms"].as_f64().unwrap();
        assert!(ms.is_finite() && ms > 0.0, "{base}: {ms}");
    }
}

/// `experiment sweep --report-only` summarises what `runs.jsonl` holds (here two seeds of one
/// ramp setting, written by hand) and refuses a directory without runs.
#[test]
fn sweep_report_only() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("ramp");
    let o = lab(&[
        "experiment",
        "sweep",
        "ramp",
        "--report-only",
        "--out",
        out.to_str().unwrap(),
    ]);
    let (_, err) = text(&o);
    assert!(
        !o.status.success() && err.contains("no runs of the ramp sweep"),
        "{err}"
    );
    std::fs::create_dir_all(&out).unwrap();
    let line = |seed: u64, acc: f64| {
        serde_json::json!({"experiment": "ramp", "name": format!("singlora-r8-lrdefault-kaiming_width-f0.02-s{seed}"),
            "series": "singlora", "x": 0.02, "method": "singlora", "rank": 8, "lr": 1e-3,
            "init": "kaiming_width", "ramp_steps": 7, "seed": seed, "eval_accuracy": acc,
            "eval_loss": 0.5, "eval_f1_macro": acc, "adapter_params": 10, "updates": 366,
            "seconds": 1.0, "device": "cpu"})
        .to_string()
    };
    std::fs::write(
        out.join("runs.jsonl"),
        format!("{}\n{}\n", line(0, 0.8), line(1, 0.9)),
    )
    .unwrap();
    let o = lab(&[
        "experiment",
        "sweep",
        "ramp",
        "--report-only",
        "--out",
        out.to_str().unwrap(),
    ]);
    let (stdout, err) = text(&o);
    assert!(o.status.success(), "{err}");
    // mean 85, sample std of (80, 90) = 7.07; the other five settings have no runs
    assert!(
        stdout.contains("85.00 ± 7.07 (2)") && stdout.contains("16 runs are missing"),
        "{stdout}"
    );
    assert!(out.join("ramp.svg").exists() && out.join("summary.json").exists());
}
