//! PeakEWMA learns from requests that never finish: a response future dropped by a client
//! timeout records the time it waited, so a hanging endpoint stops looking idle.

use std::time::Duration;

use tower::{service_fn, BoxError, Service, ServiceExt};
use tower_lb::strategy::PowerOfTwoChoices;
use tower_lb::{discover, Balance};

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_hanging_endpoint_is_avoided_after_client_timeouts() {
    let endpoints = (0..4usize).map(|id| {
        let svc = service_fn(move |_: ()| async move {
            if id == 0 {
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
            Ok::<_, BoxError>(id)
        });
        (id, svc)
    });
    let balance = Balance::new(discover::fixed(endpoints), PowerOfTwoChoices::peak_ewma());
    let workers: Vec<_> = (0..8)
        .map(|_| {
            let mut balance = balance.clone();
            tokio::spawn(async move {
                let mut timeouts = 0;
                for _ in 0..100 {
                    let call = balance.ready().await.unwrap().call(());
                    if tokio::time::timeout(Duration::from_millis(200), call)
                        .await
                        .is_err()
                    {
                        timeouts += 1;
                    }
                }
                timeouts
            })
        })
        .collect();
    let mut timeouts = 0;
    for worker in workers {
        timeouts += worker.await.unwrap();
    }
    let stats = balance.stats();
    assert_eq!(stats.in_flight(), 0, "timed-out requests were counted down");
    let hanging = stats.get(&0).unwrap().picks;
    assert_eq!(
        hanging, timeouts,
        "every request to the hanging endpoint timed out"
    );
    // Without the timeout samples its estimate would never rise, and P2C would keep sending
    // it one in every few requests whenever it has nothing in flight.
    assert!(
        timeouts <= 16,
        "{timeouts} of 800 requests went to the hanging endpoint"
    );
}
