//! One clone's state: the table it uses, its copies of endpoint services, its picking state,
//! and what its `poll_ready` promised its `call`.
//!
//! A new clone costs O(1) whatever the number of endpoints: it starts from its parent's
//! table (when that is the newest) and copies an endpoint's service only when it first needs
//! to poll that endpoint, keeping its first two copies inline. A dropped clone gives the
//! copies it has called back to their endpoints as spares, which the next clone takes instead
//! of cloning the service (see [`Origin`](crate::control::table::Origin)). A long-lived clone
//! ends up with a copy per endpoint it has used, by slot, and keeps them across tables: a new
//! table costs it the services that were removed or replaced, not a copy of every service.

use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use tokio::sync::mpsc;
use tower::util::Oneshot;
use tower::BoxError;
use tower_service::Service;

use super::future::{ResponseFuture, Timed};
use super::wait::Waiting;
use super::Front;
#[cfg(test)]
use crate::control::table::Origin;
use crate::control::table::{Snapshot, Source, Table, FAILED};
use crate::control::{Message, Shared};
use crate::endpoint::clock::Clock;
use crate::error::Error;
use crate::key::MaybeKey;
use crate::strategy::{Endpoints, LocalState, PickContext, Picker};
use crate::util::sync::Arc;

/// Copies a new clone keeps inline, before it needs a table indexed by slot.
const FEW: usize = 2;

/// [`Local::version`] before the clone has a table.
pub(super) const NO_VERSION: u64 = u64::MAX;

/// What `poll_ready` promised `call`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Reserved {
    None,
    /// This endpoint (an index into the clone's table) reported ready.
    Endpoint(usize),
    /// The strategy is keyed: `call` picks, and readies the endpoint it picked.
    Keyed,
}

/// One clone's state; see the [module docs](self).
pub(super) struct Local<S, P: Picker> {
    /// The version of `snapshot`, or [`NO_VERSION`].
    pub(super) version: u64,
    pub(super) snapshot: Option<Arc<Snapshot<S, P>>>,
    copies: Copies<S>,
    pub(super) reserved: Reserved,
    /// What this table's requests measure, if anything (from the picker and the balancer).
    timed: Option<Timed>,
    /// The clock reading of the reserving pick, when requests are timed.
    picked_at: u64,
    /// The balancer's clock.
    clock: Clock,
    /// A request abandoned after this long counts as its endpoint's failure.
    abandon_after_ns: Option<u64>,
    pick: LocalState,
    picker_local: P::Local,
    /// The bounded wait for endpoints, while one runs.
    pub(super) wait: Option<Pin<Box<Waiting>>>,
    /// Where a keyed `poll_ready` looks first for an endpoint that may take the request: the
    /// endpoint of this clone's last keyed request, or the last one its search found. So a
    /// keyed `poll_ready` usually reads the state of an endpoint this clone has just used,
    /// not the first endpoint's, which every clone on every thread would read while that
    /// endpoint's own requests write it.
    usable_at: u32,
    /// A copy may have been polled without being called since: it was pending, or not ready
    /// for a keyed request, or the picker's first choice was not ready and others were polled,
    /// or a reservation was dropped for a new table. Such a copy may hold something for its
    /// readiness (a `Buffer` permit, a place in a queue), so the clone's copies are not left
    /// as spares when it is dropped. The usual request (first choice ready, called) leaves it
    /// clear. Not covered: a service that panics inside `poll_ready` or `call`; its copy may be
    /// left as a spare, and the clone that takes it polls it again before calling it, so no
    /// request is affected, but what its readiness held stays held until then (marking it
    /// around every call costs the request path about a nanosecond, measured).
    tainted: bool,
}

impl<S, P: Picker> Local<S, P> {
    /// The number of service copies this clone holds.
    pub(super) fn copies(&self) -> usize {
        self.copies.len()
    }
}

