//! The quantized-weights cache and GGUF models, through the binary on the tiny synthetic
//! model: written on the first load, used on the second, rebuilt when damaged, and a GGUF
//! model directory served over HTTP.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use serde_json::{Value, json};

use crate::support::{binary, client, free_port};

/// A bf16 synthetic model directory.
fn synth(dir: &Path, extra: &[&str]) {
    let out = binary()
        .args(["synth", "--preset", "tiny", "--seed", "5", "--out"])
        .arg(dir)
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Greedy text of `generate --model model` with the cache in `cache`, and its log.
fn generate(model: &Path, cache: &Path) -> (String, String) {
    let out = binary()
        .args([
            "generate",
            "--cpu",
            "--max-tokens",
            "24",
            "--prompt",
            "Name three rivers.",
        ])
        .arg("--model")
        .arg(model)
        .arg("--quant-cache")
        .arg(cache)
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{log}");
    (String::from_utf8_lossy(&out.stdout).into_owned(), log)
}

/// The one cache file in `cache`.
fn cache_file(cache: &Path) -> PathBuf {
    let files: Vec<PathBuf> = std::fs::read_dir(cache)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(
        files.len(),
        1,
        "one file and no leftovers in the cache: {files:?}"
    );
    assert_eq!(files[0].extension().unwrap(), "gguf");
    files[0].clone()
}

/// Offset of the value of metadata key `key` (a u32) in a GGUF file's bytes.
fn u32_value_at(bytes: &[u8], key: &str) -> usize {
    let at = bytes
        .windows(key.len())
        .position(|w| w == key.as_bytes())
        .unwrap_or_else(|| panic!("{key} in the file"));
    let ty = at + key.len();
    assert_eq!(
        u32::from_le_bytes(bytes[ty..ty + 4].try_into().unwrap()),
        4,
        "{key} is a u32"
    );
    ty + 4
}

#[test]
fn the_cache_is_written_used_and_rebuilt_when_damaged() {
    let model = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    synth(model.path(), &[]);

    let (text, log) = generate(model.path(), cache.path());
    assert!(log.contains("quantized-weights cache written"), "{log}");
    let file = cache_file(cache.path());
    let original = std::fs::read(&file).unwrap();
    assert_eq!(&original[..4], b"GGUF");

    // Second start: the file is read, not rewritten, and the text is the same.
    let inode = std::fs::metadata(&file).unwrap().ino();
    let (again, log) = generate(model.path(), cache.path());
    assert!(log.contains("quantized-weights cache found"), "{log}");
    assert!(!log.contains("cache written"), "{log}");
    assert_eq!(
        std::fs::metadata(&file).unwrap().ino(),
        inode,
        "not rewritten"
    );
    assert_eq!(again, text);

    // Each damage is noticed, the file rebuilt to the same bytes, and the text unchanged.
    let version = u32_value_at(&original, "zopilot.format");
    type Damage = Box<dyn Fn(&mut Vec<u8>)>;
    let damages: [(&str, &str, Damage); 3] = [
        (
            "truncated",
            "truncated",
            Box::new(|b: &mut Vec<u8>| b.truncate(b.len() - 1000)),
        ),
        (
            "a flipped byte in the output head",
            "fails its checksum",
            Box::new(|b: &mut Vec<u8>| {
                let at = b.len() - 5000;
                b[at] ^= 0x10;
            }),
        ),
        (
            "another format version",
            "format",
            Box::new(move |b: &mut Vec<u8>| {
                b[version..version + 4].copy_from_slice(&999u32.to_le_bytes())
            }),
        ),
    ];
    for (what, says, damage) in damages {
        let mut bytes = original.clone();
        damage(&mut bytes);
        std::fs::write(&file, &bytes).unwrap();
        let (text_after, log) = generate(model.path(), cache.path());
        assert!(
            log.contains(says),
            "{what}: the log says why ({says}): {log}"
        );
        assert!(log.contains("cache written"), "{what}: rebuilt: {log}");
        assert_eq!(text_after, text, "{what}: same text");
        assert!(
            std::fs::read(cache_file(cache.path())).unwrap() == original,
            "{what}: same bytes"
        );
    }

    // The cache alone serves once the checkpoint's weights are gone, and a damaged cache
    // then is refused with the fix, not loaded.
    for f in std::fs::read_dir(model.path()).unwrap().flatten() {
        if f.path().extension().is_some_and(|x| x == "safetensors") {
            std::fs::remove_file(f.path()).unwrap();
        }
    }
    let (without_weights, _) = generate(model.path(), cache.path());
    assert_eq!(without_weights, text);
    let mut bytes = original.clone();
    bytes.truncate(bytes.len() - 1000);
    std::fs::write(&file, &bytes).unwrap();
    let out = binary()
        .args([
            "generate",
            "--cpu",
            "--max-tokens",
            "4",
            "--prompt",
            "x",
            "--model",
        ])
        .arg(model.path())
        .arg("--quant-cache")
        .arg(cache.path())
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(log.contains("restore the checkpoint"), "{log}");
}

#[test]
fn the_cache_file_is_a_model_of_its_own_and_equals_the_isq_load() {
    let model = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let off = Path::new("off");
    synth(model.path(), &[]);
    let (isq, _) = generate(model.path(), off);
    let (recorded, _) = generate(model.path(), cache.path());
    assert_eq!(recorded, isq, "recording does not change the weights");
    let (from_file, log) = generate(&cache_file(cache.path()), off);
    assert!(
        !log.contains("quantized-weights cache"),
        "a GGUF model is not cached again: {log}"
    );
    assert_eq!(from_file, isq);
}

/// `synth --quantized q4k` writes a GGUF-only directory that serves over HTTP.
#[tokio::test]
async fn a_gguf_model_directory_serves_over_http() {
    let model = tempfile::tempdir().unwrap();
    synth(model.path(), &["--quantized", "q4k"]);
    let names: Vec<String> = std::fs::read_dir(model.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().any(|n| n.ends_with(".gguf")), "{names:?}");
    assert!(
        !names.iter().any(|n| n.ends_with(".safetensors")),
        "no bf16: {names:?}"
    );

    let port = free_port();
    let mut child = binary()
        .args([
            "serve",
            "--cpu",
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--model",
        ])
        .arg(model.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    crate::process::wait_ready(&url).await;
    let r = client()
        .post(format!("{url}/v1/chat/completions"))
        .json(&json!({"messages": [{"role": "user", "content": "Name three rivers."}], "max_tokens": 12}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["usage"]["completion_tokens"], 12, "{body}");
    assert!(
        body["choices"][0]["message"]["content"]
            .as_str()
            .is_some_and(|t| !t.is_empty())
    );
    let _ = child.kill();
    let _ = child.wait();
}

/// `check --json` with `args`: its checks by id.
fn checks(args: &[&std::ffi::OsStr]) -> Value {
    let out = binary()
        .args(["check", "--json", "--cpu"])
        .args(args)
        .output()
        .unwrap();
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "check --json printed JSON ({e}): {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let mut by_id = serde_json::Map::new();
    for c in report["checks"].as_array().unwrap() {
        by_id.insert(c["id"].as_str().unwrap().to_owned(), c.clone());
    }
    Value::Object(by_id)
}

/// The summary of check `id` in [`checks`]' result.
fn summary<'a>(checks: &'a Value, id: &str) -> &'a str {
    checks[id]["summary"].as_str().unwrap_or_default()
}

/// `check` tells whether a cache file serves the start or the start writes one, counts the
/// cache in the disk budget, and lets a cache stand in for deleted safetensors.
#[test]
fn check_shows_the_cache_and_counts_it_on_disk() {
    let model = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    synth(model.path(), &[]);
    let args = [
        "--model".as_ref(),
        model.path().as_os_str(),
        "--quant-cache".as_ref(),
        cache.path().as_os_str(),
    ];
    let before = checks(&args);
    assert_eq!(before["cache"]["verdict"], "pass", "{before}");
    let line = summary(&before, "cache");
    assert!(line.contains("no quantized-weights cache yet"), "{line}");
    assert!(line.contains(&cache.path().display().to_string()), "{line}");
    let disk = summary(&before, "disk");
    assert!(disk.contains("the quantized-weights cache up to"), "{disk}");
    assert!(
        summary(&before, "host_memory").contains("anonymous memory"),
        "{before}"
    );

    generate(model.path(), cache.path());
    let file = cache_file(cache.path());
    for f in std::fs::read_dir(model.path()).unwrap().flatten() {
        if f.path().extension().is_some_and(|x| x == "safetensors") {
            std::fs::remove_file(f.path()).unwrap();
        }
    }
    let after = checks(&args);
    let line = summary(&after, "cache");
    assert_eq!(after["cache"]["verdict"], "pass", "{after}");
    assert!(line.contains("loading maps it"), "{line}");
    assert!(line.contains(&file.display().to_string()), "{line}");
    assert_eq!(
        after["model"]["verdict"], "pass",
        "the cache stands in: {after}"
    );
    assert_eq!(after["disk"]["summary"], "nothing to download or write");

    let off = checks(&[
        "--model".as_ref(),
        model.path().as_os_str(),
        "--quant-cache".as_ref(),
        "off".as_ref(),
    ]);
    assert_eq!(off["cache"]["verdict"], "pass", "{off}");
    assert!(summary(&off, "cache").contains("cache off"), "{off}");

    let gguf = tempfile::tempdir().unwrap();
    synth(gguf.path(), &["--quantized", "q4k"]);
    let g = checks(&["--model".as_ref(), gguf.path().as_os_str()]);
    assert_eq!(g["model"]["verdict"], "pass", "{g}");
    assert!(summary(&g, "model").starts_with("GGUF model"), "{g}");
    assert_eq!(g["cache"]["verdict"], "skip", "{g}");
}
