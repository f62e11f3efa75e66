//! The ACME server (RFC 8555) with External Account Binding (7.3.4), IP identifiers (RFC 8738)
//! and Renewal Information (RFC 9773), plus the CA's plain HTTP endpoints (`/roots.pem`,
//! `/intermediates.pem`, `/health`, `/crl`).
//!
//! Every POST goes through `authenticate`, which applies RFC 8555 6.2-6.4 in this order:
//! Content-Type `application/jose+json`; flattened JWS; supported `alg` (else
//! `badSignatureAlgorithm`); exactly one of `kid`/`jwk`, and the one this resource wants
//! (`jwk` only for newAccount and revokeCert) (else `malformed`); `nonce` present and unused
//! (else `badNonce`); `url` equal to the request URL (else `unauthorized`, as RFC 8555 6.4
//! requires); `kid` naming an existing account (else `accountDoesNotExist`) that is valid (else
//! `unauthorized`); and finally the signature (else `malformed`, see `jws.rs`).
//!
//! URLs are absolute: built from `CaConfig::url` when set, else from the request's Host (or
//! HTTP/2 :authority), so the CA works behind any address. Each state change is one store
//! transaction (see `store.rs`); validation runs in background tasks (`validation.rs`).

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Path, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use base64::Engine;
use http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode, Uri};
use serde::Deserialize;
use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio::task::JoinSet;

use crate::authority::{Authority, SubjectName};
use crate::config::{is_dns_name, CaConfig, Policy};
use crate::jws::{b64url, b64url_decode, Jwk, Jws, SUPPORTED_ALGS};
use crate::nonce::NonceStore;
use crate::problem::{Problem, ProblemType};
use crate::store::{
    AccountRec, AuthzRec, CertRec, ChallengeRec, EabRec, Identifier, OrderRec, Status, Store,
};
use crate::validation::Validator;

/// Largest request body accepted (JWS with a CSR fits easily).
pub(crate) const BODY_LIMIT: usize = 64 * 1024;
const ORDER_LIFETIME_SECS: i64 = 24 * 3600;
pub(crate) const VALID_AUTHZ_LIFETIME_SECS: i64 = 30 * 86400;
const MAX_IDENTIFIERS: usize = 100;
/// Seconds a client should wait before polling a pending object again.
const POLL_AFTER: &str = "1";

static REPLAY_NONCE: HeaderName = HeaderName::from_static("replay-nonce");

/// Shared state of the ACME server.
pub(crate) struct AcmeState {
    pub cfg: CaConfig,
    pub policy: Policy,
    /// Base URL from `CaConfig::url`, normalised.
    pub base_url: Option<String>,
    /// Host used when a request carries none (HTTP/1.0 without Host).
    pub fallback_host: String,
    pub authority: Arc<Authority>,
    pub store: Store,
    pub nonces: NonceStore,
    pub validator: Validator,
    /// Background validations; aborted and awaited on shutdown so the store is closed when
    /// `serve` returns.
    pub tasks: Mutex<JoinSet<()>>,
    /// "authz/type" keys of validations currently running (so a re-POST does not start a twin).
    pub running: Mutex<HashSet<String>>,
}

pub(crate) fn unix_now() -> i64 {
    OffsetDateTime::now_utc().unix_timestamp()
}

fn rfc3339(ts: i64) -> String {
    OffsetDateTime::from_unix_timestamp(ts)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_default()
}

fn random_id() -> String {
    b64url(&rand::random::<[u8; 16]>())
}

/// Builds the router: ACME under `/acme/`, CA files and health at the root.
pub(crate) fn router(state: Arc<AcmeState>) -> Router {
    Router::new()
        .route("/acme/directory", get(directory))
        .route("/acme/new-nonce", get(new_nonce_get).head(new_nonce_head))
        .route("/acme/new-account", post(new_account))
        .route("/acme/acct/{id}", post(account))
        .route("/acme/acct/{id}/orders", post(account_orders))
        .route("/acme/new-order", post(new_order))
        .route("/acme/order/{id}", post(order))
        .route("/acme/order/{id}/finalize", post(finalize))
        .route("/acme/authz/{id}", post(authorization))
        .route("/acme/chall/{id}/{kind}", post(challenge))
        .route("/acme/cert/{serial}", post(certificate))
        .route("/acme/revoke-cert", post(revoke_cert))
        .route("/acme/key-change", post(key_change))
        .route("/acme/renewal-info/{id}", get(renewal_info))
        .route("/roots.pem", get(roots_pem))
        .route("/intermediates.pem", get(intermediates_pem))
        .route("/health", get(health))
        .route("/crl", get(crl))
        .fallback(|| async { Problem::not_found("this resource") })
        .layer(middleware::from_fn_with_state(state.clone(), acme_headers))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state)
}

/// Adds what RFC 8555 wants on every ACME response: a fresh Replay-Nonce (6.5), the directory
/// as `Link: rel="index"` (7.1) and `Cache-Control: no-store` on nonce-bearing responses.
async fn acme_headers(State(s): State<Arc<AcmeState>>, req: Request, next: Next) -> Response {
    let is_acme = req.uri().path().starts_with("/acme/");
    let base = s.base(req.headers(), req.uri());
    let mut resp = next.run(req).await;
    if resp.status() == StatusCode::PAYLOAD_TOO_LARGE
        && resp
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|v| v.as_bytes())
            != Some(b"application/problem+json")
    {
        // axum's body limit answers in plain text; ACME clients expect a problem document.
        resp = Problem::malformed(format!("request body larger than {BODY_LIMIT} bytes"))
            .with_status(StatusCode::PAYLOAD_TOO_LARGE)
            .into_response();
    }
    if is_acme {
        let h = resp.headers_mut();
        if let Ok(v) = HeaderValue::from_str(&s.nonces.issue()) {
            h.insert(REPLAY_NONCE.clone(), v);
        }
        if let Ok(v) = HeaderValue::from_str(&format!("<{base}/acme/directory>;rel=\"index\"")) {
            h.append(header::LINK, v);
        }
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    resp
}

impl AcmeState {
    /// The base URL for this request (see the module doc).
    fn base(&self, headers: &HeaderMap, uri: &Uri) -> String {
        if let Some(b) = &self.base_url {
            return b.clone();
        }
        let host = uri
            .authority()
            .map(|a| a.as_str().to_owned())
            .or_else(|| {
                headers
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_owned)
            })
            .filter(|h| {
                !h.is_empty()
                    && h.len() <= 260
                    && h.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b))
            })
            .unwrap_or_else(|| self.fallback_host.clone());
        format!("https://{host}")
    }
}

