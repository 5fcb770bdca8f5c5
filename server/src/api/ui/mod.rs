//! The operator's web page: a few server-rendered pages, served on a listener of its own
//! (`--ui-listen`, off unless given), over the same calls as the gRPC API made as the admin:
//! events (by producer, type and time), an event's deliveries, a delivery's attempts, and
//! listeners with their health, with buttons to retry, replay, recover and enable.
//!
//! Everything sits behind the admin token: a login form that opens a session (a random id in
//! an HttpOnly, SameSite=Strict cookie, kept in memory for [`SESSION_FOR`]), or
//! `authorization: Bearer <admin token>` for scripts. Every form that changes something carries
//! a token derived from the session, so another site cannot post one. No JavaScript, no build
//! step. This module never shows a secret or an API key: listeners are shown without theirs.

mod pages;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, COOKIE, HeaderValue, LOCATION, SET_COOKIE};
use hyper::{Method, Request, Response, StatusCode};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::delivery::DeliveryApi;
use super::{ApiError, Shared};
use crate::auth::Caller;
use crate::clock::now_ms;
use crate::crypto;

/// How long a session opened by the login form lasts.
pub const SESSION_FOR: Duration = Duration::from_secs(12 * 3600);
/// Most sessions kept at once; the oldest go first.
const MAX_SESSIONS: usize = 1024;
/// Largest form accepted.
const MAX_FORM_BYTES: usize = 16 * 1024;
const COOKIE_NAME: &str = "hookd_session";

/// The page's state: the calls it makes and the sessions it has opened.
struct Ui {
    shared: Shared,
    delivery: DeliveryApi,
    /// Session id to expiry (ms since the epoch).
    sessions: Mutex<HashMap<String, u64>>,
    /// Derives each session's form token.
    form_key: [u8; 32],
}

/// Serves the page on `listener` until `shutdown`.
pub async fn serve(listener: TcpListener, shared: Shared, shutdown: CancellationToken) {
    let ui = Arc::new(Ui {
        delivery: DeliveryApi::new(shared.clone()),
        shared,
        sessions: Mutex::new(HashMap::new()),
        form_key: crypto::random_bytes(),
    });
    let answer = move |request| {
        let ui = ui.clone();
        async move { ui.answer(request).await }
    };
    crate::side_http::serve(listener, "web page", answer, shutdown).await;
}

/// An answer under construction.
pub(crate) type Page = Response<Full<Bytes>>;

pub(crate) fn html(status: StatusCode, body: String) -> Page {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    // The page is never framed by another site, nor cached.
    response.headers_mut().insert("x-frame-options", HeaderValue::from_static("DENY"));
    response.headers_mut().insert("cache-control", HeaderValue::from_static("no-store"));
    response.headers_mut().insert(
        "content-security-policy",
        HeaderValue::from_static("default-src 'none'; style-src 'unsafe-inline'; form-action 'self'"),
    );
    response
}

fn redirect(to: &str) -> Page {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::SEE_OTHER;
    response.headers_mut().insert(LOCATION, HeaderValue::from_str(to).unwrap_or(HeaderValue::from_static("/")));
    response
}

/// The query string or form body as pairs.
pub(crate) fn fields(text: &str) -> HashMap<String, String> {
    url::form_urlencoded::parse(text.as_bytes()).into_owned().collect()
}

/// Who is asking: the admin, by a session (its id) or by the bearer token, and the token its
/// forms must carry.
struct Visitor {
    session: Option<String>,
    form_token: String,
}

impl Ui {
    async fn answer(&self, request: Request<Incoming>) -> Page {
        let (method, path) = (request.method().clone(), request.uri().path().to_owned());
        let query = fields(request.uri().query().unwrap_or_default());
        if path == "/login" {
            return match method {
                Method::GET => html(StatusCode::OK, pages::login(None)),
                Method::POST => self.log_in(request).await,
                _ => html(StatusCode::METHOD_NOT_ALLOWED, pages::message("Not allowed", "")),
            };
        }
        let Some(visitor) = self.visitor(&request) else {
            return redirect("/login");
        };
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        let result = match (method, segments.as_slice()) {
            (Method::GET, [""]) => self.events(&visitor, &query).await,
            (Method::GET, ["events", id]) => self.event(&visitor, id).await,
            (Method::GET, ["deliveries", id]) => self.delivery(&visitor, id).await,
            (Method::GET, ["listeners"]) => self.listeners(&visitor).await,
            (Method::POST, action) => {
                let form = match read_form(request).await {
                    Ok(form) => form,
                    Err(page) => return page,
                };
                if !crypto::strings_equal(form.get("form").map(String::as_str).unwrap_or_default(), &visitor.form_token)
                {
                    return html(
                        StatusCode::FORBIDDEN,
                        pages::message("Refused", "This form is stale or not from this page: reload it."),
                    );
                }
                match action {
                    ["logout"] => return self.log_out(visitor.session.as_deref()),
                    ["deliveries", id, "retry"] => self.retry(id).await,
                    ["events", id, "replay"] => self.replay(id).await,
                    ["listeners", id, "recover"] => self.recover(id, &form).await,
                    ["listeners", id, "enable"] => self.enable(id).await,
                    _ => Ok(html(StatusCode::NOT_FOUND, pages::message("Not found", ""))),
                }
            }
            _ => Ok(html(StatusCode::NOT_FOUND, pages::message("Not found", "There is no such page."))),
        };
        result.unwrap_or_else(|error| {
            let status = tonic::Status::from(error);
            let code = match status.code() {
                tonic::Code::NotFound => StatusCode::NOT_FOUND,
                tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition => StatusCode::BAD_REQUEST,
                tonic::Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            };
            html(code, pages::message("That did not work", status.message()))
        })
    }

