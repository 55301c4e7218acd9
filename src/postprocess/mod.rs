//! Pre- and post-processing around models: image tensors, crops, classes, DB text boxes, CTC text, detector boxes.
//!
//! All of it is pure code on arrays, tested here without a model.

pub mod classify;
pub mod ctc;
pub mod detect;
pub mod image;
pub mod text_detect;
