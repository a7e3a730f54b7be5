//! The binary as a user runs it: exit codes, messages, and no partial output.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{DType, Device};
use singlora::adapter::target::TargetSpec;
use singlora::adapter::{AdapterKind, AdapterSpec};
use singlora::synthetic::{random_adapter, write_checkpoint, LlamaShape};

fn singlora(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_singlora"))
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

fn setup(dir: &Path, kind: AdapterKind) {
    let shape = LlamaShape::TINY;
    write_checkpoint(
        &dir.join("base"),
        &shape.config(),
        &shape.tensors(0, DType::F32).unwrap(),
        1,
    )
    .unwrap();
    let targets = TargetSpec::parse("q_proj,v_proj,up_proj", None).unwrap();
    let layers: Vec<_> = shape
        .linears()
        .into_iter()
        .filter(|(n, _)| targets.matches(n))
        .collect();
    let spec = AdapterSpec::new(kind, 2, 4.0);
    random_adapter(&spec, &layers, &targets, 2, 8)
        .unwrap()
        .write(&dir.join("adapter"), false)
        .unwrap();
}

fn p(dir: &Path, name: &str) -> String {
    dir.join(name).to_string_lossy().into_owned()
}

#[test]
fn example_runs() {
    let o = singlora(&["example"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    assert!(
        out.contains("merging the exported LoRA gives the same checkpoint"),
        "{out}"
    );
}

#[test]
fn inspect_json_and_table() {
    let tmp = tempfile::tempdir().unwrap();
    setup(tmp.path(), AdapterKind::SingLora);
    let o = singlora(&[
        "inspect",
        "--adapter",
        &p(tmp.path(), "adapter"),
        "--base",
        &p(tmp.path(), "base"),
        "--json",
    ]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["method"], "singlora");
    assert_eq!(v["step"], 2);
    assert_eq!(v["ramp_steps"], 8);
    assert_eq!(v["u"], 0.25);
    assert_eq!(v["scale"], 2.0);
    assert_eq!(v["layers"].as_array().unwrap().len(), 6);
    // q (16x16): 16·2, v (8x16): 16·2, up (24x16): 24·2, two layers
    assert_eq!(v["adapter_params"], 2 * (32 + 32 + 48));
    assert!(v["trainable_fraction"].as_f64().unwrap() > 0.0);
    let o = singlora(&["inspect", "--adapter", &p(tmp.path(), "adapter")]);
    let (out, _) = text(&o);
    assert!(
        out.contains("u(t) = 0.250000") && out.contains("adapter params 224"),
        "{out}"
    );
}

#[test]
fn merge_then_refuse_existing_output() {
    let tmp = tempfile::tempdir().unwrap();
    setup(tmp.path(), AdapterKind::Dora);
    let args = [
        "merge",
        "--base",
        &p(tmp.path(), "base"),
        "--adapter",
        &p(tmp.path(), "adapter"),
        "--out",
        &p(tmp.path(), "m"),
    ];
    let o = singlora(&args);
    assert!(o.status.success(), "{:?}", text(&o));
    assert!(tmp.path().join("m/model.safetensors").exists());
    let o = singlora(&args);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        err.contains("already exists") && err.contains("--overwrite"),
        "{err}"
    );
    let mut with = args.to_vec();
    with.push("--overwrite");
    assert!(singlora(&with).status.success());
}

#[test]
fn errors_name_the_culprit_and_write_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    setup(tmp.path(), AdapterKind::SingLora);
    // a base with a narrower MLP: the adapter's up_proj does not fit
    let shape = LlamaShape {
        intermediate: 20,
        ..LlamaShape::TINY
    };
    write_checkpoint(
        &tmp.path().join("small"),
        &shape.config(),
        &shape.tensors(0, DType::F32).unwrap(),
        1,
    )
    .unwrap();
    let o = singlora(&[
        "merge",
        "--base",
        &p(tmp.path(), "small"),
        "--adapter",
        &p(tmp.path(), "adapter"),
        "--out",
        &p(tmp.path(), "m"),
    ]);
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(
        err.starts_with("error: ") && err.contains("up_proj.singlora_A.weight"),
        "{err}"
    );
    assert!(!tmp.path().join("m").exists());

    let o = singlora(&["inspect", "--adapter", &p(tmp.path(), "nowhere")]);
    let (_, err) = text(&o);
    assert!(
        !o.status.success() && err.contains("nowhere") && err.contains("not a directory"),
        "{err}"
    );

    let o = singlora(&[
        "merge",
        "--base",
        &p(tmp.path(), "base"),
        "--adapter",
        &p(tmp.path(), "adapter"),
        "--out",
        &p(tmp.path(), "m"),
        "--dtype",
        "f8",
    ]);
    let (_, err) = text(&o);
    assert!(
        !o.status.success() && err.contains("unknown dtype `f8`"),
        "{err}"
    );

    // export-lora of an adapter that is already LoRA
    let lora = tempfile::tempdir().unwrap();
    setup(lora.path(), AdapterKind::Lora);
    let o = singlora(&[
        "export-lora",
        "--adapter",
        &p(lora.path(), "adapter"),
        "--out",
        &p(lora.path(), "x"),
    ]);
    let (_, err) = text(&o);
    assert!(!o.status.success() && err.contains("already lora"), "{err}");
    assert!(!lora.path().join("x").exists());
}

fn tiny_bert(dir: &Path) -> String {
    let m = dir.join("bert");
    let s = singlora::synthetic::BertShape::TINY;
    write_checkpoint(&m, &s.config(), &s.tensors(0, DType::F32).unwrap(), 1).unwrap();
    singlora::synthetic::write_tokenizer(
        &m,
        &["good", "bad", "movie"],
        singlora::tokenize::TokenizerStyle::Bert,
    )
    .unwrap();
    m.to_string_lossy().into_owned()
}

/// Two rows of classification data in `dir/NAME` (one of each label), for the tiny BERT.
fn two_rows(dir: &Path, name: &str) -> PathBuf {
    let data = dir.join(name);
    std::fs::write(
        &data,
        format!(
            "{}\n{}\n",
            row("good movie", "pos"),
            row("bad movie", "neg")
        ),
    )
    .unwrap();
    data
}

/// A JSONL classification row.
fn row(text: &str, label: &str) -> String {
    serde_json::json!({"text": text, "label": label}).to_string()
}

#[test]
fn train_dry_run_prints_the_plan() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_bert(tmp.path());
    let data = two_rows(tmp.path(), "d.jsonl");
    let out = p(tmp.path(), "run");
    let o = singlora(&[
        "train",
        "--model",
        &model,
        "--train",
        data.to_str().unwrap(),
        "--out",
        &out,
        "--dry-run",
        "--targets",
        "query,value",
    ]);
    let (stdout, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        stdout.contains("encoder.layer.0.attention.self.query")
            && stdout.contains("encoder.layer.1.attention.self.value"),
        "{stdout}"
    );
    assert!(!stdout.contains("attention.self.key"), "{stdout}");
    assert!(
        stdout.contains("labels         neg, pos") && stdout.contains("nothing trained"),
        "{stdout}"
    );
    // 2 layers x (query + value), 16 x 16 each, r = 8: 4 x 16 x 8
    assert!(stdout.contains("512 adapter"), "{stdout}");
    assert!(!tmp.path().join("run").exists(), "a dry run writes nothing");
}

