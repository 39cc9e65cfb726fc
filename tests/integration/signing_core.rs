//! The signing core: wallets over gRPC, keys that never leave the token,
//! low-S recoverable signatures, startup failures, session loss.

use std::path::Path;
use std::process::Command;

use cryptoki::context::Pkcs11;
use cryptoki::object::{Attribute, AttributeInfo, AttributeType, KeyType, ObjectClass};
use cryptoki::session::UserType;
use k256::ecdsa::VerifyingKey;
use k256::ecdsa::signature::hazmat::PrehashVerifier;
use tonic::Code;
use tonic_types::StatusExt;

use crate::support::{self, DevServer};
use custos::api;
use custos::hsm::{HsmError, KeyId};
use custos::proto::{self, wallet_service_client::WalletServiceClient};
use custos::wallet::{DisplayName, WalletError, WalletId};
use custos_core::chain::SigningDigest;
use custos_core::chain::ethereum::{
    self, EthereumFields, EthereumNetwork, EthereumTxType, UnsignedEthereumTx,
};
use custos_core::signature::is_low_s;

fn create_request(id: &str) -> proto::CreateWalletRequest {
    proto::CreateWalletRequest {
        wallet_id: id.into(),
        wallet: Some(proto::Wallet {
            display_name: format!("wallet {id}"),
            ..Default::default()
        }),
    }
}

/// A wallet created over gRPC has the required attributes, and a second
/// process that logs in to the same token cannot read its private value.
#[test]
fn wallet_key_created_over_grpc_cannot_be_read_by_another_process() {
    let server = DevServer::start();
    let wallet = support::runtime().block_on(async {
        let mut client = WalletServiceClient::new(server.channel_as("admin").await);
        client
            .create_wallet(create_request("cold"))
            .await
            .unwrap()
            .into_inner()
    });
    let attrs = wallet.key_attributes.unwrap();
    assert!(attrs.token && attrs.private && attrs.sensitive && attrs.always_sensitive);
    assert!(!attrs.extractable && attrs.never_extractable);
    assert_eq!(wallet.public_key.len(), 33);

    support::run_child(
        "signing_core::child_reads_wallet_key_from_token",
        &[
            ("SOFTHSM2_CONF", server.path("softhsm2_conf").into_os_string()),
            (
                "CUSTOS_TEST_PIN_FILE",
                server.path("user_pin_file").into_os_string(),
            ),
            ("CUSTOS_TEST_KEY_LABEL", wallet.key_label.into()),
            ("CUSTOS_TEST_PUBLIC_KEY", hex::encode(&wallet.public_key).into()),
        ],
    );
}