/// An authenticated ACME request.
struct Authed {
    base: String,
    url: String,
    payload: Vec<u8>,
    /// Set when the request was signed with an embedded `jwk`.
    jwk: Option<Jwk>,
    /// Set when the request was signed by an account (`kid`).
    account: Option<AccountRec>,
}

impl Authed {
    fn is_post_as_get(&self) -> bool {
        self.payload.is_empty()
    }

    fn json<T: for<'de> Deserialize<'de>>(&self) -> Result<T, Problem> {
        serde_json::from_slice(&self.payload)
            .map_err(|e| Problem::malformed(format!("request payload: {e}")))
    }

    fn account(&self) -> Result<&AccountRec, Problem> {
        self.account
            .as_ref()
            .ok_or_else(|| Problem::malformed("this request must be signed by an account (kid)"))
    }

    fn account_url(&self, id: &str) -> String {
        format!("{}/acme/acct/{id}", self.base)
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum KeyForm {
    /// newAccount: the key is embedded.
    Jwk,
    /// everything else: the account URL.
    Kid,
    /// revokeCert: either.
    Either,
}

/// Which key form a resource accepts, as a type, for [`Signed`].
trait KeyRule {
    const FORM: KeyForm;
}
struct ByJwk;
struct ByKid;
struct ByEither;
impl KeyRule for ByJwk {
    const FORM: KeyForm = KeyForm::Jwk;
}
impl KeyRule for ByKid {
    const FORM: KeyForm = KeyForm::Kid;
}
impl KeyRule for ByEither {
    const FORM: KeyForm = KeyForm::Either;
}

/// A POST signed as RFC 8555 section 6.2 requires, checked by [`authenticate`] with the key form
/// `K` before the handler runs; a request that fails gets the problem document.
struct Signed<K>(Authed, std::marker::PhantomData<K>);

impl<K: KeyRule> FromRequest<Arc<AcmeState>> for Signed<K> {
    type Rejection = Response;

    async fn from_request(req: Request, s: &Arc<AcmeState>) -> Result<Self, Response> {
        let (headers, uri) = (req.headers().clone(), req.uri().clone());
        // The body extractor applies the router's body limit, as a `Bytes` argument did.
        let body = Bytes::from_request(req, s)
            .await
            .map_err(IntoResponse::into_response)?;
        authenticate(s, &headers, &uri, &body, K::FORM)
            .map(|authed| Signed(authed, std::marker::PhantomData))
            .map_err(IntoResponse::into_response)
    }
}

fn authenticate(
    s: &AcmeState,
    headers: &HeaderMap,
    uri: &Uri,
    body: &[u8],
    form: KeyForm,
) -> Result<Authed, Problem> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !ct.trim().eq_ignore_ascii_case("application/jose+json") {
        return Err(Problem::malformed(
            "Content-Type must be application/jose+json (RFC 8555 6.2)",
        )
        .with_status(StatusCode::UNSUPPORTED_MEDIA_TYPE));
    }
    let jws = Jws::parse(body)?;
    let h = &jws.header;
    if !SUPPORTED_ALGS.contains(&h.alg.as_str()) {
        let mut p = Problem::new(
            ProblemType::BadSignatureAlgorithm,
            format!("JWS algorithm {:?} is not supported", h.alg),
        );
        p.algorithms = Some(SUPPORTED_ALGS.to_vec());
        return Err(p);
    }
    match (&h.jwk, &h.kid) {
        (Some(_), Some(_)) | (None, None) => {
            return Err(Problem::malformed(
                "the JWS header must carry exactly one of \"jwk\" and \"kid\"",
            ))
        }
        (Some(_), None) if form == KeyForm::Kid => {
            return Err(Problem::malformed(
                "this resource requires a \"kid\" (account URL), not a \"jwk\"",
            ))
        }
        (None, Some(_)) if form == KeyForm::Jwk => {
            return Err(Problem::malformed(
                "newAccount requires a \"jwk\", not a \"kid\"",
            ))
        }
        _ => {}
    }
    let Some(nonce) = h.nonce.as_deref() else {
        return Err(Problem::new(
            ProblemType::BadNonce,
            "the JWS header has no nonce",
        ));
    };
    if !s.nonces.consume(nonce) {
        return Err(Problem::new(
            ProblemType::BadNonce,
            "the nonce is unknown, expired or already used",
        ));
    }
    let base = s.base(headers, uri);
    let url = format!("{base}{}", uri.path());
    match h.url.as_deref() {
        None => return Err(Problem::malformed("the JWS header has no url")),
        Some(u) if u != url => {
            return Err(Problem::unauthorized(format!(
                "the JWS url {u:?} does not match the request URL {url:?} (RFC 8555 6.4)"
            )))
        }
        Some(_) => {}
    }
    let (key, account) = if let Some(jwk) = &h.jwk {
        (Jwk::from_value(jwk)?, None)
    } else {
        let kid = h.kid.as_deref().unwrap_or_default();
        let prefix = format!("{base}/acme/acct/");
        let acct = kid
            .strip_prefix(&prefix)
            .filter(|id| !id.is_empty() && !id.contains('/'))
            .map(|id| s.store.get::<AccountRec>(id))
            .transpose()?
            .flatten()
            .ok_or_else(|| {
                Problem::new(
                    ProblemType::AccountDoesNotExist,
                    format!("no account exists with URL {kid:?}"),
                )
            })?;
        if acct.status != Status::Valid {
            return Err(Problem::unauthorized(
                format!("account is {:?}", acct.status).to_lowercase(),
            ));
        }
        (Jwk::from_value(&acct.jwk)?, Some(acct))
    };
    jws.verify(&key)?;
    Ok(Authed {
        base,
        url,
        payload: jws.payload,
        jwk: h.jwk.is_some().then_some(key),
        account,
    })
}

fn json_response(status: StatusCode, body: &Value, location: Option<&str>) -> Response {
    let mut resp = (status, body.to_string()).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Some(loc) = location.and_then(|l| HeaderValue::from_str(l).ok()) {
        h.insert(header::LOCATION, loc);
    }
    resp
}

fn add_link(resp: &mut Response, url: &str, rel: &str) {
    if let Ok(v) = HeaderValue::from_str(&format!("<{url}>;rel=\"{rel}\"")) {
        resp.headers_mut().append(header::LINK, v);
    }
}

fn retry_after(resp: &mut Response) {
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static(POLL_AFTER));
}

// ---- directory and nonces -------------------------------------------------------------------

