//! The physical limit `custos bench` compares custos against: `C_Sign`
//! straight through cryptoki on the token custosd uses, one thread and one
//! session per worker, with no custos code in the loop.

use std::path::Path;
use std::time::{Duration, Instant};

use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, ObjectClass};

use custos::hsm::{HsmError, TokenSelector, tool_session};
use custos::secret::Pin;

/// What one raw run measured.
#[derive(Debug, Clone)]
pub struct RawSignRun {
    /// Wall time of the run.
    pub elapsed: Duration,
    /// Latency of every `C_Sign` call, in nanoseconds.
    pub latencies_ns: Vec<u64>,
}

/// Signs distinct 32-byte digests with CKM_ECDSA using the key labelled
/// `key_label`, from `sessions` threads for `duration`.
pub fn raw_sign(
    module: &Path,
    token_selector: &TokenSelector,
    pin: &Pin,
    key_label: &str,
    sessions: usize,
    duration: Duration,
) -> Result<RawSignRun, HsmError> {
    let (pkcs11, slot, anchor) = tool_session(module, token_selector, pin)?;
    let key = anchor
        .find_objects(&[
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::Label(key_label.as_bytes().to_vec()),
        ])
        .map_err(|e| HsmError::from_cryptoki("find key", e))?
        .first()
        .copied()
        .ok_or_else(|| HsmError::KeyMissing(key_label.to_owned()))?;
    let started = Instant::now();
    let deadline = started + duration;
    let results: Vec<Result<Vec<u64>, HsmError>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..sessions)
            .map(|worker| {
                let pkcs11 = &pkcs11;
                scope.spawn(move || -> Result<Vec<u64>, HsmError> {
                    let session = pkcs11
                        .open_ro_session(slot)
                        .map_err(|e| HsmError::from_cryptoki("open session", e))?;
                    let mut latencies = Vec::new();
                    let mut digest = [0u8; 32];
                    digest[0] = worker as u8;
                    let mut n: u64 = 0;
                    while Instant::now() < deadline {
                        digest[24..].copy_from_slice(&n.to_be_bytes());
                        let t = Instant::now();
                        session
                            .sign(&Mechanism::Ecdsa, key, &digest)
                            .map_err(|e| HsmError::from_cryptoki("sign", e))?;
                        latencies.push(t.elapsed().as_nanos() as u64);
                        n += 1;
                    }
                    Ok(latencies)
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().unwrap_or(Err(HsmError::Worker)))
            .collect()
    });
    let elapsed = started.elapsed();
    let mut latencies_ns = Vec::new();
    for result in results {
        latencies_ns.extend(result?);
    }
    Ok(RawSignRun {
        elapsed,
        latencies_ns,
    })
}
