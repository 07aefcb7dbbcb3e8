//! Small helpers every part uses: the per-clone random generator and the synchronisation
//! primitives (swapped for loom's under `--cfg tower_lb_loom`).

pub(crate) mod rng;
pub(crate) mod sync;