#[test]
#[ignore = "runs as a child process of wallet_key_created_over_grpc_cannot_be_read_by_another_process"]
fn child_reads_wallet_key_from_token() {
    assert!(support::is_child(
        "signing_core::child_reads_wallet_key_from_token"
    ));
    let env = |k: &str| std::env::var(k).unwrap();
    let pkcs11 = Pkcs11::new(support::module_path()).unwrap();
    pkcs11
        .initialize(cryptoki::context::CInitializeArgs::new(
            cryptoki::context::CInitializeFlags::OS_LOCKING_OK,
        ))
        .unwrap();
    let slot = support::slot_with_label(&pkcs11, custos::dev::DEV_TOKEN_LABEL);
    let session = pkcs11.open_ro_session(slot).unwrap();
    let user_pin = std::fs::read_to_string(env("CUSTOS_TEST_PIN_FILE")).unwrap();
    session
        .login(UserType::User, Some(&user_pin.trim().into()))
        .unwrap();

    let label = env("CUSTOS_TEST_KEY_LABEL").into_bytes();
    let private = session
        .find_objects(&[
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::Label(label.clone()),
        ])
        .unwrap();
    assert_eq!(
        private.len(),
        1,
        "exactly one private key with the wallet's label"
    );
    let private = private[0];

    // The private value is refused: C_GetAttributeValue(CKA_VALUE) returns CKR_ATTRIBUTE_SENSITIVE.
    let info = session
        .get_attribute_info(private, &[AttributeType::Value])
        .unwrap();
    assert!(
        matches!(info[0], AttributeInfo::Sensitive),
        "CKA_VALUE readable: {info:?}"
    );
    assert!(
        session
            .get_attributes(private, &[AttributeType::Value])
            .unwrap()
            .is_empty()
    );

    // Read-back from an independent process agrees with what custos reported.
    let attrs = session
        .get_attributes(
            private,
            &[
                AttributeType::Sensitive,
                AttributeType::Extractable,
                AttributeType::AlwaysSensitive,
                AttributeType::NeverExtractable,
                AttributeType::Derive,
                AttributeType::KeyType,
            ],
        )
        .unwrap();
    for attr in &attrs {
        match attr {
            Attribute::Sensitive(v) | Attribute::AlwaysSensitive(v) | Attribute::NeverExtractable(v) => {
                assert!(*v, "{attr:?}")
            }
            Attribute::Extractable(v) | Attribute::Derive(v) => assert!(!*v, "{attr:?}"),
            Attribute::KeyType(t) => assert_eq!(*t, KeyType::EC),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(attrs.len(), 6);

    // The public key object holds the key custos reported.
    let public = session
        .find_objects(&[Attribute::Class(ObjectClass::PUBLIC_KEY), Attribute::Label(label)])
        .unwrap();
    let point = match &session
        .get_attributes(public[0], &[AttributeType::EcPoint])
        .unwrap()[0]
    {
        Attribute::EcPoint(p) => custos::hsm::sec1_from_ec_point(p).unwrap(),
        other => panic!("{other:?}"),
    };
    let reported = hex::decode(env("CUSTOS_TEST_PUBLIC_KEY")).unwrap();
    assert_eq!(
        VerifyingKey::from_sec1_bytes(&point).unwrap(),
        VerifyingKey::from_sec1_bytes(&reported).unwrap()
    );
}

/// 1,000 digests signed through the internal signing path: every signature is
/// low-S, verifies with k256, and recovers to the wallet's addresses.
#[test]
fn thousand_signatures_are_low_s_verified_and_recover_to_the_wallet() {
    support::with_app_in_child(
        "signing_core::thousand_signatures_are_low_s_verified_and_recover_to_the_wallet",
        |app, _dir| async move {
            let id = WalletId::parse("signer").unwrap();
            let wallet = app
                .wallets
                .create(id.clone(), DisplayName::default())
                .await
                .unwrap();

            // The token really does return high-S about half the time, so the
            // normalisation below is exercised, not assumed.
            let mut raw_high_s = 0;
            for i in 0u32..200 {
                let digest = transfer_digest(&wallet.ethereum_address, u64::from(i) + 1_000_000);
                let raw = app.hsm.sign_ecdsa_prehash(&wallet.key_id, &digest).await.unwrap();
                let sig = k256::ecdsa::Signature::from_slice(&raw).unwrap();
                raw_high_s += usize::from(!is_low_s(&sig));
            }
            assert!(
                (40..=160).contains(&raw_high_s),
                "raw high-S count {raw_high_s} of 200"
            );

            let mut tasks = tokio::task::JoinSet::new();
            for i in 0u32..1000 {
                let wallets = app.wallets.clone();
                let id = id.clone();
                let address = wallet.ethereum_address.clone();
                tasks.spawn(async move {
                    let digest = transfer_digest(&address, u64::from(i));
                    (digest, wallets.sign_digest(&id, digest).await.unwrap())
                });
            }
            let mut checked = 0;
            while let Some(joined) = tasks.join_next().await {
                let (digest, sig) = joined.unwrap();
                assert!(is_low_s(sig.signature()), "high-S released");
                wallet
                    .public_key
                    .verify_prehash(digest.as_bytes(), sig.signature())
                    .unwrap();
                let recovered =
                    VerifyingKey::recover_from_prehash(digest.as_bytes(), sig.signature(), sig.recovery_id())
                        .unwrap();
                assert_eq!(
                    custos_core::address::ethereum_address_checksummed(&recovered),
                    wallet.ethereum_address
                );
                assert_eq!(
                    custos_core::address::bitcoin_p2wpkh_address(&recovered, bitcoin::Network::Regtest)
                        .to_string(),
                    wallet.bitcoin_address
                );
                checked += 1;
            }
            assert_eq!(checked, 1000);
        },
    );
}

/// The signing digest of an ETH transfer from `from` with this nonce. Parsing
/// a transaction is the only way to obtain something the HSM will sign.
fn transfer_digest(from: &str, nonce: u64) -> SigningDigest {
    let fields = EthereumFields {
        tx_type: EthereumTxType::Legacy,
        chain_id: 1,
        nonce,
        gas_limit: 21_000,
        gas_price: 1_000_000_000,
        max_fee_per_gas: 0,
        max_priority_fee_per_gas: 0,
        to: Some("0x3535353535353535353535353535353535353535".parse().unwrap()),
        value: alloy_primitives::U256::from(nonce + 1),
        data: vec![],
    };
    let network = EthereumNetwork {
        chain_id: 1,
        tokens: vec![],
    };
    let tx = UnsignedEthereumTx::try_from(fields).unwrap();
    ethereum::parse(tx, &network, from.parse().unwrap())
        .unwrap()
        .signing_digest()
}

/// A key on the token whose attributes allow export is refused when loaded,
/// naming the attribute.
#[test]
fn extractable_key_on_token_is_refused() {
    support::with_app_in_child(
        "signing_core::extractable_key_on_token_is_refused",
        |app, _dir| async move {
            // Plant a weak key pair (exportable, not sensitive) through a side session.
            let pkcs11 = Pkcs11::new(support::module_path()).unwrap();
            let session = pkcs11
                .open_rw_session(support::slot_with_label(&pkcs11, support::TEST_TOKEN_LABEL))
                .unwrap();
            let id = vec![0xAB; 16];
            support::plant_key_pair(&session, &id, b"weak", true);
            let err = app
                .hsm
                .load_key(custos::hsm::KeyKind::Secp256k1, &KeyId::from_bytes(id))
                .await
                .unwrap_err();
            assert!(
                matches!(
                    err,
                    HsmError::KeyRefused {
                        attribute: "CKA_SENSITIVE",
                        ..
                    }
                ),
                "weak key not refused: {err}"
            );
        },
    );
}

/// Startup with a wrong module path, a missing token or a wrong PIN exits
/// non-zero with a clear message, and creates no store.
#[test]
fn startup_failures_exit_clearly_and_create_nothing() {
    let mut server = DevServer::start();
    let conf = server.path("softhsm2_conf");
    let real_pin_file = server.path("user_pin_file");
    let real_pin = std::fs::read_to_string(&real_pin_file).unwrap();
    assert!(server.stop().success(), "graceful shutdown on SIGTERM exits 0");

    let work = tempfile::tempdir().unwrap();
    let wrong_pin_file = work.path().join("wrong.pin");
    std::fs::write(&wrong_pin_file, "not-the-pin-777").unwrap();
    std::fs::set_permissions(
        &wrong_pin_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let module = support::module_path();
    let missing_module = std::path::PathBuf::from("/nonexistent/libpkcs11.so");

    let cases = [
        (
            "module",
            &missing_module,
            custos::dev::DEV_TOKEN_LABEL,
            &real_pin_file,
            "cannot load PKCS#11 module /nonexistent/libpkcs11.so",
        ),
        (
            "token",
            &module,
            "no-such-token",
            &real_pin_file,
            "no initialized token with label \"no-such-token\"",
        ),
        (
            "pin",
            &module,
            custos::dev::DEV_TOKEN_LABEL,
            &wrong_pin_file,
            "C_Login refused the user PIN (PinIncorrect)",
        ),
    ];
    for (name, module, label, pin_file, expected) in cases {
        let store = work.path().join(format!("{name}.db"));
        let config = work.path().join(format!("{name}.toml"));
        std::fs::write(&config, support::config_text(module, label, pin_file, &store)).unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_custosd"));
        command
            .arg("--config")
            .arg(&config)
            .arg("--insecure-plaintext")
            .env("SOFTHSM2_CONF", &conf);
        let output = support::output_within(command, std::time::Duration::from_secs(60));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{name}: custosd started");
        assert!(
            stderr.contains(expected),
            "{name}: stderr lacks {expected:?}:\n{stderr}"
        );
        assert!(
            !stderr.contains("not-the-pin-777") && !stderr.contains(real_pin.trim()),
            "{name}: PIN in output"
        );
        assert!(!store.exists(), "{name}: store created although startup failed");
    }
}

/// Session loss mid-run: a logout is recovered; a re-initialized token fails
/// closed; a substituted key under the same id and label is never used.
#[test]
fn session_loss_recovers_or_fails_closed_and_never_uses_a_wrong_key() {
    support::with_app_in_child(
        "signing_core::session_loss_recovers_or_fails_closed_and_never_uses_a_wrong_key",
        |app, dir| async move {
            let id = WalletId::parse("w").unwrap();
            let wallet = app
                .wallets
                .create(id.clone(), DisplayName::default())
                .await
                .unwrap();
            let digest = transfer_digest(&wallet.ethereum_address, 1);
            app.wallets.sign_digest(&id, digest).await.unwrap();

            // 1. Another session of this application logs out: every session loses
            //    its login. The next signature recovers by logging in again.
            let pkcs11 = Pkcs11::new(support::module_path()).unwrap();
            let slot = support::slot_with_label(&pkcs11, support::TEST_TOKEN_LABEL);
            pkcs11.open_ro_session(slot).unwrap().logout().unwrap();
            let sig = app
                .wallets
                .sign_digest(&id, transfer_digest(&wallet.ethereum_address, 2))
                .await
                .unwrap();
            wallet
                .public_key
                .verify_prehash(
                    transfer_digest(&wallet.ethereum_address, 2).as_bytes(),
                    sig.signature(),
                )
                .unwrap();

            // 2. Another process re-initializes the token (same label and PINs):
            //    the wallet key is gone and signing fails closed.
            let softhsm = |args: &[&str]| {
                let out = Command::new("softhsm2-util")
                    .args(args)
                    .output()
                    .expect("softhsm2-util");
                assert!(
                    out.status.success(),
                    "softhsm2-util {args:?}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            };
            softhsm(&[
                "--init-token",
                "--token",
                support::TEST_TOKEN_LABEL,
                "--label",
                support::TEST_TOKEN_LABEL,
                "--so-pin",
                support::TEST_SO_PIN,
                "--pin",
                support::TEST_USER_PIN,
            ]);
            let err = app
                .wallets
                .sign_digest(&id, transfer_digest(&wallet.ethereum_address, 3))
                .await
                .unwrap_err();
            let status = api::to_status(&err);
            assert!(
                matches!(status.code(), Code::Unavailable | Code::FailedPrecondition),
                "after re-initialization: {err} -> {status:?}"
            );

            // 3. An attacker plants a different key under the wallet's CKA_ID and
            //    label. custos must refuse it rather than sign with it.
            let attacker = k256::ecdsa::SigningKey::from_slice(&[0x5A; 32]).unwrap();
            let pem = k256::pkcs8::EncodePrivateKey::to_pkcs8_pem(&attacker, Default::default()).unwrap();
            let pem_path = dir.join("attacker.pem");
            std::fs::write(&pem_path, pem.as_bytes()).unwrap();
            softhsm(&[
                "--import",
                pem_path.to_str().unwrap(),
                "--token",
                support::TEST_TOKEN_LABEL,
                "--label",
                &wallet.key_label,
                "--id",
                &wallet.key_id.to_string(),
                "--pin",
                support::TEST_USER_PIN,
            ]);
            let refusal = |err: &WalletError| {
                matches!(
                    err,
                    WalletError::Hsm(
                        HsmError::KeyMismatch(_) | HsmError::KeyMissing(_) | HsmError::KeyRefused { .. }
                    ) | WalletError::Signature(_)
                ) || matches!(err, WalletError::Hsm(HsmError::Unavailable(inner)) if matches!(**inner, HsmError::KeyMismatch(_) | HsmError::KeyMissing(_) | HsmError::KeyRefused { .. }))
            };
            for attempt in 0..3 {
                match app
                    .wallets
                    .sign_digest(&id, transfer_digest(&wallet.ethereum_address, 4 + attempt))
                    .await
                {
                    Ok(sig) => panic!("signed with an imported key: {sig:?}"),
                    Err(err) => assert!(refusal(&err), "unexpected error {err}"),
                }
            }

            // 4. A key generated inside the token under the wallet's id and label
            //    passes every attribute check, but is not the wallet's key: refused.
            let side = pkcs11.open_rw_session(slot).unwrap();
            for object in side
                .find_objects(&[Attribute::Id(wallet.key_id.as_bytes().to_vec())])
                .unwrap()
            {
                side.destroy_object(object).unwrap();
            }
            support::plant_key_pair(
                &side,
                wallet.key_id.as_bytes(),
                wallet.key_label.as_bytes(),
                false,
            );
            for attempt in 0..3 {
                match app
                    .wallets
                    .sign_digest(&id, transfer_digest(&wallet.ethereum_address, 10 + attempt))
                    .await
                {
                    Ok(sig) => panic!("signed with a substituted key: {sig:?}"),
                    Err(err) => assert!(
                        matches!(&err, WalletError::Hsm(HsmError::KeyMismatch(_)))
                            || matches!(&err, WalletError::Hsm(HsmError::Unavailable(inner)) if matches!(**inner, HsmError::KeyMismatch(_))),
                        "substituted key not refused as a mismatch: {err}"
                    ),
                }
            }
        },
    );
}

/// Health reports SERVING for the server and every custos service, over
/// Check and Watch; reflection lists every service over both v1 and
/// v1alpha.
#[test]
fn health_is_serving_and_reflection_lists_services() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };

    let server = DevServer::start();
    // Its stderr is a file: plain text, no ANSI colour codes.
    let log = server.stderr();
    assert!(log.contains("HSM token opened"), "{log}");
    assert!(!log.contains('\u{1b}'), "colour codes in a log file: {log:?}");
    support::runtime().block_on(async {
        let channel = server.channel_as("auditor").await;
        for service in custos::health::SERVICES {
            let status = support::health_status(&channel, service).await;
            assert_eq!(status, ServingStatus::Serving, "{service:?}");
            let mut watch = HealthClient::new(channel.clone())
                .watch(HealthCheckRequest {
                    service: service.into(),
                })
                .await
                .unwrap()
                .into_inner();
            let first = watch.message().await.unwrap().unwrap();
            assert_eq!(first.status(), ServingStatus::Serving, "Watch {service:?}");
        }

        {
            use tonic_reflection::pb::v1alpha::{
                ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
                server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
            };
            let request = ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::ListServices(String::new())),
            };
            let response = ServerReflectionClient::new(channel.clone())
                .server_reflection_info(tokio_stream::iter([request]))
                .await
                .unwrap()
                .into_inner()
                .message()
                .await
                .unwrap()
                .unwrap();
            let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
                panic!("unexpected v1alpha reflection response {response:?}");
            };
            assert!(
                list.service
                    .iter()
                    .any(|s| s.name == "custos.v1.WithdrawalService"),
                "{list:?}"
            );
        }

        let mut reflection = ServerReflectionClient::new(channel);
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut responses = reflection
            .server_reflection_info(tokio_stream::iter([request]))
            .await
            .unwrap()
            .into_inner();
        let response = responses.message().await.unwrap().unwrap();
        let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
            panic!("unexpected reflection response {response:?}");
        };
        let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
        for expected in [
            "custos.v1.WalletService",
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
        ] {
            assert!(
                names.iter().any(|n| n == expected),
                "{expected} missing from {names:?}"
            );
        }
    });
}

