//! Published formats checked against independent implementations.

use std::process::Command;

/// tests/intent_vectors.py, written from docs/approval-format.md alone,
/// reproduces every committed intent vector byte for byte.
#[test]
fn python_implementation_reproduces_intent_vectors() {
    let root = env!("CARGO_MANIFEST_DIR");
    let output = Command::new("python3")
        .arg(format!("{root}/tests/intent_vectors.py"))
        .arg(format!("{root}/tests/vectors/intent.json"))
        .output()
        .expect("python3 (scripts/ensure-deps.sh installs it)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("3 passed, 0 failed"), "{stdout}");
}
