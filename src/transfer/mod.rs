//! End-task-aware training (Dery, "On Resource Efficient Transfer Learning", CMU-CS-24-136):
//! an end task trained together with auxiliary objectives on a shared body, each objective
//! weighted by how much it helps the end task.
//!
//! - [`tartan`]: TARTAN (Dery, Michel, Talwalkar, Neubig 2021, arXiv 2109.07437): fixed weights
//!   (MT-TARTAN) or weights learned by the dev-head meta-gradient (META-TARTAN), the negative
//!   cosine between each objective's gradient on the body and the end task's dev gradient.
//! - [`aang`]: AANG (Dery et al. 2022, arXiv 2205.14082): a space of auxiliary objectives built
//!   from stages (input, transform, representation, output), with illegal combinations
//!   excluded, weighted by factored per-stage weights learned by the same meta-gradient.

pub mod aang;
pub mod tartan;

pub use aang::{ObjectiveSpace, Stage};
pub use tartan::{TaskWeights, cosine, flat_gradient, meta_gradients};