impl<S, P: Picker> Drop for Local<S, P> {
    /// Leaves this clone's copies as their endpoints' spares, for the next clone to take
    /// instead of cloning the service (see [`Origin`](crate::control::table::Origin)), unless
    /// one may hold something for its readiness.
    fn drop(&mut self) {
        if !std::mem::needs_drop::<S>() {
            // Plain data: never kept as a spare.
            return;
        }
        if self.tainted || matches!(self.reserved, Reserved::Endpoint(_)) {
            // A copy polled but not called (or reserved and never called) is dropped, so
            // that what its readiness holds is released.
            return;
        }
        if let Some(snapshot) = self.snapshot.as_deref() {
            self.copies.give_back(&snapshot.sources);
        }
    }
}

impl<S: Clone, P: Picker> Local<S, P> {
    /// A clone's state, starting from `snapshot` (of `version`) if it has one. Inline: a
    /// clone per request makes one per request, and a returned copy of it costs.
    #[inline]
    pub(super) fn new(
        pick: LocalState,
        version: u64,
        snapshot: Option<Arc<Snapshot<S, P>>>,
        clock: Clock,
        abandon_after_ns: Option<u64>,
    ) -> Self {
        let timed = snapshot
            .as_deref()
            .and_then(|s| Timed::new(clock, s.latency_rate, abandon_after_ns));
        Self {
            version,
            snapshot,
            copies: Copies::new(),
            reserved: Reserved::None,
            timed,
            picked_at: 0,
            clock,
            abandon_after_ns,
            pick,
            picker_local: P::Local::default(),
            wait: None,
            usable_at: u32::MAX,
            tainted: false,
        }
    }

    /// Moves to the newest table: drops the copies of services it no longer has (just those
    /// the table lists when the clone was one table behind, else by a sweep of the copies),
    /// and any reservation.
    pub(super) fn sync(&mut self, table: &Table<Snapshot<S, P>>) {
        let (version, snapshot) = table.load();
        if self.snapshot.is_some() && self.version.wrapping_add(1) == version {
            for &(slot, id) in snapshot.invalidated.iter() {
                self.copies.invalidate(slot, id);
            }
        } else {
            self.copies.retain(&snapshot.members);
        }
        self.timed = Timed::new(self.clock, snapshot.latency_rate, self.abandon_after_ns);
        self.snapshot = Some(snapshot);
        self.version = version;
        if let Reserved::Endpoint(_) = self.reserved {
            // That copy stays ready but uncalled.
            self.tainted = true;
        }
        self.reserved = Reserved::None;
        self.picker_local = P::Local::default();
    }

    /// Asks the picker (up to three times), then scans, for a ready endpoint.
    ///
    /// `Ready(Some(i))`: endpoint `i` is ready. `Ready(None)`: every endpoint has failed or is
    /// unavailable. `Pending`: some endpoint is pending and none is ready; each pending one
    /// will wake the task.
    ///
    /// The snapshot is borrowed, not cloned: an `Arc` clone per request would be two atomic
    /// operations on a cache line every clone on every thread shares.
    #[inline(always)]
    pub(super) fn pick_ready<Req>(
        &mut self,
        cx: &mut Context<'_>,
        messages: &mpsc::UnboundedSender<Message>,
    ) -> Poll<Option<usize>>
    where
        S: Service<Req>,
        S::Error: Into<BoxError>,
    {
        let Some(snapshot) = self.snapshot.as_deref() else {
            return Poll::Ready(None);
        };
        let endpoints = Endpoints::new(&snapshot.endpoints);
        let n = endpoints.len();
        if n == 0 {
            return Poll::Ready(None);
        }
        let now = match &self.timed {
            Some(timed) => {
                let now = timed.now();
                self.picked_at = now;
                now
            }
            None => 0,
        };
        // The common case, inline: the picker's first choice is ready.
        let mut pick_cx = PickContext::new(&mut self.pick, &mut self.picker_local);
        pick_cx.now = now;
        let first = snapshot.picker.pick(&endpoints, &mut pick_cx);
        let pending = match first {
            Some(index) if index < n => {
                match poll_endpoint::<S, P, Req>(
                    snapshot,
                    &mut self.copies,
                    &mut self.tainted,
                    index,
                    cx,
                    messages,
                ) {
                    Poll::Ready(true) => return Poll::Ready(Some(index)),
                    Poll::Ready(false) => false,
                    Poll::Pending => true,
                }
            }
            _ => return self.scan::<Req>(cx, messages, false),
        };
        self.pick_again::<Req>(now, pending, cx, messages)
    }