async fn directory(State(s): State<Arc<AcmeState>>, headers: HeaderMap, uri: Uri) -> Response {
    let b = s.base(&headers, &uri);
    let body = json!({
        "newNonce": format!("{b}/acme/new-nonce"),
        "newAccount": format!("{b}/acme/new-account"),
        "newOrder": format!("{b}/acme/new-order"),
        "revokeCert": format!("{b}/acme/revoke-cert"),
        "keyChange": format!("{b}/acme/key-change"),
        "renewalInfo": format!("{b}/acme/renewal-info"),
        "meta": {
            "externalAccountRequired": s.cfg.acme.require_eab,
            "website": b,
        }
    });
    json_response(StatusCode::OK, &body, None)
}

async fn new_nonce_head() -> StatusCode {
    // RFC 8555 7.2: HEAD answers 200, GET 204; the nonce itself comes from the middleware.
    StatusCode::OK
}

async fn new_nonce_get() -> StatusCode {
    StatusCode::NO_CONTENT
}

// ---- accounts -------------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct NewAccountReq {
    contact: Option<Vec<String>>,
    terms_of_service_agreed: Option<bool>,
    only_return_existing: Option<bool>,
    external_account_binding: Option<Value>,
}

fn account_json(base: &str, a: &AccountRec) -> Value {
    let mut v = json!({
        "status": a.status,
        "contact": a.contact,
        "orders": format!("{base}/acme/acct/{}/orders", a.id),
        "key": a.jwk,
        "createdAt": rfc3339(a.created),
    });
    if a.tos_agreed {
        v["termsOfServiceAgreed"] = Value::Bool(true);
    }
    v
}

fn check_contacts(contacts: &[String]) -> Result<(), Problem> {
    if contacts.len() > 10 {
        return Err(Problem::new(
            ProblemType::InvalidContact,
            "at most 10 contacts",
        ));
    }
    for c in contacts {
        let Some(addr) = c.strip_prefix("mailto:") else {
            return Err(Problem::new(
                ProblemType::UnsupportedContact,
                format!("contact {c:?}: only mailto: URLs are supported"),
            ));
        };
        let valid = addr.len() <= 254
            && addr.split_once('@').is_some_and(|(l, d)| {
                !l.is_empty()
                    && !d.is_empty()
                    && !addr.contains([',', '?', ' ', '<', '>'])
                    && d.contains('.')
            });
        if !valid {
            return Err(Problem::new(
                ProblemType::InvalidContact,
                format!("contact {c:?} is not an email address"),
            ));
        }
    }
    Ok(())
}

async fn new_account(
    State(s): State<Arc<AcmeState>>,
    Signed(req, ..): Signed<ByJwk>,
) -> Result<Response, Problem> {
    let jwk = req
        .jwk
        .clone()
        .ok_or_else(|| Problem::malformed("newAccount requires a jwk"))?;
    let payload: NewAccountReq = req.json()?;
    let thumbprint = jwk.thumbprint();
    if let Some(existing) = s.store.account_by_thumbprint(&thumbprint)? {
        // RFC 8555 7.3.1: an existing key answers 200 with the account's URL.
        if existing.status != Status::Valid {
            return Err(Problem::unauthorized(
                "the account for this key is deactivated",
            ));
        }
        let url = req.account_url(&existing.id);
        return Ok(json_response(
            StatusCode::OK,
            &account_json(&req.base, &existing),
            Some(&url),
        ));
    }
    if payload.only_return_existing == Some(true) {
        return Err(Problem::new(
            ProblemType::AccountDoesNotExist,
            "no account exists for this key",
        ));
    }
    let contact = payload.contact.unwrap_or_default();
    check_contacts(&contact)?;
    let eab_kid = match &payload.external_account_binding {
        Some(eab) => Some(check_eab(&s, &req, &jwk, eab)?),
        None if s.cfg.acme.require_eab => {
            return Err(Problem::new(
                ProblemType::ExternalAccountRequired,
                "this CA requires external account binding; ask the operator for a key (`phoenix ca eab-new`)",
            ))
        }
        None => None,
    };
    let acct = AccountRec {
        id: random_id(),
        thumbprint: thumbprint.clone(),
        jwk: jwk.to_value(),
        status: Status::Valid,
        contact,
        tos_agreed: payload.terms_of_service_agreed.unwrap_or(false),
        created: unix_now(),
        eab_kid: eab_kid.clone(),
    };
    s.store.write(|tx| {
        if tx.account_id_by_thumbprint(&thumbprint)?.is_some() {
            // A concurrent newAccount with the same key won; the client retries and gets 200.
            return Err(Problem::malformed(
                "an account for this key was created concurrently; retry",
            ));
        }
        if let Some(kid) = &eab_kid {
            let mut eab = tx
                .get::<EabRec>(kid)?
                .ok_or_else(|| Problem::unauthorized("unknown external account key id"))?;
            if eab.bound_account.is_some() {
                return Err(Problem::unauthorized(
                    "this external account key is already bound to an account",
                ));
            }
            eab.bound_account = Some(acct.id.clone());
            tx.put(&eab)?;
        }
        tx.put(&acct)?;
        tx.set_account_key(&thumbprint, &acct.id)?;
        Ok::<_, Problem>(())
    })?;
    tracing::info!(account = %acct.id, eab = ?acct.eab_kid, "ACME account created");
    let url = req.account_url(&acct.id);
    Ok(json_response(
        StatusCode::CREATED,
        &account_json(&req.base, &acct),
        Some(&url),
    ))
}

/// Verifies an External Account Binding (RFC 8555 7.3.4) and returns its key id.
fn check_eab(s: &AcmeState, req: &Authed, jwk: &Jwk, eab: &Value) -> Result<String, Problem> {
    let inner = Jws::parse_value(eab)?;
    let kid = inner
        .header
        .kid
        .clone()
        .ok_or_else(|| Problem::malformed("external account binding has no kid"))?;
    if inner.header.nonce.is_some() {
        return Err(Problem::malformed(
            "external account binding must not carry a nonce",
        ));
    }
    if inner.header.url.as_deref() != Some(req.url.as_str()) {
        return Err(Problem::unauthorized(
            "external account binding url must be the newAccount URL",
        ));
    }
    let rec = s
        .store
        .get::<EabRec>(&kid)?
        .ok_or_else(|| Problem::unauthorized(format!("unknown external account key id {kid:?}")))?;
    if rec.bound_account.is_some() {
        return Err(Problem::unauthorized(
            "this external account key is already bound to an account",
        ));
    }
    let key =
        b64url_decode(&rec.key).ok_or_else(|| Problem::internal("stored EAB key is corrupt"))?;
    inner.verify_hmac(&key)?;
    let bound: Value = serde_json::from_slice(&inner.payload)
        .map_err(|_| Problem::malformed("external account binding payload is not a JWK"))?;
    if Jwk::from_value(&bound)? != *jwk {
        return Err(Problem::unauthorized(
            "external account binding is for a different account key",
        ));
    }
    Ok(kid)
}

