//! Reports for people: PNG plots of SAFE's importance scores and freezing pattern.

pub mod plots;
pub mod tensorboard;
