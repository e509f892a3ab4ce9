//! The HTTP JSON API (axum): a thin layer that turns requests into [`Action`]s for the service
//! loop and its typed answers into responses. The only place that knows HTTP status codes.
//! Loopback by default; a bearer token when configured.

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use outpost_protocol::PowerMode;
use serde_json::json;
use tokio::sync::{mpsc, oneshot};

use crate::action::{Action, ActionError, Call, Reply};
use crate::fleet::FleetError;
use crate::views::CreateBody;

#[derive(Clone)]
struct Api {
    calls: mpsc::Sender<Call>,
    token: Option<String>,
}

/// An HTTP error: a status and the `{"error": ...}` body.
struct HttpError(StatusCode, String);

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

/// The status code of each refusal.
fn status(e: &ActionError) -> StatusCode {
    match e {
        ActionError::Fleet(FleetError::NoInstance(_) | FleetError::NoNode(_)) => {
            StatusCode::NOT_FOUND
        }
        ActionError::Fleet(FleetError::Spec(_) | FleetError::BadLabel(..))
        | ActionError::Invalid(_) => StatusCode::BAD_REQUEST,
        ActionError::Fleet(
            FleetError::NoValidHost(_)
            | FleetError::Exists(_)
            | FleetError::GroupPolicy(_)
            | FleetError::Deleting(_)
            | FleetError::NotForeign(_)
            | FleetError::NodeNotEmpty(..),
        ) => StatusCode::CONFLICT,
        ActionError::StoreDown(_) | ActionError::NotStored(_) | ActionError::ShuttingDown => {
            StatusCode::SERVICE_UNAVAILABLE
        }
    }
}

impl From<ActionError> for HttpError {
    fn from(e: ActionError) -> Self {
        Self(status(&e), e.to_string())
    }
}

async fn call(api: &Api, action: Action) -> Result<Json<Reply>, HttpError> {
    let (tx, rx) = oneshot::channel();
    api.calls
        .send((action, tx))
        .await
        .map_err(|_| ActionError::ShuttingDown)?;
    let reply = rx.await.map_err(|_| ActionError::ShuttingDown)??;
    Ok(Json(reply))
}

async fn auth(State(api): State<Api>, headers: HeaderMap, req: Request, next: Next) -> Response {
    if let Some(token) = &api.token {
        let ok = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|t| t == token);
        if !ok {
            return HttpError(
                StatusCode::UNAUTHORIZED,
                "missing or wrong bearer token".into(),
            )
            .into_response();
        }
    }
    next.run(req).await
}

type Key = Path<String>;

/// `POST /v1/nodes/{id}/labels`: `{"labels": ["key=value", "key-"]}`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct LabelBody {
    labels: Vec<String>,
}

/// `DELETE /v1/nodes/{id}?force=true`.
#[derive(Debug, Default, serde::Deserialize)]
struct RemoveQuery {
    #[serde(default)]
    force: bool,
}

/// `POST /v1/instances/{key}/stop|reboot`, body optional: `{"force": true}` pulls the plug
/// (a reset for a reboot); `{"stop_timeout_secs": 30}` gives the guest that long to act on the power
/// button before it is forced (0 or absent: the agent's configured default).
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PowerBody {
    #[serde(default)]
    force: bool,
    #[serde(default)]
    stop_timeout_secs: u16,
}

/// Reads an optional [`PowerBody`].
fn power_mode(body: &[u8]) -> Result<PowerMode, HttpError> {
    let b: PowerBody = if body.iter().all(u8::is_ascii_whitespace) {
        PowerBody::default()
    } else {
        serde_json::from_slice(body).map_err(|e| {
            HttpError(
                StatusCode::BAD_REQUEST,
                format!("bad power request: {e} (expected {{\"force\": bool, \"stop_timeout_secs\": 0..65535}})"),
            )
        })?
    };
    Ok(PowerMode {
        force: b.force,
        stop_timeout_secs: b.stop_timeout_secs,
    })
}

/// The API's routes, under `/v1`.
pub fn router(calls: mpsc::Sender<Call>, token: Option<String>) -> Router {
    let api = Api { calls, token };
    Router::new()
        .route("/v1/nodes", get(|State(a): State<Api>| async move { call(&a, Action::ListNodes).await }))
        .route(
            "/v1/nodes/{id}",
            get(|State(a): State<Api>, Path(id): Key| async move { call(&a, Action::GetNode(id)).await })
                .delete(|State(a): State<Api>, Path(id): Key, Query(q): Query<RemoveQuery>| async move {
                    call(&a, Action::RemoveNode(id, q.force)).await
                }),
        )
        .route("/v1/nodes/{id}/cordon", post(|State(a): State<Api>, Path(id): Key| async move { call(&a, Action::CordonNode(id)).await }))
        .route("/v1/nodes/{id}/uncordon", post(|State(a): State<Api>, Path(id): Key| async move { call(&a, Action::UncordonNode(id)).await }))
        .route("/v1/nodes/{id}/labels", post(|State(a): State<Api>, Path(id): Key, body: Result<Json<LabelBody>, axum::extract::rejection::JsonRejection>| async move {
            match body {
                Ok(Json(b)) => call(&a, Action::LabelNode(id, b.labels)).await,
                Err(e) => Err(HttpError(StatusCode::BAD_REQUEST, e.body_text())),
            }
        }))
        .route("/v1/nodes/{id}/adopt", post(|State(a): State<Api>, Path(id): Key| async move { call(&a, Action::AdoptNode(id)).await }))
        .route("/v1/nodes/{id}/drain", post(|State(a): State<Api>, Path(id): Key| async move { call(&a, Action::DrainNode(id)).await }))
        .route(
            "/v1/instances",
            get(|State(a): State<Api>| async move { call(&a, Action::ListInstances).await })
                .post(|State(a): State<Api>, body: Result<Json<CreateBody>, axum::extract::rejection::JsonRejection>| async move {
                    match body {
                        Ok(Json(b)) => call(&a, Action::CreateInstance(Box::new(b))).await.map(|v| (StatusCode::CREATED, v)),
                        Err(e) => Err(HttpError(StatusCode::BAD_REQUEST, e.body_text())),
                    }
                }),
        )
        .route(
            "/v1/instances/{key}",
            get(|State(a): State<Api>, Path(k): Key| async move { call(&a, Action::GetInstance(k)).await })
                .delete(|State(a): State<Api>, Path(k): Key| async move { call(&a, Action::DeleteInstance(k)).await }),
        )
        .route("/v1/instances/{key}/stop", post(|State(a): State<Api>, Path(k): Key, body: Bytes| async move { call(&a, Action::StopInstance(k, power_mode(&body)?)).await }))
        .route("/v1/instances/{key}/start", post(|State(a): State<Api>, Path(k): Key| async move { call(&a, Action::StartInstance(k)).await }))
        .route("/v1/instances/{key}/reboot", post(|State(a): State<Api>, Path(k): Key, body: Bytes| async move { call(&a, Action::RebootInstance(k, power_mode(&body)?)).await }))
        .fallback(|| async { HttpError(StatusCode::NOT_FOUND, "no such endpoint (see README: HTTP API)".into()) })
        .layer(middleware::from_fn_with_state(api.clone(), auth))
        .with_state(api)
}