#[derive(Deserialize)]
struct AccountUpdate {
    status: Option<Status>,
    contact: Option<Vec<String>>,
}

async fn account(
    Path(id): Path<String>,
    State(s): State<Arc<AcmeState>>,
    Signed(req, ..): Signed<ByKid>,
) -> Result<Response, Problem> {
    let me = req.account()?;
    if me.id != id {
        return Err(Problem::unauthorized(
            "an account can only be read or changed by its own key",
        ));
    }
    let mut acct = me.clone();
    if !req.is_post_as_get() {
        let upd: AccountUpdate = req.json()?;
        if let Some(contact) = &upd.contact {
            check_contacts(contact)?;
        }
        match upd.status {
            None => {}
            Some(Status::Deactivated) => {}
            Some(other) => {
                return Err(Problem::malformed(format!(
                    "cannot set account status to {other:?}"
                )))
            }
        }
        acct = s.store.write(|tx| {
            let mut a = tx
                .get::<AccountRec>(&id)?
                .ok_or_else(|| Problem::not_found("account"))?;
            if let Some(c) = upd.contact {
                a.contact = c;
            }
            if upd.status == Some(Status::Deactivated) {
                a.status = Status::Deactivated;
            }
            tx.put(&a)?;
            Ok::<_, Problem>(a)
        })?;
        if acct.status == Status::Deactivated {
            tracing::info!(account = %id, "ACME account deactivated");
        }
    }
    let url = req.account_url(&id);
    Ok(json_response(
        StatusCode::OK,
        &account_json(&req.base, &acct),
        Some(&url),
    ))
}

async fn account_orders(
    Path(id): Path<String>,
    State(s): State<Arc<AcmeState>>,
    Signed(req, ..): Signed<ByKid>,
) -> Result<Response, Problem> {
    if req.account()?.id != id {
        return Err(Problem::unauthorized(
            "an account's orders can only be listed by its own key",
        ));
    }
    let now = unix_now();
    let mut orders: Vec<OrderRec> = s
        .store
        .all::<OrderRec>()?
        .into_iter()
        .filter(|o| o.account == id && effective_order_status(o, now) != Status::Invalid)
        .collect();
    orders.sort_by_key(|o| o.created);
    let urls: Vec<String> = orders
        .iter()
        .map(|o| format!("{}/acme/order/{}", req.base, o.id))
        .collect();
    Ok(json_response(
        StatusCode::OK,
        &json!({ "orders": urls }),
        None,
    ))
}

async fn key_change(
    State(s): State<Arc<AcmeState>>,
    Signed(req, ..): Signed<ByKid>,
) -> Result<Response, Problem> {
    let acct = req.account()?.clone();
    let inner_value: Value = req.json()?;
    let inner = Jws::parse_value(&inner_value)?;
    if !SUPPORTED_ALGS.contains(&inner.header.alg.as_str()) {
        let mut p = Problem::new(
            ProblemType::BadSignatureAlgorithm,
            "inner JWS algorithm is not supported",
        );
        p.algorithms = Some(SUPPORTED_ALGS.to_vec());
        return Err(p);
    }
    let new_key = match (&inner.header.jwk, &inner.header.kid) {
        (Some(jwk), None) => Jwk::from_value(jwk)?,
        _ => {
            return Err(Problem::malformed(
                "the inner keyChange JWS must carry a jwk and no kid",
            ))
        }
    };
    if inner.header.url.as_deref() != Some(req.url.as_str()) {
        return Err(Problem::malformed(
            "the inner keyChange JWS url must equal the outer url",
        ));
    }
    inner.verify(&new_key)?;
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct KeyChange {
        account: String,
        old_key: Value,
    }
    let kc: KeyChange = serde_json::from_slice(&inner.payload)
        .map_err(|e| Problem::malformed(format!("inner keyChange payload: {e}")))?;
    if kc.account != req.account_url(&acct.id) {
        return Err(Problem::malformed(
            "keyChange account does not match the signing account",
        ));
    }
    if Jwk::from_value(&kc.old_key)?.thumbprint() != acct.thumbprint {
        return Err(Problem::malformed(
            "keyChange oldKey is not the account's current key",
        ));
    }
    let new_thumb = new_key.thumbprint();
    let updated = s.store.write(|tx| {
        if let Some(other) = tx.account_id_by_thumbprint(&new_thumb)? {
            let mut p = Problem::malformed("the new key is already in use by an account")
                .with_status(StatusCode::CONFLICT);
            p.location = Some(req.account_url(&other));
            return Err(p);
        }
        let mut a = tx
            .get::<AccountRec>(&acct.id)?
            .ok_or_else(|| Problem::not_found("account"))?;
        tx.remove_account_key(&a.thumbprint)?;
        a.thumbprint = new_thumb.clone();
        a.jwk = new_key.to_value();
        tx.put(&a)?;
        tx.set_account_key(&new_thumb, &a.id)?;
        Ok::<_, Problem>(a)
    })?;
    tracing::info!(account = %updated.id, "ACME account key changed");
    let url = req.account_url(&updated.id);
    Ok(json_response(
        StatusCode::OK,
        &account_json(&req.base, &updated),
        Some(&url),
    ))
}

// ---- orders ---------------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct NewOrderReq {
    identifiers: Vec<Identifier>,
    #[serde(default)]
    not_before: Option<String>,
    #[serde(default)]
    not_after: Option<String>,
    #[serde(default)]
    replaces: Option<String>,
}