/// The stock Python reflection client (`grpcio-reflection` from PyPI, which
/// speaks only v1alpha) lists the services over mTLS, describes
/// WalletService, and calls ListWallets with a request message built from
/// the descriptors it fetched. `scripts/test.sh` installs it and sets
/// `CUSTOS_TEST_PYTHON`.
#[test]
fn the_stock_python_reflection_client_lists_describes_and_calls() {
    let python = std::env::var_os("CUSTOS_TEST_PYTHON").expect(
        "CUSTOS_TEST_PYTHON names the python with grpcio-reflection: run scripts/test.sh, \
         or set it to the output of scripts/python-env.sh",
    );
    let server = DevServer::start();
    let (cert, key) = server.client_files("admin");
    let output = Command::new(python)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/reflection_client.py"))
        .arg(&server.endpoint)
        .arg(server.tls_path(&["ca_cert"]))
        .args([cert, key])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "reflection client failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let found: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    for service in [
        "custos.v1.WalletService",
        "custos.v1.WithdrawalService",
        "custos.v1.ApprovalService",
        "custos.v1.PolicyService",
        "custos.v1.AuditService",
        "grpc.health.v1.Health",
    ] {
        assert!(
            found["services"].as_array().unwrap().iter().any(|s| s == service),
            "{service} not listed: {found}"
        );
    }
    assert_eq!(
        found["wallet_service_methods"],
        serde_json::json!(["CreateWallet", "GetWallet", "ListWallets"])
    );
    assert_eq!(
        found["list_wallets_input_fields"],
        serde_json::json!(["page_size", "page_token"])
    );
    // The dev server's one wallet, as the admin sees it.
    let wallets = found["list_wallets"]["wallets"].as_array().unwrap();
    assert_eq!(wallets.len(), 1, "{found}");
}