    /// The admin, by session cookie or bearer token.
    fn visitor(&self, request: &Request<Incoming>) -> Option<Visitor> {
        let bearer = request
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "));
        if let Some(token) = bearer {
            let admitted =
                crypto::digests_equal(&crypto::hash_api_key(token.trim()), &self.shared.config.admin_token_hash);
            // A script has no session: its forms carry the token derived from its own token.
            return admitted.then(|| Visitor { session: None, form_token: self.form_token(token.trim()) });
        }
        let session = session_cookie(request)?;
        let expires = *self.sessions.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(&session)?;
        (expires > now_ms()).then(|| Visitor { form_token: self.form_token(&session), session: Some(session) })
    }

    /// The form token of a session: forms posted with it come from this page.
    fn form_token(&self, session: &str) -> String {
        crypto::hex(&crypto::hmac_sha256(&self.form_key, session.as_bytes()))
    }

    async fn log_in(&self, request: Request<Incoming>) -> Page {
        let form = match read_form(request).await {
            Ok(form) => form,
            Err(page) => return page,
        };
        let token = form.get("token").map(String::as_str).unwrap_or_default().trim().to_owned();
        if !crypto::digests_equal(&crypto::hash_api_key(&token), &self.shared.config.admin_token_hash) {
            tracing::info!("web page: a login with a wrong token");
            return html(StatusCode::UNAUTHORIZED, pages::login(Some("That is not the admin token.")));
        }
        let session = crypto::hex(&crypto::random_bytes::<32>());
        {
            let mut sessions = self.sessions.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let now = now_ms();
            sessions.retain(|_, expires| *expires > now);
            if sessions.len() >= MAX_SESSIONS
                && let Some(oldest) = sessions.iter().min_by_key(|(_, expires)| **expires).map(|(id, _)| id.clone())
            {
                sessions.remove(&oldest);
            }
            sessions.insert(session.clone(), now + SESSION_FOR.as_millis() as u64);
        }
        let mut response = redirect("/");
        let cookie =
            format!("{COOKIE_NAME}={session}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}", SESSION_FOR.as_secs());
        response.headers_mut().insert(SET_COOKIE, HeaderValue::from_str(&cookie).expect("an ascii cookie"));
        response
    }

    fn log_out(&self, session: Option<&str>) -> Page {
        if let Some(session) = session {
            self.sessions.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(session);
        }
        let mut response = redirect("/login");
        let cookie = format!("{COOKIE_NAME}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0");
        response.headers_mut().insert(SET_COOKIE, HeaderValue::from_str(&cookie).expect("an ascii cookie"));
        response
    }
}

fn session_cookie(request: &Request<Incoming>) -> Option<String> {
    request
        .headers()
        .get_all(COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE_NAME)
        .map(|(_, value)| value.to_owned())
}

async fn read_form(request: Request<Incoming>) -> Result<HashMap<String, String>, Page> {
    use crate::side_http::BodyRefused;
    let body = crate::side_http::read_body_within(request, MAX_FORM_BYTES).await.map_err(|refused| match refused {
        BodyRefused::TooLarge => {
            html(StatusCode::PAYLOAD_TOO_LARGE, pages::message("Too large", "That form is too large."))
        }
        BodyRefused::TooSlow => {
            html(StatusCode::REQUEST_TIMEOUT, pages::message("Too slow", "That form took too long to send."))
        }
        BodyRefused::Broken => {
            html(StatusCode::BAD_REQUEST, pages::message("Not read", "That form could not be read."))
        }
    })?;
    Ok(fields(&String::from_utf8_lossy(&body)))
}

/// The result of a page's work.
type Shown = Result<Page, ApiError>;

/// The page acts as the admin.
const ADMIN: Caller = Caller::Admin;