    /// The picker's first choice was not ready: ask it twice more, then scan.
    #[cold]
    #[inline(never)]
    fn pick_again<Req>(
        &mut self,
        now: u64,
        mut pending: bool,
        cx: &mut Context<'_>,
        messages: &mpsc::UnboundedSender<Message>,
    ) -> Poll<Option<usize>>
    where
        S: Service<Req>,
        S::Error: Into<BoxError>,
    {
        let Some(snapshot) = self.snapshot.as_deref() else {
            return Poll::Ready(None);
        };
        let endpoints = Endpoints::new(&snapshot.endpoints);
        let n = endpoints.len();
        for _ in 0..2 {
            let mut pick_cx = PickContext::new(&mut self.pick, &mut self.picker_local);
            pick_cx.now = now;
            let Some(index) = snapshot.picker.pick(&endpoints, &mut pick_cx) else {
                break;
            };
            if index >= n {
                break;
            }
            match poll_endpoint::<S, P, Req>(
                snapshot,
                &mut self.copies,
                &mut self.tainted,
                index,
                cx,
                messages,
            ) {
                Poll::Ready(true) => return Poll::Ready(Some(index)),
                Poll::Ready(false) => {}
                Poll::Pending => pending = true,
            }
        }
        self.scan::<Req>(cx, messages, pending)
    }