/// WalletService validates every field, stores nothing on bad input, pages,
/// and keeps wallets (with usable keys) across a restart.
#[test]
fn wallet_rpcs_validate_page_and_survive_restart() {
    let temp = tempfile::tempdir().unwrap();
    let data_dir = temp.path().join("dev");
    let mut server = DevServer::start_in(&data_dir, &[]);
    let before = support::runtime().block_on(async {
        let mut client = WalletServiceClient::new(server.channel_as("admin").await);
        // Dev mode created `hot`; two more make three.
        for id in ["a", "b"] {
            client.create_wallet(create_request(id)).await.unwrap();
        }

        let dup = client.create_wallet(create_request("a")).await.unwrap_err();
        assert_eq!(dup.code(), Code::AlreadyExists);
        assert_eq!(
            dup.get_details_error_info().unwrap().reason,
            api::reason::WALLET_ALREADY_EXISTS
        );

        let bad = client.create_wallet(create_request("A_b")).await.unwrap_err();
        assert_eq!(bad.code(), Code::InvalidArgument);
        assert_eq!(
            bad.get_details_bad_request().unwrap().field_violations[0].field,
            "wallet_id"
        );

        let mut output_only = create_request("d");
        output_only.wallet.as_mut().unwrap().ethereum_address = "0x00".into();
        let bad = client.create_wallet(output_only).await.unwrap_err();
        assert_eq!(
            bad.get_details_bad_request().unwrap().field_violations[0].field,
            "wallet.ethereum_address"
        );

        let mut long_name = create_request("e");
        long_name.wallet.as_mut().unwrap().display_name = "x".repeat(129);
        let bad = client.create_wallet(long_name).await.unwrap_err();
        assert_eq!(
            bad.get_details_bad_request().unwrap().field_violations[0].field,
            "wallet.display_name"
        );

        let missing = client
            .get_wallet(proto::GetWalletRequest {
                name: "wallets/zz".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(missing.code(), Code::NotFound);
        let malformed = client
            .get_wallet(proto::GetWalletRequest { name: "zz".into() })
            .await
            .unwrap_err();
        assert_eq!(
            malformed.get_details_bad_request().unwrap().field_violations[0].field,
            "name"
        );

        let first = client
            .list_wallets(proto::ListWalletsRequest {
                page_size: 2,
                page_token: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(first.wallets.len(), 2);
        assert!(!first.next_page_token.is_empty());
        let second = client
            .list_wallets(proto::ListWalletsRequest {
                page_size: 2,
                page_token: first.next_page_token,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(second.wallets.len(), 1);
        assert!(second.next_page_token.is_empty());
        let bad_token = client
            .list_wallets(proto::ListWalletsRequest {
                page_size: 2,
                page_token: "nope".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(bad_token.code(), Code::InvalidArgument);

        let all = client
            .list_wallets(proto::ListWalletsRequest::default())
            .await
            .unwrap()
            .into_inner();
        // Nothing was stored by the refused requests.
        assert_eq!(
            all.wallets.iter().map(|w| w.name.as_str()).collect::<Vec<_>>(),
            ["wallets/hot", "wallets/a", "wallets/b"]
        );
        all.wallets
    });
    assert!(server.stop().success());
    assert!(
        server.stderr().contains("custosd stopped"),
        "no graceful-shutdown log"
    );

    let server = DevServer::start_in(&data_dir, &[]);
    let after = support::runtime().block_on(async {
        let mut client = WalletServiceClient::new(server.channel_as("admin").await);
        client
            .list_wallets(proto::ListWalletsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .wallets
    });
    assert_eq!(before, after, "wallets changed across restart");
    assert!(
        !server.stderr().contains("cannot sign"),
        "a wallet key failed to reload:\n{}",
        server.stderr()
    );
}

/// Dev mode serves plaintext, so it refuses any non-loopback address.
#[test]
fn dev_mode_refuses_non_loopback_listen() {
    let temp = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_custosd"))
        .args(["--dev", "--listen", "0.0.0.0:0", "--data-dir"])
        .arg(temp.path().join("dev"))
        .arg("--module")
        .arg(support::module_path())
        .env_remove("SOFTHSM2_CONF")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("only on loopback"), "{stderr}");
}

/// hsm-config/create-softhsm-token.sh makes a token and config that custosd
/// serves from, without dev mode.
#[test]
fn token_script_yields_a_servable_config() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("token");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/hsm-config/create-softhsm-token.sh");
    let out = Command::new("bash")
        .arg(script)
        .arg(&dir)
        .arg("scripted")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mode = std::fs::metadata(dir.join("user.pin")).unwrap().permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o077,
        0,
        "PIN file readable by others"
    );

    let mut child = Command::new(env!("CARGO_BIN_EXE_custosd"))
        .arg("--config")
        .arg(dir.join("custosd.toml"))
        .args(["--listen", "127.0.0.1:0", "--insecure-plaintext"])
        .env("SOFTHSM2_CONF", dir.join("softhsm2.conf"))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    while !seen.contains("custosd serving") {
        let mut line = String::new();
        let read = std::io::BufRead::read_line(&mut stderr, &mut line).unwrap();
        assert!(read > 0, "custosd exited before serving:\n{seen}");
        seen.push_str(&line);
    }
    assert!(support::terminate(&mut child).success());
    assert!(dir.join("custos.db").exists());
}

/// custosd finds its token by serial number as well as by label, and reads
/// its PIN from an environment variable as well as from a file.
#[test]
fn token_by_serial_and_pin_from_environment() {
    let mut server = DevServer::start();
    let conf = server.path("softhsm2_conf");
    let pin = std::fs::read_to_string(server.path("user_pin_file")).unwrap();
    assert!(server.stop().success());
    let serial = {
        let out = Command::new("softhsm2-util")
            .arg("--show-slots")
            .env("SOFTHSM2_CONF", &conf)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let line = text
            .lines()
            .map(str::trim)
            .find(|l| l.starts_with("Serial number:") && l.len() > "Serial number:".len() + 1)
            .unwrap_or_else(|| panic!("no serial in:\n{text}"))
            .to_owned();
        line["Serial number:".len()..].trim().to_owned()
    };

    let work = tempfile::tempdir().unwrap();
    let store = work.path().join("serial.db");
    let config = work.path().join("serial.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[hsm]\nmodule = \"{}\"\ntoken_serial = \"{serial}\"\npin_env = \"CUSTOS_TEST_HSM_PIN\"\n[store]\npath = \"{}\"\n",
            support::module_path().display(),
            store.display()
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_custosd"))
        .arg("--config")
        .arg(&config)
        .arg("--insecure-plaintext")
        .env("SOFTHSM2_CONF", &conf)
        .env("CUSTOS_TEST_HSM_PIN", pin.trim())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    while !seen.contains("custosd serving") {
        let mut line = String::new();
        let read = std::io::BufRead::read_line(&mut stderr, &mut line).unwrap();
        assert!(read > 0, "custosd exited before serving:\n{seen}");
        seen.push_str(&line);
    }
    assert!(!seen.contains(pin.trim()), "PIN in the log");
    assert!(support::terminate(&mut child).success());
    assert!(store.exists());
}