/// Normalises an identifier and applies the CA's policy (rejectedIdentifier otherwise).
pub(crate) fn check_identifier(policy: &Policy, id: &Identifier) -> Result<Identifier, Problem> {
    match id.kind.as_str() {
        "dns" => {
            let name = id.value.trim_end_matches('.').to_ascii_lowercase();
            if name.starts_with("*.") {
                return Err(Problem::new(
                    ProblemType::RejectedIdentifier,
                    format!("{name}: wildcard names need dns-01, which this CA does not offer"),
                ));
            }
            if !is_dns_name(&name) {
                return Err(Problem::new(
                    ProblemType::RejectedIdentifier,
                    format!("{:?} is not a valid DNS name", id.value),
                ));
            }
            if !policy.permits_dns(&name) {
                return Err(Problem::new(
                    ProblemType::RejectedIdentifier,
                    format!(
                        "{name} is outside the domains this CA may certify ({})",
                        policy.domains().join(", ")
                    ),
                ));
            }
            Ok(Identifier {
                kind: "dns".into(),
                value: name,
            })
        }
        "ip" => {
            let ip: IpAddr = id.value.parse().map_err(|_| {
                Problem::new(
                    ProblemType::RejectedIdentifier,
                    format!("{:?} is not an IP address", id.value),
                )
            })?;
            if !policy.permits_ip(ip) {
                let nets: Vec<String> = policy.networks().iter().map(|n| n.to_string()).collect();
                return Err(Problem::new(
                    ProblemType::RejectedIdentifier,
                    format!(
                        "{ip} is outside the networks this CA may certify ({})",
                        nets.join(", ")
                    ),
                ));
            }
            Ok(Identifier {
                kind: "ip".into(),
                value: ip.to_string(),
            })
        }
        other => Err(Problem::new(
            ProblemType::UnsupportedIdentifier,
            format!("identifier type {other:?} is not supported (use dns or ip)"),
        )),
    }
}

fn identifier_name(id: &Identifier) -> SubjectName {
    match id.value.parse::<IpAddr>() {
        Ok(ip) if id.kind == "ip" => SubjectName::Ip(ip),
        _ => SubjectName::Dns(id.value.clone()),
    }
}

pub(crate) fn effective_order_status(o: &OrderRec, now: i64) -> Status {
    match o.status {
        Status::Pending | Status::Ready if o.expires <= now => Status::Invalid,
        s => s,
    }
}

fn order_json(base: &str, o: &OrderRec) -> Value {
    let mut v = json!({
        "status": effective_order_status(o, unix_now()),
        "expires": rfc3339(o.expires),
        "identifiers": o.identifiers,
        "authorizations": o.authorizations.iter().map(|a| format!("{base}/acme/authz/{a}")).collect::<Vec<_>>(),
        "finalize": format!("{base}/acme/order/{}/finalize", o.id),
    });
    if let Some(serial) = &o.certificate {
        v["certificate"] = json!(format!("{base}/acme/cert/{serial}"));
    }
    if let Some(e) = &o.error {
        v["error"] = e.clone();
    }
    if let Some(r) = &o.replaces {
        v["replaces"] = json!(r);
    }
    v
}

fn order_response(base: &str, o: &OrderRec, status: StatusCode) -> Response {
    let url = format!("{base}/acme/order/{}", o.id);
    let mut resp = json_response(status, &order_json(base, o), Some(&url));
    if matches!(
        effective_order_status(o, unix_now()),
        Status::Pending | Status::Processing
    ) {
        retry_after(&mut resp);
    }
    resp
}

/// Parses an RFC 9773 certID: base64url(AKI keyIdentifier) "." base64url(serial).
fn parse_cert_id(id: &str) -> Option<(Vec<u8>, String)> {
    let (aki, serial) = id.split_once('.')?;
    let aki = b64url_decode(aki)?;
    let serial = b64url_decode(serial)?;
    (!serial.is_empty()).then(|| (aki, hex::encode(serial)))
}

async fn new_order(
    State(s): State<Arc<AcmeState>>,
    Signed(req, ..): Signed<ByKid>,
) -> Result<Response, Problem> {
    let acct = req.account()?.clone();
    let payload: NewOrderReq = req.json()?;
    if payload.identifiers.is_empty() || payload.identifiers.len() > MAX_IDENTIFIERS {
        return Err(Problem::malformed(format!(
            "an order needs 1 to {MAX_IDENTIFIERS} identifiers"
        )));
    }
    if payload.not_before.is_some() || payload.not_after.is_some() {
        // Lifetimes are the CA's policy (leaf_lifetime); RFC 8555 7.4 lets the server refuse.
        return Err(Problem::malformed(
            "notBefore/notAfter are not supported; leaves get the CA's configured lifetime",
        ));
    }
    let mut identifiers: Vec<Identifier> = Vec::new();
    for id in &payload.identifiers {
        let id = check_identifier(&s.policy, id)?;
        if !identifiers.contains(&id) {
            identifiers.push(id);
        }
    }
    if let Some(r) = &payload.replaces {
        let (_, serial) = parse_cert_id(r)
            .ok_or_else(|| Problem::malformed("replaces is not an RFC 9773 certID"))?;
        let cert = s.store.get::<CertRec>(&serial)?.ok_or_else(|| {
            Problem::malformed("replaces names a certificate this CA did not issue")
        })?;
        if cert.account.as_deref() != Some(acct.id.as_str()) {
            return Err(Problem::unauthorized(
                "replaces names a certificate of another account",
            ));
        }
    }
    let now = unix_now();
    let order_id = random_id();
    let authzs: Vec<AuthzRec> = identifiers
        .iter()
        .map(|id| AuthzRec {
            id: random_id(),
            account: acct.id.clone(),
            order: order_id.clone(),
            identifier: id.clone(),
            status: Status::Pending,
            expires: now + ORDER_LIFETIME_SECS,
            challenges: ["http-01", "tls-alpn-01"]
                .iter()
                .map(|kind| ChallengeRec {
                    kind: (*kind).into(),
                    token: b64url(&rand::random::<[u8; 32]>()),
                    status: Status::Pending,
                    validated: None,
                    error: None,
                })
                .collect(),
        })
        .collect();
    let order = OrderRec {
        id: order_id,
        account: acct.id.clone(),
        status: Status::Pending,
        identifiers,
        authorizations: authzs.iter().map(|a| a.id.clone()).collect(),
        expires: now + ORDER_LIFETIME_SECS,
        certificate: None,
        error: None,
        replaces: payload.replaces.clone(),
        created: now,
    };
    s.store.write(|tx| {
        for a in &authzs {
            tx.put(a)?;
        }
        tx.put(&order)
    })?;
    tracing::info!(account = %acct.id, order = %order.id, identifiers = ?order.identifiers.iter().map(|i| &i.value).collect::<Vec<_>>(), "ACME order created");
    Ok(order_response(&req.base, &order, StatusCode::CREATED))
}

fn owned_order(s: &AcmeState, req: &Authed, id: &str) -> Result<OrderRec, Problem> {
    let o = s
        .store
        .get::<OrderRec>(id)?
        .ok_or_else(|| Problem::not_found("order"))?;
    if o.account != req.account()?.id {
        return Err(Problem::unauthorized(
            "this order belongs to another account",
        ));
    }
    Ok(o)
}

async fn order(
    Path(id): Path<String>,
    State(s): State<Arc<AcmeState>>,
    Signed(req, ..): Signed<ByKid>,
) -> Result<Response, Problem> {
    if !req.is_post_as_get() {
        return Err(Problem::malformed(
            "orders are read with POST-as-GET (empty payload)",
        ));
    }
    let o = owned_order(&s, &req, &id)?;
    Ok(order_response(&req.base, &o, StatusCode::OK))
}