    /// Polls every endpoint from a random one on for one that is ready; `pending` says
    /// whether one polled before was pending.
    #[cold]
    #[inline(never)]
    fn scan<Req>(
        &mut self,
        cx: &mut Context<'_>,
        messages: &mpsc::UnboundedSender<Message>,
        mut pending: bool,
    ) -> Poll<Option<usize>>
    where
        S: Service<Req>,
        S::Error: Into<BoxError>,
    {
        let Some(snapshot) = self.snapshot.as_deref() else {
            return Poll::Ready(None);
        };
        let n = snapshot.endpoints.len();
        if n == 0 {
            return Poll::Ready(None);
        }
        let start = self.pick.rng.below(n);
        for offset in 0..n {
            let index = (start + offset) % n;
            match poll_endpoint::<S, P, Req>(
                snapshot,
                &mut self.copies,
                &mut self.tainted,
                index,
                cx,
                messages,
            ) {
                Poll::Ready(true) => return Poll::Ready(Some(index)),
                Poll::Ready(false) => {}
                Poll::Pending => pending = true,
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(None)
        }
    }

    /// Whether any endpoint of the table may take a keyed request from this clone.
    ///
    /// Looks first at [`Local::usable_at`], usually an endpoint this clone has just used; the
    /// full search is out of line.
    #[inline]
    pub(super) fn any_usable(&mut self) -> bool {
        let Some(snapshot) = self.snapshot.as_deref() else {
            return false;
        };
        let at = self.usable_at as usize;
        if at < snapshot.endpoints.len() && may_take(snapshot, &self.copies, at) {
            return true;
        }
        self.find_usable()
    }

    /// [`Local::any_usable`], not inlined: for strategies that are only sometimes keyed.
    #[inline(never)]
    pub(super) fn any_usable_out_of_line(&mut self) -> bool {
        self.any_usable()
    }

    /// [`Local::any_usable`]'s search: every endpoint, from one chosen by the clone's number
    /// (so that clones do not all start at the first), remembering the one found.
    #[cold]
    #[inline(never)]
    fn find_usable(&mut self) -> bool {
        let Some(snapshot) = self.snapshot.as_deref() else {
            return false;
        };
        let n = snapshot.endpoints.len();
        let start = crate::util::rng::split(crate::key::mix64(self.pick.cursor), n).0;
        let found = (0..n)
            .map(|k| (start + k) % n)
            .find(|&index| may_take(snapshot, &self.copies, index));
        if let Some(index) = found {
            self.usable_at = index as u32;
        }
        found.is_some()
    }

    /// Sends `request` where `poll_ready` reserved, or, for keyed strategies, where its key
    /// maps. If that endpoint was removed, drained or ejected since, or its service replaced,
    /// the request goes to another one instead (readied in the response future), never to
    /// that endpoint's old service.
    #[inline(always)]
    pub(super) fn call<K, Kx, C, Req>(
        &mut self,
        request: Req,
        shared: &Shared<K, S, P, Front<Kx>>,
        completion: &C,
    ) -> ResponseFuture<S, Req, C>
    where
        S: Service<Req>,
        Kx: MaybeKey<Req>,
        C: Clone,
    {
        let reserved = std::mem::replace(&mut self.reserved, Reserved::None);
        match reserved {
            Reserved::Endpoint(index) => match self.call_reserved(index, request, completion) {
                Ok(future) => future,
                Err(request) => self.redirect(request, None, shared, completion),
            },
            Reserved::Keyed => self.call_keyed(request, shared, completion),
            Reserved::None => ResponseFuture::failed(Error::NotReady, completion.clone()),
        }
    }

    /// Sends a keyed request where its key maps.
    #[inline(always)]
    fn call_keyed<K, Kx, C, Req>(
        &mut self,
        request: Req,
        shared: &Shared<K, S, P, Front<Kx>>,
        completion: &C,
    ) -> ResponseFuture<S, Req, C>
    where
        S: Service<Req>,
        Kx: MaybeKey<Req>,
        C: Clone,
    {
        let Some(snapshot) = self.snapshot.as_deref() else {
            return ResponseFuture::failed(Error::NotReady, completion.clone());
        };
        let mut hasher = snapshot.picker.key_hasher();
        let key_hash = shared
            .front
            .key
            .hash_key(&request, &mut hasher)
            .then(|| hasher.finish());
        let Some(index) = self.pick(key_hash) else {
            // No choice: for a request without a key, say so.
            let error = if key_hash.is_none() {
                Error::MissingKey
            } else {
                Error::NoEndpoints
            };
            return ResponseFuture::failed(error, completion.clone());
        };
        self.usable_at = index as u32;
        match self.dispatch(index, request, false, completion) {
            Ok(future) => future,
            Err(request) => self.redirect(request, key_hash, shared, completion),
        }
    }

    /// Calls the copy `poll_ready` readied, unless its endpoint became unavailable since;
    /// then the request comes back.
    #[inline(always)]
    fn call_reserved<Req, C: Clone>(
        &mut self,
        index: usize,
        request: Req,
        completion: &C,
    ) -> Result<ResponseFuture<S, Req, C>, Req>
    where
        S: Service<Req>,
    {
        let Some(snapshot) = self.snapshot.as_deref() else {
            return Err(request);
        };
        let (Some(handle), Some(source)) =
            (snapshot.endpoints.get(index), snapshot.sources.get(index))
        else {
            return Err(request);
        };
        let Some(service) = self.copies.live(source.slot, source.id) else {
            return Err(request);
        };
        let Some(guard) = handle.try_dispatch(snapshot.unavailable, source.id) else {
            // The copy stays ready but uncalled.
            self.tainted = true;
            return Err(request);
        };
        let timing = self.timed.map(|timed| timed.start(self.picked_at));
        Ok(ResponseFuture::called(
            service.call(request),
            guard,
            timing,
            completion.clone(),
        ))
    }

    /// Sends `request` to endpoint `index` without a reservation, through this clone's copy
    /// of its service: called at once if it is ready; else readied by the response future,
    /// unless `ready_now` asks for an endpoint that is ready at once. The request comes back
    /// if the endpoint is unavailable (or not ready, with `ready_now`).
    #[inline(always)]
    fn dispatch<Req, C: Clone>(
        &mut self,
        index: usize,
        request: Req,
        ready_now: bool,
        completion: &C,
    ) -> Result<ResponseFuture<S, Req, C>, Req>
    where
        S: Service<Req>,
    {
        let Some(snapshot) = self.snapshot.as_deref() else {
            return Err(request);
        };
        let (Some(handle), Some(source)) =
            (snapshot.endpoints.get(index), snapshot.sources.get(index))
        else {
            return Err(request);
        };
        let unavailable = snapshot.unavailable;
        if handle.flags() & unavailable != 0 || !handle.serves(source.id) {
            return Err(request);
        }
        let copy = self
            .copies
            .get_or_copy(source, index, snapshot.members.len());
        let Some(service) = copy.service.as_mut() else {
            return Err(request);
        };
        let mut noop = Context::from_waker(Waker::noop());
        let ready = matches!(service.poll_ready(&mut noop), Poll::Ready(Ok(())));
        if !ready {
            // Not ready: its readiness may hold a place in a queue.
            self.tainted = true;
            if ready_now {
                return Err(request);
            }
        }
        let Some(guard) = handle.try_dispatch(unavailable, source.id) else {
            // Ready and not called.
            self.tainted = true;
            return Err(request);
        };
        let timing = self.timed.map(|timed| timed.start(timed.now()));
        Ok(if ready {
            ResponseFuture::called(service.call(request), guard, timing, completion.clone())
        } else {
            // Not ready (or failing): the response future readies a clone of it, so the
            // request still goes where it was sent, and a failure is counted there.
            ResponseFuture::readying(
                Oneshot::new(service.clone(), request),
                guard,
                timing,
                completion.clone(),
            )
        })
    }

    /// The endpoint a request was meant for became unavailable: move to the newest table
    /// (which leaves that endpoint out once published) and choose again. A keyed request goes
    /// where its key maps in that table; otherwise, and if that endpoint is unavailable too,
    /// the picker's choices and then every endpoint in turn (after the key's endpoint, or
    /// from a random one) are tried, first for one that is ready at once, then for any.
    fn redirect<K, Kx, C, Req>(
        &mut self,
        mut request: Req,
        key_hash: Option<u64>,
        shared: &Shared<K, S, P, Front<Kx>>,
        completion: &C,
    ) -> ResponseFuture<S, Req, C>
    where
        S: Service<Req>,
        C: Clone,
    {
        let version = shared.table.version();
        if version & FAILED != 0 {
            return ResponseFuture::failed(shared.failure(), completion.clone());
        }
        if version != self.version {
            self.sync(&shared.table);
        }
        let n = self.snapshot.as_ref().map_or(0, |s| s.endpoints.len());
        if n == 0 {
            return ResponseFuture::failed(Error::NoEndpoints, completion.clone());
        }
        let mut choices = [None; 3];
        if key_hash.is_some() {
            choices[0] = self.pick(key_hash);
            if let Some(home) = choices[0] {
                match self.dispatch(home, request, false, completion) {
                    Ok(future) => return future,
                    Err(back) => request = back,
                }
            }
        } else {
            for choice in &mut choices {
                *choice = self.pick(None);
            }
        }
        let start = match (key_hash, choices[0]) {
            (Some(_), Some(home)) => home + 1,
            _ => self.pick.rng.below(n),
        };
        let candidates = choices
            .into_iter()
            .flatten()
            .chain((0..n).map(|offset| (start + offset) % n));
        for ready_now in [true, false] {
            for index in candidates.clone() {
                match self.dispatch(index, request, ready_now, completion) {
                    Ok(future) => return future,
                    Err(back) => request = back,
                }
            }
        }
        ResponseFuture::failed(Error::NoEndpoints, completion.clone())
    }

    /// Asks the picker for one choice, with the request's key hash for keyed pickers.
    #[inline(always)]
    fn pick(&mut self, key_hash: Option<u64>) -> Option<usize> {
        let snapshot = self.snapshot.as_deref()?;
        let endpoints = Endpoints::new(&snapshot.endpoints);
        if endpoints.is_empty() {
            return None;
        }
        let mut cx = PickContext::new(&mut self.pick, &mut self.picker_local);
        cx.key_hash = key_hash;
        if snapshot.latency_rate.is_some() {
            cx.now = self.clock.now_ns();
        }
        snapshot
            .picker
            .pick(&endpoints, &mut cx)
            .filter(|&index| index < endpoints.len())
    }
}

/// Whether endpoint `index` (below the table's length) may take a request from the clone
/// with these copies: it is available and the clone's copy of its service has not failed.
#[inline(always)]
fn may_take<S, P>(snapshot: &Snapshot<S, P>, copies: &Copies<S>, index: usize) -> bool {
    let source = &snapshot.sources[index];
    snapshot.endpoints[index].flags() & snapshot.unavailable == 0
        && !copies.is_dead(source.slot, source.id)
}

/// Polls endpoint `index` for readiness through this clone's copy of its service. A failed
/// endpoint is counted, never polled or called by this clone again, and reported to the
/// discovery task; a pending one sets `tainted`.
#[inline(always)]
fn poll_endpoint<S, P, Req>(
    snapshot: &Snapshot<S, P>,
    copies: &mut Copies<S>,
    tainted: &mut bool,
    index: usize,
    cx: &mut Context<'_>,
    messages: &mpsc::UnboundedSender<Message>,
) -> Poll<bool>
where
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
{
    let handle = &snapshot.endpoints[index];
    let source = &snapshot.sources[index];
    if handle.flags() & snapshot.unavailable != 0 || !handle.serves(source.id) {
        return Poll::Ready(false);
    }
    let copy = copies.get_or_copy(source, index, snapshot.members.len());
    let Some(service) = copy.service.as_mut() else {
        return Poll::Ready(false);
    };
    match service.poll_ready(cx) {
        Poll::Ready(Ok(())) => Poll::Ready(true),
        Poll::Pending => {
            // Its readiness may now hold a place in a queue: see [`Local::tainted`].
            *tainted = true;
            Poll::Pending
        }
        Poll::Ready(Err(error)) => {
            let error: BoxError = error.into();
            tracing::debug!(%error, "endpoint failed poll_ready");
            copy.service = None;
            handle.record_failure();
            let _ = messages.send(Message::Failed {
                handle: handle.clone(),
                id: source.id,
            });
            Poll::Ready(false)
        }
    }
}

/// A clone's copy of one endpoint's service.
struct Copy<S> {
    slot: u32,
    /// Where its service was in the table it was made from: where to give it back.
    index: u32,
    /// The service's id ([`Source::id`]); 0 for an empty entry.
    id: u64,
    /// `None` once it failed `poll_ready` in this clone: it is never polled or called again.
    service: Option<S>,
}

impl<S> Copy<S> {
    const EMPTY: Self = Self {
        slot: 0,
        index: 0,
        id: 0,
        service: None,
    };

