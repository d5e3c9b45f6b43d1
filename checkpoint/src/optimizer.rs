//! Optimizer state by parameter name. PLACEHOLDER: being implemented.
