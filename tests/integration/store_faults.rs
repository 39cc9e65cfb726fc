//! The store's filesystem fills up under custos. The store lives on a small
//! tmpfs this test mounts (it needs root or CAP_SYS_ADMIN and says so when it
//! cannot mount). While the log cannot be written, requests get UNAVAILABLE,
//! nothing is stored, and nothing reaches `C_Sign`; once space returns, the
//! same request succeeds without a restart. (A read-only remount is refused
//! by Linux while custosd holds the database open for writing, so the
//! read-only case is the injected-failure test in `audit.rs`.)

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tonic::Code;
use tonic_types::StatusExt;

use crate::support;
use crate::withdrawals::{ETHER, EXCHANGE};
use custos::proto::{self, WithdrawalState, withdrawal_service_client::WithdrawalServiceClient};

fn mount(args: &[&str]) -> bool {
    Command::new("mount")
        .args(args)
        .status()
        .is_ok_and(|s| s.success())
}

/// Unmounts on drop, so a failed assertion does not leave a mount behind.
struct Mounted<'a>(&'a Path);

impl Drop for Mounted<'_> {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.0).status();
    }
}

fn fill(dir: &Path) -> std::path::PathBuf {
    let filler = dir.join("filler");
    let mut file = std::fs::File::create(&filler).unwrap();
    let block = vec![0xA5u8; 64 * 1024];
    while file.write_all(&block).is_ok() {}
    let _ = file.sync_all();
    filler
}

fn request(id: &str, nonce: u64) -> proto::CreateWithdrawalRequest {
    crate::withdrawals::create_request(id, EXCHANGE, ETHER / 10, nonce, "ops")
}

#[test]
fn a_full_store_signs_nothing_and_recovers_without_a_restart() {
    let name = "store_faults::a_full_store_signs_nothing_and_recovers_without_a_restart";
    if !support::is_child(name) {
        let hsm = support::SoftHsmDir::new();
        let output = support::run_child(name, &hsm.env());
        if output.contains("SKIPPED:") {
            eprintln!(
                "{}",
                output
                    .lines()
                    .find(|l| l.contains("SKIPPED:"))
                    .unwrap_or_default()
            );
        }
        return;
    }
    let dir = support::child_dir();
    let mnt = dir.join("store-fs");
    std::fs::create_dir_all(&mnt).unwrap();
    if !mount(&["-t", "tmpfs", "-o", "size=16m", "tmpfs", mnt.to_str().unwrap()]) {
        println!(
            "SKIPPED: cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN); the full-disk test did not run"
        );
        return;
    }
    let _mounted = Mounted(&mnt);

    let paths = custos::dev::DevPaths::new(&dir.join("dev"));
    std::fs::create_dir_all(&paths.data_dir).unwrap();
    let mut config = custos::dev::prepare(&paths, &support::module_path(), None).unwrap();
    config.store = custos::store::StoreConfig::Sqlite {
        path: mnt.join("custos.db"),
    };
    // This test is about the store; plaintext keeps the client simple.
    config.server.insecure_plaintext = true;
    support::runtime().block_on(async {
        let app = custos::server::App::open_with(&config, |wallets| custos::dev::bootstrap(&paths, wallets))
            .await
            .unwrap();
        let hsm = app.hsm.clone();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(custos::server::run(listener, app, std::future::pending()));
        let channel = tonic::transport::Endpoint::from_shared(endpoint)
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut client = WithdrawalServiceClient::new(channel);

        let first = client
            .create_withdrawal(request("before", 0))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(first.state(), WithdrawalState::Signed);
        let count = || {
            let db = rusqlite::Connection::open(mnt.join("custos.db")).unwrap();
            let n: i64 = db
                .query_row("SELECT COUNT(*) FROM withdrawals", [], |r| r.get(0))
                .unwrap();
            n
        };

        // Full: the WAL is emptied first, so the next commit needs new space.
        {
            let db = rusqlite::Connection::open(mnt.join("custos.db")).unwrap();
            db.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
                .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let filler = fill(&mnt);
        let (stored, signed) = (count(), hsm.wallet_sign_calls());
        for attempt in 0..3 {
            let err = client.create_withdrawal(request("full", 1)).await.unwrap_err();
            assert_eq!(err.code(), Code::Unavailable, "attempt {attempt}: {err:?}");
            assert_eq!(
                err.get_details_error_info().map(|i| i.reason).as_deref(),
                Some("STORE_UNAVAILABLE"),
                "attempt {attempt}: {err:?}"
            );
            assert!(
                !err.message().to_lowercase().contains("sqlite"),
                "internals stay in the log: {err:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(1500)).await; // a sweep runs meanwhile
        assert_eq!(
            hsm.wallet_sign_calls(),
            signed,
            "nothing reached C_Sign while the disk was full"
        );
        std::fs::remove_file(&filler).unwrap();
        assert_eq!(count(), stored, "nothing was stored while the disk was full");
        let retried = client
            .create_withdrawal(request("full", 1))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            retried.state(),
            WithdrawalState::Signed,
            "recovered once space returned"
        );
        assert_eq!(hsm.wallet_sign_calls(), signed + 1);
    });
}
