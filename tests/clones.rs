//! Clones: what a clone costs, what it copies, that it is `Send + Sync`, that a reserved
//! request never reaches an endpoint that left, and that a failed discovery task is reported.

mod common;

use std::convert::Infallible;
use std::future::{ready, Ready};
use std::sync::atomic::{AtomicBool, AtomicIsize, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use common::{settle, Echo, Held};
use tower::util::BoxCloneSyncService;
use tower::{BoxError, Layer, Service, ServiceExt};
use tower_lb::health::OutlierDetection;
use tower_lb::{
    discover,
    key::key_fn,
    strategy::{ConsistentHash, RoundRobin},
    weight::Weight,
    Balance, BalanceLayer, Error,
};
use tower_test::mock;

/// Counts its live copies: made by `Clone`, ended by `Drop`.
#[derive(Debug)]
struct Counted {
    id: usize,
    copies: Arc<Copies>,
}

#[derive(Debug, Default)]
struct Copies {
    made: AtomicUsize,
    live: AtomicIsize,
}

impl Copies {
    fn made(&self) -> usize {
        self.made.load(Ordering::SeqCst)
    }

    fn live(&self) -> isize {
        self.live.load(Ordering::SeqCst)
    }
}

impl Counted {
    fn new(id: usize, copies: &Arc<Copies>) -> Self {
        copies.live.fetch_add(1, Ordering::SeqCst);
        Self {
            id,
            copies: Arc::clone(copies),
        }
    }
}

impl Clone for Counted {
    fn clone(&self) -> Self {
        self.copies.made.fetch_add(1, Ordering::SeqCst);
        Self::new(self.id, &self.copies)
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.copies.live.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Service<()> for Counted {
    type Response = usize;
    type Error = Infallible;
    type Future = Ready<Result<usize, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, (): ()) -> Self::Future {
        ready(Ok(self.id))
    }
}

fn counted(n: usize) -> (Arc<Copies>, Vec<(usize, Counted)>) {
    let copies = Arc::new(Copies::default());
    let endpoints = (0..n).map(|i| (i, Counted::new(i, &copies))).collect();
    (copies, endpoints)
}

#[tokio::test(flavor = "current_thread")]
async fn a_clone_per_request_copies_one_service_whatever_the_number_of_endpoints() {
    for n in [2, 4096] {
        let (copies, endpoints) = counted(n);
        let balance = Balance::new(discover::fixed(endpoints), RoundRobin::new());
        let made = copies.made();
        let mut seen = Vec::new();
        for _ in 0..8 {
            seen.push(balance.clone().oneshot(()).await.unwrap());
        }
        // Each request copies at most the one service it uses; a dropped clone leaves its
        // copy as that endpoint's spare, which the next clone to use the endpoint takes.
        let used = n.min(8);
        assert_eq!(
            copies.made() - made,
            used,
            "N = {n}: one copy per endpoint used, then its spare"
        );
        assert_eq!(
            copies.live(),
            (n + used) as isize,
            "N = {n}: the table's services and one spare of each endpoint used"
        );
        // Clones made one after another continue one rotation.
        let first = seen[0];
        assert!(
            seen.iter()
                .enumerate()
                .all(|(k, &id)| id == (first + k) % n),
            "N = {n}: {seen:?}"
        );
    }
}

/// An endpoint whose readiness holds something, as a `Buffer`'s does: while its gate is shut,
/// `poll_ready` queues (one place, held until it is ready or dropped); once open, it takes a
/// permit, which `call` spends and a drop gives back. `held` counts places and permits held.
#[derive(Debug)]
struct Permits {
    held: Arc<AtomicIsize>,
    copies: Arc<Copies>,
    gate: Arc<AtomicBool>,
    queued: bool,
    reserved: bool,
}

impl Permits {
    fn new(held: &Arc<AtomicIsize>, copies: &Arc<Copies>, gate: &Arc<AtomicBool>) -> Self {
        copies.live.fetch_add(1, Ordering::SeqCst);
        Self {
            held: Arc::clone(held),
            copies: Arc::clone(copies),
            gate: Arc::clone(gate),
            queued: false,
            reserved: false,
        }
    }
}

impl Clone for Permits {
    fn clone(&self) -> Self {
        self.copies.made.fetch_add(1, Ordering::SeqCst);
        Self::new(&self.held, &self.copies, &self.gate)
    }
}

impl Drop for Permits {
    fn drop(&mut self) {
        self.copies.live.fetch_sub(1, Ordering::SeqCst);
        let held = isize::from(self.reserved) + isize::from(self.queued);
        self.held.fetch_sub(held, Ordering::SeqCst);
    }
}

impl Service<()> for Permits {
    type Response = ();
    type Error = Infallible;
    type Future = Ready<Result<(), Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        if !self.gate.load(Ordering::SeqCst) {
            if !self.queued {
                self.queued = true;
                self.held.fetch_add(1, Ordering::SeqCst);
            }
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        if self.queued {
            self.queued = false;
            self.held.fetch_sub(1, Ordering::SeqCst);
        }
        if !self.reserved {
            self.reserved = true;
            self.held.fetch_add(1, Ordering::SeqCst);
        }
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, (): ()) -> Self::Future {
        assert!(self.reserved, "called without poll_ready");
        self.reserved = false;
        self.held.fetch_sub(1, Ordering::SeqCst);
        ready(Ok(()))
    }
}

/// Endpoints `0..gates.len()` whose gates are open as given, and their shared counters.
struct PermitSet {
    held: Arc<AtomicIsize>,
    copies: Arc<Copies>,
    gates: Vec<Arc<AtomicBool>>,
    endpoints: Vec<(usize, Permits)>,
}

fn permits(gates: &[bool]) -> PermitSet {
    let held = Arc::new(AtomicIsize::new(0));
    let copies = Arc::new(Copies::default());
    let gates: Vec<_> = gates
        .iter()
        .map(|&open| Arc::new(AtomicBool::new(open)))
        .collect();
    let endpoints = gates
        .iter()
        .enumerate()
        .map(|(i, gate)| (i, Permits::new(&held, &copies, gate)))
        .collect();
    PermitSet {
        held,
        copies,
        gates,
        endpoints,
    }
}

fn held(held: &AtomicIsize) -> isize {
    held.load(Ordering::SeqCst)
}

/// Drops `balance` (and what goes with it) and checks that every copy of every service,
/// spares included, went with it.
async fn all_copies_go_with<B>(balance: B, copies: &Copies) {
    drop(balance);
    settle().await;
    assert_eq!(copies.live(), 0, "every copy dropped with the balancer");
}

#[tokio::test(flavor = "current_thread")]
async fn a_copy_readied_but_not_called_is_dropped_not_left_as_a_spare() {
    let set = permits(&[true]);
    let balance = Balance::new(discover::fixed(set.endpoints), RoundRobin::new());

    // A clone that readies the endpoint and is dropped without calling: its copy holds a
    // permit, so it is dropped, and the permit with it.
    let mut clone = balance.clone();
    clone.ready().await.unwrap();
    assert_eq!(held(&set.held), 1);
    drop(clone);
    assert_eq!(held(&set.held), 0, "the permit was released");
    assert_eq!(set.copies.live(), 1, "no spare kept");

    // A clone that calls leaves its spent copy as the spare, and the next one takes it.
    balance.clone().oneshot(()).await.unwrap();
    assert_eq!(set.copies.live(), 2, "the spare is kept");
    let made = set.copies.made();
    for _ in 0..10 {
        balance.clone().oneshot(()).await.unwrap();
    }
    assert_eq!(set.copies.made(), made, "ten clones took the spare in turn");
    assert_eq!(held(&set.held), 0);

    // Dropping the balancer drops the service and its spare.
    all_copies_go_with(balance, &set.copies).await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_copy_left_pending_is_dropped_not_left_as_a_spare() {
    // Endpoint 0 stays pending (its copies queue); round-robin passes to endpoint 1.
    let set = permits(&[false, true]);
    let balance = Balance::new(discover::fixed(set.endpoints), RoundRobin::new());
    for request in 0..10 {
        balance.clone().oneshot(()).await.unwrap();
        assert_eq!(
            held(&set.held),
            0,
            "request {request}: the clone that queued on endpoint 0 dropped that copy"
        );
    }
    all_copies_go_with(balance, &set.copies).await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_reservation_dropped_for_a_new_table_is_not_left_as_a_spare() {
    let set = permits(&[true, true]);
    let (handle, source) = discover::channel();
    for (key, service) in set.endpoints {
        handle.insert(key, service);
    }
    let balance = Balance::new(source, RoundRobin::new());
    settle().await;
    let mut clone = balance.clone();
    // Reserve one endpoint; a new table comes; readying again reserves the next one, and the
    // request goes there. The first copy stays readied, never called.
    clone.ready().await.unwrap();
    balance
        .handle()
        .set_weight(&0, Weight::new(2).unwrap())
        .unwrap();
    settle().await;
    clone.ready().await.unwrap().call(()).await.unwrap();
    assert_eq!(held(&set.held), 1, "the first reservation is still held");
    drop(clone);
    assert_eq!(held(&set.held), 0, "and released with its copy");
    all_copies_go_with((balance, handle), &set.copies).await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_keyed_copy_not_ready_at_call_is_not_left_as_a_spare() {
    let set = permits(&[false]);
    let balance = BalanceLayer::new(ConsistentHash::maglev())
        .key(key_fn(|_: &()| Some(b"k")))
        .layer(discover::fixed(set.endpoints));
    let mut clone = balance.clone();
    let response = clone.ready().await.unwrap().call(());
    // Not ready at `call`: the response future readies a copy of its own.
    assert!(held(&set.held) >= 1, "the clone's copy queued");
    drop(response);
    drop(clone);
    assert_eq!(held(&set.held), 0, "the queued copy went with the clone");
    // Once the endpoint is ready, clones made per request reuse one spare again.
    set.gates[0].store(true, Ordering::SeqCst);
    balance.clone().oneshot(()).await.unwrap();
    let made = set.copies.made();
    for _ in 0..5 {
        balance.clone().oneshot(()).await.unwrap();
    }
    assert_eq!(set.copies.made(), made);
    assert_eq!(held(&set.held), 0);
}

/// Clones made per request on two threads at once pass spares between them: every copy made
/// is dropped exactly once, and at most one spare per endpoint outlives the requests.
#[test]
fn clones_per_request_on_two_threads_share_spares_without_loss() {
    const N: usize = 4;
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (copies, endpoints) = counted(N);
    let balance = {
        let _entered = runtime.enter();
        Balance::new(discover::fixed(endpoints), RoundRobin::new())
    };
    let threads: Vec<_> = (0..2)
        .map(|_| {
            let balance = balance.clone();
            std::thread::spawn(move || {
                for _ in 0..5_000 {
                    let id = futures::executor::block_on(balance.clone().oneshot(())).unwrap();
                    assert!(id < N);
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    let live = copies.live();
    assert!(
        (N as isize..=2 * N as isize).contains(&live),
        "{live} live copies: the services and at most a spare each"
    );
    drop(balance);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while copies.live() != 0 && std::time::Instant::now() < deadline {
        std::thread::yield_now();
    }
    assert_eq!(copies.live(), 0, "every copy dropped once the balancer is");
    drop(runtime);
}

#[tokio::test(flavor = "current_thread")]
async fn a_long_lived_clone_keeps_its_copies_across_tables_and_drops_only_what_left() {
    let (copies, endpoints) = counted(64);
    let (handle, source) = discover::channel();
    for (key, service) in endpoints {
        handle.insert(key, service);
    }
    let balance = Balance::new(source, RoundRobin::new());
    settle().await;
    let mut clone = balance.clone();
    for _ in 0..64 {
        clone.ready().await.unwrap().call(()).await.unwrap();
    }
    let after_warm_up = copies.made();
    assert_eq!(
        copies.live(),
        64 + 64,
        "the table's services and one copy of each"
    );

    // A reweight publishes a new table: the clone keeps every copy.
    balance
        .handle()
        .set_weight(&7, Weight::new(3).unwrap())
        .unwrap();
    settle().await;
    for _ in 0..64 {
        clone.ready().await.unwrap().call(()).await.unwrap();
    }
    assert_eq!(copies.made(), after_warm_up, "no service copied again");

    // Removing two endpoints drops exactly their copies.
    handle.remove(3);
    handle.remove(40);
    settle().await;
    clone.ready().await.unwrap();
    assert_eq!(copies.live(), 62 + 62);
    for _ in 0..62 {
        let id = clone.ready().await.unwrap().call(()).await.unwrap();
        assert!(id != 3 && id != 40);
    }
    assert_eq!(copies.made(), after_warm_up, "nothing copied again");

    // Replacing a service: the clone copies the new one, once, and drops the old copy.
    let replacement = Counted::new(1000, &copies);
    handle.insert(5, replacement);
    settle().await;
    let mut answers = Vec::new();
    for _ in 0..62 {
        answers.push(clone.ready().await.unwrap().call(()).await.unwrap());
    }
    assert!(
        answers.contains(&1000) && !answers.contains(&5),
        "{answers:?}"
    );
    assert_eq!(copies.made(), after_warm_up + 1);
    assert_eq!(copies.live(), 62 + 62);
}

fn assert_send_sync<T: Send + Sync + 'static>(_: &T) {}

#[tokio::test(flavor = "current_thread")]
async fn balance_is_send_and_sync_and_fits_a_box_clone_sync_service() {
    let boxed = (0..3).map(|i| {
        let service: BoxCloneSyncService<(), usize, BoxError> =
            BoxCloneSyncService::new(ServiceExt::<()>::map_err(Echo(i), BoxError::from));
        (i, service)
    });
    let balance = Balance::new(discover::fixed(boxed), RoundRobin::new());
    assert_send_sync(&balance);

    let functions = (0..3).map(|i| {
        (
            i,
            tower::service_fn(move |()| async move { Ok::<_, Infallible>(i) }),
        )
    });
    let balance = BalanceLayer::new(ConsistentHash::maglev())
        .key(key_fn(|_: &()| Some(b"k")))
        .layer(discover::fixed(functions));
    assert_send_sync(&balance);
    // As a type-erased, shareable service.
    let mut erased = BoxCloneSyncService::new(balance);
    let arc = Arc::new(erased.clone());
    assert_send_sync(&arc);
    assert!(erased.ready().await.unwrap().call(()).await.unwrap() < 3);
}

/// The usual axum program: the balanced client in the router's state, cloned per request by
/// the handler.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_axum_handler_clones_the_balancer_from_state_per_request() {
    use axum::extract::State;
    use axum::routing::get;

    type Client = Balance<usize, Echo, RoundRobin>;

    async fn handler(State(client): State<Client>) -> String {
        let id = client.clone().oneshot(()).await.unwrap();
        format!("backend {id}")
    }

    let client: Client = Balance::new(
        discover::fixed((0..3).map(|i| (i, Echo(i)))),
        RoundRobin::new(),
    );
    let app = axum::Router::new()
        .route("/", get(handler))
        .with_state(client.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let http = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let mut seen = [0; 3];
    for _ in 0..30 {
        let response = tokio::time::timeout(
            Duration::from_secs(10),
            http.get(format!("http://{addr}/").parse().unwrap()),
        )
        .await
        .expect("answered in time")
        .unwrap();
        use http_body_util::BodyExt;
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let text = std::str::from_utf8(&body).unwrap();
        let id: usize = text.trim_start_matches("backend ").parse().unwrap();
        seen[id] += 1;
    }
    // Clones made one after another rotate; axum may clone the state beyond the handler's
    // clone now and then, which skips a step.
    assert!(seen.iter().all(|&n| (8..=12).contains(&n)), "{seen:?}");
    assert_eq!(client.stats().picks(), 30);
    assert_eq!(client.stats().in_flight(), 0);
    server.abort();
}

type Mock = mock::Mock<(), usize>;
type MockHandle = mock::Handle<(), usize>;

/// A balancer over mock endpoints `a` and `b` from a channel, the discovery handle, and the
/// mocks' handles.
async fn two_mocks() -> (
    Balance<&'static str, Mock, RoundRobin>,
    discover::DiscoverHandle<&'static str, Mock>,
    MockHandle,
    MockHandle,
) {
    let (a, a_handle) = mock::pair::<(), usize>();
    let (b, b_handle) = mock::pair::<(), usize>();
    let (handle, source) = discover::channel();
    handle.insert("a", a);
    handle.insert("b", b);
    let balance = Balance::new(source, RoundRobin::new());
    settle().await;
    (balance, handle, a_handle, b_handle)
}

/// Polls until the balancer is ready; `a` is the only endpoint allowed a request.
async fn reserve_a<S: Service<(), Error = BoxError>>(balance: &mut S, b: &mut MockHandle) {
    b.allow(0);
    tokio::time::timeout(Duration::from_secs(1), balance.ready())
        .await
        .expect("ready at once")
        .unwrap();
}

/// The request arrives at `to` (answered with `answer`) and never at `not`.
async fn arrives<F>(future: F, to: &mut MockHandle, not: &mut MockHandle, answer: usize)
where
    F: std::future::Future<Output = Result<usize, BoxError>> + Send + 'static,
{
    let response = tokio::spawn(future);
    let ((), reply) = tokio::time::timeout(Duration::from_secs(1), to.next_request())
        .await
        .expect("the request reaches the other endpoint")
        .expect("a request");
    reply.send_response(answer);
    assert_eq!(response.await.unwrap().unwrap(), answer);
    assert!(
        nothing_arrives(not).await,
        "nothing reached the endpoint that left"
    );
}

/// Whether no request reaches the mock within 50 ms (of paused time); a mock whose every
/// copy was dropped receives nothing either.
async fn nothing_arrives(mock: &mut MockHandle) -> bool {
    matches!(
        tokio::time::timeout(Duration::from_millis(50), mock.next_request()).await,
        Err(_) | Ok(None)
    )
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_request_reserved_on_a_removed_endpoint_goes_elsewhere() {
    let (mut balance, handle, mut a, mut b) = two_mocks().await;
    reserve_a(&mut balance, &mut b).await;
    handle.remove("a");
    settle().await;
    b.allow(1);
    arrives(balance.call(()), &mut b, &mut a, 2).await;
    let stats = balance.stats();
    assert_eq!(stats.get(&"b").unwrap().picks, 1);
    assert_eq!(stats.picks(), 1, "nothing counted for a");
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn an_endpoint_inserted_in_the_removed_ones_slot_is_not_mistaken_for_it() {
    let (mut balance, handle, mut a, mut b) = two_mocks().await;
    reserve_a(&mut balance, &mut b).await;
    handle.remove("a");
    let (c, mut c_handle) = mock::pair::<(), usize>();
    handle.insert("c", c);
    settle().await;
    // Only `c` may take a request: it has `a`'s slot, and a fresh copy of its own service.
    arrives(balance.call(()), &mut c_handle, &mut a, 3).await;
    assert!(nothing_arrives(&mut b).await);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_request_reserved_on_a_replaced_service_goes_to_the_new_one() {
    let (mut balance, handle, mut a, mut b) = two_mocks().await;
    reserve_a(&mut balance, &mut b).await;
    let (a2, mut a2_handle) = mock::pair::<(), usize>();
    handle.insert("a", a2);
    settle().await;
    arrives(balance.call(()), &mut a2_handle, &mut a, 7).await;
    assert_eq!(
        balance.stats().get(&"a").unwrap().picks,
        1,
        "same endpoint, counters kept"
    );
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_request_reserved_on_a_drained_endpoint_goes_elsewhere_and_the_drain_ends() {
    let (mut balance, _handle, mut a, mut b) = two_mocks().await;
    reserve_a(&mut balance, &mut b).await;
    let drained = balance.handle().drain(&"a").unwrap();
    settle().await;
    b.allow(1);
    arrives(balance.call(()), &mut b, &mut a, 2).await;
    tokio::time::timeout(Duration::from_secs(1), drained)
        .await
        .expect("nothing was ever in flight to a");
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_keyed_request_whose_endpoint_was_removed_goes_to_the_next_one() {
    let (a, mut a_handle) = mock::pair::<(), usize>();
    let (b, mut b_handle) = mock::pair::<(), usize>();
    let (handle, source) = discover::channel();
    handle.insert("a", a);
    handle.insert("b", b);
    let mut balance = BalanceLayer::new(ConsistentHash::ring())
        .key(key_fn(|_: &()| Some(b"the-key")))
        .layer(source);
    settle().await;
    // Where does the key map?
    let first = tokio::spawn(balance.ready().await.unwrap().call(()));
    let (home, home_handle, other_handle) = tokio::select! {
        Some(((), reply)) = a_handle.next_request() => { reply.send_response(1); ("a", &mut a_handle, &mut b_handle) }
        Some(((), reply)) = b_handle.next_request() => { reply.send_response(2); ("b", &mut b_handle, &mut a_handle) }
    };
    first.await.unwrap().unwrap();

    balance.ready().await.unwrap();
    handle.remove(home);
    settle().await;
    arrives(balance.call(()), other_handle, home_handle, 9).await;
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_panicking_discovery_task_fails_requests_with_its_message() {
    let (handle, source) = discover::channel::<&'static str, Echo>();
    handle.insert("ok", Echo(1));
    let mut balance = BalanceLayer::new(RoundRobin::new())
        .wait_for_endpoints(Duration::from_secs(3600))
        .unwrap()
        .weigh_with(|key: &&str, _: &Echo| {
            assert!(*key != "bad", "the weigher exploded on {key}");
            Weight::ONE
        })
        .layer(source);
    let ready = ServiceExt::<()>::ready(&mut balance).await.unwrap();
    assert_eq!(ready.call(()).await.unwrap(), 1);

    // A clone waiting for endpoints is woken by the failure, not left to its deadline.
    handle.remove("ok");
    settle().await;
    let mut waiting = balance.clone();
    let waiter =
        tokio::spawn(async move { ServiceExt::<()>::ready(&mut waiting).await.map(|_| ()) });
    settle().await;
    handle.insert("bad", Echo(2));
    let started = tokio::time::Instant::now();
    let error = tokio::time::timeout(Duration::from_secs(1), waiter)
        .await
        .expect("the waiting clone is told at once")
        .unwrap()
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(1));
    match error.downcast_ref::<Error>() {
        Some(Error::DiscoveryFailed(message)) => {
            assert!(message.contains("the weigher exploded on bad"), "{message}")
        }
        other => panic!("expected DiscoveryFailed, got {other:?}"),
    }
    let error = ServiceExt::<()>::ready(&mut balance)
        .await
        .map(|_| ())
        .unwrap_err();
    assert!(
        error.to_string().contains("the weigher exploded on bad"),
        "{error}"
    );
    let failure = balance.stats().discovery_failure.expect("stats say so");
    assert!(failure.contains("the weigher exploded on bad"), "{failure}");
}

#[tokio::test(flavor = "current_thread")]
async fn a_panic_while_taking_in_the_first_endpoints_is_reported_too() {
    let endpoints = [("bad", Echo(0))];
    let balance = BalanceLayer::new(RoundRobin::new())
        .weigh_with(|key: &&str, _: &Echo| -> Weight { panic!("no weight for {key}") })
        .layer(discover::fixed(endpoints));
    let error = balance.oneshot(()).await.unwrap_err();
    assert!(
        matches!(error.downcast_ref::<Error>(), Some(Error::DiscoveryFailed(m)) if m.contains("no weight for bad")),
        "{error}"
    );
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn ejection_times_are_bounded_and_the_longest_does_not_stop_discovery() {
    /// Fails every request.
    #[derive(Clone)]
    struct Failing;
    impl Service<()> for Failing {
        type Response = usize;
        type Error = BoxError;
        type Future = Ready<Result<usize, BoxError>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, (): ()) -> Self::Future {
            ready(Err("down".into()))
        }
    }
    let (handle, source) = discover::channel::<usize, BoxCloneSyncService<(), usize, BoxError>>();
    handle.insert(0, BoxCloneSyncService::new(Failing));
    // An ejection time too long for the clock is refused where it is given…
    let error = BalanceLayer::new(RoundRobin::new())
        .outlier_detection(OutlierDetection::new().base_ejection_time(Duration::MAX))
        .unwrap_err();
    assert_eq!(error.setting(), "base_ejection_time");
    // …and the longest one accepted does not stop discovery either.
    let outlier = OutlierDetection::new()
        .consecutive_failures(1)
        .base_ejection_time(Duration::from_secs(24 * 60 * 60));
    let mut balance = BalanceLayer::new(RoundRobin::new())
        .outlier_detection(outlier)
        .unwrap()
        .panic_threshold(0.0)
        .unwrap()
        .layer(source);
    assert!(balance.ready().await.unwrap().call(()).await.is_err());
    settle().await;
    assert_eq!(
        balance.stats().get(&0).unwrap().status,
        tower_lb::EndpointStatus::Ejected
    );
    handle.insert(
        1,
        BoxCloneSyncService::new(ServiceExt::<()>::map_err(Echo(1), BoxError::from)),
    );
    settle().await;
    assert_eq!(balance.ready().await.unwrap().call(()).await.unwrap(), 1);
    assert!(balance.stats().discovery_failure.is_none());
}

#[tokio::test(flavor = "current_thread")]
async fn bounded_loads_hold_their_cap_when_every_request_uses_a_new_clone() {
    const N: usize = 8;
    const FACTOR: f64 = 1.25;
    for strategy in [ConsistentHash::maglev(), ConsistentHash::ring()] {
        let balance = BalanceLayer::new(strategy.bounded_load(FACTOR).unwrap())
            .key(key_fn(|_: &tokio::sync::oneshot::Receiver<()>| {
                Some(b"hot")
            }))
            .layer(discover::fixed((0..N).map(|i| (i, Held(i)))));
        let mut held = Vec::new();
        for i in 0..200u64 {
            let (release, request) = tokio::sync::oneshot::channel();
            let mut fresh = balance.clone();
            let response = fresh.ready().await.unwrap().call(request);
            drop(fresh);
            held.push((release, tokio::spawn(response)));
            let stats = balance.stats();
            let total = stats.in_flight();
            assert_eq!(total, i + 1);
            let cap = (FACTOR * total as f64 / N as f64 - 1e-9).ceil() as u64;
            for endpoint in &stats.endpoints {
                assert!(
                    endpoint.in_flight <= cap,
                    "endpoint {} has {} in flight, above the cap {cap} at {total}",
                    endpoint.key,
                    endpoint.in_flight
                );
            }
        }
        for (release, response) in held {
            release.send(()).unwrap();
            response.await.unwrap().unwrap();
        }
        assert_eq!(balance.stats().in_flight(), 0);
    }
}
