//! Whole training checkpoints. PLACEHOLDER: being implemented.
