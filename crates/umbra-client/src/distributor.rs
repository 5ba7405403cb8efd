//! The distributor's side: a reseller authenticates with its own key and
//! manages the lines it sold. It never sees content, contacts or groups.

use umbra_mls::DeviceSigner;
use umbra_proto::frame::{CodeKind, LineAction, LineInfo};
use umbra_proto::{
    AccountId, DistributorCredential, Push, Reply, Request, distributor_login_payload,
};

use crate::client::Client;
use crate::error::{ClientError, Result};
use crate::link::Link;

/// An authenticated distributor connection.
#[derive(Debug)]
pub struct DistributorSession {
    link: Link,
}

impl DistributorSession {
    pub async fn connect(credential: &DistributorCredential) -> Result<Self> {
        let (link, hello, _pushes) = Link::connect(&credential.address, credential.pin).await?;
        let Push::Hello { nonce, .. } = hello else {
            return Err(ClientError::ConnectionLost);
        };
        let signer = DeviceSigner::from_secret(&credential.secret);
        link.request(Request::DistributorLogin {
            distributor_id: credential.id,
            signature: signer.sign_payload(&distributor_login_payload(&nonce, credential.id)),
        })
        .await?;
        Ok(DistributorSession { link })
    }

    /// Issues codes within the quota: activation strings for new lines, or
    /// renewal codes for lines already sold.
    pub async fn issue_codes(&self, renewal: bool, days: u32, count: u32) -> Result<Vec<String>> {
        let kind = if renewal {
            CodeKind::Renewal
        } else {
            CodeKind::Activation
        };
        match self
            .link
            .request(Request::IssueCodes { kind, days, count })
            .await?
        {
            Reply::Codes { codes } => Ok(codes),
            _ => Err(ClientError::Invalid(
                "unexpected reply to IssueCodes".into(),
            )),
        }
    }

    /// The lines this distributor sold: ID, subscription end, last-seen day.
    pub async fn lines(&self) -> Result<Vec<LineInfo>> {
        match self.link.request(Request::ListLines).await? {
            Reply::Lines { lines } => Ok(lines),
            _ => Err(ClientError::Invalid("unexpected reply to ListLines".into())),
        }
    }

    async fn set(&self, account: &AccountId, action: LineAction) -> Result<()> {
        self.link
            .request(Request::SetLineStatus {
                account_id: account.clone(),
                action,
            })
            .await?;
        Ok(())
    }

    /// The line can log in but not send until resumed.
    pub async fn suspend(&self, account: &AccountId) -> Result<()> {
        self.set(account, LineAction::Suspend).await
    }

    pub async fn resume(&self, account: &AccountId) -> Result<()> {
        self.set(account, LineAction::Resume).await
    }

    /// Ends the line for good: its KeyPackages are withdrawn and its groups
    /// told to remove it.
    pub async fn revoke(&self, account: &AccountId) -> Result<()> {
        self.set(account, LineAction::Revoke).await
    }
}

impl Client {
    /// Redeems a renewal code; returns the new end of the subscription.
    /// Works after the subscription ended, too.
    pub async fn redeem_renewal(&self, code: &str) -> Result<u64> {
        let code = umbra_proto::ActivationCode::parse(code)?;
        match self.request(Request::RedeemRenewal { code }).await? {
            Reply::Renewed {
                subscription_expires_at,
            } => {
                self.db().execute(
                    "UPDATE device SET subscription_expires_at = ?1",
                    [subscription_expires_at],
                )?;
                Ok(subscription_expires_at)
            }
            _ => Err(ClientError::Invalid(
                "unexpected reply to RedeemRenewal".into(),
            )),
        }
    }
}
