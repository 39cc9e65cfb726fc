//! Secrets are never printed (DESIGN.md invariant 7): the whole Quick start
//! story (`scripts/demo.sh`) runs with debug logging, and no line of the
//! server's log or of the CLI's output carries the HSM PINs, the approver
//! and admin keys, or the client TLS keys, in any of the encodings a careless
//! `Debug` or error message would use.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use base64::Engine as _;

use crate::support;

/// The encodings of `secret` a leak would most likely take.
fn encodings(secret: &[u8]) -> Vec<String> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut forms = vec![
        hex::encode(secret),
        hex::encode_upper(secret),
        b64.encode(secret),
        format!("{secret:?}"),
    ];
    if let Ok(text) = std::str::from_utf8(secret) {
        forms.push(text.to_owned());
    }
    forms
}

/// The secret scalar of a PKCS#8 PEM key file, and the base64 lines of the
/// file itself.
fn key_file_secrets(path: &Path) -> Vec<Vec<u8>> {
    let pem = std::fs::read_to_string(path).unwrap();
    let mut secrets: Vec<Vec<u8>> = pem
        .lines()
        .filter(|l| !l.starts_with("-----") && l.len() >= 16)
        .map(|l| l.as_bytes().to_vec())
        .collect();
    use k256::pkcs8::DecodePrivateKey as _;
    if let Ok(key) = k256::SecretKey::from_pkcs8_pem(&pem) {
        secrets.push(key.to_bytes().to_vec());
    }
    assert!(!secrets.is_empty(), "{} holds no key", path.display());
    secrets
}

#[test]
fn quick_start_story_with_debug_logging_prints_no_secret() {
    let temp = tempfile::tempdir().unwrap();
    let data_dir = temp.path().join("demo");
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_custosd")).parent().unwrap();
    let mut command = Command::new("bash");
    command
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/demo.sh"))
        .env("CUSTOS_BIN", bin_dir)
        .env("CUSTOS_DEMO_DIR", &data_dir)
        .env("RUST_LOG", "debug")
        .env_remove("SOFTHSM2_CONF");
    let output = support::output_within(command, Duration::from_secs(240));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "demo failed:\n{stdout}\n{stderr}");
    assert!(
        stdout.contains("all 15 entries verified"),
        "the story did not run to its end:\n{stdout}"
    );
    let server_log = std::fs::read_to_string(data_dir.with_extension("log")).unwrap();
    // The test is only as good as the logging it reads: debug lines from
    // custos itself must be there.
    assert!(
        server_log
            .lines()
            .any(|l| l.contains("DEBUG") && l.contains("custos")),
        "custosd logged no debug lines; RUST_LOG=debug did not take"
    );

    let mut secrets: Vec<(String, Vec<u8>)> = Vec::new();
    for pin in ["user.pin", "so.pin"] {
        secrets.push((pin.into(), std::fs::read(data_dir.join(pin)).unwrap()));
    }
    for who in ["alice", "bob", "carol", "admin"] {
        for s in key_file_secrets(&data_dir.join("keys").join(format!("{who}.pem"))) {
            secrets.push((format!("{who}'s approver key"), s));
        }
    }
    for who in ["backend", "admin", "auditor", "alice", "bob"] {
        for s in key_file_secrets(&data_dir.join("tls/clients").join(format!("{who}.key"))) {
            secrets.push((format!("{who}'s TLS key"), s));
        }
    }
    for s in key_file_secrets(&data_dir.join("tls/server.key")) {
        secrets.push(("the server's TLS key".into(), s));
    }
    let texts = [
        ("custosd log", &server_log),
        ("demo stdout", &stdout),
        ("demo stderr", &stderr),
    ];
    let mut checked = 0;
    for (what, secret) in &secrets {
        assert!(secret.len() >= 8, "{what} is too short to search for");
        for form in encodings(secret) {
            for (name, text) in &texts {
                for (n, line) in text.lines().enumerate() {
                    assert!(
                        !line.contains(&form),
                        "{what} appears in {name} line {}: {line}",
                        n + 1
                    );
                    checked += 1;
                }
            }
        }
    }
    assert!(checked > 10_000, "searched only {checked} lines");
}
