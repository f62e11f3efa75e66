//! Durable CA state in one redb file (`ca.redb`): accounts, orders, authorizations (with their
//! challenges), issued certificates and EAB keys.
//!
//! Records are JSON values in one table per kind, keyed by their id; `account_keys` maps a JWK
//! thumbprint (RFC 7638) to its account id. Every state change of the ACME flow is one write
//! transaction (`Store::write`), committed with redb's default immediate durability before the
//! response is sent, so a crash or `kill -9` at any point leaves either the old or the new state:
//! a certificate row and its order's `valid` status are written together, so there is never a
//! duplicate serial or an order pointing at a missing certificate.
//!
//! redb allows one process per file (it takes an exclusive file lock). `phoenix ca list/revoke/
//! issue/eab-new` therefore open the store themselves and, if a running `ca serve` holds it, fail
//! with `CaError::Locked`, which tells the operator to stop the server or use ACME. This was
//! preferred over a loopback admin endpoint: no second authenticated API to secure.

use std::path::{Path, PathBuf};

use redb::{Database, DatabaseError, ReadableTable, TableDefinition};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::CaError;

const ACCOUNTS: TableDefinition<&str, &[u8]> = TableDefinition::new("accounts");
const ACCOUNT_KEYS: TableDefinition<&str, &str> = TableDefinition::new("account_keys");
const ORDERS: TableDefinition<&str, &[u8]> = TableDefinition::new("orders");
const AUTHZS: TableDefinition<&str, &[u8]> = TableDefinition::new("authorizations");
const CERTS: TableDefinition<&str, &[u8]> = TableDefinition::new("certificates");
const EAB_KEYS: TableDefinition<&str, &[u8]> = TableDefinition::new("eab_keys");

/// A record kind stored as JSON in its own table.
pub(crate) trait Record: Serialize + DeserializeOwned {
    const TABLE: TableDefinition<'static, &'static str, &'static [u8]>;
    fn record_key(&self) -> &str;
}

/// Status of an account, order, authorization or challenge (RFC 8555 7.1.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Status {
    Pending,
    Ready,
    Processing,
    Valid,
    Invalid,
    Deactivated,
    Expired,
    Revoked,
}

/// An ACME identifier (RFC 8555 7.1.3; "ip" from RFC 8738).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Identifier {
    #[serde(rename = "type")]
    pub kind: String,
    pub value: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct AccountRec {
    pub id: String,
    pub thumbprint: String,
    pub jwk: serde_json::Value,
    pub status: Status,
    pub contact: Vec<String>,
    pub tos_agreed: bool,
    pub created: i64,
    pub eab_kid: Option<String>,
}

