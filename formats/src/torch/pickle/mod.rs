//! Python pickles, as torch uses them: a weights-only reader ([`load`]) that never
//! executes anything, and a protocol-2 writer for object trees with tensor leaves.
//!
//! ```
//! use kiln_formats::torch::pickle::{self, Value};
//! // {'lr': 0.001} as protocol 2
//! let bytes = b"\x80\x02}q\x00X\x02\x00\x00\x00lrq\x01G?PbM\xd2\xf1\xa9\xfcs.";
//! let v = pickle::load(bytes)?;
//! assert_eq!(v.get("lr"), Some(&Value::Float(0.001)));
//! // and a refusal: os.system is never resolved, let alone called
//! let evil = b"\x80\x02cos\nsystem\nX\x02\x00\x00\x00ls\x85R.";
//! assert!(matches!(pickle::load(evil), Err(kiln_formats::Error::Forbidden(_))));
//! # Ok::<(), kiln_formats::Error>(())
//! ```

mod allowlist;
mod ops;
mod read;
mod rebuild;
mod text;
mod tree;
mod value;
mod write;

pub use read::{Limits, load, load_with_limits};
pub use value::{StorageRef, TensorRef, Value, contiguous_strides};
pub use write::dump;

pub(crate) use write::pickle_tree;