/// The CSR checks phoenix-pki cannot make: its key must not be the account key (RFC 8555
/// 11.1), and it must not ask for more than a leaf (see `check_requested_extensions`).
/// Signature, key type and the exact name set are checked by `issue_from_csr`.
fn check_csr_key(der: &[u8], account_key: &Jwk) -> Result<(), Problem> {
    use x509_parser::prelude::FromDer;
    let info = phoenix_pki::parse_csr(der)
        .map_err(|e| Problem::new(ProblemType::BadCsr, e.to_string()))?;
    check_requested_extensions(der)?;
    let (_, spki) = x509_parser::x509::SubjectPublicKeyInfo::from_der(&info.spki_der)
        .map_err(|e| Problem::new(ProblemType::BadCsr, format!("CSR public key: {e}")))?;
    if account_key.matches_spki(&spki) {
        return Err(Problem::new(
            ProblemType::BadCsr,
            "the certificate key must not be the account key",
        ));
    }
    Ok(())
}

/// Requested extensions are never copied into a certificate (the leaf profile is fixed), so
/// most are ignored. A CSR that asks for CA powers (`basicConstraints` cA, `keyCertSign` or
/// `cRLSign`, name constraints) or marks an extension we do not know as critical is refused
/// instead: it is either an attack or a client that would be surprised by the leaf it got.
fn check_requested_extensions(der: &[u8]) -> Result<(), Problem> {
    use x509_parser::certification_request::X509CertificationRequest;
    use x509_parser::extensions::ParsedExtension;
    use x509_parser::prelude::FromDer;
    let bad = |m: String| Problem::new(ProblemType::BadCsr, m);
    let (_, csr) =
        X509CertificationRequest::from_der(der).map_err(|e| bad(format!("CSR is not DER: {e}")))?;
    for ext in csr.requested_extensions().into_iter().flatten() {
        match ext {
            ParsedExtension::BasicConstraints(bc) if bc.ca => {
                return Err(bad(
                    "the CSR asks for a CA certificate (basicConstraints cA)".into(),
                ))
            }
            ParsedExtension::KeyUsage(ku) if ku.key_cert_sign() || ku.crl_sign() => {
                return Err(bad(
                    "the CSR asks for keyCertSign or cRLSign; leaves cannot sign".into(),
                ))
            }
            ParsedExtension::NameConstraints(_) => {
                return Err(bad(
                    "the CSR asks for name constraints, a CA extension".into()
                ))
            }
            _ => {}
        }
    }
    // Criticality is on the raw extension; `requested_extensions` gives only parsed values.
    for attr in csr.certification_request_info.iter_attributes() {
        if let x509_parser::cri_attributes::ParsedCriAttribute::ExtensionRequest(req) =
            attr.parsed_attribute()
        {
            for ext in &req.extensions {
                if ext.critical
                    && matches!(
                        ext.parsed_extension(),
                        ParsedExtension::UnsupportedExtension { .. }
                    )
                {
                    return Err(bad(format!(
                        "the CSR carries an unknown critical extension {}",
                        ext.oid.to_id_string()
                    )));
                }
            }
        }
    }
    Ok(())
}

fn issuance_problem(e: phoenix_pki::PkiError) -> Problem {
    use phoenix_pki::PkiError;
    match e {
        PkiError::BadCsr(m) | PkiError::UnsupportedKey(m) => Problem::new(ProblemType::BadCsr, m),
        PkiError::Rejected(m) => Problem::new(ProblemType::RejectedIdentifier, m),
        other => Problem::from(crate::CaError::Pki(other.to_string())),
    }
}

async fn finalize(
    Path(id): Path<String>,
    State(s): State<Arc<AcmeState>>,
    Signed(req, ..): Signed<ByKid>,
) -> Result<Response, Problem> {
    let acct = req.account()?.clone();
    let o = owned_order(&s, &req, &id)?;
    let status = effective_order_status(&o, unix_now());
    if status != Status::Ready {
        return Err(Problem::new(
            ProblemType::OrderNotReady,
            format!("the order is {status:?}, not ready; complete its authorizations first")
                .to_lowercase(),
        ));
    }
    #[derive(Deserialize)]
    struct FinalizeReq {
        csr: String,
    }
    let payload: FinalizeReq = req.json()?;
    let der = b64url_decode(payload.csr.trim_end_matches('='))
        .ok_or_else(|| Problem::new(ProblemType::BadCsr, "csr is not base64url"))?;
    check_csr_key(&der, &Jwk::from_value(&acct.jwk)?)?;
    // Order identifiers' order, so the first DNS name becomes the subject CN.
    let names: Vec<SubjectName> = o.identifiers.iter().map(identifier_name).collect();
    let leaf = s
        .authority
        .issue_from_csr(&der, &names, s.cfg.leaf_lifetime)
        .map_err(issuance_problem)?;
    let cert = CertRec {
        serial: leaf.serial.clone(),
        names: names.iter().map(SubjectName::to_text).collect(),
        not_before: leaf.not_before.unix_timestamp(),
        not_after: leaf.not_after.unix_timestamp(),
        account: Some(acct.id.clone()),
        order: Some(o.id.clone()),
        der: base64::engine::general_purpose::STANDARD.encode(&leaf.der),
        revoked_at: None,
        reason: None,
    };
    let updated = s.store.write(|tx| {
        let mut o = tx
            .get::<OrderRec>(&id)?
            .ok_or_else(|| Problem::not_found("order"))?;
        if o.status != Status::Ready {
            return Err(Problem::new(
                ProblemType::OrderNotReady,
                "the order was finalized concurrently",
            ));
        }
        if tx.get::<CertRec>(&cert.serial)?.is_some() {
            return Err(Problem::internal("serial collision; retry"));
        }
        o.status = Status::Valid;
        o.certificate = Some(cert.serial.clone());
        tx.put(&cert)?;
        tx.put(&o)?;
        Ok::<_, Problem>(o)
    })?;
    tracing::info!(account = %acct.id, order = %id, serial = %cert.serial, names = ?cert.names, "certificate issued");
    Ok(order_response(&req.base, &updated, StatusCode::OK))
}

// ---- authorizations and challenges ----------------------------------------------------------

fn challenge_json(base: &str, authz_id: &str, c: &ChallengeRec) -> Value {
    let mut v = json!({
        "type": c.kind,
        "url": format!("{base}/acme/chall/{authz_id}/{}", c.kind),
        "token": c.token,
        "status": c.status,
    });
    if let Some(t) = c.validated {
        v["validated"] = json!(rfc3339(t));
    }
    if let Some(e) = &c.error {
        v["error"] = e.clone();
    }
    v
}