    /// A copy of `source` (at `index` in its table): its spare, or a clone of its service.
    fn of(source: &Source<S>, index: usize) -> Self
    where
        S: Clone,
    {
        Self {
            slot: source.slot,
            index: index as u32,
            id: source.id,
            service: Some(source.service.copy()),
        }
    }

    fn is(&self, slot: u32, id: u64) -> bool {
        self.id == id && self.slot == slot
    }
}

/// A clone's copies of endpoint services, made when it first polls an endpoint: inline at
/// first (no allocation and no work that grows with the number of endpoints), then, once the
/// clone has used more endpoints than fit inline, in a table indexed by slot.
struct Copies<S> {
    few: [Copy<S>; FEW],
    /// Empty until the copies spill here from `few`; then `few` stays empty.
    by_slot: Vec<Copy<S>>,
}

impl<S> Copies<S> {
    #[inline]
    fn new() -> Self {
        Self {
            few: [Copy::EMPTY; FEW],
            by_slot: Vec::new(),
        }
    }

    fn entries(&self) -> &[Copy<S>] {
        if self.by_slot.is_empty() {
            &self.few
        } else {
            &self.by_slot
        }
    }

    fn entries_mut(&mut self) -> &mut [Copy<S>] {
        if self.by_slot.is_empty() {
            &mut self.few
        } else {
            &mut self.by_slot
        }
    }

