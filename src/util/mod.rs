//! Small helpers every part uses: the per-clone random generator, the place where clones
//! leave spare service copies, and the synchronisation primitives (swapped for loom's under `--cfg tower_lb_loom`).

pub(crate) mod rng;
#[allow(unsafe_code)]
pub(crate) mod spare;
pub(crate) mod sync;