#[test]
fn train_refuses_bad_rows_and_typos_before_writing() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_bert(tmp.path());
    let data = tmp.path().join("d.jsonl");
    std::fs::write(&data, "{\"text\": \"good movie\", \"label\": \"pos\"}\n{\"text\": \"\", \"label\": \"neg\"}\n{\"label\": \"neg\"}\n").unwrap();
    let out = p(tmp.path(), "run");
    let o = singlora(&[
        "train",
        "--model",
        &model,
        "--train",
        data.to_str().unwrap(),
        "--out",
        &out,
    ]);
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(
        err.contains("d.jsonl:2") && err.contains("d.jsonl:3") && err.contains("--skip-bad-rows"),
        "{err}"
    );
    assert!(!tmp.path().join("run").exists());
    let good = two_rows(tmp.path(), "g.jsonl");
    let o = singlora(&[
        "train",
        "--model",
        &model,
        "--train",
        good.to_str().unwrap(),
        "--out",
        &out,
        "--targets",
        "q_proj",
    ]);
    let (_, err) = text(&o);
    assert!(
        !o.status.success() && err.contains("`q_proj`") && err.contains("matches no module"),
        "{err}"
    );
    assert!(!tmp.path().join("run").exists());
}

/// `--devices cpu,cpu` trains through the data-parallel path (two ranks, one run directory
/// written by rank 0); `--gpus` on a build without NCCL says so and writes nothing.
#[test]
fn train_on_several_devices() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_bert(tmp.path());
    let data = tmp.path().join("d.jsonl");
    let rows: String = (0..10)
        .map(|i| {
            let (t, l) = if i % 2 == 0 {
                ("good movie", "pos")
            } else {
                ("bad movie", "neg")
            };
            format!("{{\"text\": \"{t}\", \"label\": \"{l}\"}}\n")
        })
        .collect();
    std::fs::write(&data, rows).unwrap();
    let out = p(tmp.path(), "run");
    let args = |extra: &[&str]| {
        let mut v = vec![
            "train",
            "--model",
            &model,
            "--train",
            data.to_str().unwrap(),
            "--out",
            &out,
            "--batch-size",
            "4",
            "--epochs",
            "1",
            "--quiet",
        ];
        v.extend_from_slice(extra);
        v.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    let run = |extra: &[&str]| {
        let a = args(extra);
        singlora(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let o = run(&["--devices", "cpu,cpu"]);
    let (_, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let run_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join("run/run.json")).unwrap())
            .unwrap();
    assert_eq!(run_json["world_size"], 2);
    assert_eq!(
        run_json["config"]["devices"],
        serde_json::json!(["cpu", "cpu"])
    );
    let lines = std::fs::read_to_string(tmp.path().join("run/metrics.jsonl")).unwrap();
    let updates = lines.lines().filter(|l| l.contains("\"loss\"")).count();
    assert_eq!(
        updates, 3,
        "one line per update (10 rows at batch 4), rank 0 only"
    );
    assert!(tmp.path().join("run/adapter_model.safetensors").exists());
    if !cfg!(feature = "nccl") {
        let out2 = p(tmp.path(), "run2");
        let mut a = args(&["--gpus", "2"]);
        let i = a.iter().position(|x| x == &out).unwrap();
        a[i] = out2.clone();
        let o = singlora(&a.iter().map(String::as_str).collect::<Vec<_>>());
        let (_, err) = text(&o);
        assert!(!o.status.success() && err.contains("nccl"), "{err}");
        assert!(!tmp.path().join("run2").exists());
    }
}

/// Every file under `dir` with its contents, to show that a refused command changed nothing.
fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = vec![];
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(dir).unwrap().to_string_lossy().into_owned();
                out.push((rel, std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

/// `--out` pointing at an input, at a folder holding one, or inside one is refused before
/// anything is written or deleted, for `train` and `merge` alike, and `--overwrite` does not
/// replace a folder singlora did not write.
#[test]
fn outputs_never_overlap_inputs() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    setup(root, AdapterKind::SingLora);
    let model = tiny_bert(root);
    let data = two_rows(root, "d.jsonl");
    let before = snapshot(root);
    let train = |out: &str, cwd: &Path| {
        Command::new(env!("CARGO_BIN_EXE_singlora"))
            .current_dir(cwd)
            .args([
                "train",
                "--model",
                &model,
                "--train",
                data.to_str().unwrap(),
                "--out",
                out,
                "--overwrite",
                "--max-steps",
                "1",
                "--quiet",
            ])
            .output()
            .unwrap()
    };
    for (out, cwd, input) in [
        (".", root, "--model"),
        (model.as_str(), root, "--model"),
        (data.to_str().unwrap(), root, "--train"),
        ("run", Path::new(&model), "--model"),
    ] {
        let o = train(out, cwd);
        let (_, err) = text(&o);
        assert_eq!(o.status.code(), Some(1), "{out}: {err}");
        assert!(
            err.contains(input) && err.contains("choose an output"),
            "{out}: {err}"
        );
    }
    let base = p(root, "base");
    let adapter = p(root, "adapter");
    let merge = |out: &str| {
        singlora(&[
            "merge",
            "--base",
            &base,
            "--adapter",
            &adapter,
            "--out",
            out,
            "--overwrite",
        ])
    };
    for (out, input) in [
        (base.clone(), "--base"),
        (adapter.clone(), "--adapter"),
        (p(root, ""), "--base"),
        (p(root, "base/merged"), "--base"),
    ] {
        let o = merge(&out);
        let (_, err) = text(&o);
        assert_eq!(o.status.code(), Some(1), "{out}: {err}");
        assert!(err.contains(input), "{out}: {err}");
    }
    assert_eq!(snapshot(root), before, "a refused command changed files");
    // --overwrite replaces only singlora's own outputs
    let mine = root.join("mine");
    std::fs::create_dir(&mine).unwrap();
    std::fs::write(mine.join("notes.txt"), "keep").unwrap();
    let o = merge(mine.to_str().unwrap());
    let (_, err) = text(&o);
    assert!(err.contains("not written by singlora"), "{err}");
    assert_eq!(std::fs::read(mine.join("notes.txt")).unwrap(), b"keep");
    let merged = p(root, "merged");
    assert!(merge(&merged).status.success());
    assert!(
        merge(&merged).status.success(),
        "a merged model is replaced"
    );
}

/// A second process cannot train into a run another one holds: it is refused at once, naming
/// the holder, and the holder's files are untouched.
#[test]
fn a_run_in_use_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let model = tiny_bert(root);
    let data = two_rows(root, "d.jsonl");
    let run = p(root, "run");
    let mut first = Command::new(env!("CARGO_BIN_EXE_singlora"))
        .args([
            "train",
            "--model",
            &model,
            "--train",
            data.to_str().unwrap(),
            "--out",
            &run,
            "--max-steps",
            "1000000",
            "--quiet",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = first.id().to_string();
    let lock = root.join("run").join(".lock");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while std::fs::read_to_string(&lock).unwrap_or_default() != pid {
        assert!(
            std::time::Instant::now() < deadline,
            "the first run never started"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let second = singlora(&["train", "--resume", "--out", &run]);
    let overwrite = singlora(&[
        "train",
        "--model",
        &model,
        "--train",
        data.to_str().unwrap(),
        "--out",
        &run,
        "--overwrite",
    ]);
    first.kill().unwrap();
    first.wait().unwrap();
    for o in [second, overwrite] {
        let (_, err) = text(&o);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(
            err.contains(&format!("is in use by process {pid}")),
            "{err}"
        );
    }
    assert!(root.join("run").join("run.json").exists());
}

/// `train --resume RUN_DIR` works alone, with everything from the run's run.json; settings
/// that may change on resume (--max-steps) are applied, others are refused by name unless they
/// equal the run's.
#[test]
fn resume_takes_the_run_directory_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let model = tiny_bert(root);
    let data = two_rows(root, "d.jsonl");
    let run = p(root, "run");
    let o = singlora(&[
        "train",
        "--model",
        &model,
        "--train",
        data.to_str().unwrap(),
        "--out",
        &run,
        "--max-steps",
        "2",
        "--rank",
        "4",
        "--quiet",
    ]);
    assert!(o.status.success(), "{:?}", text(&o));
    let o = singlora(&["train", "--resume", &run, "--rank", "8"]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("--rank 8 conflicts with the run's 4") && err.contains("--max-steps"),
        "{err}"
    );
    let o = singlora(&[
        "train",
        "--resume",
        &run,
        "--max-steps",
        "5",
        "--rank",
        "4",
        "--quiet",
    ]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(out.contains("trained 5 updates"), "{out}");
    let o = singlora(&["train", "--resume"]);
    assert!(text(&o).1.contains("--resume RUN_DIR"), "{:?}", text(&o));
    let o = singlora(&["train", "--out", &p(root, "other")]);
    assert!(text(&o).1.contains("--model is required"), "{:?}", text(&o));
}

/// Ctrl-C (SIGINT) and SIGTERM stop a run at the next update with a checkpoint and exit 130
/// and 143; the run then resumes to its end.
#[test]
fn signals_checkpoint_and_exit_non_zero() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let model = tiny_bert(root);
    let data = two_rows(root, "d.jsonl");
    for (signal, code) in [("INT", 130), ("TERM", 143)] {
        let run = root.join(format!("run-{signal}"));
        let child = Command::new(env!("CARGO_BIN_EXE_singlora"))
            .args([
                "train",
                "--model",
                &model,
                "--train",
                data.to_str().unwrap(),
                "--out",
                run.to_str().unwrap(),
                "--max-steps",
                "1000000",
                "--quiet",
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // wait for training to be under way (metrics.jsonl has an update)
        let metrics = run.join("metrics.jsonl");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while !std::fs::read_to_string(&metrics)
            .unwrap_or_default()
            .contains("\"loss\"")
        {
            assert!(
                std::time::Instant::now() < deadline,
                "training never started"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let killed = Command::new("kill")
            .args([format!("-{signal}"), child.id().to_string()])
            .status()
            .unwrap();
        assert!(killed.success());
        let o = child.wait_with_output().unwrap();
        let (out, err) = text(&o);
        assert_eq!(o.status.code(), Some(code), "{signal}: {out}\n{err}");
        assert!(
            out.contains(&format!(
                "resume with: singlora train --resume {}",
                run.display()
            )),
            "{out}"
        );
        assert!(
            run.join("checkpoints").read_dir().unwrap().count() >= 1,
            "no checkpoint"
        );
    }
    let run = p(root, "run-INT");
    let saved: u64 = std::fs::read_dir(root.join("run-INT").join("checkpoints"))
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            name.strip_prefix("step-")?.parse().ok()
        })
        .max()
        .unwrap();
    let to = (saved + 2).to_string();
    let o = singlora(&["train", "--resume", &run, "--max-steps", &to, "--quiet"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(out.contains(&format!("trained {to} updates")), "{out}");
}

#[cfg(unix)]
#[path = "../../singlora/tests/support/modes.rs"]
mod modes;

/// A run directory (adapters, checkpoints, metrics, run.json) and a merged model can be read by
/// other users as the umask allows: the modes a plain create gives here (0644 and 0755 under
/// the usual umask 022).
#[cfg(unix)]
#[test]
fn outputs_get_the_modes_the_umask_gives() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let modes = modes::expected_modes(root);
    let model = tiny_bert(root);
    let data = root.join("d.jsonl");
    std::fs::write(
        &data,
        "{\"text\": \"good movie\", \"label\": \"pos\"}\n{\"text\": \"bad movie\", \"label\": \"neg\"}\n",
    )
    .unwrap();
    let run = p(root, "run");
    let o = singlora(&[
        "train",
        "--model",
        &model,
        "--train",
        data.to_str().unwrap(),
        "--out",
        &run,
        "--max-steps",
        "3",
        "--save-every",
        "1",
        "--quiet",
    ]);
    assert!(o.status.success(), "{:?}", text(&o));
    let merged = p(root, "merged");
    let o = singlora(&[
        "merge",
        "--base",
        &model,
        "--adapter",
        &run,
        "--out",
        &merged,
    ]);
    assert!(o.status.success(), "{:?}", text(&o));
    let checked: Vec<_> = [&run, &merged]
        .iter()
        .flat_map(|d| modes::assert_default_modes(Path::new(d), modes))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    assert!(
        checked.len() >= 3,
        "adapter, checkpoint and merged weights: {checked:?}"
    );
}

/// An adapter whose config lists a layer its file lacks fails every command, naming it.
#[test]
fn incomplete_adapter_fails_every_command() {
    let tmp = tempfile::tempdir().unwrap();
    setup(tmp.path(), AdapterKind::SingLora);
    let dir = tmp.path().join("adapter");
    let af = singlora::adapter::file::AdapterFile::read(&dir, &candle_core::Device::Cpu).unwrap();
    let missing = "model.layers.1.mlp.up_proj";
    let tensors: std::collections::BTreeMap<_, _> = af
        .tensors()
        .into_iter()
        .filter(|(k, _)| !k.contains(missing))
        .collect();
    singlora::checkpoint::write_safetensors(&dir.join("adapter_model.safetensors"), &tensors, None)
        .unwrap();
    let (base, adapter) = (p(tmp.path(), "base"), p(tmp.path(), "adapter"));
    for args in [
        vec![
            "merge",
            "--base",
            &base,
            "--adapter",
            &adapter,
            "--out",
            "OUT",
        ],
        vec!["export-lora", "--adapter", &adapter, "--out", "OUT"],
        vec!["inspect", "--adapter", &adapter],
    ] {
        let out = p(tmp.path(), "out");
        let args: Vec<&str> = args
            .into_iter()
            .map(|a| if a == "OUT" { out.as_str() } else { a })
            .collect();
        let o = singlora(&args);
        let (_, err) = text(&o);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(&format!("`{missing}`")), "{args:?}: {err}");
        assert!(!Path::new(&out).exists());
    }
}

/// `singlora train --model MODEL --train DATA --out OUT` with `extra` flags.
fn train(model: &str, data: &Path, out: &str, extra: &[&str]) -> Output {
    let mut args = vec!["train", "--model", model, "--train", data.to_str().unwrap()];
    args.extend(["--out", out]);
    args.extend_from_slice(extra);
    singlora(&args)
}

fn run_json(run: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(run.join("run.json")).unwrap()).unwrap()
}

/// Settings no run can mean are refused before anything is loaded or written, naming the flag
/// (and, for a rank the layers cannot hold, the layer).
#[test]
fn train_refuses_settings_that_cannot_be_meant() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_bert(tmp.path());
    let data = two_rows(tmp.path(), "d.jsonl");
    let out = p(tmp.path(), "run");
    let cases: &[(&[&str], &[&str])] = &[
        (&["--alpha", "0"], &["--alpha"]),
        (&["--alpha", "nan"], &["--alpha"]),
        (&["--alpha=-8"], &["--alpha -8: must be positive"]),
        (&["--alpha", "1e12"], &["--alpha"]),
        (&["--lr", "0"], &["--lr"]),
        (&["--lr=-0.001"], &["--lr -0.001: must be positive"]),
        (&["--lr", "inf"], &["--lr"]),
        (&["--weight-decay", "nan"], &["--weight-decay"]),
        (&["--weight-decay=-0.1"], &["--weight-decay -0.1"]),
        (&["--warmup-ratio", "2"], &["--warmup-ratio", "[0, 1]"]),
        (&["--max-steps", "0"], &["--max-steps"]),
        (&["--epochs", "0"], &["--epochs"]),
        (
            &["--rank", "17"],
            &["rank 17", "encoder.layer.0.attention.self.query", "16"],
        ),
    ];
    for (flags, words) in cases {
        let mut extra = flags.to_vec();
        extra.push("--dry-run");
        let o = train(&model, &data, &out, &extra);
        let (_, err) = text(&o);
        assert_eq!(o.status.code(), Some(1), "{flags:?}: {err}");
        for w in *words {
            assert!(err.contains(w), "{flags:?}: `{w}` not in {err}");
        }
    }
    assert!(!tmp.path().join("run").exists());
}

/// `--skip-bad-rows` reports each row it drops as FILE:LINE: reason (the first 20, then a
/// count), rows cut at --max-length are counted and reported, and run.json records both.
#[test]
fn skipped_and_truncated_rows_are_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_bert(tmp.path());
    let data = tmp.path().join("d.jsonl");
    let mut rows = vec![row("good movie", "pos"), row("bad movie", "neg")];
    rows.extend((0..25).map(|_| row("", "neg")));
    rows.push(row(&"good movie ".repeat(20), "pos"));
    std::fs::write(&data, rows.join("\n") + "\n").unwrap();
    let out = p(tmp.path(), "run");
    let o = train(
        &model,
        &data,
        &out,
        &["--skip-bad-rows", "--max-length", "8", "--max-steps", "1"],
    );
    let (_, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let d = data.display();
    assert!(err.contains("25 malformed rows left out"), "{err}");
    for line in 3..23 {
        assert!(
            err.contains(&format!("{d}:{line}: field `text` is empty")),
            "{err}"
        );
    }
    assert!(!err.contains(&format!("{d}:23:")), "{err}");
    assert!(err.contains("… and 5 more"), "{err}");
    assert!(err.contains("1 row cut to --max-length 8 tokens"), "{err}");
    assert!(err.contains(&format!("{d}:28: ")), "{err}");
    let plan = &run_json(&tmp.path().join("run"))["plan"];
    assert_eq!(plan["skipped_rows"], 25, "{plan}");
    assert_eq!(plan["truncated_rows"], 1, "{plan}");
    assert_eq!(plan["train_rows"], 3, "{plan}");

    // --truncation drop leaves the long row out, said as much
    let o = train(
        &model,
        &data,
        &out,
        &[
            "--skip-bad-rows",
            "--max-length",
            "8",
            "--max-steps",
            "1",
            "--truncation",
            "drop",
            "--overwrite",
        ],
    );
    let (_, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("1 row longer than --max-length 8 tokens left out"),
        "{err}"
    );
    let plan = &run_json(&tmp.path().join("run"))["plan"];
    assert_eq!(
        (plan["train_rows"].as_u64(), plan["dropped_rows"].as_u64()),
        (Some(2), Some(1))
    );
}

/// `eval` and `predict` on a run directory (or its best/ or a checkpoint) take the model,
/// columns and data settings from its run.json; flags given override them.
#[test]
fn eval_and_predict_take_the_runs_settings() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let model = tiny_bert(root);
    let data = root.join("s.jsonl");
    let rows: Vec<String> = [("good movie", "pos"), ("bad movie", "neg")]
        .iter()
        .map(|(t, l)| serde_json::json!({"sentence": t, "y": l}).to_string())
        .collect();
    std::fs::write(&data, rows.join("\n") + "\n").unwrap();
    let run = p(root, "run");
    let o = train(
        &model,
        &data,
        &run,
        &[
            "--eval",
            data.to_str().unwrap(),
            "--text-column",
            "sentence",
            "--label-column",
            "y",
            "--max-length",
            "16",
            "--max-steps",
            "2",
            "--quiet",
        ],
    );
    assert!(o.status.success(), "{:?}", text(&o));
    let data_arg = data.to_str().unwrap();
    for adapter in [
        run.clone(),
        p(root, "run/best"),
        p(root, "run/checkpoints/step-2"),
    ] {
        let o = singlora(&["eval", "--adapter", &adapter, "--data", data_arg, "--json"]);
        let (out, err) = text(&o);
        assert!(o.status.success(), "{adapter}: {err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert!(v["eval_accuracy"].is_number(), "{out}");
    }
    let o = singlora(&["predict", "--adapter", &run, "good movie"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(out.ends_with("\tgood movie\n"), "{out}");
    // a JSONL file in, JSON lines out; a line without its field is named
    let input = root.join("inputs.jsonl");
    std::fs::write(
        &input,
        "{\"text\": \"good movie\"}\n\n{\"text\": \"bad film\"}\n",
    )
    .unwrap();
    let o = singlora(&[
        "predict",
        "--adapter",
        &run,
        "--input",
        input.to_str().unwrap(),
    ]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert_eq!(lines[1]["text"], "bad film");
    std::fs::write(&input, "{\"prompt\": \"good movie\"}\n").unwrap();
    let o = singlora(&[
        "predict",
        "--adapter",
        &run,
        "--input",
        input.to_str().unwrap(),
    ]);
    let (_, err) = text(&o);
    assert!(
        !o.status.success() && err.contains("inputs.jsonl:1: no string field `text`"),
        "{err}"
    );
    // a flag given wins over the run's setting
    let o = singlora(&[
        "eval",
        "--adapter",
        &run,
        "--data",
        data_arg,
        "--text-column",
        "text",
    ]);
    let (_, err) = text(&o);
    assert!(
        !o.status.success() && err.contains("missing field `text`"),
        "{err}"
    );
    let o = singlora(&[
        "eval",
        "--adapter",
        &run,
        "--model",
        &p(root, "nowhere"),
        "--data",
        data_arg,
    ]);
    let (_, err) = text(&o);
    assert!(!o.status.success() && err.contains("nowhere"), "{err}");
    // an adapter outside a run needs --model
    let adapter = root.join("copy");
    std::fs::create_dir(&adapter).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(root.join("run").join(f), adapter.join(f)).unwrap();
    }
    let o = singlora(&[
        "eval",
        "--adapter",
        adapter.to_str().unwrap(),
        "--data",
        data_arg,
    ]);
    let (_, err) = text(&o);
    assert!(!o.status.success() && err.contains("--model"), "{err}");
}

/// DreamBooth from the command line on the tiny diffusers-made pipeline: train, resume refused
/// settings, generate with the adapter, export for ComfyUI, merge into a diffusers folder.
#[test]
fn train_diffusion_generate_export_and_merge() {
    let tmp = tempfile::tempdir().unwrap();
    let sd = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../singlora/tests/fixtures/sd-tiny")
        .canonicalize()
        .unwrap();
    let subject = tmp.path().join("subject");
    std::fs::create_dir_all(&subject).unwrap();
    for k in 0..2u8 {
        image::RgbImage::from_pixel(40, 40, image::Rgb([40 * k, 100, 200]))
            .save(subject.join(format!("{k}.png")))
            .unwrap();
    }
    let run = tmp.path().join("run");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let o = singlora(&[
        "train-diffusion",
        "--model",
        &s(&sd),
        "--instance-images",
        &s(&subject),
        "--instance-prompt",
        "a photo of sks dog",
        "--rank",
        "2",
        "--max-steps",
        "2",
        "--sample-steps",
        "1",
        "--samples-per-prompt",
        "1",
        "--out",
        &s(&run),
    ]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    assert!(out.contains("pytorch_lora_weights.safetensors"), "{out}");
    assert!(run.join("samples/step-000002.png").is_file());

    let o = singlora(&["train-diffusion", "--resume", &s(&run), "--rank", "4"]);
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(err.contains("--rank cannot change"), "{err}");

    let grid = tmp.path().join("grid.png");
    let o = singlora(&[
        "generate",
        "--model",
        &s(&sd),
        "--adapter",
        &s(&run),
        "--prompt",
        "a photo of sks dog",
        "--prompt",
        "a red cat",
        "--num-images",
        "2",
        "--steps",
        "2",
        "--out",
        &s(&grid),
    ]);
    assert!(o.status.success(), "{:?}", text(&o));
    let img = image::open(&grid).unwrap();
    assert_eq!(
        (img.width(), img.height()),
        (64, 64),
        "2 prompts × 2 images of 32 px"
    );
    let o = singlora(&[
        "generate",
        "--model",
        &s(&sd),
        "--prompt",
        "x",
        "--out",
        &s(&grid),
    ]);
    assert!(!o.status.success(), "an existing image is not replaced");

    let kohya = tmp.path().join("kohya");
    let o = singlora(&[
        "export-lora",
        "--adapter",
        &s(&run),
        "--format",
        "kohya",
        "--out",
        &s(&kohya),
    ]);
    assert!(o.status.success(), "{:?}", text(&o));
    assert!(kohya.join("lora_kohya.safetensors").is_file());

    let merged = tmp.path().join("merged");
    let o = singlora(&[
        "merge",
        "--base",
        &s(&sd),
        "--adapter",
        &s(&run),
        "--out",
        &s(&merged),
    ]);
    assert!(o.status.success(), "{:?}", text(&o));
    assert!(merged
        .join("unet/diffusion_pytorch_model.safetensors")
        .is_file());
    assert!(merged.join("model_index.json").is_file());
}

/// A LLaMA base with a byte-level BPE tokenizer (what a GGUF file can carry) and a SingLoRA
/// adapter on its attention.
fn setup_bpe(dir: &Path) {
    let shape = LlamaShape {
        vocab: 272,
        ..LlamaShape::TINY
    };
    let base = dir.join("base");
    write_checkpoint(
        &base,
        &shape.config(),
        &shape.tensors(0, DType::F32).unwrap(),
        1,
    )
    .unwrap();
    singlora::synthetic::write_bpe_tokenizer(&base).unwrap();
    let targets = TargetSpec::parse("q_proj,k_proj,v_proj", None).unwrap();
    let layers: Vec<_> = shape
        .linears()
        .into_iter()
        .filter(|(n, _)| targets.matches(n))
        .collect();
    let spec = AdapterSpec::new(AdapterKind::SingLora, 2, 4.0);
    random_adapter(&spec, &layers, &targets, 1, 2)
        .unwrap()
        .write(&dir.join("adapter"), true)
        .unwrap();
}

#[test]
fn gguf_outputs_from_the_command_line() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    setup_bpe(d);
    let (base, adapter) = (p(d, "base"), p(d, "adapter"));
    // the .gguf name chooses the format; f16 by default
    let o = singlora(&[
        "merge",
        "--base",
        &base,
        "--adapter",
        &adapter,
        "--out",
        &p(d, "m.gguf"),
    ]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    assert!(out.contains("m.gguf"), "{out}");
    let g = singlora::gguf::load_gguf(&d.join("m.gguf"), DType::F32).unwrap();
    assert_eq!(g.config["vocab_size"], 272);

    // the base alone, then the adapter for it
    let o = singlora(&[
        "merge",
        "--base",
        &base,
        "--out",
        &p(d, "base.gguf"),
        "--quant",
        "f32",
    ]);
    assert!(o.status.success(), "{:?}", text(&o));
    let g = singlora::gguf::load_gguf(&d.join("base.gguf"), DType::F32).unwrap();
    let ckpt = singlora::checkpoint::Checkpoint::open(&d.join("base")).unwrap();
    for (name, t) in &g.tensors {
        let want = ckpt.load(name, &candle_core::Device::Cpu).unwrap();
        let diff = (t - want).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "{name}");
    }
    let a = p(d, "adapter.gguf");
    let o = singlora(&[
        "export-lora",
        "--adapter",
        &adapter,
        "--format",
        "gguf",
        "--out",
        &a,
    ]);
    let (_, err) = text(&o);
    assert!(!o.status.success() && err.contains("--base"), "{err}");
    assert!(!Path::new(&a).exists());
    let o = singlora(&[
        "export-lora",
        "--adapter",
        &adapter,
        "--format",
        "gguf",
        "--out",
        &a,
        "--base",
        &base,
    ]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    assert!(out.contains("6 layers") && out.contains("scale 1"), "{out}");

    // mistakes
    let o = singlora(&["merge", "--base", &base, "--out", &p(d, "plain")]);
    let (_, err) = text(&o);
    assert!(
        !o.status.success() && err.contains("--adapter is required"),
        "{err}"
    );
    let o = singlora(&[
        "merge",
        "--base",
        &base,
        "--out",
        &p(d, "q.gguf"),
        "--quant",
        "q3",
    ]);
    let (_, err) = text(&o);
    assert!(!o.status.success() && err.contains("q4_k_m"), "{err}");
    let o = singlora(&[
        "merge",
        "--base",
        &base,
        "--adapter",
        &adapter,
        "--out",
        &p(d, "m.gguf"),
    ]);
    let (_, err) = text(&o);
    assert!(!o.status.success() && err.contains("--overwrite"), "{err}");
}

/// A free TCP port on the loopback: bound, read, released.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `singlora ARGS` as rank `rank` of `world` processes, as torchrun starts them.
fn launched(args: &[String], rank: usize, world: usize, port: u16) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_singlora"))
        .args(args)
        .env("RANK", rank.to_string())
        .env("WORLD_SIZE", world.to_string())
        .env("LOCAL_RANK", rank.to_string())
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .env("SINGLORA_RENDEZVOUS_TIMEOUT", "60")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// 13 short classification rows (three texts, two labels) in `dir/d.jsonl`.
fn thirteen_rows(dir: &Path) -> PathBuf {
    let data = dir.join("d.jsonl");
    let rows: String = (0..13)
        .map(|i| {
            row(
                ["good movie", "bad movie", "movie good"][i % 3],
                ["pos", "neg"][i % 2],
            ) + "\n"
        })
        .collect();
    std::fs::write(&data, rows).unwrap();
    data
}

/// Waits, at most 2 minutes, for a run's first update in its `metrics.jsonl`.
fn wait_for_first_update(metrics: &Path) {
    let started = std::time::Instant::now();
    while !std::fs::read_to_string(metrics).is_ok_and(|m| m.contains("\"loss\"")) {
        assert!(
            started.elapsed().as_secs() < 120,
            "no update within 2 minutes"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

fn adapter_values(run: &Path) -> Vec<(String, Vec<f32>)> {
    let t = candle_core::safetensors::load(run.join("adapter_model.safetensors"), &Device::Cpu)
        .unwrap();
    let mut v: Vec<(String, Vec<f32>)> = t
        .into_iter()
        .map(|(k, t)| (k, t.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// One process per rank, as torchrun (or srun, mpirun) starts them, on the CPU: 2 and 3
/// processes end with the adapter of the threaded group over as many CPU ranks, bit for bit,
/// and rank 0 alone writes the run; a rank that never arrives and a rank killed mid-run end the
/// others with an error naming it, without a hang.
#[test]
fn launched_processes_train_as_the_threaded_group() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_bert(tmp.path());
    let data = thirteen_rows(tmp.path());
    let args = |out: &str, extra: &[&str]| -> Vec<String> {
        let mut v = vec![
            "train",
            "--model",
            &model,
            "--train",
            data.to_str().unwrap(),
            "--out",
            out,
            "--batch-size",
            "6",
            "--weight-decay",
            "0.01",
            "--quiet",
        ];
        v.extend_from_slice(extra);
        v.iter().map(|s| s.to_string()).collect()
    };
    for world in [2usize, 3] {
        let threaded = p(tmp.path(), &format!("threaded-{world}"));
        let devices = vec!["cpu"; world].join(",");
        let a = args(&threaded, &["--epochs", "3", "--devices", &devices]);
        let o = singlora(&a.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(o.status.success(), "{}", text(&o).1);
        let out = p(tmp.path(), &format!("launched-{world}"));
        let port = free_port();
        let kids: Vec<_> = (0..world)
            .map(|r| launched(&args(&out, &["--epochs", "3"]), r, world, port))
            .collect();
        for (r, k) in kids.into_iter().enumerate() {
            let o = k.wait_with_output().unwrap();
            assert!(o.status.success(), "rank {r}: {}", text(&o).1);
        }
        let out = Path::new(&out);
        assert_eq!(run_json(out)["world_size"], world);
        assert_eq!(
            adapter_values(out),
            adapter_values(Path::new(&threaded)),
            "{world} processes against {world} threads"
        );
    }

    // rank 1 of 2 never starts: rank 0 says so and stops
    let out = p(tmp.path(), "alone");
    let port = free_port();
    let mut a = args(&out, &["--epochs", "3"]);
    a.retain(|x| x != "--quiet");
    let o = Command::new(env!("CARGO_BIN_EXE_singlora"))
        .args(&a)
        .env("RANK", "0")
        .env("WORLD_SIZE", "2")
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .env("SINGLORA_RENDEZVOUS_TIMEOUT", "2")
        .output()
        .unwrap();
    let (_, err) = text(&o);
    assert!(
        !o.status.success() && err.contains("rank(s) 1 of 2 never arrived"),
        "{err}"
    );
    assert!(!Path::new(&out).join("adapter_model.safetensors").exists());

    // rank 1 killed mid-run: rank 0 ends with an error naming it
    let out = p(tmp.path(), "killed");
    let port = free_port();
    let long = args(&out, &["--epochs", "100000", "--save-minutes", "0"]);
    let mut r0 = launched(&long, 0, 2, port);
    let mut r1 = launched(&long, 1, 2, port);
    let metrics = Path::new(&out).join("metrics.jsonl");
    wait_for_first_update(&metrics);
    r1.kill().unwrap();
    r1.wait().unwrap();
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(s) = r0.try_wait().unwrap() {
            break s;
        }
        assert!(
            started.elapsed().as_secs() < 60,
            "rank 0 still runs a minute after rank 1 died"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(r0.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(!status.success() && err.contains("rank 1 is gone"), "{err}");
}

/// SIGTERM to rank 1 of a launched group stops both ranks at the same update (rank 0 writes the
/// checkpoint), and the group resumed with `--resume` ends with the adapter of an uninterrupted
/// threaded run over 2 CPU ranks, bit for bit.
#[cfg(unix)]
#[test]
fn a_signal_to_any_launched_rank_stops_all_and_the_group_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_bert(tmp.path());
    let data = thirteen_rows(tmp.path());
    let run = p(tmp.path(), "run");
    let args = |out: &str, steps: &str| -> Vec<String> {
        [
            "train",
            "--model",
            &model,
            "--train",
            data.to_str().unwrap(),
            "--out",
            out,
            "--batch-size",
            "6",
            "--max-steps",
            steps,
            "--schedule",
            "constant",
            "--warmup-steps",
            "0",
            "--ramp-steps",
            "5",
            "--quiet",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let port = free_port();
    let r0 = launched(&args(&run, "1000000"), 0, 2, port);
    let r1 = launched(&args(&run, "1000000"), 1, 2, port);
    let metrics = Path::new(&run).join("metrics.jsonl");
    wait_for_first_update(&metrics);
    let killed = Command::new("kill")
        .args(["-TERM", &r1.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let (o0, o1) = (
        r0.wait_with_output().unwrap(),
        r1.wait_with_output().unwrap(),
    );
    assert_eq!(o1.status.code(), Some(143), "rank 1: {}", text(&o1).1);
    let (out0, err0) = text(&o0);
    assert!(out0.contains("interrupted after"), "rank 0: {out0}\n{err0}");
    let saved: Vec<u64> = std::fs::read_dir(Path::new(&run).join("checkpoints"))
        .unwrap()
        .filter_map(|e| {
            e.unwrap()
                .file_name()
                .to_str()?
                .strip_prefix("step-")?
                .parse()
                .ok()
        })
        .collect();
    let last = *saved.iter().max().expect("a checkpoint");
    let logged = std::fs::read_to_string(&metrics)
        .unwrap()
        .lines()
        .filter(|l| l.contains("\"loss\""))
        .count() as u64;
    assert_eq!(logged, last, "the checkpoint is the last update logged");

    let to = (last + 3).to_string();
    let port = free_port();
    let resume: Vec<String> = ["train", "--resume", &run, "--max-steps", &to, "--quiet"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let kids = [launched(&resume, 0, 2, port), launched(&resume, 1, 2, port)];
    for (r, k) in kids.into_iter().enumerate() {
        let o = k.wait_with_output().unwrap();
        assert!(o.status.success(), "resumed rank {r}: {}", text(&o).1);
    }
    let reference = p(tmp.path(), "threaded");
    let mut a = args(&reference, &to);
    a.extend(["--devices".to_string(), "cpu,cpu".to_string()]);
    let o = singlora(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "{}", text(&o).1);
    assert_eq!(
        adapter_values(Path::new(&run)),
        adapter_values(Path::new(&reference))
    );
}