    fn len(&self) -> usize {
        self.entries().iter().filter(|c| c.id != 0).count()
    }

    /// The copy of service `id` in `slot`, if this clone has it.
    #[inline(always)]
    fn find(&mut self, slot: u32, id: u64) -> Option<&mut Copy<S>> {
        if self.by_slot.is_empty() {
            self.few.iter_mut().find(|c| c.is(slot, id))
        } else {
            self.by_slot.get_mut(slot as usize).filter(|c| c.id == id)
        }
    }

    /// The copy of service `id` in `slot`, if this clone has it and it has not failed.
    #[inline(always)]
    fn live(&mut self, slot: u32, id: u64) -> Option<&mut S> {
        self.find(slot, id)?.service.as_mut()
    }

    /// Whether this clone's copy of service `id` in `slot` failed: O(1), like [`Copies::find`].
    fn is_dead(&self, slot: u32, id: u64) -> bool {
        let copy = if self.by_slot.is_empty() {
            self.few.iter().find(|c| c.is(slot, id))
        } else {
            self.by_slot.get(slot as usize).filter(|c| c.id == id)
        };
        copy.is_some_and(|c| c.service.is_none())
    }

    /// This clone's copy of `source`, made now if it has none (or one of a replaced service).
    /// `slots` is the table's slot count, the size of the by-slot table if one is made.
    #[inline(always)]
    fn get_or_copy(&mut self, source: &Source<S>, index: usize, slots: usize) -> &mut Copy<S>
    where
        S: Clone,
    {
        let slot = source.slot as usize;
        if !self.by_slot.is_empty() {
            if slot < self.by_slot.len() && self.by_slot[slot].id == source.id {
                return &mut self.by_slot[slot];
            }
        } else if let Some(at) = self.few.iter().position(|c| c.is(source.slot, source.id)) {
            return &mut self.few[at];
        }
        self.copy(source, index, slots)
    }

