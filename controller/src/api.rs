//! The HTTP JSON API (axum): a thin layer that turns requests into [`Op`]s for the service
//! task and its answers into responses. Loopback by default; a bearer token when configured.

use axum::Json;
use axum::Router;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};

use crate::service::{ApiError, Call, Op};
use crate::views::CreateBody;

#[derive(Clone)]
struct Api {
    calls: mpsc::Sender<Call>,
    token: Option<String>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(json!({ "error": self.message }))).into_response()
    }
}

async fn call(api: &Api, op: Op) -> Result<Json<Value>, ApiError> {
    let (tx, rx) = oneshot::channel();
    let down = || ApiError {
        status: 503,
        message: "the controller is shutting down".into(),
    };
    api.calls.send((op, tx)).await.map_err(|_| down())?;
    rx.await.map_err(|_| down())?.map(Json)
}

async fn auth(State(api): State<Api>, headers: HeaderMap, req: Request, next: Next) -> Response {
    if let Some(token) = &api.token {
        let ok = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|t| t == token);
        if !ok {
            return ApiError {
                status: 401,
                message: "missing or wrong bearer token".into(),
            }
            .into_response();
        }
    }
    next.run(req).await
}

/// The API's routes, under `/v1`.
pub fn router(calls: mpsc::Sender<Call>, token: Option<String>) -> Router {
    let api = Api { calls, token };
    Router::new()
        .route("/v1/nodes", get(|State(a): State<Api>| async move { call(&a, Op::ListNodes).await }))
        .route("/v1/nodes/{id}", get(|State(a): State<Api>, Path(id): Path<String>| async move { call(&a, Op::GetNode(id)).await }))
        .route("/v1/nodes/{id}/cordon", post(|State(a): State<Api>, Path(id): Path<String>| async move { call(&a, Op::Cordon(id, true)).await }))
        .route("/v1/nodes/{id}/uncordon", post(|State(a): State<Api>, Path(id): Path<String>| async move { call(&a, Op::Cordon(id, false)).await }))
        .route("/v1/nodes/{id}/adopt", post(|State(a): State<Api>, Path(id): Path<String>| async move { call(&a, Op::Adopt(id)).await }))
        .route("/v1/nodes/{id}/drain", post(|State(a): State<Api>, Path(id): Path<String>| async move { call(&a, Op::Drain(id)).await }))
        .route(
            "/v1/instances",
            get(|State(a): State<Api>| async move { call(&a, Op::ListInstances).await })
                .post(|State(a): State<Api>, body: Result<Json<CreateBody>, axum::extract::rejection::JsonRejection>| async move {
                    match body {
                        Ok(Json(b)) => call(&a, Op::Create(Box::new(b))).await.map(|v| (StatusCode::CREATED, v)),
                        Err(e) => Err(ApiError { status: 400, message: e.body_text() }),
                    }
                }),
        )
        .route(
            "/v1/instances/{key}",
            get(|State(a): State<Api>, Path(k): Path<String>| async move { call(&a, Op::GetInstance(k)).await })
                .delete(|State(a): State<Api>, Path(k): Path<String>| async move { call(&a, Op::Delete(k)).await }),
        )
        .route("/v1/instances/{key}/stop", post(|State(a): State<Api>, Path(k): Path<String>| async move { call(&a, Op::Stop(k)).await }))
        .route("/v1/instances/{key}/start", post(|State(a): State<Api>, Path(k): Path<String>| async move { call(&a, Op::Start(k)).await }))
        .route("/v1/instances/{key}/reboot", post(|State(a): State<Api>, Path(k): Path<String>| async move { call(&a, Op::Reboot(k)).await }))
        .fallback(|| async { ApiError { status: 404, message: "no such endpoint (see README: HTTP API)".into() } })
        .layer(middleware::from_fn_with_state(api.clone(), auth))
        .with_state(api)
}