fn authz_json(base: &str, a: &AuthzRec) -> Value {
    json!({
        "identifier": a.identifier,
        "status": a.status,
        "expires": rfc3339(a.expires),
        "challenges": a.challenges.iter().map(|c| challenge_json(base, &a.id, c)).collect::<Vec<_>>(),
    })
}

fn owned_authz(s: &AcmeState, req: &Authed, id: &str) -> Result<AuthzRec, Problem> {
    let a = s
        .store
        .get::<AuthzRec>(id)?
        .ok_or_else(|| Problem::not_found("authorization"))?;
    if a.account != req.account()?.id {
        return Err(Problem::unauthorized(
            "this authorization belongs to another account",
        ));
    }
    Ok(a)
}

async fn authorization(
    Path(id): Path<String>,
    State(s): State<Arc<AcmeState>>,
    Signed(req, ..): Signed<ByKid>,
) -> Result<Response, Problem> {
    let mut a = owned_authz(&s, &req, &id)?;
    if !req.is_post_as_get() {
        let upd: AccountUpdate = req.json()?;
        if upd.status != Some(Status::Deactivated) {
            return Err(Problem::malformed(
                "the only change allowed on an authorization is {\"status\":\"deactivated\"}",
            ));
        }
        a = s.store.write(|tx| {
            let mut a = tx
                .get::<AuthzRec>(&id)?
                .ok_or_else(|| Problem::not_found("authorization"))?;
            if !matches!(a.status, Status::Pending | Status::Valid) {
                return Err(Problem::malformed(format!(
                    "cannot deactivate a {:?} authorization",
                    a.status
                )));
            }
            a.status = Status::Deactivated;
            tx.put(&a)?;
            // RFC 8555 7.1.6: an order whose authorization is deactivated can no longer succeed.
            if let Some(mut o) = tx.get::<OrderRec>(&a.order)? {
                if matches!(o.status, Status::Pending | Status::Ready) {
                    o.status = Status::Invalid;
                    tx.put(&o)?;
                }
            }
            Ok::<_, Problem>(a)
        })?;
    }
    let url = format!("{}/acme/authz/{id}", req.base);
    let mut resp = json_response(StatusCode::OK, &authz_json(&req.base, &a), Some(&url));
    if a.status == Status::Pending {
        retry_after(&mut resp);
    }
    Ok(resp)
}

async fn challenge(
    Path((authz_id, kind)): Path<(String, String)>,
    State(s): State<Arc<AcmeState>>,
    Signed(req, ..): Signed<ByKid>,
) -> Result<Response, Problem> {
    let a = owned_authz(&s, &req, &authz_id)?;
    if !a.challenges.iter().any(|c| c.kind == kind) {
        return Err(Problem::not_found("challenge"));
    }
    let mut start = false;
    let a = if req.is_post_as_get() {
        a
    } else {
        // RFC 8555 7.5.1: the client says it is ready with an empty JSON object.
        let _: serde_json::Map<String, Value> = req.json()?;
        s.store.write(|tx| {
            let mut a = tx
                .get::<AuthzRec>(&authz_id)?
                .ok_or_else(|| Problem::not_found("authorization"))?;
            let busy = a
                .challenges
                .iter()
                .any(|c| c.status == Status::Processing && c.kind != kind);
            if a.status == Status::Pending && !busy {
                if let Some(c) = a.challenges.iter_mut().find(|c| c.kind == kind) {
                    match c.status {
                        Status::Pending => {
                            c.status = Status::Processing;
                            tx.put(&a)?;
                            start = true;
                        }
                        // Re-POST of a processing challenge (e.g. after a CA restart): make
                        // sure a validation is running.
                        Status::Processing => start = true,
                        _ => {}
                    }
                }
            }
            Ok::<_, Problem>(a)
        })?
    };
    let a = if start {
        crate::validation::spawn_validation(&s, &authz_id, &kind);
        settled_authz(&s, &authz_id, a).await
    } else {
        a
    };
    let c = a
        .challenges
        .iter()
        .find(|c| c.kind == kind)
        .ok_or_else(|| Problem::not_found("challenge"))?;
    let url = format!("{}/acme/chall/{authz_id}/{kind}", req.base);
    let mut resp = json_response(
        StatusCode::OK,
        &challenge_json(&req.base, &authz_id, c),
        Some(&url),
    );
    add_link(
        &mut resp,
        &format!("{}/acme/authz/{authz_id}", req.base),
        "up",
    );
    if c.status == Status::Processing {
        retry_after(&mut resp);
    }
    Ok(resp)
}

/// How long a challenge POST waits for the validation it started before answering. A validation
/// of a reachable client takes a few milliseconds; answering with its outcome spares the client
/// a poll, and clients such as lego wait a whole `Retry-After` (1 s) before their first poll.
/// A slow or retried validation is still answered `processing` with `Retry-After`.
const SETTLE_WAIT: std::time::Duration = std::time::Duration::from_millis(500);
const SETTLE_STEP: std::time::Duration = std::time::Duration::from_millis(2);

/// The authorization once its challenge left `processing`, or as it is after [`SETTLE_WAIT`].
async fn settled_authz(s: &AcmeState, authz_id: &str, current: AuthzRec) -> AuthzRec {
    let deadline = tokio::time::Instant::now() + SETTLE_WAIT;
    let mut latest = current;
    while tokio::time::Instant::now() < deadline {
        tokio::time::sleep(SETTLE_STEP).await;
        match s.store.get::<AuthzRec>(authz_id) {
            Ok(Some(a)) => {
                let done = !a.challenges.iter().any(|c| c.status == Status::Processing);
                latest = a;
                if done {
                    break;
                }
            }
            _ => break,
        }
    }
    latest
}

// ---- certificates, revocation, renewal information ------------------------------------------

fn cert_der(c: &CertRec) -> Result<Vec<u8>, Problem> {
    base64::engine::general_purpose::STANDARD
        .decode(&c.der)
        .map_err(|_| Problem::internal("stored certificate is corrupt"))
}