impl Record for AccountRec {
    const TABLE: TableDefinition<'static, &'static str, &'static [u8]> = ACCOUNTS;
    fn record_key(&self) -> &str {
        &self.id
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct OrderRec {
    pub id: String,
    pub account: String,
    pub status: Status,
    pub identifiers: Vec<Identifier>,
    pub authorizations: Vec<String>,
    pub expires: i64,
    pub certificate: Option<String>,
    pub error: Option<serde_json::Value>,
    pub replaces: Option<String>,
    pub created: i64,
}

impl Record for OrderRec {
    const TABLE: TableDefinition<'static, &'static str, &'static [u8]> = ORDERS;
    fn record_key(&self) -> &str {
        &self.id
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ChallengeRec {
    #[serde(rename = "type")]
    pub kind: String,
    pub token: String,
    pub status: Status,
    pub validated: Option<i64>,
    pub error: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct AuthzRec {
    pub id: String,
    pub account: String,
    pub order: String,
    pub identifier: Identifier,
    pub status: Status,
    pub expires: i64,
    pub challenges: Vec<ChallengeRec>,
}

impl Record for AuthzRec {
    const TABLE: TableDefinition<'static, &'static str, &'static [u8]> = AUTHZS;
    fn record_key(&self) -> &str {
        &self.id
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct CertRec {
    pub serial: String,
    pub names: Vec<String>,
    pub not_before: i64,
    pub not_after: i64,
    /// Owning ACME account; None for certificates from `phoenix ca issue` and the CA's own.
    pub account: Option<String>,
    pub order: Option<String>,
    /// DER, base64 (standard alphabet).
    pub der: String,
    pub revoked_at: Option<i64>,
    pub reason: Option<u8>,
}

impl Record for CertRec {
    const TABLE: TableDefinition<'static, &'static str, &'static [u8]> = CERTS;
    fn record_key(&self) -> &str {
        &self.serial
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct EabRec {
    pub kid: String,
    /// HMAC key, base64url without padding (as handed to the operator).
    pub key: String,
    pub created: i64,
    pub bound_account: Option<String>,
}

impl Record for EabRec {
    const TABLE: TableDefinition<'static, &'static str, &'static [u8]> = EAB_KEYS;
    fn record_key(&self) -> &str {
        &self.kid
    }
}

fn store_err(e: impl std::fmt::Display) -> CaError {
    CaError::Store(e.to_string())
}

/// The open store. One per process (see the module doc).
pub(crate) struct Store {
    db: Database,
}

/// A write transaction; changes become visible (and durable) only when `Store::write` commits.
pub(crate) struct WriteTx {
    tx: redb::WriteTransaction,
}

impl Store {
    /// Opens (creating if needed) `dir/ca.redb`.
    pub(crate) fn open(dir: &Path) -> Result<Store, CaError> {
        let path: PathBuf = dir.join(crate::authority::STORE_FILE);
        let db = match Database::create(&path) {
            Ok(db) => db,
            Err(DatabaseError::DatabaseAlreadyOpen) => {
                return Err(CaError::Locked {
                    dir: dir.to_path_buf(),
                })
            }
            Err(DatabaseError::Storage(redb::StorageError::Io(e))) => {
                return Err(CaError::io(path, e))
            }
            Err(e) => return Err(store_err(e)),
        };
        let tx = db.begin_write().map_err(store_err)?;
        {
            // Creating every table up front lets read transactions open them unconditionally.
            tx.open_table(ACCOUNTS).map_err(store_err)?;
            tx.open_table(ACCOUNT_KEYS).map_err(store_err)?;
            tx.open_table(ORDERS).map_err(store_err)?;
            tx.open_table(AUTHZS).map_err(store_err)?;
            tx.open_table(CERTS).map_err(store_err)?;
            tx.open_table(EAB_KEYS).map_err(store_err)?;
        }
        tx.commit().map_err(store_err)?;
        Ok(Store { db })
    }

    pub(crate) fn get<T: Record>(&self, key: &str) -> Result<Option<T>, CaError> {
        let tx = self.db.begin_read().map_err(store_err)?;
        let table = tx.open_table(T::TABLE).map_err(store_err)?;
        match table.get(key).map_err(store_err)? {
            Some(v) => Ok(Some(serde_json::from_slice(v.value()).map_err(store_err)?)),
            None => Ok(None),
        }
    }

    pub(crate) fn all<T: Record>(&self) -> Result<Vec<T>, CaError> {
        let tx = self.db.begin_read().map_err(store_err)?;
        let table = tx.open_table(T::TABLE).map_err(store_err)?;
        let mut out = Vec::new();
        for row in table.iter().map_err(store_err)? {
            let (_, v) = row.map_err(store_err)?;
            out.push(serde_json::from_slice(v.value()).map_err(store_err)?);
        }
        Ok(out)
    }

    pub(crate) fn account_by_thumbprint(
        &self,
        thumbprint: &str,
    ) -> Result<Option<AccountRec>, CaError> {
        let tx = self.db.begin_read().map_err(store_err)?;
        let keys = tx.open_table(ACCOUNT_KEYS).map_err(store_err)?;
        let Some(id) = keys
            .get(thumbprint)
            .map_err(store_err)?
            .map(|v| v.value().to_owned())
        else {
            return Ok(None);
        };
        drop(keys);
        let table = tx.open_table(ACCOUNTS).map_err(store_err)?;
        match table.get(id.as_str()).map_err(store_err)? {
            Some(v) => Ok(Some(serde_json::from_slice(v.value()).map_err(store_err)?)),
            None => Ok(None),
        }
    }

    /// Runs `f` in one write transaction and commits it if `f` succeeds.
    pub(crate) fn write<R, E: From<CaError>>(
        &self,
        f: impl FnOnce(&mut WriteTx) -> Result<R, E>,
    ) -> Result<R, E> {
        let mut wtx = WriteTx {
            tx: self.db.begin_write().map_err(store_err)?,
        };
        let r = f(&mut wtx)?;
        wtx.tx.commit().map_err(store_err)?;
        Ok(r)
    }
}

impl WriteTx {
    pub(crate) fn get<T: Record>(&self, key: &str) -> Result<Option<T>, CaError> {
        let table = self.tx.open_table(T::TABLE).map_err(store_err)?;
        let v = table.get(key).map_err(store_err)?;
        match v {
            Some(v) => Ok(Some(serde_json::from_slice(v.value()).map_err(store_err)?)),
            None => Ok(None),
        }
    }

    pub(crate) fn put<T: Record>(&mut self, rec: &T) -> Result<(), CaError> {
        let bytes = serde_json::to_vec(rec).map_err(store_err)?;
        let mut table = self.tx.open_table(T::TABLE).map_err(store_err)?;
        table
            .insert(rec.record_key(), bytes.as_slice())
            .map_err(store_err)?;
        Ok(())
    }

    pub(crate) fn account_id_by_thumbprint(
        &self,
        thumbprint: &str,
    ) -> Result<Option<String>, CaError> {
        let keys = self.tx.open_table(ACCOUNT_KEYS).map_err(store_err)?;
        let v = keys.get(thumbprint).map_err(store_err)?;
        Ok(v.map(|v| v.value().to_owned()))
    }

    pub(crate) fn set_account_key(
        &mut self,
        thumbprint: &str,
        account: &str,
    ) -> Result<(), CaError> {
        let mut keys = self.tx.open_table(ACCOUNT_KEYS).map_err(store_err)?;
        keys.insert(thumbprint, account).map_err(store_err)?;
        Ok(())
    }

    pub(crate) fn remove_account_key(&mut self, thumbprint: &str) -> Result<(), CaError> {
        let mut keys = self.tx.open_table(ACCOUNT_KEYS).map_err(store_err)?;
        keys.remove(thumbprint).map_err(store_err)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_open_reports_locked_and_writes_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert!(matches!(
            Store::open(dir.path()),
            Err(CaError::Locked { .. })
        ));
        store
            .write(|tx| {
                tx.put(&EabRec {
                    kid: "k1".into(),
                    key: "secret".into(),
                    created: 1,
                    bound_account: None,
                })
            })
            .unwrap();
        let failed: Result<(), CaError> = store.write(|tx| {
            tx.put(&EabRec {
                kid: "k2".into(),
                key: "x".into(),
                created: 1,
                bound_account: None,
            })?;
            Err(CaError::Store("abort".into()))
        });
        assert!(failed.is_err());
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert!(store.get::<EabRec>("k1").unwrap().is_some());
        assert!(
            store.get::<EabRec>("k2").unwrap().is_none(),
            "aborted transaction must not commit"
        );
    }
}