    /// [`Copies::get_or_copy`] when this clone has no copy of `source` yet.
    #[cold]
    #[inline(never)]
    fn copy(&mut self, source: &Source<S>, index: usize, slots: usize) -> &mut Copy<S>
    where
        S: Clone,
    {
        if self.by_slot.is_empty() {
            let few = &self.few;
            let at = few
                .iter()
                .position(|c| c.is(source.slot, source.id))
                .or_else(|| few.iter().position(|c| c.slot == source.slot && c.id != 0))
                .or_else(|| few.iter().position(|c| c.id == 0));
            match at {
                Some(at) => {
                    let entry = &mut self.few[at];
                    if !entry.is(source.slot, source.id) {
                        *entry = Copy::of(source, index);
                    }
                    return entry;
                }
                None => self.spill(slots),
            }
        }
        let slot = source.slot as usize;
        if slot >= self.by_slot.len() {
            self.by_slot
                .resize_with(slots.max(slot + 1), || Copy::EMPTY);
        }
        let entry = &mut self.by_slot[slot];
        if entry.id != source.id {
            *entry = Copy::of(source, index);
        }
        entry
    }

    /// Moves the inline copies to a table indexed by slot.
    #[cold]
    fn spill(&mut self, slots: usize) {
        let len = self
            .few
            .iter()
            .map(|c| c.slot as usize + 1)
            .max()
            .unwrap_or(0)
            .max(slots)
            .max(1);
        self.by_slot.resize_with(len, || Copy::EMPTY);
        for entry in self.few.iter_mut() {
            if entry.id != 0 {
                let slot = entry.slot as usize;
                self.by_slot[slot] = std::mem::replace(entry, Copy::EMPTY);
            }
        }
    }

    /// Drops the copy of service `id` in `slot`, if this clone has it.
    fn invalidate(&mut self, slot: u32, id: u64) {
        if let Some(copy) = self.find(slot, id) {
            *copy = Copy::EMPTY;
        }
    }

