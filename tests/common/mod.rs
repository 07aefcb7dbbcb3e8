//! Endpoint services for the integration tests.
#![allow(dead_code, unreachable_pub)]

use std::convert::Infallible;
use std::future::{ready, Future, Ready};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tower::{BoxError, Service};

pub mod dnsmasq;
pub mod servers;

/// Answers its own id at once; always ready.
#[derive(Clone, Debug)]
pub struct Echo(pub usize);

impl<R> Service<R> for Echo {
    type Response = usize;
    type Error = Infallible;
    type Future = Ready<Result<usize, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: R) -> Self::Future {
        ready(Ok(self.0))
    }
}

/// `Echo` endpoints with these weights, keyed and answering by their index.
pub fn weighted(weights: &[u32]) -> Vec<(usize, tower_lb::weight::Weighted<Echo>)> {
    weights
        .iter()
        .enumerate()
        .map(|(id, &w)| {
            let weight = tower_lb::weight::Weight::new(w).unwrap();
            (id, tower_lb::weight::Weighted::new(Echo(id), weight))
        })
        .collect()
}

/// A readiness switch shared by every clone of a [`Gated`] service.
#[derive(Clone, Debug, Default)]
pub struct Gate {
    open: Arc<AtomicBool>,
    wakers: Arc<Mutex<Vec<Waker>>>,
}

impl Gate {
    pub fn closed() -> Self {
        Self::default()
    }

    pub fn open(&self) {
        self.open.store(true, Ordering::SeqCst);
        for waker in self.wakers.lock().unwrap().drain(..) {
            waker.wake();
        }
    }
}

/// Answers its id; ready only while its gate is open.
#[derive(Clone, Debug)]
pub struct Gated {
    pub id: usize,
    pub gate: Gate,
}

impl<R> Service<R> for Gated {
    type Response = usize;
    type Error = Infallible;
    type Future = Ready<Result<usize, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        if self.gate.open.load(Ordering::SeqCst) {
            return Poll::Ready(Ok(()));
        }
        self.gate.wakers.lock().unwrap().push(cx.waker().clone());
        if self.gate.open.load(Ordering::SeqCst) {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    }

    fn call(&mut self, _: R) -> Self::Future {
        ready(Ok(self.id))
    }
}

/// Fails `poll_ready` (every clone, every time).
#[derive(Clone, Debug)]
pub struct Broken;

impl<R> Service<R> for Broken {
    type Response = usize;
    type Error = BoxError;
    type Future = Ready<Result<usize, BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Err("connection refused".into()))
    }

    fn call(&mut self, _: R) -> Self::Future {
        panic!("a service that failed poll_ready must never be called");
    }
}

/// Answers its id when the request's oneshot receiver fires (or errors if it is dropped).
#[derive(Clone, Debug)]
pub struct Held(pub usize);

impl Service<tokio::sync::oneshot::Receiver<()>> for Held {
    type Response = usize;
    type Error = BoxError;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<usize, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, release: tokio::sync::oneshot::Receiver<()>) -> Self::Future {
        let id = self.0;
        Box::pin(async move {
            release.await.map_err(|_| "released without answer")?;
            Ok(id)
        })
    }
}

/// Lets the discovery task run (current-thread runtime).
pub async fn settle() {
    for _ in 0..8 {
        tokio::task::yield_now().await;
    }
}

/// Answers its id after `latency` on tokio's clock (at once for zero), or fails after it.
#[derive(Clone, Debug)]
pub struct Backend {
    pub id: usize,
    pub latency: Duration,
    pub fails: bool,
}

impl Backend {
    pub fn answers(id: usize, latency: Duration) -> Self {
        Self {
            id,
            latency,
            fails: false,
        }
    }

    pub fn fails_at_once(id: usize) -> Self {
        Self {
            id,
            latency: Duration::ZERO,
            fails: true,
        }
    }
}

impl Service<()> for Backend {
    type Response = usize;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<usize, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: ()) -> Self::Future {
        let Backend { id, latency, fails } = self.clone();
        Box::pin(async move {
            if !latency.is_zero() {
                tokio::time::sleep(latency).await;
            }
            if fails {
                Err("internal error".into())
            } else {
                Ok(id)
            }
        })
    }
}
