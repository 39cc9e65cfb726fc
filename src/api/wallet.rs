//! `custos.v1.WalletService`: request conversion and the service implementation.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::{FieldViolation, to_status};
use crate::proto::{self, wallet_service_server::WalletService};
use crate::wallet::{DisplayName, Wallet, WalletId, Wallets};

/// A parsed CreateWallet request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateWallet {
    /// The new wallet's id.
    pub id: WalletId,
    /// Its display name.
    pub display_name: DisplayName,
}

impl TryFrom<proto::CreateWalletRequest> for CreateWallet {
    type Error = FieldViolation;

    fn try_from(request: proto::CreateWalletRequest) -> Result<Self, FieldViolation> {
        let id = WalletId::parse(&request.wallet_id).map_err(|e| FieldViolation::new("wallet_id", e.0))?;
        let wallet = request.wallet.unwrap_or_default();
        let output_only = [
            ("wallet.name", !wallet.name.is_empty()),
            ("wallet.key_label", !wallet.key_label.is_empty()),
            ("wallet.public_key", !wallet.public_key.is_empty()),
            ("wallet.ethereum_address", !wallet.ethereum_address.is_empty()),
            ("wallet.bitcoin_address", !wallet.bitcoin_address.is_empty()),
            ("wallet.key_attributes", wallet.key_attributes.is_some()),
            ("wallet.create_time", wallet.create_time.is_some()),
        ];
        if let Some((field, _)) = output_only.iter().find(|(_, set)| *set) {
            return Err(FieldViolation::new(*field, "is output only and must be empty"));
        }
        let display_name = DisplayName::parse(&wallet.display_name)
            .map_err(|e| FieldViolation::new("wallet.display_name", e.0))?;
        Ok(Self { id, display_name })
    }
}

/// A parsed ListWallets request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListWallets {
    /// Cursor: list wallets after this sequence number.
    pub after: i64,
    /// Page size.
    pub limit: usize,
}

impl TryFrom<proto::ListWalletsRequest> for ListWallets {
    type Error = FieldViolation;

    fn try_from(request: proto::ListWalletsRequest) -> Result<Self, FieldViolation> {
        let (after, limit) = super::paging(request.page_size, &request.page_token)?;
        Ok(Self { after, limit })
    }
}

impl From<&Wallet> for proto::Wallet {
    fn from(wallet: &Wallet) -> Self {
        proto::Wallet {
            name: wallet.id.resource_name(),
            display_name: wallet.display_name.clone(),
            key_label: wallet.key_label.clone(),
            public_key: wallet.public_key.to_sec1_point(true).as_bytes().to_vec(),
            ethereum_address: wallet.ethereum_address.clone(),
            bitcoin_address: wallet.bitcoin_address.clone(),
            key_attributes: Some(proto::KeyAttributes {
                token: wallet.attributes.token,
                private: wallet.attributes.private,
                sensitive: wallet.attributes.sensitive,
                extractable: wallet.attributes.extractable,
                always_sensitive: wallet.attributes.always_sensitive,
                never_extractable: wallet.attributes.never_extractable,
            }),
            create_time: Some(prost_types::Timestamp {
                seconds: wallet.created_at,
                nanos: 0,
            }),
        }
    }
}

/// The WalletService implementation.
#[derive(Debug, Clone)]
pub struct WalletApi {
    wallets: Arc<Wallets>,
}

impl WalletApi {
    /// Serves `wallets`.
    pub fn new(wallets: Arc<Wallets>) -> Self {
        Self { wallets }
    }
}

#[tonic::async_trait]
impl WalletService for WalletApi {
    async fn create_wallet(
        &self,
        request: Request<proto::CreateWalletRequest>,
    ) -> Result<Response<proto::Wallet>, Status> {
        let create = CreateWallet::try_from(request.into_inner())?;
        let wallet = self
            .wallets
            .create(create.id, create.display_name)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new((&wallet).into()))
    }

    async fn get_wallet(
        &self,
        request: Request<proto::GetWalletRequest>,
    ) -> Result<Response<proto::Wallet>, Status> {
        let id = WalletId::from_resource_name(&request.into_inner().name)
            .map_err(|e| FieldViolation::new("name", e.0))?;
        let wallet = self.wallets.get(&id).await.map_err(|e| to_status(&e))?;
        Ok(Response::new((&wallet).into()))
    }

    async fn list_wallets(
        &self,
        request: Request<proto::ListWalletsRequest>,
    ) -> Result<Response<proto::ListWalletsResponse>, Status> {
        let list = ListWallets::try_from(request.into_inner())?;
        let page = self
            .wallets
            .list(list.after, list.limit)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(proto::ListWalletsResponse {
            wallets: page.wallets.iter().map(proto::Wallet::from).collect(),
            next_page_token: page.next_after.map(|n| n.to_string()).unwrap_or_default(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_request_parses_or_names_the_field() {
        let ok = CreateWallet::try_from(proto::CreateWalletRequest {
            wallet_id: "hot".into(),
            wallet: Some(proto::Wallet {
                display_name: "Hot wallet".into(),
                ..Default::default()
            }),
        })
        .unwrap();
        assert_eq!(ok.id.as_str(), "hot");

        let bad_id = CreateWallet::try_from(proto::CreateWalletRequest {
            wallet_id: "Hot!".into(),
            wallet: None,
        })
        .unwrap_err();
        assert_eq!(bad_id.field, "wallet_id");

        let output_only = CreateWallet::try_from(proto::CreateWalletRequest {
            wallet_id: "hot".into(),
            wallet: Some(proto::Wallet {
                public_key: vec![2; 33],
                ..Default::default()
            }),
        })
        .unwrap_err();
        assert_eq!(output_only.field, "wallet.public_key");
    }

    #[test]
    fn list_request_bounds() {
        let default = ListWallets::try_from(proto::ListWalletsRequest::default()).unwrap();
        assert_eq!(default, ListWallets { after: 0, limit: 100 });
        for (size, token, field) in [
            (-1, "", "page_size"),
            (1001, "", "page_size"),
            (10, "x", "page_token"),
            (10, "-5", "page_token"),
        ] {
            let err = ListWallets::try_from(proto::ListWalletsRequest {
                page_size: size,
                page_token: token.into(),
            })
            .unwrap_err();
            assert_eq!(err.field, field);
        }
    }
}