    /// Leaves each copy as the spare of its service in the clone's table (`sources`), if it
    /// was made from that table; other copies are dropped. Only for copies whose readiness
    /// is used up (see [`Local::tainted`]).
    fn give_back(&mut self, sources: &[Source<S>]) {
        for entry in self.entries_mut() {
            let Some(source) = sources
                .get(entry.index as usize)
                .filter(|source| entry.is(source.slot, source.id))
            else {
                continue;
            };
            if let Some(service) = entry.service.take() {
                source.service.give_back(service);
            }
        }
    }

    /// Keeps only the copies of services that are members now (`members[slot]` is the id of
    /// the member in `slot`).
    fn retain(&mut self, members: &[u64]) {
        for entry in self.entries_mut() {
            if entry.id != 0 && members.get(entry.slot as usize) != Some(&entry.id) {
                *entry = Copy::EMPTY;
            }
        }
    }
}

#[cfg(all(test, not(tower_lb_loom)))]
mod tests {
    use super::*;

    fn source(slot: u32, id: u64) -> Source<u64> {
        Source {
            service: std::sync::Arc::new(Origin::new(id * 10)),
            slot,
            id,
        }
    }

    #[test]
    fn copies_start_inline_and_spill_by_slot() {
        let mut copies: Copies<u64> = Copies::new();
        assert_eq!(copies.get_or_copy(&source(7, 1), 0, 8).service, Some(10));
        assert_eq!(copies.get_or_copy(&source(3, 2), 0, 8).service, Some(20));
        assert!(copies.by_slot.is_empty());
        // The same copies again: nothing new.
        assert_eq!(copies.get_or_copy(&source(7, 1), 0, 8).service, Some(10));
        assert_eq!(copies.len(), 2);
        // A third endpoint spills to the by-slot table, keeping the first two.
        assert_eq!(copies.get_or_copy(&source(5, 3), 0, 8).service, Some(30));
        assert_eq!(copies.by_slot.len(), 8);
        assert_eq!(copies.len(), 3);
        assert_eq!(copies.live(7, 1).copied(), Some(10));
        assert_eq!(copies.live(3, 2).copied(), Some(20));
        // A slot beyond the table grows it.
        assert_eq!(copies.get_or_copy(&source(12, 4), 0, 8).service, Some(40));
        assert_eq!(copies.len(), 4);
    }

    #[test]
    fn a_replaced_service_is_copied_again() {
        for spilled in [false, true] {
            let mut copies: Copies<u64> = Copies::new();
            if spilled {
                copies.spill(4);
            }
            copies.get_or_copy(&source(1, 1), 0, 4);
            assert_eq!(copies.live(1, 2), None, "another id in the same slot");
            assert_eq!(copies.get_or_copy(&source(1, 2), 0, 4).service, Some(20));
            assert_eq!(copies.live(1, 1), None, "the old copy is gone");
            assert_eq!(copies.len(), 1);
        }
    }

    #[test]
    fn invalidation_and_sweeps_drop_exactly_what_left() {
        for spilled in [false, true] {
            let mut copies: Copies<u64> = Copies::new();
            if spilled {
                copies.spill(4);
            }
            copies.get_or_copy(&source(0, 1), 0, 4);
            copies.get_or_copy(&source(2, 2), 0, 4);
            copies.invalidate(0, 9);
            assert_eq!(copies.len(), 2, "another id: kept");
            copies.invalidate(0, 1);
            assert_eq!(copies.live(0, 1), None);
            assert_eq!(copies.live(2, 2).copied(), Some(20));
            copies.retain(&[0, 0, 3]);
            assert_eq!(copies.len(), 0, "slot 2 now holds service 3");
        }
    }

    #[test]
    fn a_failed_copy_stays_dead_until_its_service_is_replaced() {
        let mut copies: Copies<u64> = Copies::new();
        copies.get_or_copy(&source(0, 1), 0, 1).service = None;
        assert!(copies.is_dead(0, 1));
        assert_eq!(copies.get_or_copy(&source(0, 1), 0, 1).service, None);
        assert!(!copies.is_dead(0, 2));
        assert_eq!(copies.get_or_copy(&source(0, 2), 0, 1).service, Some(20));
    }
}
