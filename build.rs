//! Compiles `proto/` with protox (pure Rust), so building needs no system `protoc`.

use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/custos/v1/wallet.proto",
        "proto/custos/v1/transaction.proto",
        "proto/custos/v1/withdrawal.proto",
        "proto/custos/v1/policy.proto",
        "proto/custos/v1/audit.proto",
    ];
    println!("cargo:rerun-if-changed=proto");

    let descriptors = protox::compile(protos, ["proto"])?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let descriptor_path = out_dir.join("custos_descriptor.bin");
    std::fs::write(&descriptor_path, prost::Message::encode_to_vec(&descriptors))?;

    tonic_prost_build::configure()
        // Messages carrying signatures, policy documents and customers'
        // transactions get a redacted Debug (src/lib.rs, `proto`), so a stray
        // `{:?}` in a log line prints sizes, not contents.
        .skip_debug([
            "custos.v1.CreateWithdrawalRequest",
            "custos.v1.SubmitApprovalRequest",
            "custos.v1.SignedMessage",
            "custos.v1.ProposePolicyRequest",
        ])
        .build_client(true)
        .build_server(true)
        .skip_protoc_run()
        .compile_fds(descriptors)?;
    Ok(())
}
