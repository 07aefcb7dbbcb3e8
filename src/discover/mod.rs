//! Ready-made endpoint sources: each is a [`tower::discover::Discover`] stream.
//!
//! - [`fixed`]: a list known up front.
//! - [`channel`]: a [`DiscoverHandle`] that inserts and removes endpoints at run time.
//!
//! Any other `Discover` works too: a balancer accepts any stream of
//! [`Change`](tower::discover::Change)s.

mod channel;
mod fixed;

pub use channel::{channel, ChannelDiscover, DiscoverHandle};
pub use fixed::{fixed, Fixed};