async fn certificate(
    Path(serial): Path<String>,
    State(s): State<Arc<AcmeState>>,
    Signed(req, ..): Signed<ByKid>,
) -> Result<Response, Problem> {
    if !req.is_post_as_get() {
        return Err(Problem::malformed(
            "certificates are downloaded with POST-as-GET (empty payload)",
        ));
    }
    let c = s
        .store
        .get::<CertRec>(&serial)?
        .ok_or_else(|| Problem::not_found("certificate"))?;
    if c.account.as_deref() != Some(req.account()?.id.as_str()) {
        return Err(Problem::unauthorized(
            "this certificate belongs to another account",
        ));
    }
    let pem = s.authority.chain_pem(&cert_der(&c)?);
    let mut resp = (StatusCode::OK, pem).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/pem-certificate-chain"),
    );
    Ok(resp)
}

/// CRL reason codes a subscriber may give (RFC 5280 5.3.1 minus CA-only and CRL-only ones).
const ALLOWED_REASONS: &[i64] = &[0, 1, 3, 4, 5, 9];

async fn revoke_cert(
    State(s): State<Arc<AcmeState>>,
    Signed(req, ..): Signed<ByEither>,
) -> Result<Response, Problem> {
    #[derive(Deserialize)]
    struct RevokeReq {
        certificate: String,
        reason: Option<i64>,
    }
    let payload: RevokeReq = req.json()?;
    let reason = payload.reason.unwrap_or(0);
    if !ALLOWED_REASONS.contains(&reason) {
        return Err(Problem::new(
            ProblemType::BadRevocationReason,
            format!("reason {reason} is not allowed; use one of {ALLOWED_REASONS:?}"),
        ));
    }
    let der = b64url_decode(&payload.certificate)
        .ok_or_else(|| Problem::malformed("certificate is not base64url"))?;
    let (_, parsed) = x509_parser::parse_x509_certificate(&der)
        .map_err(|_| Problem::malformed("certificate does not parse"))?;
    let serial = hex::encode(parsed.raw_serial());
    let rec = s
        .store
        .get::<CertRec>(&serial)?
        .filter(|c| cert_der(c).is_ok_and(|d| d == der))
        .ok_or_else(|| Problem::not_found("certificate").with_status(StatusCode::NOT_FOUND))?;
    match (&req.account, &req.jwk) {
        (Some(acct), _) if rec.account.as_deref() == Some(acct.id.as_str()) => {}
        (Some(_), _) => {
            return Err(Problem::unauthorized(
                "this account does not own the certificate",
            ))
        }
        (None, Some(jwk)) if jwk.matches_spki(parsed.public_key()) => {}
        _ => {
            return Err(Problem::unauthorized(
                "the JWS key is not the certificate's key",
            ))
        }
    }
    s.store.write(|tx| {
        let mut c = tx
            .get::<CertRec>(&serial)?
            .ok_or_else(|| Problem::not_found("certificate"))?;
        if c.revoked_at.is_some() {
            return Err(Problem::new(
                ProblemType::AlreadyRevoked,
                format!("certificate {serial} is already revoked"),
            ));
        }
        c.revoked_at = Some(unix_now());
        c.reason = Some(reason as u8);
        tx.put(&c).map_err(Problem::from)
    })?;
    tracing::info!(serial = %serial, reason, "certificate revoked over ACME");
    Ok(StatusCode::OK.into_response())
}

/// RFC 9773: when to renew. The window sits around two thirds of the lifetime; a revoked
/// certificate should be replaced now.
pub(crate) fn renewal_window(c: &CertRec, now: i64) -> (i64, i64) {
    if c.revoked_at.is_some() {
        return (now - 60, now);
    }
    let life = (c.not_after - c.not_before).max(1);
    let centre = c.not_before + life * 2 / 3;
    (centre - life / 20, centre + life / 20)
}

async fn renewal_info(
    Path(id): Path<String>,
    State(s): State<Arc<AcmeState>>,
) -> Result<Response, Problem> {
    let (aki, serial) =
        parse_cert_id(&id).ok_or_else(|| Problem::malformed("not an RFC 9773 certID"))?;
    if aki != s.authority.intermediate_key_id() {
        return Err(Problem::not_found("certificate"));
    }
    let c = s
        .store
        .get::<CertRec>(&serial)?
        .ok_or_else(|| Problem::not_found("certificate"))?;
    let (start, end) = renewal_window(&c, unix_now());
    let body = json!({"suggestedWindow": {"start": rfc3339(start), "end": rfc3339(end)}});
    let mut resp = json_response(StatusCode::OK, &body, None);
    // Poll again in an hour, or sooner for short-lived certificates.
    let retry = ((c.not_after - c.not_before) / 10).clamp(60, 3600);
    if let Ok(v) = HeaderValue::from_str(&retry.to_string()) {
        resp.headers_mut().insert(header::RETRY_AFTER, v);
    }
    Ok(resp)
}

// ---- plain endpoints ------------------------------------------------------------------------

fn pem_response(pem: String) -> Response {
    let mut resp = (StatusCode::OK, pem).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-pem-file"),
    );
    resp
}

async fn roots_pem(State(s): State<Arc<AcmeState>>) -> Response {
    pem_response(s.authority.root_pem().to_owned())
}

async fn intermediates_pem(State(s): State<Arc<AcmeState>>) -> Response {
    pem_response(s.authority.intermediate_pem().to_owned())
}

async fn health() -> Response {
    json_response(StatusCode::OK, &json!({"status": "ok"}), None)
}

async fn crl(State(s): State<Arc<AcmeState>>) -> Result<Response, Problem> {
    let revoked: Vec<(String, OffsetDateTime, u8)> = s
        .store
        .all::<CertRec>()?
        .into_iter()
        .filter_map(|c| {
            let at = OffsetDateTime::from_unix_timestamp(c.revoked_at?).ok()?;
            Some((c.serial, at, c.reason.unwrap_or(0)))
        })
        .collect();
    let der = s.authority.crl(&revoked)?;
    let mut resp = (StatusCode::OK, der).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/pkix-crl"),
    );
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_window_is_around_two_thirds_and_immediate_when_revoked() {
        let mut c = CertRec {
            serial: "01".into(),
            names: vec![],
            not_before: 0,
            not_after: 3000,
            account: None,
            order: None,
            der: String::new(),
            revoked_at: None,
            reason: None,
        };
        let (start, end) = renewal_window(&c, 10);
        assert!(
            start < 2000 && 2000 < end && start > 1500 && end < 2500,
            "{start}..{end}"
        );
        c.revoked_at = Some(5);
        let (_, end) = renewal_window(&c, 10);
        assert!(end <= 10);
    }

    #[test]
    fn cert_id_round_trip() {
        let id = format!("{}.{}", b64url(&[1, 2, 3]), b64url(&[0x7f, 0x01]));
        assert_eq!(parse_cert_id(&id), Some((vec![1, 2, 3], "7f01".to_owned())));
        assert_eq!(parse_cert_id("nodot"), None);
    }
}
